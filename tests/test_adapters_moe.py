"""Issue 4: the LLaDA-MoE adapter and `MixtureOfExperts` on llada-moe-tiny / -variant: forward parity
(router logits, q/k norm, shared expert, dense layers, ignored mask), per-expert hooks, dispatch
against a naive reference, save/load, and the LLaDA sampler goldens."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.core.components.moe import MixtureOfExperts
from tests.adapter_parity import assert_pairs_close, capture_module_outputs, ln_out
from tests.conftest import FIXTURES

MOE = ["llada-moe-tiny", "llada-moe-tiny-variant"]


@pytest.fixture(scope="module", params=MOE)
def moe(request):
    folder = FIXTURES / request.param
    return HookedDiffusionTransformer.from_pretrained(folder), load_file(folder / "golden_forward.safetensors"), folder


def moe_pairs(model, golden):
    ids = golden["input_ids"]
    cfg = model.cfg
    linears = {}
    for layer, block in enumerate(model.blocks):
        for proj in ("q_proj", "k_proj", "v_proj"):
            linears[f"act.model.layers.{layer}.self_attn.{proj}.out"] = getattr(block.attn, proj)
    raw, handles = capture_module_outputs(model, linears)  # q/k before the per-head norm have no hook point
    try:
        logits, cache = model.run_with_cache(ids)
    finally:
        for handle in handles:
            handle.remove()
    flat = lambda t: t.reshape(*ids.shape, -1)  # noqa: E731
    pairs = {"logits": logits, **raw}
    for layer, block in enumerate(model.blocks):
        up, ours = f"act.model.layers.{layer}", f"blocks.{layer}"
        pairs.update({
            f"hidden_states.{layer}": cache[f"{ours}.hook_resid_pre"],
            f"{up}.input_layernorm.out": ln_out(cache, f"{ours}.ln1", block.ln1),
            f"{up}.self_attn.q_norm.out": cache[f"{ours}.attn.hook_q"].reshape(-1, cfg.d_head),
            f"{up}.self_attn.k_norm.out": cache[f"{ours}.attn.hook_k"].reshape(-1, cfg.d_head),
            f"{up}.self_attn.o_proj.in": flat(cache[f"{ours}.attn.hook_z"]),
            f"{up}.self_attn.o_proj.out": cache[f"{ours}.hook_attn_out"],
            f"{up}.post_attention_layernorm.out": ln_out(cache, f"{ours}.ln2", block.ln2),
            f"{up}.out": cache[f"{ours}.hook_resid_post"],
        })
        if layer in cfg.moe_layers:
            pairs[f"{up}.mlp.gate.out"] = cache[f"{ours}.mlp.hook_router_logits"].reshape(-1, cfg.n_experts)
            pairs[f"{up}.mlp.out"] = cache[f"{ours}.mlp.hook_routed_out"]
            if cfg.d_shared_expert_mlp:
                pairs[f"{up}.shared_expert.out"] = cache[f"{ours}.mlp.hook_shared_out"]
        else:
            pairs[f"{up}.mlp.out"] = cache[f"{ours}.hook_mlp_out"]
    final = ln_out(cache, "ln_final", model.ln_final)
    pairs["act.model.norm.out"] = pairs[f"hidden_states.{cfg.n_layers}"] = final
    return pairs, cache


def test_forward_every_golden_tensor_matches(moe):
    model, golden, _ = moe
    pairs, _ = moe_pairs(model, golden)
    checked = set(pairs) | {"input_ids", "ignored_attention_mask", "logits_with_ignored_attention_mask"}
    assert checked == set(golden), f"unchecked golden tensors: {set(golden) - checked}"
    assert assert_pairs_close(pairs, golden) < 1e-5


def test_attention_mask_is_ignored(moe):
    model, golden, _ = moe
    mask = golden["ignored_attention_mask"]
    assert (mask == 0).any()
    with_mask = model(golden["input_ids"], mask)
    torch.testing.assert_close(with_mask, golden["logits_with_ignored_attention_mask"], atol=1e-4, rtol=1e-4)
    assert torch.equal(with_mask, model(golden["input_ids"]))


def test_config_mapping_and_internal_weight_names(moe):
    model, _, folder = moe
    config = json.loads((folder / "config.json").read_text())
    cfg = model.cfg
    assert cfg.moe_layers == tuple(i for i, f in enumerate(config["moe_layer_freq"]) if f)
    assert cfg.rotary_dim == int(cfg.d_head * config["partial_rotary_factor"])
    assert cfg.qk_norm and cfg.attention_mask_mode == "ignored"
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.d_expert_mlp) == (8, 2, 32)
    assert cfg.router_expert_bias == config["moe_router_enable_expert_bias"]
    assert cfg.mask_token_id is None  # no mask id in this config and no `<|mdm_mask|>` row in a 320 vocab
    state = model.state_dict()
    for layer in cfg.moe_layers:
        for e in range(cfg.n_experts):
            assert f"blocks.{layer}.mlp.experts.{e}.down_proj.weight" in state
        assert isinstance(model.blocks[layer].mlp.experts[3].down_proj, torch.nn.Linear)
        assert (f"blocks.{layer}.mlp.shared_expert.down_proj.weight" in state) == bool(cfg.d_shared_expert_mlp)


def test_per_expert_hooks_have_documented_shapes_and_recompose_the_output(moe):
    model, golden, _ = moe
    cfg = model.cfg
    ids = golden["input_ids"]
    n_tokens = ids.numel()
    _, cache = model.run_with_cache(ids)
    for layer in cfg.moe_layers:
        p = f"blocks.{layer}.mlp"
        weights = cache[f"{p}.hook_expert_weights"]
        assert weights.shape == (*ids.shape, cfg.n_experts)
        assert cache[f"{p}.hook_router_probs"].dtype == torch.float32
        assert ((weights != 0).sum(-1) == cfg.n_experts_per_token).all()
        flat_weights = weights.reshape(n_tokens, cfg.n_experts)
        rebuilt = torch.zeros(n_tokens, cfg.d_model)
        total = 0
        for e in range(cfg.n_experts):
            routed = flat_weights[:, e].nonzero().squeeze(-1)  # documented row order
            for name, width in [("hook_pre", cfg.d_expert_mlp), ("hook_pre_linear", cfg.d_expert_mlp),
                                ("hook_post", cfg.d_expert_mlp), ("hook_out", cfg.d_model)]:
                assert cache[f"{p}.experts.{e}.{name}"].shape == (len(routed), width)
            post = F.silu(cache[f"{p}.experts.{e}.hook_pre"]) * cache[f"{p}.experts.{e}.hook_pre_linear"]
            torch.testing.assert_close(post, cache[f"{p}.experts.{e}.hook_post"])
            rebuilt[routed] += cache[f"{p}.experts.{e}.hook_out"] * flat_weights[routed, e, None]
            total += len(routed)
        assert total == n_tokens * cfg.n_experts_per_token
        torch.testing.assert_close(rebuilt.view(*ids.shape, -1), cache[f"{p}.hook_routed_out"], atol=1e-5, rtol=1e-5)
        mlp_out = cache[f"{p}.hook_routed_out"] + (cache[f"{p}.hook_shared_out"] if cfg.d_shared_expert_mlp else 0)
        torch.testing.assert_close(mlp_out, cache[f"blocks.{layer}.hook_mlp_out"])


def naive_moe(mlp: MixtureOfExperts, x):
    """Every expert on every token, then the top-k combination: slow, obviously right."""
    probs = torch.softmax(mlp.router(x).float(), -1)
    if mlp.expert_bias is not None:
        probs = probs + mlp.expert_bias
    top_w, top_e = probs.topk(mlp.top_k, -1)
    all_out = torch.stack([expert(x) for expert in mlp.experts], dim=-2)  # [batch pos expert d_model]
    chosen = all_out.gather(-2, top_e[..., None].expand(*top_e.shape, x.shape[-1]))
    out = (chosen * top_w[..., None].to(x.dtype)).sum(-2)
    return out + (mlp.shared_expert(x) if mlp.shared_expert is not None else 0)


def test_sorted_dispatch_equals_naive_reference(moe):
    model, _, _ = moe
    torch.manual_seed(0)
    x = torch.randn(3, 17, model.cfg.d_model)
    for layer in model.cfg.moe_layers:
        mlp = model.blocks[layer].mlp
        torch.testing.assert_close(mlp(x), naive_moe(mlp, x), atol=1e-5, rtol=1e-5)


def test_expert_weights_hook_reroutes_tokens(moe):
    """Zeroing an expert's weight in `hook_expert_weights` drops it: its hooks see no rows and the
    output equals the routed sum without it."""
    model, golden, _ = moe
    layer = model.cfg.moe_layers[-1]
    ids = golden["input_ids"]
    seen = {}

    def drop_expert_0(weights, hook):
        return weights.clone().index_fill_(-1, torch.tensor([0]), 0.0)

    def count_rows(act, hook):
        seen["rows"] = act.shape[0]

    base = model(ids)
    steered = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.mlp.hook_expert_weights", drop_expert_0),
                                                  (f"blocks.{layer}.mlp.experts.0.hook_out", count_rows)])
    assert seen["rows"] == 0
    assert not torch.allclose(base, steered)


def test_save_pretrained_round_trip_in_llada_moe_format(moe, tmp_path):
    model, golden, folder = moe
    model.save_pretrained(tmp_path)
    original, saved = load_file(folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    config = json.loads((tmp_path / "config.json").read_text())
    source = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in source} == source
    reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path)
    assert reloaded.adapter.name == "llada_moe"
    assert torch.equal(reloaded(golden["input_ids"]), model(golden["input_ids"]))


@pytest.mark.parametrize("key, value", [("moe_layer_freq", 1), ("moe_layer_freq", [1]), ("hidden_act", "gelu"),
                                        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0})])
def test_unsupported_config_values_are_rejected(tmp_path, key, value):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "llada-moe-tiny", folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key):
        HookedDiffusionTransformer.from_pretrained(folder)


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("run", ["gen_semi_ar", "gen_cfg"])
def test_llada_sampler_goldens_token_exact(name, run):
    from tests.adapter_parity import run_metadata

    folder = FIXTURES / name
    model = HookedDiffusionTransformer.from_pretrained(folder)
    golden = load_file(folder / "golden_generate.safetensors")
    meta = run_metadata(folder / "golden_generate.safetensors")
    assert type(model.adapter.sampler(model.cfg)).__name__ == "LLaDASampler"
    out = model.generate(golden[f"{run}.prompt"], attention_mask=golden.get(f"{run}.attention_mask"),
                         mask_id=int(meta["mask_id"]), progress=False, **meta[f"{run}.kwargs"])
    assert torch.equal(out.trajectory, golden[f"{run}.trajectory"])
    assert torch.equal(out.sequences, golden[f"{run}.output"])


def test_step_cache_of_moe_hooks_is_sized_exactly_and_per_expert_hooks_are_refused():
    """Router / routed / shared-expert hooks have [batch pos ...] shapes the estimator knows; per-expert
    hooks are [n_routed ...] (data-dependent), so a size-guarded cache refuses them by name."""
    folder = FIXTURES / "llada-moe-tiny-variant"
    model = HookedDiffusionTransformer.from_pretrained(folder)
    prompt = load_file(folder / "golden_generate.safetensors")["gen_semi_ar.prompt"]
    run = dict(steps=8, gen_length=16, block_length=8, mask_id=310)
    request = dict(names=lambda n: ".mlp.hook_" in n or "shared_expert.hook_" in n, steps=[0, 3])
    out = model.generate(prompt, cache=request, progress=False, **run)
    assert "blocks.1.mlp.hook_router_probs" in out.cache[0].keys()
    assert model.estimate_cache_bytes(prompt, cache=request, **run) == out.cache.nbytes
    with pytest.raises(ValueError, match="experts.0.hook_pre"):
        model.estimate_cache_bytes(prompt, cache=dict(names="blocks.1.mlp.experts.0.hook_pre", steps=[0]), **run)
