"""Extract and run the code blocks of the documentation (README.md, docs/**/*.md, the model card).

Rules (tests/test_doc_snippets.py enforces them):

* Every fenced block declares its language: ```python, ```bash or ```text.
* ```python blocks run. The python blocks of one page run in order in one namespace, so a page
  reads as one session: a block may use names an earlier block of the same page defined.
* ```bash blocks are not run (they are `make` / `pip` / `git` commands; CI runs `make test`
  itself), but every `make TARGET` they name must be a Makefile target and every
  `bench/*.py`, `scripts/*.py` or `tests/*.py` path they name must exist.
* ```text blocks (diagrams, sample output) are not code.
* A python block may be preceded, on the line right above its fence, by one marker comment:

      <!-- snippet: substitute `OLD` -> `NEW`, `OLD2` -> `NEW2` (why) -->
          runs the block with each OLD replaced by NEW, e.g. an 8B hub checkpoint on a GPU by the
          embedded model on the CPU. Every OLD must occur in the block, so a marker cannot go stale.
      <!-- snippet: skip (why) -->
          does not run the block (pseudo-code, an excerpt with elisions). The reason is required
          and every skip is listed by the test, so nothing is skipped silently.

  Any other `<!-- snippet` comment, or a marker that is not right above a python fence, is an error.

Snippets run in a fresh temporary folder that links the repository's top-level entries, so paths
read as from a clone (`tests/fixtures/...`) and files a snippet writes (`save_pretrained("x")`)
are thrown away with the folder.
"""

from __future__ import annotations

import os
import re
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
LANGUAGES = {"python", "bash", "text"}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*snippet\b(?P<body>.*?)-->\s*$")
_SKIP = re.compile(r"^:\s*skip\s*\((?P<reason>[^()]*\S[^()]*)\)\s*$")
_SUBSTITUTE = re.compile(r"^:\s*substitute\s+(?P<pairs>.+?)\s*\((?P<reason>[^()]*\S[^()]*)\)\s*$")
_PAIR = re.compile(r"`(?P<old>[^`]+)`\s*->\s*`(?P<new>[^`]*)`")


def documentation_pages(root: Path = ROOT) -> list[Path]:
    """README.md, every page under docs/ (API pages included) and the embedded models' cards,
    which the site copies in (`model_card.md`, `model_card_moe.md`: scripts/docs_hooks.py)."""
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md")),
             *sorted((root / "diffusion_lens" / "pretrained").glob("*/README.md"))]
    return [p for p in pages if p.is_file()]


def page_id(path: Path, root: Path = ROOT) -> str:
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return path.name


class SnippetSyntaxError(ValueError):
    """A markdown page breaks the snippet rules (unknown language, bad or stray marker)."""


@dataclass
class Block:
    page: str
    path: Path
    line: int                     # 1-based line of the first code line
    language: str
    source: str
    index: int = 0                # 1-based among the page's python blocks (0 for other languages)
    skip: Optional[str] = None    # reason
    substitutions: list[tuple[str, str]] = field(default_factory=list)
    substitute_reason: Optional[str] = None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.index}"

    @property
    def kind(self) -> str:
        return "skip" if self.skip else "substitute" if self.substitutions else "run"

    def runnable_source(self) -> str:
        """The source with the marker's substitutions applied; each OLD must occur."""
        text = self.source
        for old, new in self.substitutions:
            if old not in text:
                raise SnippetSyntaxError(f"{self.page} line {self.line}: the snippet marker substitutes "
                                         f"`{old}`, which the block does not contain (stale marker)")
            text = text.replace(old, new)
        if text.count("\n") != self.source.count("\n"):
            raise SnippetSyntaxError(f"{self.page} line {self.line}: a substitution may not add or remove lines")
        return text


def _parse_marker(body: str, where: str) -> tuple[Optional[str], list[tuple[str, str]], Optional[str]]:
    if m := _SKIP.match(body):
        return m["reason"].strip(), [], None
    if m := _SUBSTITUTE.match(body):
        pairs = [(p["old"], p["new"]) for p in _PAIR.finditer(m["pairs"])]
        leftover = _PAIR.sub("", m["pairs"]).replace(",", "").strip()
        if pairs and not leftover:
            return None, pairs, m["reason"].strip()
    raise SnippetSyntaxError(f"{where}: cannot read the snippet marker `<!-- snippet{body}-->`; write "
                             "`<!-- snippet: skip (why) -->` or "
                             "`<!-- snippet: substitute `OLD` -> `NEW`, ... (why) -->`")


def extract(path: Path, root: Path = ROOT) -> list[Block]:
    """Every fenced block of a page, with its marker. Raises SnippetSyntaxError on a rule break."""
    page = page_id(path, root)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: Optional[tuple[int, str]] = None    # (line, body) of a marker waiting for its fence
    n_python = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := _MARKER.match(line):
            if pending:
                raise SnippetSyntaxError(f"{page} line {pending[0]}: snippet marker not followed by a python block")
            pending = (i + 1, m["body"])
            i += 1
            continue
        if re.search(r"<!--\s*snippet", re.sub(r"`[^`]*`", "", line)):   # (a mention in `code` is prose)
            raise SnippetSyntaxError(f"{page} line {i + 1}: a snippet marker must be a comment on a line of its own")
        fence = _FENCE.match(line)
        if not fence:
            if pending and line.strip():
                raise SnippetSyntaxError(f"{page} line {pending[0]}: snippet marker not right above a python block")
            i += 1
            continue
        indent, ticks, language = fence["indent"], fence["fence"], fence["info"].strip().split(" ")[0].lower()
        start = i + 1
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{ticks}`*\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i >= len(lines):
            raise SnippetSyntaxError(f"{page} line {start}: unclosed code fence")
        i += 1
        if language not in LANGUAGES:
            raise SnippetSyntaxError(f"{page} line {start}: fenced block with language {language or '(none)'!r}; "
                                     f"declare one of {sorted(LANGUAGES)} (python blocks run, see tests/_snippets.py)")
        block = Block(page, path, start + 1, language, "\n".join(body) + "\n")
        if language == "python":
            n_python += 1
            block.index = n_python
        if pending:
            if language != "python":
                raise SnippetSyntaxError(f"{page} line {pending[0]}: snippet marker above a {language} block; "
                                         "only python blocks run")
            block.skip, block.substitutions, block.substitute_reason = _parse_marker(
                pending[1], f"{page} line {pending[0]}")
            pending = None
        blocks.append(block)
    if pending:
        raise SnippetSyntaxError(f"{page} line {pending[0]}: snippet marker not followed by a python block")
    return blocks


def python_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    return [b for b in extract(path, root) if b.language == "python"]


# ---------------------------------------------------------------------------------------------- bash
_MAKE = re.compile(r"(?:^|[;&|]\s*|\s)make\s+(?P<target>[A-Za-z][\w-]*)")
_SCRIPT = re.compile(r"(?<![\w/.])(?P<path>(?:bench|scripts|tests)/[\w/.-]+\.py)\b")


def makefile_targets(root: Path = ROOT) -> set[str]:
    text = (root / "Makefile").read_text()
    return {t for line in text.splitlines() if (m := re.match(r"^([A-Za-z][\w.-]*(?:\s+[A-Za-z][\w.-]*)*)\s*:(?!=)", line))
            for t in m[1].split()}


def bash_problems(block: Block, root: Path = ROOT) -> list[str]:
    """What a bash block names that does not exist: make targets, scripts in the repository."""
    targets = makefile_targets(root)
    problems = []
    for n, line in enumerate(block.source.splitlines()):
        code = line.split("#", 1)[0]
        for m in _MAKE.finditer(code):
            if m["target"] not in targets:
                problems.append(f"{block.page} line {block.line + n}: `make {m['target']}` is not a Makefile target")
        for m in _SCRIPT.finditer(code):
            if not (root / m["path"]).is_file():
                problems.append(f"{block.page} line {block.line + n}: {m['path']} does not exist")
    return problems


# ---------------------------------------------------------------------------------------------- running
class SnippetFailure(AssertionError):
    pass


def link_clone(tmp: Path, root: Path = ROOT) -> Path:
    """Fill `tmp` with links to the repository's top-level entries (hidden ones excepted)."""
    for entry in root.iterdir():
        if not entry.name.startswith("."):
            (tmp / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return tmp


@contextmanager
def working_directory(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def run_block(block: Block, namespace: dict) -> None:
    """exec the block in the page's namespace; line numbers in a traceback are the markdown's."""
    source = "\n" * (block.line - 1) + block.runnable_source()
    try:
        exec(compile(source, str(block.path), "exec"), namespace)
    except Exception as exc:  # reported with the page, the block and the markdown line
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
        what = f"{block.id} (line {block.line}" + (", substituted" if block.substitutions else "") + ")"
        raise SnippetFailure(f"documentation snippet {what} failed:\n{tb}") from exc


class PageSession:
    """The python blocks of one page, run in order in one namespace, each at most once.

    `run_through(k)` runs the blocks up to k that have not run yet (so a test of block k selected
    alone still runs the page's earlier blocks first) and fails if block k, or an earlier block it
    may depend on, failed.
    """

    def __init__(self, path: Path, tmp: Path, root: Path = ROOT):
        self.blocks = python_blocks(path, root)
        self.folder = link_clone(tmp, root)
        self.namespace: dict = {"__name__": "__doc_snippet__"}
        self.done = 0
        self.errors: dict[int, SnippetFailure] = {}

    def run_through(self, index: int) -> Block:
        with working_directory(self.folder):
            while self.done < index:
                block = self.blocks[self.done]
                self.done += 1
                if block.skip or self.errors:
                    continue
                try:
                    run_block(block, self.namespace)
                except SnippetFailure as exc:
                    self.errors[block.index] = exc
        target = self.blocks[index - 1]
        if index in self.errors:
            raise self.errors[index]
        earlier = [i for i in self.errors if i < index]
        if earlier:
            raise SnippetFailure(f"{target.id} not run: block {self.blocks[earlier[0] - 1].id} of the same "
                                 "page failed first")
        return target
