"""Issue 10 (item 4): every python code block of the documentation runs, so the docs cannot rot.

Pages: README.md, docs/**/*.md (the API pages too) and the embedded model's card (the site's
`model_card.md`). The rules and the marker syntax are in tests/_snippets.py; in short:

* the python blocks of a page run in order in one namespace (one test per block, id
  `docs/concepts.md:2` = the page's second python block), in a scratch folder that links the
  repository, so relative paths work and written files are discarded;
* a block that needs an 8B hub checkpoint or a GPU carries a visible
  `<!-- snippet: substitute `OLD` -> `NEW` (why) -->` marker and runs on the embedded
  `tiny-refusal` model on the CPU instead; pseudo-code carries `<!-- snippet: skip (why) -->`;
  an unmarked block that fails is a test failure, and the skips are listed below, so a new skip
  is a deliberate edit here;
* ```bash blocks are NOT executed (README's `make demo` / `make test`, pip and git commands: CI
  runs `make test` itself); the `make` targets and repository scripts they name must exist.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests import _snippets as S

PAGES = S.documentation_pages()
BLOCKS = [b for page in PAGES for b in S.python_blocks(page)]

# Every skipped block, by id: adding a skip means adding it here too (nothing is skipped silently).
EXPECTED_SKIPS = {
    "docs/adding_a_model.md:1",   # an excerpt of model_adapters/dream.py with `...` elisions
    "docs/adding_a_model.md:3",   # the shape of Sampler.run with `...` elisions
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """A snippet never reaches the hub (CI has no network; a hub id needs a substitute marker)."""
    import huggingface_hub

    def refuse(repo_id, *args, **kwargs):
        raise RuntimeError(f"a documentation snippet tried to download {repo_id!r} from the hub; give the "
                           "block a `<!-- snippet: substitute ... -->` marker (see tests/_snippets.py)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """One PageSession per page, shared by that page's block tests (blocks build on each other)."""
    cache: dict[str, S.PageSession] = {}

    def get(block: S.Block) -> S.PageSession:
        if block.page not in cache:
            cache[block.page] = S.PageSession(block.path, tmp_path_factory.mktemp("snippets"))
        return cache[block.page]

    return get


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_documentation_snippet_runs(block, sessions):
    if block.skip:
        pytest.skip(f"marked `snippet: skip` ({block.skip})")
    try:
        sessions(block).run_through(block.index)
    except S.SnippetFailure as exc:
        pytest.fail(str(exc), pytrace=False)   # the snippet's own traceback, in markdown lines


def _rule_problems(expected_skips: set[str]) -> list[str]:
    """Fences declare python/bash/text, markers parse and sit on python blocks (extract raises
    otherwise), substitutions match, and the skipped blocks are exactly `expected_skips`."""
    python = [b for page in PAGES for b in S.python_blocks(page)]
    for b in python:
        b.runnable_source()                                      # raises on a stale substitution
    skipped = {b.id for b in python if b.skip}
    return ([f"{i}: skipped but not listed in EXPECTED_SKIPS" for i in sorted(skipped - expected_skips)]
            + [f"{i}: listed in EXPECTED_SKIPS but not skipped" for i in sorted(expected_skips - skipped)])


def test_every_page_follows_the_snippet_rules_and_the_skips_are_the_listed_ones():
    problems = _rule_problems(EXPECTED_SKIPS)
    assert not problems, "\n".join(problems)
    counts = {kind: sum(b.kind == kind for b in BLOCKS) for kind in ("run", "substitute", "skip")}
    print(f"documentation python blocks: {counts}")
    assert counts["run"] + counts["substitute"] >= 8, "documentation blocks went missing"


def test_bash_blocks_name_existing_make_targets_and_scripts():
    """bash blocks are not run; what they name must exist (a renamed target or bench breaks this)."""
    problems = [p for page in PAGES for b in S.extract(page) if b.language == "bash" for p in S.bash_problems(b)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- meta
def _page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(textwrap.dedent(text))
    return path


def _run_page(path: Path, tmp_path: Path) -> S.PageSession:
    folder = tmp_path / "scratch"
    folder.mkdir()
    session = S.PageSession(path, folder)
    for block in session.blocks:
        if not block.skip:
            session.run_through(block.index)
    return session


def test_meta_a_broken_snippet_fails_naming_the_page_block_and_line(tmp_path):
    path = _page(tmp_path, """\
        # Page

        ```python
        x = 1
        ```

        prose

        ```python
        y = x + undefined_name
        ```
        """)
    with pytest.raises(S.SnippetFailure, match=r"page.md:2 \(line 10\)[\s\S]*NameError: name 'undefined_name'"):
        _run_page(path, tmp_path)


def test_meta_blocks_of_a_page_share_a_namespace_and_a_failure_stops_the_page(tmp_path):
    path = _page(tmp_path, """\
        ```python
        x = 41
        ```
        ```python
        assert x + 1 == 42
        raise RuntimeError("boom")
        ```
        ```python
        z = 3
        ```
        """)
    folder = tmp_path / "scratch"
    folder.mkdir()
    session = S.PageSession(path, folder)
    assert session.run_through(1).index == 1
    with pytest.raises(S.SnippetFailure, match="RuntimeError: boom"):
        session.run_through(2)
    with pytest.raises(S.SnippetFailure, match="page.md:3 not run: block page.md:2 of the same page failed"):
        session.run_through(3)
    assert "z" not in session.namespace and session.namespace["x"] == 41


def test_meta_substitution_applies_and_a_stale_one_is_refused(tmp_path):
    path = _page(tmp_path, """\
        <!-- snippet: substitute `"big/hub-model"` -> `"small"`, `"cuda"` -> `"cpu"` (a GPU checkpoint) -->
        ```python
        name, device = "big/hub-model", "cuda"
        assert (name, device) == ("small", "cpu")
        ```
        """)
    session = _run_page(path, tmp_path)
    assert session.blocks[0].kind == "substitute"
    stale = _page(tmp_path, """\
        <!-- snippet: substitute `"gone"` -> `"small"` (a GPU checkpoint) -->
        ```python
        name = "big/hub-model"
        ```
        """)
    with pytest.raises(S.SnippetSyntaxError, match="stale marker"):
        S.python_blocks(stale)[0].runnable_source()


def test_meta_skips_need_a_reason_and_markers_must_sit_on_a_python_block(tmp_path):
    bad = {
        "no reason": "<!-- snippet: skip -->\n```python\nx\n```\n",
        "empty reason": "<!-- snippet: skip () -->\n```python\nx\n```\n",
        "unknown directive": "<!-- snippet: ignore (why) -->\n```python\nx\n```\n",
        "on a bash block": "<!-- snippet: skip (why) -->\n```bash\nls\n```\n",
        "not right above": "<!-- snippet: skip (why) -->\nprose\n```python\nx\n```\n",
        "dangling": "text\n<!-- snippet: skip (why) -->\n",
        "inside a line": "text <!-- snippet: skip (why) -->\n```python\nx\n```\n",
        "untagged fence": "```\nx = 1\n```\n",
        "unknown language": "```py\nx = 1\n```\n",
        "unclosed fence": "```python\nx = 1\n",
    }
    for what, text in bad.items():
        path = tmp_path / "bad.md"
        path.write_text(text)
        with pytest.raises(S.SnippetSyntaxError):
            S.extract(path)
            pytest.fail(f"{what}: accepted")
    ok = _page(tmp_path, """\
        <!-- snippet: skip (pseudo-code) -->
        ```python
        def f(...): ...
        ```
        """)
    (block,) = S.python_blocks(ok)
    assert block.kind == "skip" and block.skip == "pseudo-code"
    assert _run_page(ok, tmp_path).namespace.keys() == {"__name__"}   # not executed


def test_meta_an_unlisted_skip_fails_the_inventory():
    """A page that gains (or loses) a skip without an edit of EXPECTED_SKIPS fails the inventory."""
    assert _rule_problems(EXPECTED_SKIPS - {"docs/adding_a_model.md:3"}) == [
        "docs/adding_a_model.md:3: skipped but not listed in EXPECTED_SKIPS"]
    assert _rule_problems(EXPECTED_SKIPS | {"README.md:1"}) == [
        "README.md:1: listed in EXPECTED_SKIPS but not skipped"]


def test_meta_a_hub_download_is_refused(tmp_path):
    path = _page(tmp_path, """\
        ```python
        from diffusion_lens import HookedDiffusionTransformer
        HookedDiffusionTransformer.from_pretrained("GSAI-ML/LLaDA-8B-Instruct")
        ```
        """)
    with pytest.raises(S.SnippetFailure, match="tried to download 'GSAI-ML/LLaDA-8B-Instruct'"):
        _run_page(path, tmp_path)


def test_meta_bash_blocks_are_checked_not_run(tmp_path):
    path = _page(tmp_path, """\
        ```bash
        make test         # exists
        make tset         # typo
        .venv/bin/python bench/nope.py
        rm -rf /should/never/run
        ```
        """)
    (block,) = S.extract(path)
    problems = S.bash_problems(block)
    assert len(problems) == 2 and "make tset" in problems[0] and "bench/nope.py" in problems[1]
