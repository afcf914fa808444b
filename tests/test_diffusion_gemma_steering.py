"""Issue 13 item 5: steering on DiffusionGemma's Gemma-4 layout, in both passes.

Every residual writer reaches the residual stream through weighted norms (sandwich norms), so the
weight edit that removes a direction r is u = r * (norm weights) out of each writer (every slice of
the fused expert tensor included), and its runtime counterpart is the same projection at the
writer's pre-norm output. The embedding is tied to the LM head and read by the self-conditioning,
and is edited once. Checked: `orthogonalize_weights` equals `ablate` (default sites) in an encoder
forward, a self-conditioned decoder forward over the same KV cache, and `generate` token for token
at every recorded state; the old post-norm sites are not equal; the residual stream is orthogonal to
r in both passes; `passes=` restricts `ablate` / `add` to one pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.core.kv_cache import KVCache
from diffusion_lens.steering import ABLATION_SITES, ablate, add, orthogonalize_weights, residual_writers
from diffusion_lens.steering.weights import writer_basis, writer_sites
from tests.conftest import FIXTURES

GEMMA = ["diffusion-gemma-tiny", "diffusion-gemma-tiny-dense"]
ATOL = 1e-4  # fp32 logits up to the softcap (30); measured <= 6e-5
_MODELS: dict[str, HookedDiffusionTransformer] = {}


@pytest.fixture(params=GEMMA)
def gemma(request) -> HookedDiffusionTransformer:
    if request.param not in _MODELS:
        _MODELS[request.param] = HookedDiffusionTransformer.from_pretrained(FIXTURES / request.param)
    return copy.deepcopy(_MODELS[request.param])


def direction(model, k: int, seed: int = 0) -> torch.Tensor:
    """A random unit r [d_model] (k = 1) or k random rows."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(k, model.cfg.d_model, generator=g)
    return v[0] / v[0].norm() if k == 1 else v


def two_passes(model, hooks=(), seed: int = 1):
    """An encoder forward over a prompt (a padded row), then a self-conditioned decoder forward over the
    same KV cache: both passes' logits [2 pos vocab]."""
    cfg, C = model.cfg, model.cfg.extra["canvas_length"]
    g = torch.Generator().manual_seed(seed)
    P = 6
    prompt = torch.randint(3, cfg.d_vocab, (2, P), generator=g)
    canvas = torch.randint(0, cfg.d_vocab, (2, C), generator=g)
    previous = 3 * torch.randn(2, C, cfg.d_vocab, generator=g)
    mask = torch.ones(2, P + C, dtype=torch.long)
    mask[1, :2] = 0
    cache = KVCache.empty(cfg, batch=2, n_pos=P + C, like=model.W_E)
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        encoder = model(prompt, mask, kv_cache=cache, pass_name="encoder")
        decoder = model(canvas, mask, kv_cache=cache, window_start=P, pass_name="decoder",
                        self_conditioning_logits=previous)
    real = mask[:, :P].bool()
    return encoder[real], decoder


def generate(model, hooks=()):
    """Two blocks, four denoising steps each, seeded, every state recorded."""
    torch.manual_seed(0)
    prompt = torch.tensor([[2, 65, 149, 131, 203, 211], [2, 7, 8, 9, 10, 11]]) % model.cfg.d_vocab
    return model.generate(prompt, max_new_tokens=2 * model.cfg.extra["canvas_length"], max_denoising_steps=4,
                          chat=False, progress=False, record=True, hooks=list(hooks))


# ---------------------------------------------------------------- the sites, found by structure
def test_writers_are_the_pre_norm_outputs_and_every_fused_expert_slice(gemma):
    hooks = [w.hooks for w in writer_sites(gemma, 0)]
    assert hooks == [("hook_embed", "self_conditioning.hook_soft_embed", "hook_unembed_in"),
                     ("self_conditioning.hook_signal",), ("blocks.0.ln_attn_out.hook_in",),
                     ("blocks.0.mlp.ln_dense_out.hook_in",), ("blocks.0.mlp.hook_routed_out",)]
    assert [name for name, _ in residual_writers(gemma, 1)] == [
        "blocks.1.attn.o_proj", "blocks.1.mlp.dense.down_proj", "blocks.1.mlp.experts.down_proj"]
    names = [name for name, _ in ablate(gemma, direction(gemma, 1))]
    assert names[:3] == ["hook_embed", "self_conditioning.hook_soft_embed", "hook_unembed_in"]
    assert "blocks.0.hook_attn_out" not in names and "blocks.2.mlp.ln_dense_out.hook_in" in names
    assert [name for name, _ in ablate(gemma, direction(gemma, 1), layers=1)] == [
        "blocks.1.hook_resid_pre", "blocks.1.ln_attn_out.hook_in", "blocks.1.mlp.ln_dense_out.hook_in",
        "blocks.1.mlp.hook_routed_out"]  # a subset of layers: no model-level sites
    r = direction(gemma, 1)
    explicit = dict(ablate(gemma, r, layers=0, sites=("ln_attn_out.hook_in", "hook_attn_out")))
    scaled = torch.nn.functional.normalize(r.double() * gemma.blocks[0].ln_attn_out.weight.double(), dim=0)
    assert abs(explicit["blocks.0.ln_attn_out.hook_in"].edit.v[:, 0] @ scaled) > 1 - 1e-9  # a writer's hook: u
    assert abs(explicit["blocks.0.hook_attn_out"].edit.v[:, 0] @ r.double()) > 1 - 1e-6   # any other site: r
    with pytest.raises(ValueError, match=r"unknown block site\(s\) \['ln_attn_out'\]"):
        ablate(gemma, r, sites=("ln_attn_out",))


def test_every_slice_of_the_fused_experts_loses_the_scaled_direction(gemma):
    r = direction(gemma, 1)
    before = [block.mlp.experts.down_proj.detach().clone() for block in gemma.blocks]
    edited = orthogonalize_weights(gemma, r)
    assert edited[:2] == ["embed.weight", "self_conditioning.mlp.down_proj.weight"]
    assert edited.count("embed.weight") == 1 and not any("unembed" in name for name in edited)  # tied: once
    for layer, block in enumerate(gemma.blocks):
        assert f"blocks.{layer}.mlp.experts.down_proj" in edited
        experts = writer_sites(gemma, layer, embedding=False)[-1]
        u = writer_basis(experts, r[None].double())[0].float()
        torch.testing.assert_close(u, torch.nn.functional.normalize(
            r * block.mlp.ln_moe_out.weight * block.mlp.ln_out.weight, dim=0), atol=1e-6, rtol=0)
        weight = block.mlp.experts.down_proj.detach()
        for e in range(gemma.cfg.n_experts):  # W_e <- W_e - u u^T W_e, every slice
            assert (u @ weight[e]).abs().max() < 1e-5
            torch.testing.assert_close(weight[e], before[layer][e] - u[:, None] * (u @ before[layer][e]), atol=1e-6, rtol=0)
    assert gemma.unembed.weight is gemma.embed.weight


# ---------------------------------------------------------------- weights == runtime ablation, both passes
@pytest.mark.parametrize("k", [1, 2])
def test_orthogonalized_weights_equal_runtime_ablation_in_both_passes(gemma, k):
    r = direction(gemma, k)
    runtime = two_passes(gemma, ablate(gemma, r))
    post_norm = two_passes(gemma, ablate(gemma, r, sites=ABLATION_SITES))  # the old sites: r after the norms
    plain = two_passes(gemma)
    orthogonalize_weights(gemma, r)
    edited = two_passes(gemma)
    for name, ours, theirs, old, unedited in zip(("encoder", "decoder"), runtime, edited, post_norm, plain):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        assert (old - theirs).abs().max() > 0.1, f"{name}: the post-norm sites must not equal the weight edit"
        assert (unedited - theirs).abs().max() > 0.1, f"{name}: the edit must change the logits"


def test_a_float64_model_routes_and_its_edit_equals_runtime_ablation(gemma):
    """float64 weights (norms still normalise in fp32): the fp64 per-expert scale once broke the routing."""
    gemma = gemma.to(torch.float64)
    r = direction(gemma, 1, seed=2).double()
    runtime = two_passes(gemma, ablate(gemma, r))
    orthogonalize_weights(gemma, r)
    for ours, theirs in zip(runtime, two_passes(gemma)):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_orthogonalized_weights_generate_like_runtime_ablation_at_every_state(gemma):
    r = direction(gemma, 1, seed=3)
    runtime = generate(gemma, ablate(gemma, r))
    post_norm = generate(gemma, ablate(gemma, r, sites=ABLATION_SITES))
    plain = generate(gemma)
    orthogonalize_weights(gemma, r)
    edited = generate(gemma)
    assert torch.equal(runtime.sequences, edited.sequences) and torch.equal(runtime.trajectory, edited.trajectory)
    assert len(runtime.states) == len(edited.states) and {s.pass_name for s in edited.states} == {"encoder", "decoder"}
    assert sum(s.pass_name == "encoder" for s in edited.states) == 2  # two blocks
    for ours, theirs in zip(runtime.states, edited.states):
        assert (ours.pass_name, ours.step, ours.window) == (theirs.pass_name, theirs.step, theirs.window)
        assert torch.equal(ours.canvas, theirs.canvas) and torch.equal(ours.is_masked, theirs.is_masked)
        if theirs.self_conditioning_logits is None:
            assert ours.self_conditioning_logits is None
        else:
            torch.testing.assert_close(ours.self_conditioning_logits, theirs.self_conditioning_logits, atol=2 * ATOL, rtol=0)
    assert not torch.equal(plain.trajectory, edited.trajectory)
    assert not torch.equal(post_norm.trajectory, edited.trajectory)


@pytest.mark.parametrize("k", [1, 2])
def test_the_residual_stream_is_orthogonal_to_the_direction_in_both_passes(gemma, k):
    r = direction(gemma, k, seed=4)
    basis = torch.linalg.qr(r.reshape(k, -1).double().T)[0].T
    store: dict[str, list[torch.Tensor]] = {}

    def record(act, hook):
        store.setdefault(hook.name, []).append(act.detach().double())

    sites = [f"blocks.{layer}.hook_resid_{where}" for layer in range(gemma.cfg.n_layers) for where in ("pre", "mid", "post")]
    runtime = copy.deepcopy(gemma)
    orthogonalize_weights(gemma, r)
    for model, hooks in ((gemma, []), (runtime, ablate(runtime, r))):
        store.clear()
        two_passes(model, hooks + [(site, record) for site in sites])
        assert set(store) == set(sites) and all(len(acts) == 2 for acts in store.values())  # both passes
        worst = max((act @ basis.T).abs().max().item() for acts in store.values() for act in acts)
        assert worst < 1e-5, worst


# ---------------------------------------------------------------- per-pass interventions
def test_ablate_and_add_select_a_pass(gemma):
    r = direction(gemma, 1, seed=5)
    plain_encoder, plain_decoder = two_passes(gemma)
    encoder, decoder = two_passes(gemma, ablate(gemma, r, passes="decoder"))
    assert torch.equal(encoder, plain_encoder)  # the encoder pass is untouched
    assert (decoder - plain_decoder).abs().max() > 0.1
    assert (two_passes(gemma, ablate(gemma, r))[0] - plain_encoder).abs().max() > 0.1

    # add in the encoder only: the decoder reads the steered cache, but its own hook points are not
    # steered (its blocks.1.hook_resid_pre depends on layer 0's cache only, which layer 1's add leaves alone)
    seen: list[tuple[str, torch.Tensor]] = []
    log = [("blocks.1.hook_resid_pre", lambda act, hook: seen.append((hook.pass_name, act.detach().clone())))]
    two_passes(gemma, log)
    encoder, _ = two_passes(gemma, add(gemma, 4 * r, layers=1, passes="encoder") + log)
    (p0, enc0), (p1, dec0), (p2, enc1), (p3, dec1) = seen
    assert (p0, p1, p2, p3) == ("encoder", "decoder", "encoder", "decoder")
    torch.testing.assert_close(enc1 - enc0, (4 * r).expand_as(enc0), atol=1e-5, rtol=0)
    assert torch.equal(dec1, dec0)
    assert (encoder - plain_encoder).abs().max() > 0.1
    with pytest.raises(ValueError, match="'draft'"):
        gemma.run_with_hooks(torch.tensor([[2, 3]]), fwd_hooks=ablate(gemma, r, passes="draft"))
