"""Strip outputs from notebooks before they are committed (`make notebooks-clean`).

    python scripts/strip_notebooks.py tutorials/*.ipynb     # rewrite in place
    python scripts/strip_notebooks.py --check tutorials/*.ipynb   # exit 1 if any has outputs

Why the tutorials are committed without outputs: CI executes every notebook from scratch
(`make docs`, run by `make test`, executes them into the documentation site), so stored outputs
could only ever be stale copies of what the code printed once, and they would bloat every diff with
images. Read them executed on the site, or run `make notebooks` to execute them in place, and strip
them again before a commit.
"""

from __future__ import annotations

import argparse
import sys

import nbformat


def strip(nb) -> bool:
    """Remove outputs, execution counts and per-cell execution metadata; True if anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            cell.outputs = []
            changed = True
        if cell.get("execution_count") is not None:
            cell.execution_count = None
            changed = True
        for key in ("execution", "collapsed", "scrolled"):
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    for key in ("widgets",):
        if key in nb.metadata:
            del nb.metadata[key]
            changed = True
    language = nb.metadata.get("language_info")
    if language and set(language) != {"name"}:  # the kernel's version details: noise in a diff
        nb.metadata["language_info"] = {"name": language.get("name", "python")}
        changed = True
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--check", action="store_true", help="only report notebooks that have outputs")
    args = parser.parse_args(argv)
    dirty = []
    for path in args.paths:
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    if args.check and dirty:
        print("notebooks with outputs (run `make notebooks-clean`):", *dirty, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
