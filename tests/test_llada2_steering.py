"""Issue 14 item 5: steering on LLaDA2.x equals runtime interventions, token for token.

LLaDA2 is pre-norm, so its residual writers are the attention output (`attn.o_proj`, with its bias in
llada2-tiny-b), the dense MLP's `down_proj` (llada2-tiny's layer 0), every routed expert's and the
shared expert's `down_proj`, and the embedding rows (untied LM head). Checked on both fixtures:
`orthogonalize_weights` edits each of them and leaves the residual stream orthogonal to r; it equals
`ablate` (default sites) in a plain and a block-causal forward and in `generate` with both samplers
(LLaDA2.0 and LLaDA2.1 with edits, greedy and seeded, every recorded canvas); `add` and a fitted
transport map folded with `fold` equal their hooks; `denoise_blocks=` fires by sampler block.

Routing: the router chooses experts from fp32 sigmoid scores + expert bias, so an edit that moves a
score by float noise could flip a near-tie. The runs below choose the same experts in both models
(checked: `test_weight_edit_keeps_every_routing_choice`), so no tolerance hides a flip.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens import hooks as H
from diffusion_lens.steering import AffineMap, ablate, add, fit_transport, fold, orthogonalize_weights
from tests._llada2 import FIXTURES, VARIANTS, golden_runs, sampler_options

ATOL = 3e-5  # fp32 logits up to ~13 in magnitude; measured <= 1.1e-5 (the float64 edit cast back to fp32)
_MODELS: dict[str, HookedDiffusionTransformer] = {}
_RUNS: dict[str, dict] = {}
#: greedy and seeded runs of each algorithm (LLaDA2.1's hf21_greedy_s edits committed tokens)
GENERATE_RUNS = ["hf20_greedy", "hf20_sampled", "hf21_greedy_s", "hf21_sampled"]


@pytest.fixture(params=VARIANTS)
def llada2(request) -> HookedDiffusionTransformer:
    if request.param not in _MODELS:
        _MODELS[request.param] = HookedDiffusionTransformer.from_pretrained(FIXTURES / request.param)
        _RUNS[request.param] = golden_runs(request.param)
    model = copy.deepcopy(_MODELS[request.param])
    model.runs = _RUNS[request.param]
    return model


def direction(model, k: int = 1, seed: int = 0) -> torch.Tensor:
    """A random unit r [d_model] (k = 1) or k random rows [k d_model]."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(k, model.cfg.d_model, generator=g)
    return v[0] / v[0].norm() if k == 1 else v


def tokens(model, seed: int = 1) -> torch.Tensor:
    """Two rows of 10 text tokens (ids below the fixtures' special ids)."""
    return torch.randint(0, 190, (2, 10), generator=torch.Generator().manual_seed(seed))


def forwards(model, hooks=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a plain (bidirectional) and a block-causal forward (blocks of 4)."""
    ids = tokens(model)
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        return model(ids), model(ids, attention_block_size=4)


def generate(model, run: str, hooks=()):
    """A recorded golden run's kwargs through `model.generate`, every state recorded."""
    golden = model.runs[run]
    options, seed = sampler_options(golden["kwargs"])
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(golden["prompt"], chat=False, progress=False, record=True, hooks=list(hooks), **options)


def routing(model, hooks=()) -> list[torch.Tensor]:
    """The chosen experts (nonzero routing weights) of every MoE layer in both forwards."""
    names = [f"blocks.{layer}.mlp.hook_expert_weights" for layer in model.cfg.moe_layers]
    ids = tokens(model)
    chosen = []
    for block_size in (None, 4):
        with model.hooks(fwd_hooks=list(hooks)):
            _, cache = model.run_with_cache(ids, names_filter=names, attention_block_size=block_size)
        chosen += [cache[name] != 0 for name in names]
    return chosen


# ---------------------------------------------------------------- the writers, by name
def test_every_residual_writer_is_edited(llada2):
    cfg = llada2.cfg
    edited = orthogonalize_weights(llada2, direction(llada2))
    expected = ["embed.weight"]
    for layer in range(cfg.n_layers):
        expected += [f"blocks.{layer}.attn.o_proj.weight"] + [f"blocks.{layer}.attn.o_proj.bias"] * cfg.attn_out_bias
        if layer in cfg.moe_layers:
            expected += [f"blocks.{layer}.mlp.experts.{e}.down_proj.weight" for e in range(cfg.n_experts)]
            expected += [f"blocks.{layer}.mlp.shared_expert.down_proj.weight"]
        else:
            expected += [f"blocks.{layer}.mlp.down_proj.weight"]
    assert sorted(edited) == sorted(expected)
    assert len(edited) == len(set(edited))  # each tensor once
    assert not any("unembed" in name for name in edited)  # untied: the LM head reads the stream, not the rows


@pytest.mark.parametrize("k", [1, 2])
def test_the_residual_stream_is_orthogonal_to_the_direction(llada2, k):
    r = direction(llada2, k, seed=4)
    basis = torch.linalg.qr(r.reshape(k, -1).double().T)[0].T
    sites = [f"blocks.{layer}.hook_resid_{where}" for layer in range(llada2.cfg.n_layers) for where in ("pre", "mid", "post")]
    plain = copy.deepcopy(llada2)
    orthogonalize_weights(llada2, r)
    for block_size in (None, 4):
        _, cache = llada2.run_with_cache(tokens(llada2), names_filter=sites, attention_block_size=block_size)
        assert max((cache[site].double() @ basis.T).abs().max().item() for site in sites) < 1e-5
    _, cache = plain.run_with_cache(tokens(plain), names_filter=sites)
    assert max((cache[site].double() @ basis.T).abs().max().item() for site in sites) > 0.1  # the edit did that


# ---------------------------------------------------------------- weights == runtime ablation
@pytest.mark.parametrize("k", [1, 2])
def test_orthogonalized_weights_equal_runtime_ablation_in_plain_and_block_causal_forwards(llada2, k):
    r = direction(llada2, k)
    runtime, plain = forwards(llada2, ablate(llada2, r)), forwards(llada2)
    orthogonalize_weights(llada2, r)
    for name, ours, theirs, unedited in zip(("plain", "block-causal"), runtime, forwards(llada2), plain):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        assert (unedited - theirs).abs().max() > 0.1, f"{name}: the edit must change the logits"


@pytest.mark.parametrize("k", [1, 2])
def test_weight_edit_keeps_every_routing_choice(llada2, k):
    """The equalities above are not luck over a flipped expert: both models route every token alike."""
    r = direction(llada2, k)
    runtime = routing(llada2, ablate(llada2, r))
    orthogonalize_weights(llada2, r)
    assert all(torch.equal(a, b) for a, b in zip(runtime, routing(llada2)))


@pytest.mark.parametrize("run", GENERATE_RUNS)
@pytest.mark.parametrize("k", [1, 2])
def test_orthogonalized_weights_generate_like_runtime_ablation_at_every_state(llada2, run, k):
    r = direction(llada2, k, seed=3)
    runtime = generate(llada2, run, ablate(llada2, r))
    plain = generate(llada2, run)
    orthogonalize_weights(llada2, r)
    edited = generate(llada2, run)
    assert torch.equal(runtime.sequences, edited.sequences) and torch.equal(runtime.trajectory, edited.trajectory)
    assert len(runtime.states) == len(edited.states) == edited.n_forwards
    for ours, theirs in zip(runtime.states, edited.states):
        assert (ours.step, ours.block, ours.window) == (theirs.step, theirs.block, theirs.window)
        assert torch.equal(ours.canvas, theirs.canvas) and torch.equal(ours.is_masked, theirs.is_masked)
    assert not torch.equal(plain.trajectory, edited.trajectory) or not torch.equal(plain.sequences, edited.sequences)


# ---------------------------------------------------------------- add and transport maps, folded
def test_folded_addition_equals_add_hooks(llada2):
    v = 3 * direction(llada2, seed=5)
    layer = llada2.cfg.moe_layers[0]
    sites = [("hook_attn_out", 0), ("hook_mlp_out", layer)]  # an attention output and a MoE output (shared expert bias)
    hooks = [hook for site, at in sites for hook in add(llada2, v, layers=at, site=site)]
    runtime, plain = forwards(llada2, hooks), forwards(llada2)
    gen_runtime = generate(llada2, "hf21_sampled", hooks)
    edited = fold(llada2, AffineMap.from_addition(v, 1.0, [f"blocks.{at}.{site}" for site, at in sites]))
    assert f"blocks.{layer}.mlp.shared_expert.down_proj.bias" in edited and "blocks.0.attn.o_proj.bias" in edited
    for ours, theirs, unedited in zip(runtime, forwards(llada2), plain):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        assert (unedited - theirs).abs().max() > 0.1
    folded = generate(llada2, "hf21_sampled")
    assert torch.equal(gen_runtime.sequences, folded.sequences) and torch.equal(gen_runtime.trajectory, folded.trajectory)


def test_folded_transport_map_equals_its_hooks(llada2):
    """Linear-ACT fitted on the MoE and attention outputs (every position) of two sets of prompts, folded: omega into every
    expert's and the shared expert's down_proj, beta into the shared expert's bias."""
    layer = llada2.cfg.moe_layers[-1]
    sites = [f"blocks.{layer}.hook_mlp_out", "blocks.1.hook_attn_out"]
    g = torch.Generator().manual_seed(6)
    source, target = torch.randint(0, 100, (4, 8), generator=g), torch.randint(100, 190, (4, 8), generator=g)
    acts = [llada2.run_with_cache(ids, names_filter=sites, attention_block_size=4)[1] for ids in (source, target)]
    amap = fit_transport("linear", *({site: cache[site].flatten(0, 1) for site in sites} for cache in acts))
    hooks = amap.as_hooks()
    runtime, plain = forwards(llada2, hooks), forwards(llada2)
    gen_runtime = generate(llada2, "hf20_sampled", hooks)
    edited = fold(llada2, amap)
    assert sum(".experts." in name for name in edited) == llada2.cfg.n_experts  # every routed expert
    for ours, theirs, unedited in zip(runtime, forwards(llada2), plain):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        assert (unedited - theirs).abs().max() > 1e-2
    folded = generate(llada2, "hf20_sampled")
    assert torch.equal(gen_runtime.sequences, folded.sequences) and torch.equal(gen_runtime.trajectory, folded.trajectory)


# ---------------------------------------------------------------- scheduling by denoising block
def test_denoise_blocks_fires_only_in_that_sampler_block(llada2):
    seen: list[tuple[int, int]] = []
    every: list[int] = []

    def record(act, hook):
        seen.append((hook.state.block, hook.state.step))
        return act

    def log(act, hook):
        every.append(hook.state.block)

    name = "blocks.1.hook_resid_post"
    out = generate(llada2, "hf21_greedy_s", [H.at(name, record, denoise_blocks=1), (name, log)])
    assert every == [s.block for s in out.states] and set(every) == set(range(max(every) + 1)) and max(every) >= 2
    assert [b for b, _ in seen] == [1] * every.count(1) and seen
    r = direction(llada2)
    steered = generate(llada2, "hf21_greedy_s", ablate(llada2, r, denoise_blocks=1))
    first = every.index(1)  # block 0's forwards are untouched, block 1's are steered
    assert torch.equal(steered.trajectory[:first], out.trajectory[:first])
