"""Issue 11 (item 6): the studies (`diffusion_lens.studies`: the paper's refusal study, cross-lingual
transfer, the toy model's data and trainer) sit outside the library core and use only its public
API, so whatever they need is reachable by users too. Complements the import-linter contract
"studies-public" (pyproject.toml), which sees modules but not the names imported from them."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[1] / "diffusion_lens" / "studies"
PUBLIC_PACKAGES = {
    "diffusion_lens", "diffusion_lens.abliterate", "diffusion_lens.checkpoints", "diffusion_lens.denoising",
    "diffusion_lens.evals", "diffusion_lens.plot", "diffusion_lens.prompts", "diffusion_lens.steering",
}


def private_imports(source: str) -> list[str]:
    """The imports of `source` that reach past the public API: a module inside a package, an
    underscore name, or a name missing from its package's `__all__` (public packages may also be
    imported as modules: `from diffusion_lens import plot`)."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            problems += [alias.name for alias in node.names
                         if alias.name.startswith("diffusion_lens") and not _allowed_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("diffusion_lens")):
            module = node.module or ""
            if node.level or not _allowed_module(module):
                problems.append(f"from {'.' * node.level}{module} import ...")
            elif not module.startswith("diffusion_lens.studies"):
                public = set(importlib.import_module(module).__all__)
                problems += [f"from {module} import {alias.name}" for alias in node.names
                             if alias.name not in public and f"{module}.{alias.name}" not in PUBLIC_PACKAGES]
    return problems


def _allowed_module(module: str) -> bool:
    return module in PUBLIC_PACKAGES or module == "diffusion_lens.studies" or module.startswith("diffusion_lens.studies.")


@pytest.mark.parametrize("path", sorted(STUDIES.rglob("*.py")), ids=lambda p: str(p.relative_to(STUDIES)))
def test_studies_import_only_public_names(path):
    assert private_imports(path.read_text()) == []


def test_the_check_catches_what_the_studies_imported_before_the_move():
    old = """
from diffusion_lens.steering.selection import select_direction
from diffusion_lens.model import HookedDiffusionTransformer
from diffusion_lens.steering import ablate, _common
from diffusion_lens.evals import masked_kl
from .data import corpus
import diffusion_lens.core.config
"""
    assert private_imports(old) == [
        "from diffusion_lens.steering.selection import ...", "from diffusion_lens.model import ...",
        "from diffusion_lens.steering import _common", "from .data import ...", "diffusion_lens.core.config",
    ]


def test_the_moved_names_live_in_the_studies_and_not_in_the_core():
    from diffusion_lens import evals, studies

    assert "cross_lingual_transfer" in studies.__all__ and "cross_lingual_transfer" not in evals.__all__
    for gone in ("diffusion_lens.demo", "diffusion_lens.toy", "diffusion_lens.evals.crosslingual"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)


def test_the_cli_and_the_trainer_still_run_from_their_new_homes():
    runs = {module: subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
            for module in ("diffusion_lens", "diffusion_lens.studies.tiny_refusal.train")}
    assert all(run.returncode == 0 for run in runs.values()), {m: run.stderr for m, run in runs.items()}
    assert "demo" in runs["diffusion_lens"].stdout and "--out" in runs["diffusion_lens.studies.tiny_refusal.train"].stdout
