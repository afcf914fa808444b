"""Fused experts (Gemma-4 layout): the grouped-matmul path equals the per-expert loop bit for bit, and
the loop runs whenever an expert's hook point holds a hook, a gradient is needed or the rows are not
16-byte aligned."""

from __future__ import annotations

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.core.components.gemma4 import FusedExperts
from diffusion_lens.core.config import DiffusionConfig
from tests.conftest import FIXTURES

PROMPT = torch.tensor([[2, 65, 149, 131, 203, 211, 7, 9]])


def _loop_calls(experts: FusedExperts, calls: list):
    original = experts._per_expert

    def counted(*args):
        calls.append(1)
        return original(*args)

    return counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_equals_the_per_expert_loop_exactly(dtype):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "diffusion-gemma-tiny", dtype=dtype)
    experts = model.blocks[0].mlp.experts
    calls = []
    experts._per_expert = _loop_calls(experts, calls)
    with torch.inference_mode():
        grouped = model(PROMPT)
        assert calls == []  # no expert hook: the grouped matmuls ran
        with model.hooks(fwd_hooks=[("blocks.0.mlp.experts.1.hook_post", lambda act, hook: None)]):
            looped = model(PROMPT)
    assert calls == [1]
    assert torch.equal(grouped, looped)


def test_the_loop_runs_for_hooks_caches_and_gradients():
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "diffusion-gemma-tiny")
    experts = model.blocks[1].mlp.experts
    calls = []
    experts._per_expert = _loop_calls(experts, calls)
    _, cache = model.run_with_cache(PROMPT, names_filter=lambda name: name.startswith("blocks.1.mlp.experts."))
    assert calls == [1] and any(name.endswith("hook_out") for name in cache.keys())
    with model.activation_grads():
        model(PROMPT).sum().backward()
    assert calls == [1, 1]


def test_unaligned_rows_take_the_loop():
    """d_model 30 in fp32 is 120 bytes per row, not a multiple of 16: the grouped matmul would refuse it."""
    cfg = DiffusionConfig(d_model=30, n_layers=1, n_heads=3, d_mlp=16, d_vocab=20, d_head=10, block_layout="gemma4",
                          n_experts=3, n_experts_per_token=2, d_expert_mlp=6, layer_scalar_passes=("encoder",),
                          default_pass="encoder")
    experts = FusedExperts(cfg)
    calls = []
    experts._per_expert = _loop_calls(experts, calls)
    x = torch.randn(5, 30)
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8], [1.0, 0.0, 0.0], [0.0, 0.3, 0.7]])
    with torch.no_grad():
        out = experts(x, weights)
    assert calls == [1] and out.shape == (5, 30)
