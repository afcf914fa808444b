"""Issue 11 item 3: one intervention representation. `ablate`, `add`, `AffineMap` (its constructors,
`as_hooks`, `fold`, save / load) and `orthogonalize_weights` run one `SiteEdit` formula; a
direction stays a rank-k edit (O(d k) numbers), never a [d d] matrix."""

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.steering import ABLATION_SITES, AffineMap, ablate, add, fold, orthogonalize_weights
from diffusion_lens.steering.edits import EditHook, SiteEdit
from tests.conftest import FIXTURES

_MODELS: dict[str, HookedDiffusionTransformer] = {}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(name="llada-tiny-mha"):
    if name not in _MODELS:
        _MODELS[name] = HookedDiffusionTransformer.from_pretrained(FIXTURES / name)
    return copy.deepcopy(_MODELS[name])


def tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(0, 250, (2, 6), generator=g), torch.full((2, 6), 310)], dim=1)


def unit(d=64, seed=0):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def stored_numbers(amap: AffineMap) -> int:
    tensors = list(amap.omega.values()) + list(amap.beta.values())
    tensors += [t for pair in amap.low_rank.values() for t in pair]
    return sum(t.numel() for t in tensors)


def test_ablate_is_the_ablation_maps_hooks_and_equals_orthogonalized_weights():
    model = load()
    r = unit(seed=1)
    x = tokens()
    names = [f"blocks.{layer}.{site}" for layer in range(model.cfg.n_layers) for site in ABLATION_SITES]
    hooks = ablate(model, r)
    assert [name for name, _ in hooks] == names
    assert all(isinstance(fn, EditHook) and fn.edit.rank == 1 and fn.edit.omega is None and fn.edit.beta is None
               for _, fn in hooks)
    via_ablate = model.run_with_hooks(x, fwd_hooks=hooks)
    via_map = model.run_with_hooks(x, fwd_hooks=AffineMap.from_ablation(r, names).as_hooks())
    assert torch.equal(via_ablate, via_map)  # the same hook, bit for bit
    orthogonalize_weights(model, r)
    torch.testing.assert_close(model(x), via_ablate, atol=1e-4, rtol=0)


def test_orthogonalize_weights_is_fold_of_the_ablation_map_at_the_writers():
    r = unit(seed=2)
    ortho, folded = load("llada-moe-tiny-variant"), load("llada-moe-tiny-variant")
    edited = orthogonalize_weights(ortho, r, embedding=False)
    writer_sites = [f"blocks.{layer}.{site}" for layer in range(ortho.cfg.n_layers)
                    for site in ("hook_attn_out", "hook_mlp_out")]
    assert fold(folded, AffineMap.from_ablation(r, writer_sites)) == edited
    for (name, a), (_, b) in zip(ortho.named_parameters(), folded.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("k", [1, 3])
def test_a_rank_k_edit_stores_o_of_d_numbers_and_matches_the_dense_projection(k):
    d, sites = 64, ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"]
    basis = torch.randn(k, d, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    amap = AffineMap.from_subspace_ablation(basis, sites) if k > 1 else AffineMap.from_ablation(basis[0], sites)
    assert stored_numbers(amap) == len(sites) * (2 * d + 2 * d * k)  # omega = 1, beta = 0, U, V: no d x d
    assert all(t.ndim == 1 for t in amap.omega.values())
    q = torch.linalg.qr(basis.T)[0].T
    dense = torch.eye(d, dtype=torch.float64) - q.T @ q
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(amap.apply(sites[0], x), x @ dense.T)
    omega_l, beta_l = amap.coefficients(sites[0], strength=0.25)  # the dense form only on request
    torch.testing.assert_close(omega_l, 0.75 * torch.eye(d, dtype=torch.float64) + 0.25 * dense)
    torch.testing.assert_close(amap.apply(sites[0], x, strength=0.25), x @ omega_l.T + beta_l)


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_fold_of_a_low_rank_edit_equals_its_runtime_hook(strength):
    model = load("llada-tiny-gqa")
    x = tokens(1)
    sites = ["hook_embed", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.2.mlp.hook_post",
             "blocks.0.mlp.hook_pre"]
    g = torch.Generator().manual_seed(5)
    _, cache = model.run_with_cache(x, names_filter=sites)
    omega, beta, low_rank = {}, {}, {}
    for site in sites:
        n = cache[site].shape[-1]
        omega[site] = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
        beta[site] = 0.2 * torch.randn(n, generator=g, dtype=torch.float64)
        low_rank[site] = (0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64),
                          0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64))
    amap = AffineMap(omega, beta, low_rank=low_rank)
    expected = model.run_with_hooks(x, fwd_hooks=amap.as_hooks(strength))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # biases the llada format cannot save
        fold(model, amap, strength=strength)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=0)


def test_add_is_the_addition_maps_hooks():
    model = load()
    v = torch.randn(64, generator=torch.Generator().manual_seed(3))
    x = tokens()
    hooks = add(model, v, -1.5, layers=[0, 2])
    assert [name for name, _ in hooks] == ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]
    assert all(fn.edit.omega is None and fn.edit.u is None for _, fn in hooks)
    amap = AffineMap.from_addition(v, -1.5, ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"])
    assert torch.equal(model.run_with_hooks(x, fwd_hooks=hooks), model.run_with_hooks(x, fwd_hooks=amap.as_hooks()))


def test_low_rank_maps_save_and_load_and_old_dense_files_still_load(tmp_path):
    r = unit(seed=4)
    amap = AffineMap.from_ablation(r, ["blocks.0.hook_attn_out"]).with_strength(0.5)
    amap.save(tmp_path / "ablation.safetensors")
    back = AffineMap.load(tmp_path / "ablation.safetensors")
    assert set(back.low_rank) == {"blocks.0.hook_attn_out"} and back.strength == 0.5
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(back.apply("blocks.0.hook_attn_out", x), amap.apply("blocks.0.hook_attn_out", x))
    # a file written by the previous version: from_ablation stored omega = I - r r^T densely
    dense = torch.eye(64, dtype=torch.float64) - torch.outer(r, r)
    meta = {"kind": "ablation", "strength": "1.0", "sites": '["s"]', "support_quantiles": "null"}
    save_file({"omega/s": dense, "beta/s": torch.zeros(64, dtype=torch.float64)}, str(tmp_path / "old.safetensors"),
              metadata=meta)
    old = AffineMap.load(tmp_path / "old.safetensors")
    torch.testing.assert_close(old.apply("s", x), x - (x @ r)[:, None] * r)


def test_old_blocks_keyword_warns_and_still_schedules():
    model = load()
    r = unit(seed=6)
    with pytest.warns(DeprecationWarning, match=r"renamed ablate\(blocks=...\) to ablate\(denoise_blocks=...\)"):
        old = ablate(model, r, blocks=[1])
    new = ablate(model, r, denoise_blocks=[1])
    assert [fn.schedule.denoise_blocks for _, fn in old] == [fn.schedule.denoise_blocks for _, fn in new]
    with pytest.raises(TypeError, match="both blocks= and denoise_blocks="):
        add(model, r, 1.0, blocks=[0], denoise_blocks=[1])
    with pytest.raises(TypeError, match="unexpected keyword argument 'block'"):
        AffineMap.from_addition(r, 1.0, ["blocks.0.hook_resid_pre"]).as_hooks(block=1)


def test_site_edit_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"U and V must both be \[d k\]"):
        AffineMap({"s": torch.ones(4)}, {"s": torch.zeros(4)}, low_rank={"s": (torch.ones(4, 1), torch.ones(3, 1))})
    with pytest.raises(ValueError, match="omega and beta do not have"):
        AffineMap({"s": torch.ones(4)}, {"s": torch.zeros(4)}, low_rank={"t": (torch.ones(4, 1), torch.ones(4, 1))})
    hook = EditHook(SiteEdit.projection(unit(8)[None]), "ablate")
    with pytest.raises(ValueError, match=r"ablate at \?: .* expected trailing dimensions \(8,\)"):
        hook(torch.randn(2, 7))
