"""Issue 5, steering core: each test is an identity (weights vs hooks, fold vs hooks, transport
moments, streaming vs batch means, ablation leaves no component) on the fixtures or synthetic data."""

import copy
import gc
import warnings

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.steering import (
    AffineMap,
    Directions,
    ablate,
    add,
    class_pca,
    collect_activations,
    fit_transport,
    fold,
    instruction_template,
    mean_difference,
    orthogonalize_weights,
    project_coefficient,
)
from diffusion_lens.steering.directions import difference_subspace
from tests.conftest import FIXTURES

DENSE = ["llada-tiny-mha", "llada-tiny-gqa"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~100x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_CACHE: dict[str, HookedDiffusionTransformer] = {}


def load(name: str) -> HookedDiffusionTransformer:
    """A fresh copy of a fixture model (loaded once per session)."""
    if name not in _CACHE:
        _CACHE[name] = HookedDiffusionTransformer.from_pretrained(FIXTURES / name)
    return copy.deepcopy(_CACHE[name])


def canvas(model, n=2, prompt_len=6, gen_length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 300, (n, prompt_len), generator=g)
    mask_id = model.cfg.mask_token_id if model.cfg.mask_token_id is not None else 310  # MoE configs record none
    return torch.cat([prompt, torch.full((n, gen_length), mask_id)], dim=1)


def random_unit(d, seed=0):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def make_chat_tokenizer():
    """A word-level tokenizer over the fixtures' 320-token layout with a LLaDA-style chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(300)}
    vocab.update({"<|startoftext|>": 300, "<|endoftext|>": 301, "<|start_header_id|>": 302, "<|eot_id|>": 303,
                  "<|end_header_id|>": 304, "user": 305, "assistant": 306, "[UNK]": 309, "<|mdm_mask|>": 310})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|eot_id|>", "<|end_header_id|>", "<|mdm_mask|>"]
    tok.add_special_tokens(specials)
    template = (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="[UNK]", chat_template=template)


def word_prompts(n, seed, lo=0, hi=300, min_len=3, max_len=7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        out.append(" ".join(f"w{int(t)}" for t in torch.randint(lo, hi, (length,), generator=g)))
    return out


# ----------------------------------------------------------------------------- ablation
@pytest.mark.parametrize("name", DENSE + ["llada-moe-tiny", "llada-moe-tiny-variant", "dream-tiny", "mmada-tiny"])
def test_orthogonalized_weights_equal_runtime_ablation(name):
    model = load(name)
    r = random_unit(model.cfg.d_model, seed=1) * 3.0  # ablate normalises
    tokens = canvas(model, prompt_len=5, gen_length=6) % 250
    expected = model.run_with_hooks(tokens, fwd_hooks=ablate(model, r))
    edited = orthogonalize_weights(model, r)
    assert "embed.weight" in edited and any("o_proj" in e for e in edited)
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


def test_moe_per_expert_orthogonalization_equals_output_ablation():
    """Per-expert edit == ablating the MoE block's output (hook_mlp_out), with a shared expert too."""
    model = load("llada-moe-tiny-variant")
    r = random_unit(model.cfg.d_model, seed=2)
    tokens = canvas(model, prompt_len=5, gen_length=6) % 250
    moe_layer = model.cfg.moe_layers[0]
    expected = model.run_with_hooks(tokens, fwd_hooks=ablate(model, r, layers=[moe_layer], sites=("hook_mlp_out",)))
    from diffusion_lens.steering.weights import project_out_of_writer, residual_writers

    writers = residual_writers(model, moe_layer)[1:]  # the MLP's writers only
    names = [n for n, _ in writers]
    assert sum(".experts." in n for n in names) == model.cfg.n_experts and any("shared_expert" in n for n in names)
    for n, linear in writers:
        project_out_of_writer(linear, r[None], n)
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("subspace", [False, True])
def test_ablation_leaves_no_component_at_any_hooked_site(subspace):
    model = load("llada-tiny-gqa")
    r = torch.stack([random_unit(64, 3), random_unit(64, 4)]) if subspace else random_unit(64, 3)
    basis = torch.linalg.qr(r.T if subspace else r[:, None])[0].T
    hooks = ablate(model, r)
    sites = [name for name, _ in hooks]
    store = {}
    record = [(s, lambda act, hook: store.__setitem__(hook.name, act.detach().clone())) for s in sites]
    post = ["blocks.2.hook_resid_post", "blocks.1.hook_resid_mid"]
    record += [(s, lambda act, hook: store.__setitem__(hook.name, act.detach().clone())) for s in post]
    model.run_with_hooks(canvas(model), fwd_hooks=hooks + record)
    assert set(store) == set(sites + post) and len(sites) == 3 * model.cfg.n_layers
    for name, act in store.items():
        component = act.double() @ basis.double().T
        assert component.abs().max() <= 1e-5, name
        if not subspace:
            assert project_coefficient(act, r).abs().max() <= 1e-5


def test_orthogonalized_model_survives_save_pretrained(tmp_path):
    model = load("llada-tiny-mha")
    orthogonalize_weights(model, random_unit(64, 5))
    tokens = canvas(model)
    expected = model(tokens)
    model.save_pretrained(tmp_path / "abliterated")
    reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path / "abliterated")
    torch.testing.assert_close(reloaded(tokens), expected, atol=0, rtol=0)


def test_add_hooks_shift_the_residual_by_alpha_v():
    model = load("llada-tiny-mha")
    v = torch.randn(64)
    got = {}
    rec = lambda act, hook: got.__setitem__(hook.name, act.detach().clone())  # noqa: E731
    tokens = canvas(model)
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", rec)])
    base = got.pop("blocks.1.hook_resid_pre")
    model.run_with_hooks(tokens, fwd_hooks=add(model, v, -2.0, layers=1) + [("blocks.1.hook_resid_pre", rec)])
    torch.testing.assert_close(got["blocks.1.hook_resid_pre"], base - 2.0 * v, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- transport
def _gaussians(n=4000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64) + 1.0
    tgt = torch.randn(n + 37, d, generator=g, dtype=torch.float64) * torch.linspace(3.0, 0.2, d, dtype=torch.float64) - 2.0
    return src, tgt


@pytest.mark.parametrize("kind", ["mean", "gaussian"])
def test_mean_and_gaussian_transport_move_source_moments_onto_target(kind):
    src, tgt = _gaussians()
    amap = fit_transport(kind, src, tgt, sites=["blocks.0.hook_mlp_out"])
    mapped = amap.apply("blocks.0.hook_mlp_out", src)
    assert (mapped.mean(0) - tgt.mean(0)).abs().max() <= 1e-5
    if kind == "gaussian":
        assert (mapped.std(0, unbiased=False) - tgt.std(0, unbiased=False)).abs().max() <= 1e-5
    else:
        assert (mapped.std(0) - src.std(0)).abs().max() <= 1e-5


def test_gaussian_leaves_constant_dimensions_unchanged():
    src, tgt = _gaussians(n=200, d=4)
    src[:, 2] = 0.5
    amap = fit_transport("gaussian", {"s": src}, {"s": tgt})
    assert float(amap.omega["s"][2]) == 1.0 and float(amap.beta["s"][2]) == 0.0


@pytest.mark.parametrize("independent", [False, True])
def test_linear_act_recovers_a_planted_affine_map(independent):
    g = torch.Generator().manual_seed(7)
    d, n = 6, (200_000 if independent else 5000)  # independent draws: quantile noise ~ 1/sqrt(n)
    omega = torch.tensor([0.5, 1.0, 2.0, 3.5, 0.1, 1.3], dtype=torch.float64)
    beta = torch.tensor([1.0, -2.0, 0.0, 0.3, 5.0, -0.7], dtype=torch.float64)
    base = torch.rand(n, d, generator=g, dtype=torch.float64) * 4 - 1  # non-Gaussian (uniform)
    other = torch.rand(n, d, generator=g, dtype=torch.float64) * 4 - 1 if independent else base[torch.randperm(n, generator=g)]
    target = omega * other + beta
    amap = fit_transport("linear", {"s": base}, {"s": target})
    assert ((amap.omega["s"] - omega).abs() / omega).max() <= 0.01
    assert (amap.beta["s"] - beta).abs().max() <= 0.01 * beta.abs().clamp_min(1.0).max()


def test_strength_interpolates_with_identity_and_gate_passes_outside_support():
    src, tgt = _gaussians(n=500, d=8)
    amap = fit_transport("linear", {"s": src}, {"s": tgt}, support=(0.1, 0.9))
    ungated = amap.without_support()
    x = src[:50]
    full = ungated.apply("s", x, strength=1.0)
    torch.testing.assert_close(ungated.apply("s", x, strength=0.3), 0.7 * x + 0.3 * full)
    lo, hi = amap.support["s"]
    gated = amap.apply("s", x)
    inside = (x >= lo) & (x <= hi)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(gated[inside], full[inside])
    torch.testing.assert_close(gated[~inside], x[~inside])


FOLD_SITES = [
    "hook_embed", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.2.mlp.hook_post",
    "blocks.1.mlp.hook_pre", "blocks.0.mlp.hook_pre_linear", "blocks.2.attn.hook_z", "blocks.1.attn.hook_v",
    "blocks.2.attn.hook_q",
]


@pytest.mark.parametrize("name", DENSE)
def test_folded_map_equals_runtime_map(name):
    model = load(name)
    tokens = canvas(model)
    _, cache = model.run_with_cache(tokens, names_filter=FOLD_SITES)
    g = torch.Generator().manual_seed(11)
    omega, beta = {}, {}
    for site in FOLD_SITES:
        shape = cache[site].shape[2:]
        omega[site] = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
        beta[site] = 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    amap = AffineMap(omega, beta, kind="custom")
    expected = model.run_with_hooks(tokens, fwd_hooks=amap.as_hooks(strength=0.6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # biases the llada format cannot save
        fold(model, amap, strength=0.6)
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)


def test_fold_into_moe_output_and_ablation_map():
    model = load("llada-moe-tiny-variant")  # has a shared expert: beta folds into its bias
    tokens = canvas(model) % 250
    layer = model.cfg.moe_layers[0]
    site = f"blocks.{layer}.hook_mlp_out"
    g = torch.Generator().manual_seed(3)
    amap = AffineMap({site: 0.5 + torch.rand(64, generator=g, dtype=torch.float64)},
                     {site: torch.randn(64, generator=g, dtype=torch.float64)})
    ablation = AffineMap.from_ablation(random_unit(64, 9), ["blocks.0.hook_attn_out"])
    expected = model.run_with_hooks(tokens, fwd_hooks=amap.as_hooks() + ablation.as_hooks())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fold(model, amap)
        fold(model, ablation)
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)
    no_shared = load("llada-moe-tiny")
    with pytest.raises(ValueError, match="shared expert"):
        fold(no_shared, AffineMap({"blocks.0.hook_mlp_out": torch.ones(64)}, {"blocks.0.hook_mlp_out": torch.ones(64)}))
    fold(no_shared, AffineMap({"blocks.0.hook_mlp_out": torch.full((64,), 2.0)}, {"blocks.0.hook_mlp_out": torch.zeros(64)}))


def test_fold_refuses_gated_and_unfoldable_maps_and_saves_created_bias(tmp_path):
    model = load("llada-tiny-mha")
    src, tgt = torch.randn(100, 64), torch.randn(100, 64) + 1
    gated = fit_transport("mean", {"blocks.0.hook_mlp_out": src}, {"blocks.0.hook_mlp_out": tgt}, support="minmax")
    with pytest.raises(ValueError, match="support gate"):
        fold(model, gated)
    resid = fit_transport("mean", {"blocks.0.hook_resid_post": src}, {"blocks.0.hook_resid_post": tgt})
    with pytest.raises(ValueError, match="not foldable"):
        fold(model, resid)
    fold(model, gated.without_support())  # creates down_proj's bias, which LLaDA's format has no key for
    with pytest.warns(UserWarning, match="diffusion_lens_biases.safetensors"):
        model.save_pretrained(tmp_path / "folded")
    tokens = torch.randint(0, 300, (1, 7))
    assert torch.equal(HookedDiffusionTransformer.from_pretrained(tmp_path / "folded")(tokens), model(tokens))
    omega_only = load("llada-tiny-mha")
    fold(omega_only, AffineMap({"blocks.0.hook_mlp_out": torch.full((64,), 0.5)}, {"blocks.0.hook_mlp_out": torch.zeros(64)}))
    omega_only.save_pretrained(tmp_path / "omega")  # no bias created: the original format holds it


def test_affine_map_save_load_roundtrip(tmp_path):
    src, tgt = _gaussians(n=100, d=8)
    amap = fit_transport("gaussian", {"a.b": src, "c": src}, {"a.b": tgt, "c": tgt}, support=(0.05, 0.95)).with_strength(0.4)
    amap.save(tmp_path / "map.safetensors")
    back = AffineMap.load(tmp_path / "map.safetensors")
    assert back.sites == amap.sites and back.strength == 0.4 and back.support_quantiles == (0.05, 0.95)
    torch.testing.assert_close(back.apply("c", src), amap.apply("c", src))


def test_fit_transport_from_prompts_uses_pooled_canvas_activations():
    model = load("llada-tiny-mha")
    neg, pos = canvas(model, n=6, seed=1)[:, :6], canvas(model, n=6, seed=2)[:, :6]
    site = "blocks.1.hook_mlp_out"
    amap = fit_transport("mean", neg, pos, model=model, sites=[site], pooling="mean_all", gen_length=4)
    acts = {k: collect_activations(model, p, sites=[site], pooling="mean_all", gen_length=4)[site] for k, p in (("n", neg), ("p", pos))}
    torch.testing.assert_close(amap.beta[site], acts["p"].mean(0) - acts["n"].mean(0))


# ----------------------------------------------------------------------------- directions
def _manual_means(model, prompts, layers, offsets, gen_length):
    tokens = torch.cat([prompts, torch.full((prompts.shape[0], gen_length), model.cfg.mask_token_id)], 1)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    P = prompts.shape[1]
    return torch.stack([cache[f"blocks.{layer}.hook_resid_pre"][:, [P + o for o in offsets]].double().mean(0) for layer in layers])


def test_streaming_mean_difference_equals_batch_computation():
    model = load("llada-tiny-gqa")
    g = torch.Generator().manual_seed(4)
    pos, neg = torch.randint(0, 300, (11, 7), generator=g), torch.randint(0, 300, (9, 7), generator=g)
    dirs = mean_difference(model, pos, neg, layers="all", positions=["prompt[-3]", "last_prompt", "response[0]", "response[2]"],
                           gen_length=5, batch_size=4)
    assert dirs.directions.shape == (3, 4, 64) and dirs.directions.dtype == torch.float64
    mp, mn = _manual_means(model, pos, range(3), [-3, -1, 0, 2], 5), _manual_means(model, neg, range(3), [-3, -1, 0, 2], 5)
    torch.testing.assert_close(dirs.mean_positive, mp, atol=1e-5, rtol=0)
    torch.testing.assert_close(dirs.directions, mp - mn, atol=1e-5, rtol=0)
    torch.testing.assert_close(dirs.cosine, torch.cosine_similarity(mp, mn, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(dirs.norms, (mp - mn).norm(dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(dirs.unit(2, "last_prompt").norm(), torch.tensor(1.0, dtype=torch.float64))


def _live_tensor_bytes():
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except Exception:
                continue
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_mean_difference_peak_memory_does_not_grow_with_prompt_count():
    """Peak bytes of live CPU tensors during the forwards, for 6 and 24 prompts per class (both prompt
    sets stay alive throughout, so only what mean_difference keeps can differ)."""
    model = load("llada-tiny-mha")
    prompt_sets = {n: torch.randint(0, 300, (n, 6), generator=torch.Generator().manual_seed(n)) for n in (6, 24)}
    flipped = {n: p.flip(0) for n, p in prompt_sets.items()}
    peaks = []
    for n in (6, 24):
        gc.collect()
        peak = [0]
        handle = model.blocks[2].hook_resid_pre.register_forward_hook(
            lambda module, inputs, output: peak.__setitem__(0, max(peak[0], _live_tensor_bytes()))
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # gc.get_objects touches deprecated torch attributes
                mean_difference(model, prompt_sets[n], flipped[n], layers="all", positions="mean_all", gen_length=4,
                                batch_size=6)
        finally:
            handle.remove()
        peaks.append(peak[0])
    # slack: objects in reference cycles (a finished class's reducers) wait for the cyclic GC; storing
    # every prompt's pooled activations instead would add 24 x 3 layers x 64 x 8 bytes = 36 KiB here
    assert peaks[1] <= peaks[0] + 4096, peaks


def test_pooled_positions_and_template_positions_with_a_chat_tokenizer():
    model = load("llada-tiny-mha")
    model.tokenizer = make_chat_tokenizer()
    template = instruction_template(model)
    assert template.prefix == [300, 302, 305, 304] and template.suffix == [303, 302, 306, 304]
    pos, neg = word_prompts(5, 1), word_prompts(4, 2)
    post = mean_difference(model, pos, neg, layers=[0, 2], positions="post_instruction", gen_length=4, batch_size=2)
    assert post.positions == [f"post_instruction[{i}]" for i in range(-4, 0)]
    offsets = mean_difference(model, pos, neg, layers=[0, 2], positions=["prompt[-4]", "prompt[-3]", "prompt[-2]", "last_prompt"],
                              gen_length=4, batch_size=2)
    torch.testing.assert_close(post.directions, offsets.directions)
    pre = mean_difference(model, pos, neg, layers=[1], positions="pre_instruction", gen_length=4, batch_size=5)
    assert pre.shape == (1, 4, 64)
    # pre-instruction tokens are identical in every prompt, so at layer 0 (the embedding) they cannot differ
    layer0 = mean_difference(model, pos, neg, layers=[0], positions="pre_instruction", gen_length=4, batch_size=3)
    assert layer0.norms.max() == 0
    pooled = mean_difference(model, pos, neg, layers="all", positions="mean_prompt", gen_length=4)
    assert pooled.positions == ["mean_prompt"] and pooled.shape == (3, 1, 64)
    # token prompts have no template: a clear error
    with pytest.raises(ValueError, match="Name the positions instead"):
        mean_difference(model, torch.randint(0, 300, (3, 5)), torch.randint(0, 300, (3, 5)), positions="post_instruction")


def test_mean_response_pooling_matches_manual_average():
    model = load("llada-tiny-mha")
    prompts = [torch.randint(0, 300, (k,)) for k in (3, 6, 4)]  # ragged: left padding
    acts = collect_activations(model, prompts, sites=["blocks.1.hook_resid_pre"], pooling="mean_response", gen_length=5, batch_size=3)
    for i, p in enumerate(prompts):
        tokens = torch.cat([p, torch.full((5,), 310)])[None]
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
        torch.testing.assert_close(acts["blocks.1.hook_resid_pre"][i], cache["blocks.1.hook_resid_pre"][0, -5:].double().mean(0), atol=1e-5, rtol=0)


def test_difference_subspace_and_pca():
    g = torch.Generator().manual_seed(0)
    d = 10
    m_neg, m_pos = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    m_pos[0] = 5.0
    xp = m_pos + 0.01 * torch.randn(200, d, generator=g, dtype=torch.float64)
    xp[:, 3] += torch.randn(200, generator=g, dtype=torch.float64) * 2.0  # second spread direction
    basis = difference_subspace(xp.T @ xp / len(xp), xp.mean(0), m_neg, k=2)
    assert abs(float(basis[0, 0])) > 0.99 and float(basis[0, 0]) > 0 and abs(float(basis[1, 3])) > 0.99
    model = load("llada-tiny-mha")
    pos, neg = torch.randint(0, 150, (8, 6)), torch.randint(150, 300, (8, 6))
    res = class_pca(model, pos, neg, layer=1, position="last_prompt", k=2, gen_length=4)
    assert res.positive.shape == (8, 2) and res.negative.shape == (8, 2)
    assert float(res.explained_variance_ratio.sum()) <= 1.0 + 1e-9
    dirs = mean_difference(model, pos, neg, layers=[1], positions="last_prompt", gen_length=4, subspace=True)
    sub = dirs.subspace(1, "last_prompt", k=3)
    torch.testing.assert_close(sub @ sub.T, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)
    assert isinstance(dirs, Directions) and dirs.direction_tensor().shape == (64,)


# ----------------------------------------------------------------------------- errors
def test_wrong_shapes_dtypes_and_layers_raise_clear_errors():
    model = load("llada-tiny-mha")
    r = torch.randn(64)
    with pytest.raises(ValueError, match=r"\[d_model\].*got \(63,\)"):
        ablate(model, torch.randn(63))
    with pytest.raises(TypeError, match="floating-point"):
        ablate(model, torch.ones(64, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ablate(model, [0.0] * 64)
    with pytest.raises(ValueError, match="Unknown layer 3.*3 layers"):
        ablate(model, r, layers=[0, 3])
    with pytest.raises(ValueError, match="zero norm"):
        ablate(model, torch.zeros(64))
    with pytest.raises(ValueError, match="linearly dependent"):
        ablate(model, torch.stack([r, 2 * r]))
    with pytest.raises(ValueError, match="Unknown layer -4"):
        add(model, r, 1.0, layers=-4)
    with pytest.raises(TypeError, match="alpha"):
        add(model, r, "1")
    with pytest.raises(ValueError, match=r"\[d_model\]"):
        orthogonalize_weights(model, torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="feature shape"):
        fit_transport("mean", {"s": torch.randn(5, 4)}, {"s": torch.randn(5, 3)})
    with pytest.raises(ValueError, match="Unknown transport kind"):
        fit_transport("optimal", {"s": torch.randn(5, 4)}, {"s": torch.randn(5, 4)})
    with pytest.raises(TypeError, match="floating-point"):
        fit_transport("mean", {"s": torch.ones(5, 4, dtype=torch.long)}, {"s": torch.randn(5, 4)})
    with pytest.raises(ValueError, match="support"):
        fit_transport("linear", {"s": torch.randn(5, 4)}, {"s": torch.randn(5, 4)}, support=(0.9, 0.1))
    with pytest.raises(ValueError, match="omega must have beta's shape"):
        AffineMap({"s": torch.ones(3)}, {"s": torch.ones(4)})
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        AffineMap({"s": torch.ones(3)}, {"s": torch.ones(3)}).as_hooks(1.5)
    with pytest.raises(KeyError, match="Unknown hook point"):
        fold(model, AffineMap({"blocks.9.hook_mlp_out": torch.ones(64)}, {"blocks.9.hook_mlp_out": torch.ones(64)}))
    amap = AffineMap({"blocks.0.hook_mlp_out": torch.ones(32)}, {"blocks.0.hook_mlp_out": torch.ones(32)})
    with pytest.raises(ValueError, match=r"trailing dimensions \(32,\)"):
        model.run_with_hooks(canvas(model), fwd_hooks=amap.as_hooks())
    with pytest.raises(TypeError, match="integer token ids"):
        mean_difference(model, torch.randn(3, 5), torch.randn(3, 5), positions="last_prompt")
    with pytest.raises(ValueError, match="outside 0..319"):
        mean_difference(model, torch.full((2, 3), 400), torch.zeros(2, 3, dtype=torch.long), positions="last_prompt")
    with pytest.raises(ValueError, match="reach outside a canvas"):
        mean_difference(model, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), positions="prompt[-5]", gen_length=2)
    with pytest.raises(ValueError, match="Unknown positions"):
        mean_difference(model, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), positions="last")
    with pytest.raises(ValueError, match="no tokenizer"):
        mean_difference(model, ["hello"], ["bye"], positions="last_prompt")
    with pytest.raises(ValueError, match="Unknown layer 7"):
        mean_difference(model, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), layers=[7], positions="last_prompt")


def test_fit_transport_per_position_samples_and_head_shaped_sites():
    SEL = ["prompt[-2]", "last_prompt", "response[0]"]
    model = load("llada-tiny-gqa")
    neg, pos = canvas(model, n=3, seed=1)[:, :6], canvas(model, n=3, seed=2)[:, :6]
    amap = fit_transport("gaussian", neg, pos, model=model, sites=["blocks.1.attn.hook_z"], pooling=SEL, gen_length=3)
    assert amap.omega["blocks.1.attn.hook_z"].shape == (4, 16)  # [head d_head], per-dimension
    acts = collect_activations(model, pos, sites=["blocks.1.attn.hook_z"], pooling=SEL, gen_length=3)
    assert acts["blocks.1.attn.hook_z"].shape == (3, 3, 4, 16)
    mapped = amap.apply("blocks.1.attn.hook_z", collect_activations(model, neg, sites=["blocks.1.attn.hook_z"],
                                                                     pooling=SEL, gen_length=3)["blocks.1.attn.hook_z"].flatten(0, 1))
    torch.testing.assert_close(mapped.mean(0), acts["blocks.1.attn.hook_z"].flatten(0, 1).mean(0), atol=1e-5, rtol=0)


def test_fold_inside_mixture_of_experts_sites():
    model = load("llada-moe-tiny-variant")
    layer = model.cfg.moe_layers[0]
    tokens = canvas(model) % 250
    g = torch.Generator().manual_seed(8)
    d_expert = model.cfg.d_expert_mlp

    def rand(shape):
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)

    sites = {
        f"blocks.{layer}.mlp.hook_routed_out": (rand(64), torch.zeros(64, dtype=torch.float64)),
        f"blocks.{layer}.mlp.hook_shared_out": (rand(64), torch.randn(64, generator=g, dtype=torch.float64)),
        f"blocks.{layer}.mlp.experts.3.hook_post": (rand(d_expert), torch.randn(d_expert, generator=g, dtype=torch.float64)),
        f"blocks.{layer}.mlp.experts.5.hook_out": (rand(64), torch.randn(64, generator=g, dtype=torch.float64)),
    }
    amap = AffineMap({s: w for s, (w, _) in sites.items()}, {s: b for s, (_, b) in sites.items()})
    expected = model.run_with_hooks(tokens, fwd_hooks=amap.as_hooks(0.7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fold(model, amap, 0.7)
    torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=0)
    site = f"blocks.{layer}.mlp.hook_routed_out"
    with pytest.raises(ValueError, match="routed weights"):
        fold(model, AffineMap({site: torch.ones(64)}, {site: torch.ones(64)}))


def test_template_and_pooled_means_match_unpadded_single_prompt_forwards():
    """Ragged string prompts (left padding inside batches) vs one unpadded forward per prompt."""
    model = load("llada-tiny-mha")
    model.tokenizer = make_chat_tokenizer()
    pos, neg = word_prompts(5, 11), word_prompts(3, 12)
    pre = mean_difference(model, pos, neg, layers=[1], positions="pre_instruction", gen_length=3, batch_size=3)
    pooled = mean_difference(model, pos, neg, layers=[1], positions="mean_prompt", gen_length=3, batch_size=3)
    rows_pre, tokens_prompt = [], []
    for text in pos:
        ids = torch.tensor(model.tokenizer(model.chat_text(text), add_special_tokens=False)["input_ids"])
        tokens = torch.cat([ids, torch.full((3,), 310)])[None]
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre")
        act = cache["blocks.1.hook_resid_pre"][0].double()
        rows_pre.append(act[:4])
        tokens_prompt.append(act[: len(ids)])
    torch.testing.assert_close(pre.mean_positive[0], torch.stack(rows_pre).mean(0), atol=1e-5, rtol=0)
    # pooled means are token-weighted over all prompt tokens of the class
    torch.testing.assert_close(pooled.mean_positive[0, 0], torch.cat(tokens_prompt).mean(0), atol=1e-5, rtol=0)


def test_padding_sensitive_family_is_batched_by_length_and_results_keep_prompt_order():
    """MMaDA turns a whole batch causal when any row is padded, so its prompts are batched by length:
    ragged prompts then give exactly the unpadded single-prompt activations, in prompt order."""
    from diffusion_lens.evals import refusal_score

    model = load("mmada-tiny")
    assert model.cfg.attention_mask_mode == "causal_when_padded"
    prompts = [torch.randint(0, 300, (k,), generator=torch.Generator().manual_seed(k)) for k in (4, 6, 4, 5, 6)]
    site = "blocks.1.hook_resid_pre"
    acts = collect_activations(model, prompts, sites=[site], pooling=["last_prompt", "response[0]"], gen_length=3, batch_size=4)[site]
    scores = refusal_score(model, prompts, refusal_tokens=[1, 2], gen_length=3, batch_size=4)
    from diffusion_lens.evals.scores import log_odds

    for i, p in enumerate(prompts):
        tokens = torch.cat([p, torch.full((3,), model.cfg.mask_token_id)])[None]
        logits, cache = model.run_with_cache(tokens, names_filter=site)
        torch.testing.assert_close(acts[i], cache[site][0, [len(p) - 1, len(p)]].double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(scores[i], log_odds(logits[:, len(p)], torch.tensor([1, 2]))[0], atol=1e-6, rtol=0)
    dirs = mean_difference(model, prompts, prompts[:2], layers=[1], positions=["last_prompt"], gen_length=3, batch_size=4)
    torch.testing.assert_close(dirs.mean_positive[0, 0], acts[:, 0].mean(0), atol=1e-5, rtol=0)
