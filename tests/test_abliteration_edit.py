"""Issue 16 items 1 and 3: an abliteration trial is a weight edit equal to its runtime twin, undone
bitwise from a snapshot of the touched tensors only, per expert on MoE models, and tie-safe.

Models: the embedded `tiny-refusal` (LLaDA, dense) and `tiny-refusal-moe` (LLaDA-MoE, 8 routed
experts), the `llada2-tiny` fixture (a dense layer, then routed + shared experts) and the
`diffusion-gemma-tiny` fixture (fused experts, sandwich norms, a self-conditioning MLP, embedding
tied to the LM head). Logits: fp32 within 3e-5 (measured <= 8e-6 on the dense models, <= 2.2e-5 on
the MoE ones: fp32 rounding through six layers), and fp64 within 1e-9 (the formula is exact).
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.steering import AblationKernel, AbliterationEdit, interpolate_direction
from diffusion_lens.steering.abliteration import component_kind
from diffusion_lens.steering.weights import writer_sites
from tests.conftest import FIXTURES

MODELS = ["tiny-refusal", "tiny-refusal-moe", "llada2-tiny", "diffusion-gemma-tiny"]
_CACHE: dict[str, HookedDiffusionTransformer] = {}
KERNELS = {"attention": AblationKernel(1.0, 1.0, 0.3, 2.0), "mlp": AblationKernel(0.9, 1.0, 0.2, 1.5),
           "experts": AblationKernel(1.2, 0.5, 0.4, 3.0), "shared_expert": AblationKernel(0.7, 1.5, 0.1, 2.0),
           "embedding": 0.8, "self_conditioning": 0.6}


def load(name: str) -> HookedDiffusionTransformer:
    if name not in _CACHE:
        _CACHE[name] = HookedDiffusionTransformer.from_pretrained(name if name.startswith("tiny-") else FIXTURES / name)
    return copy.deepcopy(_CACHE[name])


def kinds(model) -> set[str]:
    return {component_kind(name, weight) for writer in writer_sites(model) for name, weight in writer.weights}


def trial(model, *, index=None, norm_preserving=False, seed=0, **override) -> AbliterationEdit:
    """Every component the model has, each with its own kernel (routed and shared experts differ)."""
    directions = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=torch.Generator().manual_seed(seed))
    weights = {kind: w for kind, w in {**KERNELS, **override}.items() if kind in kinds(model)}
    return AbliterationEdit.from_directions(directions.to(model.cfg.dtype), weights, index=index,
                                            norm_preserving=norm_preserving)


def tokens(model, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}


# ---------------------------------------------------------------- kernel and interpolation
def test_kernel_falls_linearly_to_min_weight_then_zero():
    assert AblationKernel(1.0, 2.0, 0.5, 2.0).weights(6) == [0.5, 0.75, 1.0, 0.75, 0.5, 0.0]
    torch.testing.assert_close(torch.tensor(AblationKernel(1.5, 0.5, 0.0, 1.0).weights(3)),
                               torch.tensor([0.75, 0.75, 0.0]))
    for bad, match in [((0.5, 1.0, 0.8, 1.0), "min_weight <= max_weight"), ((1.0, 1.0, -0.1, 1.0), "min_weight"),
                       ((1.0, 1.0, 0.5, 0.0), "min_weight_distance must be > 0"),
                       ((float("nan"), 1.0, 0.5, 1.0), "max_weight must be a finite"), ((1.0, True, 0.5, 1.0), "finite")]:
        with pytest.raises(ValueError, match=match):
            AblationKernel(*bad)
    with pytest.raises(ValueError, match=r"max_weight_position=6.5 is outside the model's layers \[0, 5\]"):
        AblationKernel(1.0, 6.5, 0.5, 1.0).weights(6)


def test_interpolate_direction_mixes_adjacent_layers():
    d = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = 0.7 * d[2] + 0.3 * d[3]
    torch.testing.assert_close(interpolate_direction(d, 2.3), expected / expected.norm())
    torch.testing.assert_close(interpolate_direction(d, 4.0), d[4] / d[4].norm())
    torch.testing.assert_close(interpolate_direction(d, 0), d[0] / d[0].norm())
    for index in (-0.1, 4.01):
        with pytest.raises(ValueError, match="outside"):
            interpolate_direction(d, index)
    with pytest.raises(ValueError, match="cancel"):
        interpolate_direction(torch.stack([d[0], -d[0]]), 0.5)


# ---------------------------------------------------------------- weight edit == runtime twin
@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("index", [None, 1.3], ids=["per_layer", "global"])
@pytest.mark.parametrize("name", MODELS)
def test_edited_weights_equal_the_runtime_twin(name, index, norm_preserving):
    model = load(name)
    edit = trial(model, index=index, norm_preserving=norm_preserving)
    x = tokens(model)
    if norm_preserving and name == "diffusion-gemma-tiny":  # fused experts: no per-expert hook
        with pytest.raises(ValueError, match="No hook carries the output of blocks.0.mlp.experts.down_proj alone, and each slice"):
            edit.hooks(model)
        return
    for dtype, tol in ((torch.float32, dict(atol=3e-5, rtol=0)), (torch.float64, dict(atol=1e-9, rtol=0))):
        model = model.to(dtype)
        edit = trial(model, index=index, norm_preserving=norm_preserving)
        with torch.no_grad():
            plain = model(x)
            twin = model.run_with_hooks(x, fwd_hooks=edit.hooks(model))
            with edit.applied(model):
                edited = model(x)
        torch.testing.assert_close(edited, twin, **tol)
        assert (edited - plain).abs().max() > 0.1


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("name", ["llada2-tiny", "diffusion-gemma-tiny"])
def test_a_rank_2_subspace_edit_equals_its_runtime_twin_and_restores_bitwise(name, norm_preserving):
    """Per-layer subspaces [n_layers 2 d_model] (a learned subspace's shape): the same exactness. On the
    models with routed + shared experts and with sandwich norms (where `writer_basis` orthonormalises
    the two rows times the norm weights)."""
    model = load(name)
    raw = torch.randn(model.cfg.n_layers, 2, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    weights = {kind: w for kind, w in KERNELS.items() if kind in kinds(model)}
    x = tokens(model)
    if norm_preserving and name == "diffusion-gemma-tiny":  # fused experts: no per-expert hook
        with pytest.raises(ValueError, match="No hook carries the output of blocks.0.mlp.experts.down_proj alone"):
            AbliterationEdit(raw, weights, norm_preserving=True).hooks(model)
        return
    for dtype, tol in ((torch.float32, dict(atol=3e-5, rtol=0)), (torch.float64, dict(atol=1e-9, rtol=0))):
        model = model.to(dtype)
        edit = AbliterationEdit(raw.to(dtype), weights, norm_preserving=norm_preserving)
        assert edit.directions.shape == raw.shape
        gram = edit.directions.double() @ edit.directions.double().transpose(1, 2)
        torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64).expand_as(gram), atol=1e-6, rtol=0)
        before = params(model)
        with torch.no_grad():
            plain = model(x)
            twin = model.run_with_hooks(x, fwd_hooks=edit.hooks(model))
            one = model.run_with_hooks(x, fwd_hooks=AbliterationEdit(raw[:, 0].to(dtype), weights,
                                                                     norm_preserving=norm_preserving).hooks(model))
            with edit.applied(model):
                edited = model(x)
        torch.testing.assert_close(edited, twin, **tol)
        assert (edited - plain).abs().max() > 0.1 and (edited - one).abs().max() > 1e-3  # the second row matters
        assert all(torch.equal(before[n], p) for n, p in params(model).items())


def test_subspace_directions_are_checked():
    with pytest.raises(ValueError, match="layer 1's subspace are linearly dependent"):
        AbliterationEdit(torch.stack([torch.randn(2, 128), torch.ones(2, 128)]), {"embedding": 1.0})
    with pytest.raises(ValueError, match=r"subspaces \[n_layers k d_model\] are used per layer: pass index=None"):
        AbliterationEdit.from_directions(torch.randn(6, 2, 128), {"embedding": 1.0}, index=1.0)
    with pytest.raises(ValueError, match=r"\(6, 128\) or \(6, k, 128\)"):
        AbliterationEdit(torch.randn(5, 2, 128), {"embedding": 1.0}).apply(load("tiny-refusal"))


def test_moe_edits_every_expert_slice_and_hooks_each_expert_when_edits_differ():
    model = load("llada2-tiny")
    hooks = [name for name, _ in trial(model).hooks(model)]
    assert "blocks.2.mlp.experts.7.hook_out" in hooks and "blocks.2.mlp.hook_shared_out" in hooks
    assert "blocks.2.hook_mlp_out" not in hooks and "blocks.0.hook_mlp_out" in hooks  # layer 0 is dense
    model = load("tiny-refusal-moe")
    same = AbliterationEdit.from_directions(torch.randn(6, 128), {"experts": AblationKernel(0.5, 2.0, 0.5, 9.0)}, index=2)
    assert [name for name, _ in same.hooks(model)] == [f"blocks.{l}.hook_mlp_out" for l in range(6)]  # one edit per layer
    r = same.directions[0].double()
    before = [[e.down_proj.weight.detach().double() for e in block.mlp.experts] for block in model.blocks]
    with same.applied(model) as handle:
        assert len(handle.names) == 6 * 8
        for block, old in zip(model.blocks, before):
            for expert, w in zip(block.mlp.experts, old):  # W_e <- W_e - 0.5 r r^T W_e, every expert
                torch.testing.assert_close(expert.down_proj.weight.double(), w - 0.5 * r[:, None] * (r @ w)[None],
                                           atol=1e-6, rtol=0)


def test_norm_preserving_keeps_each_output_feature_norm():
    model = load("tiny-refusal-moe")
    edit = trial(model, norm_preserving=True)
    before = params(model)
    with edit.applied(model) as handle:
        after = params(model)
    for name in handle.names:
        dim = 0 if name == "embed.weight" else 1  # embedding columns, linear rows
        torch.testing.assert_close(after[name].norm(dim=dim), before[name].norm(dim=dim), atol=1e-5, rtol=1e-5)
        assert (after[name] - before[name]).abs().max() > 1e-4, name


# ---------------------------------------------------------------- snapshot and restore
def test_restore_is_bitwise_and_only_the_touched_tensors_are_snapshotted():
    model = load("tiny-refusal-moe")
    before = params(model)
    edit = AbliterationEdit.from_directions(torch.randn(6, 128), {"attention": AblationKernel(1.0, 2.0, 0.5, 1.0)}, index=0.5)
    handle = edit.apply(model)
    assert handle.names == [f"blocks.{l}.attn.o_proj.weight" for l in (1, 2, 3)]  # weight 0 beyond distance 1
    after = params(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(handle.names)
    handle.restore()
    assert all(torch.equal(before[name], p) for name, p in params(model).items())
    with pytest.raises(RuntimeError, match="already restored"):
        handle.restore()

    with pytest.raises(KeyError, match="boom"):  # the context manager restores after an exception
        with trial(model, norm_preserving=True).applied(model):
            assert not torch.equal(model.embed.weight, before["embed.weight"])
            raise KeyError("boom")
    assert all(torch.equal(before[name], p) for name, p in params(model).items())


# ---------------------------------------------------------------- tied tensors
def tied_llada() -> HookedDiffusionTransformer:
    model = load("tiny-refusal")
    model.unembed.weight = model.embed.weight
    model.cfg.tie_word_embeddings = True
    return model


@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("name", ["diffusion-gemma-tiny", "tied-llada"])
def test_a_tied_embedding_is_edited_once_in_place_and_its_lm_head_sees_it(name, norm_preserving):
    model = tied_llada() if name == "tied-llada" else load(name)
    assert model.unembed.weight is model.embed.weight
    edit = AbliterationEdit.from_directions(torch.randn(model.cfg.n_layers, model.cfg.d_model), {"embedding": 0.5},
                                            norm_preserving=norm_preserving)
    ptr, old = model.embed.weight.data_ptr(), model.embed.weight.detach().double().clone()
    x = tokens(model)
    with torch.no_grad():
        hooks = edit.hooks(model)
        assert [hook for hook, _ in hooks][-1] == "hook_unembed_in"
        twin = model.run_with_hooks(x, fwd_hooks=hooks)
    with edit.applied(model) as handle, torch.no_grad():
        assert handle.names == ["embed.weight"]
        assert model.embed.weight.data_ptr() == ptr and model.unembed.weight is model.embed.weight
        q = edit.directions[0].double()[None]
        once = old - 0.5 * (old @ q.T) @ q  # edited once; twice would leave 0.25 of the component
        if norm_preserving:
            once = once * (old.norm(dim=0) / once.norm(dim=0))
        torch.testing.assert_close(model.embed.weight.double(), once, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), twin, atol=1e-5, rtol=1e-5)  # the LM head reads the edit
    assert model.embed.weight.data_ptr() == ptr and torch.equal(model.embed.weight.double(), old)


def test_the_transposed_edit_matters_at_a_tied_lm_head():
    """With norm preservation the embedding's map is not symmetric: the untransposed map at the LM head differs."""
    model = tied_llada()
    edit = AbliterationEdit.from_directions(torch.randn(6, model.cfg.d_model), {"embedding": 0.9}, norm_preserving=True)
    hooks = edit.hooks(model)
    wrong = hooks[:-1] + [("hook_unembed_in", hooks[0][1])]
    x = tokens(model)
    with torch.no_grad():
        twin, off = model.run_with_hooks(x, fwd_hooks=hooks), model.run_with_hooks(x, fwd_hooks=wrong)
        with edit.applied(model):
            edited = model(x)
    torch.testing.assert_close(edited, twin, atol=1e-5, rtol=1e-5)
    assert (edited - off).abs().max() > 1e-3


def test_a_module_shared_by_two_blocks_is_edited_once_or_refused_when_its_edits_differ():
    model = load("tiny-refusal")
    model.blocks[1].attn.o_proj = model.blocks[0].attn.o_proj  # one tensor written into two layers
    directions = torch.randn(6, model.cfg.d_model)
    edit = AbliterationEdit.from_directions(directions, {"attention": AblationKernel(0.6, 0.5, 0.4, 2.0)}, index=1.0)
    x = tokens(model)
    with torch.no_grad():
        twin = model.run_with_hooks(x, fwd_hooks=edit.hooks(model))  # layers 0 and 1 both weight 0.55
        with edit.applied(model) as handle:
            assert [n for n in handle.names if n.startswith(("blocks.0.", "blocks.1."))] == ["blocks.0.attn.o_proj.weight"]
            torch.testing.assert_close(model(x), twin, atol=3e-5, rtol=0)
    per_layer = AbliterationEdit.from_directions(directions, {"attention": AblationKernel(0.6, 0.5, 0.4, 2.0)})
    before = params(model)
    with pytest.raises(ValueError, match="blocks.1.attn.o_proj shares its storage with another writer"):
        per_layer.apply(model)  # layers 0 and 1 have different directions
    assert all(torch.equal(before[name], p) for name, p in params(model).items())


# ---------------------------------------------------------------- input errors
def test_configuration_errors_say_what_is_wrong():
    model = load("tiny-refusal")
    with pytest.raises(ValueError, match=r"Component\(s\) \['experts'\] configured, but this model has only"):
        AbliterationEdit(torch.randn(6, 128), {"attention": KERNELS["attention"], "experts": KERNELS["experts"]}).apply(model)
    with pytest.raises(ValueError, match=r"Component\(s\) \['shared_expert'\]"):
        AbliterationEdit(torch.randn(6, 128), {"shared_expert": AblationKernel(1.0, 1.0, 0.5, 1.0)}).hooks(model)
    with pytest.raises(ValueError, match="Unknown component 'mlp_out'"):
        AbliterationEdit(torch.randn(6, 128), {"mlp_out": 1.0})
    with pytest.raises(TypeError, match="'attention' must be an AblationKernel"):
        AbliterationEdit(torch.randn(6, 128), {"attention": 1.0})
    with pytest.raises(ValueError, match=r"this model needs one row per layer: \(6, 128\)"):
        AbliterationEdit(torch.randn(7, 128), {"embedding": 1.0}).apply(model)
    with pytest.raises(ValueError, match="nonzero"):
        AbliterationEdit(torch.zeros(6, 128), {"embedding": 1.0})
