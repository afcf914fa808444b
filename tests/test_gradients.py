"""Issue 10 item 7: backward hooks, `run_with_cache(incl_bwd=True)` and gradients with respect to
activations work on a model whose weights stay frozen, and attribution patching (gradient x
activation difference) agrees with real activation patching."""

import pytest
import torch
import transformer_lens.patching as tl_patching

from diffusion_lens import HookedDiffusionTransformer
from tests.conftest import FIXTURES


@pytest.fixture(scope="module", params=["llada-tiny-mha", "dream-tiny", "llada-moe-tiny"])
def model(request):
    return HookedDiffusionTransformer.from_pretrained(FIXTURES / request.param)


def tokens(n_pos=8, seed=0):
    return torch.randint(0, 250, (2, n_pos), generator=torch.Generator().manual_seed(seed))


def grads_by_retain(model, toks, names, metric):
    """Reference gradients: keep the activations and read `.grad` (needs `activation_grads`)."""
    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept[hook.name] = act

    with model.activation_grads():
        metric(model.run_with_hooks(toks, fwd_hooks=[(name, keep) for name in names])).backward()
    return {name: kept[name].grad for name in names}


def test_backward_hooks_fire_with_frozen_weights(model):
    assert not any(p.requires_grad for p in model.parameters())
    toks, names = tokens(), ["hook_embed", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]
    metric = lambda logits: logits[0, -1, 3] - logits[1, 2, 7]  # noqa: E731
    seen = {}
    for name in names:
        model.add_hook(name, lambda grad, hook: seen.__setitem__(hook.name, grad), dir="bwd")
    try:
        metric(model(toks)).backward()
    finally:
        model.reset_hooks()
    assert sorted(seen) == sorted(names)
    expected = grads_by_retain(model, toks, names, metric)
    for name in names:
        torch.testing.assert_close(seen[name], expected[name])
        assert seen[name].abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_run_with_cache_incl_bwd_caches_gradients(model, monkeypatch):
    if model.cfg.mask_token_id is None:  # the MoE fixture's config names no mask token
        monkeypatch.setattr(model.cfg, "mask_token_id", 299)
    clean = tokens(seed=1)
    noisy = clean.clone()
    noisy[:, 4:] = model.cfg.mask_token_id
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"]
    loss, cache = model.run_with_cache(noisy, names_filter=names, return_type="loss", targets=clean, incl_bwd=True)
    assert sorted(cache.keys()) == sorted(names + [n + "_grad" for n in names])
    expected = grads_by_retain(model, noisy, names, lambda out: model.masked_diffusion_loss(out, noisy, clean))
    for name in names:
        torch.testing.assert_close(cache[name + "_grad"], expected[name])
    assert loss.ndim == 0


def test_incl_bwd_refuses_what_it_cannot_do(model):
    toks = tokens()
    with pytest.raises(ValueError, match="must be a scalar: pass return_type='loss'"):
        model.run_with_cache(toks, incl_bwd=True)
    with torch.no_grad(), pytest.raises(ValueError, match="grad mode is off"):
        model.run_with_cache(toks, return_type="loss", targets=toks, incl_bwd=True)


def test_no_graph_unless_asked_and_nothing_under_no_grad(model):
    toks = tokens()
    assert not model(toks).requires_grad  # plain forward: frozen weights, no graph, as before
    with model.activation_grads():
        assert model(toks).requires_grad
        with torch.no_grad():
            assert not model(toks).requires_grad
    model.add_hook("blocks.0.hook_resid_post", lambda grad, hook: None, dir="bwd")
    try:
        assert model(toks).requires_grad
        with torch.no_grad():
            assert not model(toks).requires_grad
    finally:
        model.reset_hooks()
    assert not model(toks).requires_grad


def test_attribution_patching_agrees_with_activation_patching():
    """Gradient x (clean - corrupted activation) at every block's resid_pre / attn_out / mlp_out and
    position, against TransformerLens' real activation patching of the same cells: every cell with a
    sizeable real effect has the same sign, the five largest cells are the same, and ranks correlate."""
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    clean = torch.randint(0, 250, (1, 8), generator=torch.Generator().manual_seed(0))
    corrupt = clean.clone()
    corrupt[0, 2] = (clean[0, 2] + 7) % 250
    masks = torch.full((1, 2), model.cfg.mask_token_id)
    clean, corrupt = torch.cat([clean, masks], 1), torch.cat([corrupt, masks], 1)
    with torch.no_grad():
        shift = model(clean)[0, -2] - model(corrupt)[0, -2]
    good, bad = shift.argmax(), shift.argmin()
    metric = lambda logits: logits[0, -2, good] - logits[0, -2, bad]  # noqa: E731

    _, clean_cache = model.run_with_cache(clean)
    real = tl_patching.get_act_patch_block_every(model, corrupt, clean_cache, metric)  # [3 layer pos]
    with torch.no_grad():
        real = real - metric(model(corrupt))

    sites = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out"]
    acts, grads = {}, {}
    is_site = lambda name: name.count(".") == 2 and name.split(".")[-1] in sites  # noqa: E731
    with model.hooks(fwd_hooks=[(is_site, lambda x, hook: acts.__setitem__(hook.name, x.detach()))],
                     bwd_hooks=[(is_site, lambda g, hook: grads.__setitem__(hook.name, g))]):
        metric(model(corrupt)).backward()
    attribution = torch.stack([
        torch.stack([
            ((clean_cache[f"blocks.{layer}.{site}"] - acts[f"blocks.{layer}.{site}"]) * grads[f"blocks.{layer}.{site}"]).sum(-1)[0]
            for layer in range(model.cfg.n_layers)
        ])
        for site in sites
    ])

    real, attribution = real.flatten(), attribution.flatten()
    sizeable = real.abs() > 0.1 * real.abs().max()
    assert sizeable.sum() >= 5
    assert torch.equal(real[sizeable].sign(), attribution[sizeable].sign())
    assert set(real.abs().topk(5).indices.tolist()) == set(attribution.abs().topk(5).indices.tolist())
    ranks = torch.stack([real.argsort().argsort(), attribution.argsort().argsort()]).float()
    assert torch.corrcoef(ranks)[0, 1] > 0.7
