"""Issue 11 item 5: the jaxtyping annotations are checked (under beartype) while the tests run.

`tests/conftest.py` installs jaxtyping's import hook for `diffusion_lens` and `model_adapters`
before anything imports them. Each test here calls a public annotated function with a tensor that
contradicts its documented shape or dtype; every one of them would pass silently (or fail later,
elsewhere) if the hook were off.
"""

import pytest
import torch
from jaxtyping import TypeCheckError

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.core.components.norm import RMSNorm
from diffusion_lens.steering._common import orthonormal_rows, unit
from tests.conftest import FIXTURES


def test_the_import_hook_instrumented_the_package():
    # The hook wraps each function in `jaxtyped`, which records the original on `__wrapped__`.
    assert hasattr(RMSNorm.forward, "__wrapped__")
    assert hasattr(HookedDiffusionTransformer.token_logits, "__wrapped__")


def test_wrong_dtype_is_rejected():
    norm = RMSNorm(4, 1e-5)
    assert norm(torch.ones(2, 3, 4)).shape == (2, 3, 4)
    with pytest.raises(TypeCheckError, match="Float"):
        norm(torch.ones(2, 3, 4, dtype=torch.long))  # RMSNorm.forward takes Float[Tensor, "... d"]


def test_wrong_rank_is_rejected():
    assert unit(torch.ones(3)).shape == (3,)
    with pytest.raises(TypeCheckError):
        unit(torch.ones(2, 3))  # Float[Tensor, " d"]: a vector, not a matrix
    with pytest.raises(TypeCheckError):
        orthonormal_rows(torch.ones(3))  # Float[Tensor, "k d"]: rows of a matrix


def test_dimension_names_bind_across_arguments():
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    tokens = torch.full((2, 5), model.cfg.mask_token_id)
    logits = torch.zeros(2, 5, model.cfg.d_vocab_out)
    assert model.masked_diffusion_loss(logits, tokens, torch.zeros(2, 5, dtype=torch.long)).shape == ()
    # `batch pos` is bound by `logits` first; a `tokens` of another length contradicts it.
    with pytest.raises(TypeCheckError, match="pos"):
        model.masked_diffusion_loss(logits, tokens[:, :4], torch.zeros(2, 4, dtype=torch.long))


def test_the_forward_itself_is_checked():
    # `forward` takes text or tokens and explains a bad input itself, so it is exempt; the body it
    # delegates to (`_logits`: tokens [batch pos] -> logits [batch pos d_vocab]) is checked.
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    tokens = torch.full((2, 5), model.cfg.mask_token_id)
    assert model(tokens).shape == (2, 5, model.cfg.d_vocab_out)
    assert hasattr(type(model)._logits, "__wrapped__")
    model.ln_final.forward = lambda x: x[:, :-1]  # a component that drops a position
    with pytest.raises(TypeCheckError, match="pos"):
        model(tokens)
