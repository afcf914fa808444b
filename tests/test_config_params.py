"""`DiffusionConfig.n_params` equals the parameters of the model the config builds.

On every fixture (both DiffusionGemma layouts: per-layer head dims and kv heads, values from keys,
q/k norms, dense MLP and fused experts in every layer, router scales, sandwich norms,
self-conditioning, tied embeddings; the pre-norm families) and on configs that switch on the
options no fixture has (biases everywhere, a shared expert, an untied head).
"""

from __future__ import annotations

import pytest

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.core.config import DiffusionConfig
from tests.conftest import FIXTURES

CHECKPOINTS = sorted(path.name for path in FIXTURES.iterdir() if (path / "config.json").exists())


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter


def test_every_fixture_is_covered():
    assert {"diffusion-gemma-tiny", "diffusion-gemma-tiny-dense", "dream-tiny", "llada-moe-tiny"} <= set(CHECKPOINTS)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_n_params_counts_every_fixture(name):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / name)
    assert model.cfg.n_params == _count(model)


BASE = dict(d_model=32, n_layers=3, n_heads=4, d_mlp=48, d_vocab=50, n_key_value_heads=2)


@pytest.mark.parametrize("options", [
    dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True, qk_norm=True),
    dict(n_experts=3, n_experts_per_token=2, d_expert_mlp=8, d_shared_expert_mlp=12, moe_layers=(0, 2),
         mlp_bias=True, router_expert_bias=True),
    dict(tie_word_embeddings=True, d_vocab_out=56),
], ids=["biases", "moe-shared-expert", "tied-padded-vocab"])
def test_n_params_counts_options_no_fixture_has(options):
    cfg = DiffusionConfig(**{**BASE, **options})
    assert cfg.n_params == _count(HookedDiffusionTransformer(cfg))
