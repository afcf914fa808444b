"""Architecture figures for the closing notes: import cycles, function-level internal imports, lines per folder.

    python scripts/arch_stats.py            # prints the figures
    python scripts/arch_stats.py --list     # also lists each function-level internal import

Reads the source with `ast` (nothing is imported). An import counts as internal when it names
`diffusion_lens` or `model_adapters`; a cycle is a strongly connected component of more than one
module in the graph of all internal imports (module level and function level alike).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("diffusion_lens", "model_adapters")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(modules: set[str], name: str) -> str | None:
    """The longest known module that `name` (a module or `module.attribute`) lives in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(tree: ast.Module, here: str, is_pkg: bool, typing_too: bool) -> list[tuple[str, bool, int]]:
    """(imported name, inside a function?, line) for each internal import; `typing_too` adds the
    imports under `if TYPE_CHECKING:`, which never run but still tie the modules together."""
    found = []
    base = here if is_pkg else here.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = base
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    mod = f"{anchor}.{child.module}" if child.module else anchor
                else:
                    mod = child.module or ""
                found.extend((f"{mod}.{a.name}", in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.If) and _is_type_checking(child.test) and not typing_too:
                continue
            visit(child, inner)

    visit(tree, False)
    return [f for f in found if f[0].split(".")[0] in PACKAGES]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            connect(v)
    return out


def graph_of(files: dict[str, Path], typing_too: bool) -> tuple[dict[str, set[str]], list[str]]:
    """The internal import graph and the function-level imports ("file:line -> module")."""
    graph: dict[str, set[str]] = defaultdict(set)
    lazy = set()
    for mod, path in sorted(files.items()):
        graph[mod]
        for name, in_function, line in imports(ast.parse(path.read_text()), mod, path.name == "__init__.py", typing_too):
            target = resolve(set(files), name)
            if target is None or target == mod:
                continue
            graph[mod].add(target)
            if in_function:
                lazy.add(f"{path.relative_to(ROOT)}:{line} -> {target}")
    return graph, sorted(lazy)


def main() -> None:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    print(f"modules: {len(files)}")
    for typing_too in (False, True):
        graph, lazy = graph_of(files, typing_too)
        cycles = [c for c in strongly_connected(graph) if len(c) > 1]
        label = "all imports, TYPE_CHECKING ones included" if typing_too else "imports that run"
        print(f"import cycles, {label} (SCCs > 1 module): {len(cycles)}" + "".join(
            f"\n  {len(c)} modules: {', '.join(c)}" for c in cycles))
    print(f"function-level internal imports (statements): {len(lazy)}")
    if "--list" in sys.argv:
        print("".join(f"  {entry}\n" for entry in lazy), end="")
    print("lines per top-level folder (*.py / *.md / *.ipynb):")
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and p.name not in {"site", "bench_out"} and not p.name.endswith(".egg-info")):
        n = sum(len(f.read_text(errors="replace").splitlines()) for ext in ("py", "md", "ipynb")
                for f in folder.rglob(f"*.{ext}") if "fixtures" not in f.parts and "pretrained" not in f.parts)
        print(f"  {folder.name + '/':<18}{n:>7}")


if __name__ == "__main__":
    main()
