import os
import sys
import typing

# Shape checks: every function and dataclass in the package is wrapped in
# `jaxtyped(typechecker=beartype)` while the tests run, so the jaxtyping annotations
# (`Float[Tensor, "batch pos d_model"]`, ...) are verified at each call, with dimension names
# bound consistently across a call's arguments and return value. The hook only instruments
# modules imported after it is installed, so it must run before anything imports the package;
# pytest loads this file before any test module. (Notebooks run in their own kernels and the docs
# build imports the package plainly: neither is checked.)
#
# Only the array annotations are handed to beartype (`shape_checked` below): the other hints
# (`Literal["origin", ...]`, `int`, `Optional[str]`) are validated by the library itself, which
# answers a wrong option with a sentence that the tests pin; a type checker in front of it would
# replace that sentence with its own error.
import jaxtyping

_CHECKED = ("diffusion_lens", "model_adapters")


def _holds_array(hint) -> bool:
    if isinstance(hint, type) and issubclass(hint, jaxtyping.AbstractArray):
        return True
    return any(_holds_array(arg) for arg in typing.get_args(hint))


def shape_checked(fn):
    """beartype over the jaxtyping annotations of `fn` only (the typechecker the hook applies).

    jaxtyping hands the typechecker a stand-in function it builds from the real signature, so
    dropping the other annotations here leaves the library's own functions untouched."""
    import beartype

    annotations = getattr(fn, "__annotations__", {})
    for name in [name for name, hint in annotations.items() if not _holds_array(hint)]:
        del annotations[name]
    return beartype.beartype(fn)


# Public entry points that validate their own input and answer a wrong one with a sentence (the
# model's forward, `ablate`, `orthogonalize_weights`, `count_left_masked`, ...) carry
# `@typing.no_type_check`, which the hook honours: the sentence is their contract; what they call
# is still checked. Measured cost: the suite takes about a third longer with the checks on (2m36s
# against 1m58s on a quiet 2-core machine), well inside CI's budget, so nothing else is excluded.
# `DIFFUSION_LENS_SHAPE_CHECKS=0` switches them off (e.g. to time the suite without them).
if os.environ.get("DIFFUSION_LENS_SHAPE_CHECKS", "1") != "0":
    _already = sorted(m for m in _CHECKED if m in sys.modules)
    if _already:  # pragma: no cover - a plugin imported the package first
        raise RuntimeError(f"shape checks cannot instrument already imported packages: {_already}")
    jaxtyping.install_import_hook(list(_CHECKED), "tests.conftest.shape_checked")

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Under pytest-xdist (`make test` runs two workers, one per core of the CI machine) each worker
# computes with one thread, so two workers do not fight over the cores; alone, two threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def pytest_configure(config):
    # beartype warns, once per decorated function, that `typing.Sequence[...]`-style hints are
    # deprecated by PEP 585; that is a style note about the annotations, not a shape violation.
    config.addinivalue_line("filterwarnings", "ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")
