"""Issue 15 (item 4): the tutorials are readable on the documentation site, executed, figures included.

The site is built with `mkdocs build --strict` (mkdocs-jupyter executes every notebook in
`tutorials/` while it builds), served on localhost, and each tutorial page is opened in headless
Chromium. A page passes when it loaded (its notebook's title is the heading, no resource failed to
load, nothing was requested from another host: the site must work offline) and it shows at least one
figure: an `<img>` whose PNG decoded (`naturalWidth > 0`) or a rendered plotly `<svg>`.

`make docs` builds `site/` once and runs this file on it (`DIFFUSION_LENS_SITE=site`); without that
variable the test builds its own site in a temporary folder, so it never passes for want of a site:

    .venv/bin/pytest -q tests/test_docs_site.py                            # builds, ~5 min on 2 cores
    DIFFUSION_LENS_SITE=site .venv/bin/pytest -q tests/test_docs_site.py   # checks `make docs`'s site/
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
SITE_ENV = "DIFFUSION_LENS_SITE"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=20000", "--dump-dom",
]

# Injected by the test server at the top of <head> of a probed page (the site itself is unchanged):
# it records every resource that failed to load, and once the page has loaded writes what the
# browser rendered into a <pre id="site-probe"> that `--dump-dom` prints.
PROBE = """<script>
window.__failed = [];
window.addEventListener("error", e => {
  const t = e.target || {};
  window.__failed.push(String(t.src || t.href || e.message).slice(0, 100));
}, true);
window.addEventListener("load", () => setTimeout(() => {
  const body = document.querySelector(".jupyter-wrapper");
  const imgs = body ? [...body.querySelectorAll("img")] : [];
  const report = {
    title: document.title,
    h1: [...document.querySelectorAll("article h1")].map(h => h.textContent.replace("\\u00b6", "").trim()),
    notebook: body !== null,
    outputs: body ? body.querySelectorAll(".jp-OutputArea-output").length : 0,
    png: imgs.filter(i => i.src.startsWith("data:image/png") && i.complete && i.naturalWidth > 0).length,
    broken_img: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 60)),
    plotly_svg: body ? body.querySelectorAll(".js-plotly-plot svg.main-svg").length : 0,
    hosts: [...new Set(performance.getEntriesByType("resource").map(r => new URL(r.name).host))],
    failed: window.__failed,
    download: [...document.querySelectorAll("a[download]")].map(a => a.getAttribute("href")),
  };
  const pre = document.createElement("pre");
  pre.id = "site-probe";
  pre.textContent = JSON.stringify(report);
  document.body.appendChild(pre);
}, 1000));
</script>"""


def _build_site(out: Path) -> Path:
    """`mkdocs build --strict` into `out` (what `make docs` runs), failing the test with its output."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"`mkdocs build --strict` failed (exit {result.returncode}):\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    given = os.environ.get(SITE_ENV)
    if not given:
        return _build_site(tmp_path_factory.mktemp("site"))
    path = (ROOT / given).resolve()
    if not (path / "index.html").is_file():
        pytest.fail(f"{SITE_ENV}={given}: no built site there ({path / 'index.html'} is missing); "
                    f"run `make docs`, or unset {SITE_ENV} to let this test build one")
    return path


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; `?probe` adds PROBE to an HTML page."""

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if query != "probe":
            return super().do_GET()
        file = Path(self.translate_path(path))
        file = file / "index.html" if file.is_dir() else file
        text = file.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1)
        body = text.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest's output to the failures
        pass


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_Handler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("headless Chromium is needed to check the documentation site: "
                    "`apt-get install -y chromium` (Debian; .ci/run installs it when missing)")
    return path


def _open(chromium: str, url: str) -> dict:
    """The probe's report on `url`, rendered by headless Chromium with a fresh profile."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
                                capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="site-probe">(.*?)</pre>', result.stdout, re.S)
    assert match, (f"Chromium printed no probe report for {url} (exit {result.returncode}); "
                   f"stderr tail:\n{result.stderr[-3000:]}")
    return json.loads(html.unescape(match.group(1)))


def _title(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    first = "".join(cells[0]["source"]) if cells and cells[0]["cell_type"] == "markdown" else ""
    heading = re.search(r"^# (.+)$", first, re.M)
    assert heading, f"{notebook.name}: its first cell should be a markdown cell starting with a `# Title`"
    return heading.group(1).strip()


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_page_is_executed_and_shows_a_figure(notebook, site, server, chromium):
    page = site / "tutorials" / notebook.stem / "index.html"
    assert page.is_file(), f"the site has no page for {notebook.name} ({page} is missing)"
    report = _open(chromium, f"{server}/tutorials/{notebook.stem}/?probe")
    title = _title(notebook)
    assert report["h1"] and report["h1"][0] == title, f"heading {report['h1']!r}, expected {title!r}"
    assert report["title"].startswith(title), report["title"]
    assert report["notebook"] and report["outputs"] > 0, "the page shows no executed notebook outputs"
    assert report["failed"] == [], f"resources failed to load: {report['failed']}"
    assert report["hosts"] and set(report["hosts"]) <= {server.removeprefix("http://")}, (
        f"the page fetched from other hosts {report['hosts']}: the site must serve its own assets")
    assert report["broken_img"] == [], f"images that did not decode: {report['broken_img']}"
    assert report["png"] + report["plotly_svg"] >= 1, f"no figure rendered on {notebook.name}'s page: {report}"
    assert report["download"] == [f"../../notebooks/{notebook.name}"], report["download"]


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda p: p.stem)
def test_download_is_the_committed_notebook(notebook, site):
    """The page's download link serves the notebook as committed (no outputs), byte for byte."""
    assert (site / "notebooks" / notebook.name).read_bytes() == notebook.read_bytes()
