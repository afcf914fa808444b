"""Issue 13 (part 1): DiffusionGemma's layer in the core and its adapter, encoder pass (the decoder
pass and self-conditioning: tests/test_diffusion_gemma_passes.py).

The Gemma-4 components (fp32-weight norms, proportional partial RoPE, gelu-tanh MLPs, fused
experts, per-layer head geometry) against direct formulas; loading both fixtures in both config
layouts; the save_pretrained round trip (vision tower and self-conditioning carried through); and
every `enc.*` golden tensor (tests/fixtures/README-diffusion-gemma.md) at atol 1e-4 from the
model's hook points, top-k experts exactly, plus the encoder's K/V cache.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.checkpoints.adapters import detect_adapter, get_adapter
from diffusion_lens.core.components import FusedExperts, GatedMLP, RMSNorm, Rotary
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.core.kv_cache import KVCache
from tests._diffusion_gemma import randomize_weights, read_config, read_forward
from tests.conftest import FIXTURES

ATOL = RTOL = 1e-4
GEMMA = ["diffusion-gemma-tiny", "diffusion-gemma-tiny-dense"]


def _cfg(**overrides) -> DiffusionConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_mlp=48, d_vocab=40, d_head=8)
    return DiffusionConfig(**{**base, **overrides})


# ---------------------------------------------------------------- components
def test_fp32_weight_norm_multiplies_before_the_cast_back():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16).bfloat16()
    norm = RMSNorm(16, 1e-6, weight_in_fp32=True).bfloat16()
    norm.weight.data = (1 + 0.3 * torch.randn(16)).bfloat16()
    x32 = x.float()
    expected = (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5) * norm.weight.float()).bfloat16()
    assert torch.equal(norm(x), expected)
    legacy = RMSNorm(16, 1e-6).bfloat16()
    legacy.weight.data = norm.weight.data
    assert not torch.equal(legacy(x), expected)  # the LLaDA order rounds before the weight
    weightless = RMSNorm(16, 1e-6, weight=False)
    assert weightless.weight is None and torch.allclose(weightless(x32).pow(2).mean(-1), torch.ones(3, 5), atol=1e-4)


def test_proportional_rope_rotates_only_its_frequencies_over_the_full_head_exponent():
    cfg = _cfg()
    spec = {"kind": "proportional", "theta": 1e6, "partial_rotary_factor": 0.25}
    rotary = Rotary(cfg, spec, head_dim=32)
    cos, sin = rotary.tables(7, torch.device("cpu"))
    n_rot = int(0.25 * 32 // 2)  # 4 frequencies
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 32, 2).float() / 32))
    inv_freq[n_rot:] = 0
    angles = torch.arange(7).float()[:, None] * inv_freq
    torch.testing.assert_close(cos[:, 0], torch.cat([angles, angles], -1).cos())
    x = torch.randn(1, 7, 2, 32)
    rotated = rotary(x, cos, sin)
    still = torch.cat([torch.arange(n_rot, 16), torch.arange(16 + n_rot, 32)])
    assert torch.equal(rotated[..., still], x[..., still]) and not torch.allclose(rotated[..., :n_rot], x[..., :n_rot])
    default = Rotary(cfg, {"kind": "default", "theta": 1e4}, head_dim=32)
    assert default.rotary_dim == 32 and default.n_freqs == 16


def test_gelu_tanh_mlp_and_fused_experts_match_direct_formulas():
    torch.manual_seed(1)
    mlp = GatedMLP(8, 12, act="gelu_tanh")
    x = torch.randn(2, 3, 8)
    expected = mlp.down_proj(F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expected)

    cfg = _cfg(n_experts=3, n_experts_per_token=2, d_expert_mlp=6, mlp_act="gelu_tanh")
    experts = FusedExperts(cfg)
    flat = torch.randn(5, 32)
    weights = torch.zeros(5, 3)
    weights[torch.arange(5), torch.tensor([0, 1, 2, 0, 2])] = torch.rand(5)
    weights[torch.arange(5), torch.tensor([1, 2, 0, 2, 1])] = torch.rand(5)
    naive = torch.zeros(5, 32)
    for e in range(3):
        gate, up = (flat @ experts.gate_up_proj[e].T).split(6, -1)
        naive += weights[:, e : e + 1] * ((F.gelu(gate, approximate="tanh") * up) @ experts.down_proj[e].T)
    torch.testing.assert_close(experts(flat, weights), naive)


def test_per_layer_fields_are_checked_and_default_to_the_uniform_model():
    plain = _cfg()
    assert (plain.head_dim(1), plain.kv_heads(1), plain.block_layout, plain.attn_scale) == (8, 4, "pre_norm", None)
    with pytest.raises(ValueError, match="layer_head_dims has 1 entries"):
        _cfg(layer_head_dims=(8,))
    with pytest.raises(ValueError, match="layer_kv_heads\\[1\\]=3 must divide"):
        _cfg(layer_kv_heads=(2, 3))
    with pytest.raises(ValueError, match="layer_rope\\[0\\]"):
        _cfg(layer_rope=({"kind": "yarn", "theta": 1.0}, {"kind": "default", "theta": 1.0}))
    with pytest.raises(ValueError, match="default_pass='decoder' is not one of"):
        _cfg(block_layout="gemma4", n_experts=2, n_experts_per_token=1, d_expert_mlp=4,
             layer_scalar_passes=("encoder",), default_pass="decoder")
    with pytest.raises(ValueError, match="mlp_act='relu'"):
        _cfg(mlp_act="relu")
    cfg = _cfg(layer_head_dims=(8, 16), layer_kv_heads=(2, 1))
    cache = KVCache.empty(cfg, batch=2, n_pos=5, like=torch.zeros(1))
    assert [tuple(k.shape) for k in cache.keys] == [(2, 2, 5, 8), (2, 1, 5, 16)]


# ---------------------------------------------------------------- adapter: config and loading
@pytest.fixture(scope="module", params=GEMMA)
def gemma(request):
    folder = FIXTURES / request.param
    return HookedDiffusionTransformer.from_pretrained(folder), read_forward(folder), folder


def _hub_layout(config: dict) -> dict:
    """The published hub form of a save_pretrained config.json: global_head_dim /
    num_global_key_value_heads and an explicit softcap, no per_layer_config."""
    hub = json.loads(json.dumps(config))
    text = hub["text_config"]
    overrides = text.pop("per_layer_config")
    full = [i for i, kind in enumerate(text["layer_types"]) if kind == "full_attention"]
    text["global_head_dim"] = overrides[str(full[0])].get("head_dim", text["head_dim"])
    if "num_key_value_heads" in overrides[str(full[0])]:
        text["num_global_key_value_heads"] = overrides[str(full[0])]["num_key_value_heads"]
    text["final_logit_softcapping"] = 30.0
    return hub


@pytest.mark.parametrize("name", GEMMA)
def test_both_config_layouts_give_the_fixture_geometry(name):
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    facts = read_config(folder)
    adapter = detect_adapter(config)
    assert adapter.name == "diffusion_gemma"
    saved, hub = adapter.to_config(config), adapter.to_config(_hub_layout(config))
    for cfg in (saved, hub):
        assert cfg.layer_head_dims == facts.head_dim and cfg.layer_kv_heads == facts.kv_heads
        assert cfg.layer_values_from_keys == tuple(not facts.sliding(i) for i in range(facts.n_layers))
        assert cfg.layer_attention == tuple("sliding_causal" if facts.sliding(i) else "causal" for i in range(facts.n_layers))
        assert (cfg.sliding_window, cfg.final_logit_softcap, cfg.attn_scale) == (facts.sliding_window, 30.0, 1.0)
        assert cfg.embed_scale == math.sqrt(facts.d_model) and cfg.default_pass == "encoder"
        assert cfg.pass_layer_attention["encoder"] == cfg.layer_attention and cfg.self_conditioning_pass == "decoder"
        assert cfg.pass_layer_attention["decoder"] == tuple(
            "window_sliding_prefix" if facts.sliding(i) else "window_prefix" for i in range(facts.n_layers))
    assert saved.layer_rope == hub.layer_rope
    no_global = _hub_layout(config)
    del no_global["text_config"]["global_head_dim"]
    assert adapter.to_config(no_global).layer_head_dims[-1] == 512  # the class default (reference Q2)


def test_unsupported_values_say_what_is_missing_and_generate_runs(gemma):
    model, _, folder = gemma
    config = json.loads((folder / "config.json").read_text())
    adapter = get_adapter("diffusion_gemma")
    bidirectional = json.loads(json.dumps(config))
    bidirectional["text_config"]["use_bidirectional_attention"] = "all"
    with pytest.raises(ValueError, match="use_bidirectional_attention='all'"):
        adapter.to_config(bidirectional)
    untied = {**config, "tie_word_embeddings": False}
    with pytest.raises(ValueError, match="tie_word_embeddings=False"):
        adapter.to_config(untied)
    C = model.cfg.extra["canvas_length"]  # generate runs the adapter's entropy-bound sampler (issue 13, part 3)
    out = model.generate(torch.tensor([[2, 5, 6]]), chat=False, progress=False, seed=0, max_new_tokens=C,
                         max_denoising_steps=2)
    assert out.sequences.shape == (1, 3 + C) and out.n_forwards <= 3


def test_loading_reads_every_text_key_and_keeps_both_layer_scalar_sets(gemma):
    model, _, folder = gemma
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    for layer, block in enumerate(model.blocks):
        assert torch.equal(block.encoder_layer_scalar, stored[f"model.encoder.language_model.layers.{layer}.layer_scalar"])
        assert torch.equal(block.decoder_layer_scalar, stored[f"model.decoder.layers.{layer}.layer_scalar"])
        assert not torch.equal(block.encoder_layer_scalar, block.decoder_layer_scalar)
    assert model.unembed.weight is model.embed.weight
    carried = {key for key in stored if ".vision_tower." in key or ".embed_vision." in key}
    assert set(model.carried_tensors) == carried and len(carried) >= 18
    conditioning = model.self_conditioning  # read into the decoder's input module, not carried
    assert torch.equal(conditioning.mlp.down_proj.weight, stored["model.decoder.self_conditioning.down_proj.weight"])
    assert torch.equal(conditioning.pre_norm.weight, stored["model.decoder.self_conditioning.pre_norm.weight"])
    assert conditioning.post_norm.weight is None


def test_save_pretrained_round_trip_is_byte_exact(gemma, tmp_path):
    model, _, folder = gemma
    out = model.save_pretrained(tmp_path / "saved")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        original = {key: f.get_tensor(key) for key in f.keys()}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = {key: f.get_tensor(key) for key in f.keys()}
    assert set(written) == set(original)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    assert (out / "generation_config.json").read_text() == (folder / "generation_config.json").read_text()
    again = HookedDiffusionTransformer.from_pretrained(out)
    tokens = read_forward(folder).passes["enc"].input_ids
    assert torch.equal(again(tokens), model(tokens))
    shutil.rmtree(out)


def test_a_bf16_model_saves_a_config_that_says_bf16(gemma, tmp_path):
    """config.json's `dtype` is what transformers loads the tensors as: it must match what was written."""
    from transformers import DiffusionGemmaForBlockDiffusion  # the live reference

    _, _, folder = gemma
    half = HookedDiffusionTransformer.from_pretrained(folder, dtype=torch.bfloat16)
    out = half.save_pretrained(tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.decoder.embed_tokens.weight").dtype == torch.bfloat16
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(out)
    assert reference.model.decoder.embed_tokens.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- encoder-pass parity
def _pre_norm(cache, name: str) -> torch.Tensor:
    """A norm's input, from its cached normalised vector and scale (the hook points carry both)."""
    return cache[f"{name}.hook_normalized"] * cache[f"{name}.hook_scale"]


def test_encoder_pass_reproduces_every_enc_golden(gemma):
    model, golden, _ = gemma
    enc = golden.passes["enc"]
    real = enc.query_mask  # [2 P]: pad queries of row 1 are garbage upstream (README)
    logits, cache = model.run_with_cache(enc.input_ids, enc.attention_mask)
    cfg, worst = model.cfg, {}

    def check(group: str, ours: torch.Tensor, expected: torch.Tensor, rows=real):
        assert ours.shape == expected.shape, (group, ours.shape, expected.shape)
        ours, expected = ours[rows], expected[rows]
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{group}: {m}")
        worst[group] = max(worst.get(group, 0.0), (ours - expected).abs().max().item())

    check("embed", cache["hook_embed"], enc.embed)
    flat_real = real.reshape(-1)
    for i, layer in enumerate(enc.layers):
        b, hooks = f"blocks.{i}", layer.hooks
        block = model.blocks[i]
        check("layers.out", cache[f"{b}.hook_resid_post"], layer.out)
        check("ln1", cache[f"{b}.ln1.hook_normalized"] * block.ln1.weight, hooks["ln1"])
        check("q/k/v normed", cache[f"{b}.attn.hook_q"], hooks["q_normed"])
        check("q/k/v normed", cache[f"{b}.attn.hook_k"], hooks["k_normed"])
        check("q/k/v normed", cache[f"{b}.attn.hook_v"], hooks["v_normed"])
        check("attn_out", _pre_norm(cache, f"{b}.ln_attn_out"), hooks["attn_out"])
        check("resid_mid", cache[f"{b}.hook_resid_mid"], hooks["resid_mid"])
        check("ffn_out", cache[f"{b}.hook_mlp_out"], hooks["ffn_out"])
        scores = cache[f"{b}.mlp.hook_router_logits"].reshape(-1, cfg.n_experts)
        probs = cache[f"{b}.mlp.hook_router_probs"].reshape(-1, cfg.n_experts)
        weights = cache[f"{b}.mlp.hook_expert_weights"].reshape(-1, cfg.n_experts)
        check("router logits/probs", scores, layer.router.logits, flat_real)
        check("router logits/probs", probs, layer.router.probs, flat_real)
        index = layer.router.topk_index
        assert torch.equal(probs.topk(cfg.n_experts_per_token, dim=-1).indices[flat_real], index[flat_real])
        assert torch.equal((weights != 0).sum(-1)[flat_real], torch.full_like(index[flat_real, 0], index.shape[1]))
        check("router topk weights", weights.gather(-1, index), layer.router.topk_weights, flat_real)
    check("last_hidden_state", cache["ln_final.hook_normalized"] * model.ln_final.weight, enc.last_hidden_state)
    assert logits.abs().max() <= cfg.final_logit_softcap
    print({group: f"{value:.1e}" for group, value in worst.items()})


def test_encoder_kv_cache_equals_the_golden_cache(gemma):
    """Keys post-k_norm post-RoPE, values post-v_norm; sliding layers keep the last W - 1 positions."""
    model, golden, folder = gemma
    enc = golden.passes["enc"]
    facts = read_config(folder)
    cache = KVCache.empty(model.cfg, batch=2, n_pos=enc.input_ids.shape[1], like=model.W_E)
    model(enc.input_ids, enc.attention_mask, kv_cache=cache)
    real = enc.attention_mask.bool()[:, None, :, None]  # pad positions' keys come from garbage states
    for layer, (keys, values) in enumerate(enc.cache):
        kept = keys.shape[2]
        assert kept == facts.cache_len(layer, enc.input_ids.shape[1])
        for ours, expected in ((cache.keys[layer], keys), (cache.values[layer], values)):
            ours, mask = ours[:, :, -kept:], real[:, :, -kept:].expand_as(expected)
            torch.testing.assert_close(ours[mask], expected[mask], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- live reference: transformers' own encoder
def test_encoder_matches_transformers_on_a_fresh_random_config(tmp_path):
    """A config unlike both fixtures (5 layers, two full layers in a row, top-3 of 3 experts, 24-wide
    full heads, proportional RoPE 0.5), random non-trivial weights, run through upstream's encoder."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # the live reference

    vision = json.loads((FIXTURES / GEMMA[0] / "config.json").read_text())["vision_config"]
    text = dict(
        vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, global_head_dim=24, num_global_key_value_heads=1, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention", "sliding_attention"],
        num_experts=3, top_k_experts=3, moe_intermediate_size=12, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 5e3},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 5e4}},
    )
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=8)
    generator = torch.Generator().manual_seed(1313)
    reference = DiffusionGemmaForBlockDiffusion(config).eval()
    randomize_weights(reference, generator)
    reference.save_pretrained(tmp_path)
    model = HookedDiffusionTransformer.from_pretrained(tmp_path)
    assert model.cfg.layer_rope[-1]["kind"] == "proportional" and model.cfg.layer_head_dims[-1] == 24  # forced full

    ids = torch.randint(3, 96, (2, 11), generator=generator)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = reference.model.encoder.language_model(ids, attention_mask=mask, output_hidden_states=True)
    logits, cache = model.run_with_cache(ids, mask)
    real = mask.bool()
    states = [cache["hook_embed"]] + [cache[f"blocks.{i}.hook_resid_post"] for i in range(4)]
    for layer, (ours, theirs) in enumerate(zip(states, expected.hidden_states)):
        torch.testing.assert_close(ours[real], theirs[real], atol=ATOL, rtol=RTOL, msg=lambda m, n=layer: f"state {n}: {m}")
    final = cache["ln_final.hook_normalized"] * model.ln_final.weight
    torch.testing.assert_close(final[real], expected.last_hidden_state[real], atol=ATOL, rtol=RTOL)


def test_branch_and_per_expert_hooks_add_up_and_views_explain_themselves(gemma):
    model, golden, _ = gemma
    enc = golden.passes["enc"]
    _, cache = model.run_with_cache(enc.input_ids, enc.attention_mask, names_filter=lambda n: "blocks.0." in n)
    mlp, cfg = model.blocks[0].mlp, model.cfg
    torch.testing.assert_close(mlp.ln_out(cache["blocks.0.mlp.hook_dense_out"] + cache["blocks.0.mlp.hook_moe_out"]),
                               cache["blocks.0.hook_mlp_out"])
    weights = cache["blocks.0.mlp.hook_expert_weights"].reshape(-1, cfg.n_experts)
    summed = torch.zeros(weights.shape[0], cfg.d_model)
    for e in range(cfg.n_experts):
        tokens = (weights[:, e] != 0).nonzero().flatten()
        out = cache[f"blocks.0.mlp.experts.{e}.hook_out"]
        assert out.shape == (len(tokens), cfg.d_model)
        assert cache[f"blocks.0.mlp.experts.{e}.hook_post"].shape == (len(tokens), cfg.d_expert_mlp)
        summed.index_add_(0, tokens, weights[tokens, e : e + 1] * out)
    torch.testing.assert_close(summed, cache["blocks.0.mlp.hook_routed_out"].reshape(-1, cfg.d_model))
    with pytest.raises(AttributeError, match="mlp.dense or .mlp.experts"):
        model.W_in
    if len(set(cfg.layer_head_dims)) > 1:
        with pytest.raises(AttributeError, match="different head dims"):
            model.W_Q
    assert model.blocks[-1].attn.v_proj is None and torch.equal(model.blocks[-1].attn.W_V, model.blocks[-1].attn.W_K)
    generated = model.generate(enc.input_ids[:1], chat=False, progress=False, seed=0, max_denoising_steps=1)
    assert generated.sequences[:, : enc.input_ids.shape[1]].equal(enc.input_ids[:1])
