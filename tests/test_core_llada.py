"""Issue 2: the core model on the LLaDA fixtures: parity with upstream goldens, hook points,
weight views, caching, save/load, and the errors users meet."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffusion_lens import DiffusionConfig, HookedDiffusionTransformer
from tests.conftest import FIXTURES

FAMILIES = ["llada-tiny-mha", "llada-tiny-gqa"]
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    folder = FIXTURES / request.param
    model = HookedDiffusionTransformer.from_pretrained(folder)
    return model, load_file(folder / "golden_forward.safetensors"), folder


def golden_to_hooks(model, golden):
    """Pairs (our activation, upstream activation) for every tensor recorded in the golden file."""
    _, cache = model.run_with_cache(golden["input_ids"])
    cfg, pairs = model.cfg, {}
    batch, n_pos = golden["input_ids"].shape
    flat = lambda t: t.reshape(batch, n_pos, -1)  # noqa: E731  [batch pos head d_head] -> [batch pos head*d_head]
    for layer in range(cfg.n_layers):
        up, ours = f"act.model.transformer.blocks.{layer}", f"blocks.{layer}"
        block = model.blocks[layer]
        pairs.update({
            f"{up}.attn_norm.out": cache[f"{ours}.ln1.hook_normalized"] * block.ln1.weight,
            f"{up}.q_proj.out": flat(cache[f"{ours}.attn.hook_q"]),
            f"{up}.k_proj.out": flat(cache[f"{ours}.attn.hook_k"]),
            f"{up}.v_proj.out": flat(cache[f"{ours}.attn.hook_v"]),
            f"{up}.rotary_emb.out.q": cache[f"{ours}.attn.hook_rot_q"].transpose(1, 2),
            f"{up}.rotary_emb.out.k": cache[f"{ours}.attn.hook_rot_k"].transpose(1, 2),
            f"{up}.attn_out.in": flat(cache[f"{ours}.attn.hook_z"]),
            f"{up}.attn_out.out": cache[f"{ours}.hook_attn_out"],
            f"{up}.ff_norm.out": cache[f"{ours}.ln2.hook_normalized"] * block.ln2.weight,
            f"{up}.ff_proj.out": cache[f"{ours}.mlp.hook_pre"],
            f"{up}.act.out": F.silu(cache[f"{ours}.mlp.hook_pre"]),
            f"{up}.up_proj.out": cache[f"{ours}.mlp.hook_pre_linear"],
            f"{up}.ff_out.in": cache[f"{ours}.mlp.hook_post"],
            f"{up}.ff_out.out": cache[f"{ours}.hook_mlp_out"],
            f"{up}.out": cache[f"{ours}.hook_resid_post"],
            f"hidden_states.{layer}": cache[f"{ours}.hook_resid_pre"],
        })
    final = cache["ln_final.hook_normalized"] * model.ln_final.weight
    pairs["act.model.transformer.ln_f.out"] = final
    pairs["act.model.transformer.ff_out.in"] = final
    pairs[f"hidden_states.{cfg.n_layers}"] = final
    return pairs


def test_logits_match_golden(loaded):
    model, golden, _ = loaded
    torch.testing.assert_close(model(golden["input_ids"]), golden["logits"], atol=ATOL, rtol=RTOL)


def test_every_intermediate_matches_golden(loaded):
    model, golden, _ = loaded
    pairs = golden_to_hooks(model, golden)
    recorded = {k for k in golden if k.startswith(("act.", "hidden_states."))} - {"act.model.transformer.ff_out.out"}
    assert recorded == set(pairs), f"unmapped golden tensors: {recorded ^ set(pairs)}"
    for name, ours in pairs.items():
        torch.testing.assert_close(ours, golden[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(
        model(golden["input_ids"]), golden["act.model.transformer.ff_out.out"], atol=ATOL, rtol=RTOL
    )


def test_padded_forward_matches_golden(loaded):
    model, golden, folder = loaded
    padded = load_file(folder / "golden_forward_padded.safetensors")
    tokens, mask = padded["input_ids"], padded["attention_mask"]
    assert (mask == 0).any()
    _, cache = model.run_with_cache(tokens, mask, names_filter=lambda n: n.endswith("hook_resid_pre"))
    logits = model(tokens, mask)
    torch.testing.assert_close(logits, padded["logits"], atol=ATOL, rtol=RTOL)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_resid_pre"], padded[f"hidden_states.{layer}"], atol=ATOL, rtol=RTOL
        )
    # The unpadded row is unaffected by another row's padding.
    torch.testing.assert_close(logits[1], golden["logits"][1], atol=ATOL, rtol=RTOL)
    # An all-ones mask means "no mask".
    torch.testing.assert_close(model(tokens, torch.ones_like(mask)), model(tokens), atol=0, rtol=0)


def expected_hook_shapes(cfg: DiffusionConfig, batch: int, n_pos: int) -> dict[str, tuple]:
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    resid, scale = (batch, n_pos, d), (batch, n_pos, 1)
    shapes = {"hook_embed": resid, "ln_final.hook_scale": scale, "ln_final.hook_normalized": resid,
              "hook_unembed_in": resid}
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}"
        shapes.update({
            f"{b}.hook_resid_pre": resid, f"{b}.hook_resid_mid": resid, f"{b}.hook_resid_post": resid,
            f"{b}.hook_attn_out": resid, f"{b}.hook_mlp_out": resid,
            f"{b}.ln1.hook_scale": scale, f"{b}.ln1.hook_normalized": resid,
            f"{b}.ln2.hook_scale": scale, f"{b}.ln2.hook_normalized": resid,
            f"{b}.attn.hook_q": (batch, n_pos, h, dh), f"{b}.attn.hook_rot_q": (batch, n_pos, h, dh),
            f"{b}.attn.hook_k": (batch, n_pos, kv, dh), f"{b}.attn.hook_rot_k": (batch, n_pos, kv, dh),
            f"{b}.attn.hook_v": (batch, n_pos, kv, dh), f"{b}.attn.hook_z": (batch, n_pos, h, dh),
            f"{b}.attn.hook_attn_scores": (batch, h, n_pos, n_pos), f"{b}.attn.hook_pattern": (batch, h, n_pos, n_pos),
            f"{b}.attn.hook_result": (batch, n_pos, h, d),
            f"{b}.mlp.hook_pre": (batch, n_pos, cfg.d_mlp), f"{b}.mlp.hook_pre_linear": (batch, n_pos, cfg.d_mlp),
            f"{b}.mlp.hook_post": (batch, n_pos, cfg.d_mlp),
        })
    return shapes


def test_every_design_hook_exists_with_documented_shape(loaded):
    model, golden, _ = loaded
    tokens = golden["input_ids"]
    expected = expected_hook_shapes(model.cfg, *tokens.shape)
    assert set(model.hook_dict) == set(expected)
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_attn_result(False)
    assert {name: tuple(cache[name].shape) for name in expected} == expected


def test_weight_views_have_transformer_lens_shapes_and_recompute_a_head(loaded):
    model, golden, _ = loaded
    cfg = model.cfg
    L, H, D, dh, m = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp
    assert model.W_E.shape == (cfg.d_vocab_out, D) and model.W_U.shape == (D, cfg.d_vocab_out)
    for view in (model.W_Q, model.W_K, model.W_V):
        assert view.shape == (L, H, D, dh)
    assert model.W_O.shape == (L, H, dh, D)
    assert model.W_in.shape == model.W_gate.shape == (L, D, m) and model.W_out.shape == (L, m, D)
    assert model.OV.shape == (L, H, D, D) and model.QK.shape == (L, H, D, D)

    layer, head = 1, 3
    _, cache = model.run_with_cache(golden["input_ids"])
    ln1 = cache[f"blocks.{layer}.ln1.hook_normalized"] * model.blocks[layer].ln1.weight
    v = ln1 @ model.W_V[layer, head]  # GQA heads expanded: query head 3 reads kv head 3 // groups
    torch.testing.assert_close(v, cache[f"blocks.{layer}.attn.hook_v"][:, :, head // (H // cfg.n_key_value_heads)])
    q_unrotated = ln1 @ model.W_Q[layer, head]
    torch.testing.assert_close(q_unrotated, cache[f"blocks.{layer}.attn.hook_q"][:, :, head])
    z = cache[f"blocks.{layer}.attn.hook_z"]
    head_out = z[:, :, head] @ model.W_O[layer, head]
    all_heads = sum(z[:, :, h] @ model.W_O[layer, h] for h in range(H))
    torch.testing.assert_close(all_heads, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5, rtol=1e-5)
    model.set_use_attn_result(True)
    try:
        _, per_head = model.run_with_cache(golden["input_ids"], names_filter=f"blocks.{layer}.attn.hook_result")
    finally:
        model.set_use_attn_result(False)
    torch.testing.assert_close(per_head[f"blocks.{layer}.attn.hook_result"][:, :, head], head_out, atol=1e-5, rtol=1e-5)


def test_logit_lens_over_cached_residual_reproduces_logits(loaded):
    model, golden, _ = loaded
    logits, cache = model.run_with_cache(golden["input_ids"])
    stack = cache.accumulated_resid(apply_ln=True)  # [layer+1 batch pos d_model], ln_final applied
    assert stack.shape[0] == model.cfg.n_layers + 1
    torch.testing.assert_close(stack[-1] @ model.W_U, logits, atol=1e-5, rtol=1e-5)
    # Direct logit attribution: decomposed components sum to the final logit of a token.
    token = int(logits[0, 5].argmax())
    parts = cache.decompose_resid(apply_ln=False)  # logit_attrs applies the cached final-norm scale
    attrs = cache.logit_attrs(parts, tokens=torch.tensor([token, token]))
    torch.testing.assert_close(attrs.sum(0)[0, 5], logits[0, 5, token], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "names_filter, expected",
    [
        ("blocks.0.hook_resid_post", {"blocks.0.hook_resid_post"}),
        (["hook_embed", "blocks.2.mlp.hook_post"], {"hook_embed", "blocks.2.mlp.hook_post"}),
        (lambda name: name.endswith("hook_scale"), {"ln_final.hook_scale"} | {f"blocks.{i}.ln{j}.hook_scale" for i in range(3) for j in (1, 2)}),
    ],
)
def test_names_filter_forms(names_filter, expected):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    tokens = torch.randint(0, 300, (2, 7))
    _, cache = model.run_with_cache(tokens, names_filter=names_filter)
    assert set(cache.keys()) == expected


def test_cache_of_all_names_equals_hooking_one_by_one(loaded):
    model, golden, _ = loaded
    tokens = golden["input_ids"]
    _, cache = model.run_with_cache(tokens)
    # Caching everything hooks the attention patterns, which selects the explicit attention path;
    # a no-op pattern hook selects the same path for the one-by-one runs (the two paths are
    # compared separately, to 1e-5).
    same_path = [(lambda n: n.endswith("hook_pattern"), lambda act, hook: None)]
    opt_in = {name for name in model.hook_dict if name.endswith("attn.hook_result")}
    assert set(cache.keys()) == set(model.hook_dict) - opt_in
    for name in cache.keys():
        seen = {}
        grab = [(name, lambda act, hook: seen.setdefault("act", act.clone()))]
        model.run_with_hooks(tokens, fwd_hooks=grab + same_path)
        assert torch.equal(seen["act"], cache[name]), name
    assert not model.list_hooks(), "run_with_hooks left hooks behind"


def test_remove_batch_dim_and_device():
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    tokens = torch.randint(0, 300, (1, 6))
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed", remove_batch_dim=True, device="cpu")
    assert cache["hook_embed"].shape == (6, model.cfg.d_model)
    with pytest.raises(ValueError, match="batch of 1"):
        model.run_with_cache(torch.randint(0, 300, (2, 6)), remove_batch_dim=True)


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_and_explicit_attention_agree(loaded, padded):
    model, golden, folder = loaded
    inputs = load_file(folder / "golden_forward_padded.safetensors") if padded else golden
    args = (inputs["input_ids"], inputs.get("attention_mask"))
    fast = model(*args)
    pattern_names = lambda name: name.endswith("hook_pattern")  # noqa: E731
    explicit, cache = model.run_with_cache(*args, names_filter=pattern_names)
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=1e-5)
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    if padded:  # padded keys get no attention, padded queries still attend to real tokens
        pads = inputs["attention_mask"] == 0
        assert pattern.permute(0, 3, 1, 2)[pads].abs().max() == 0


def test_save_load_round_trip_is_bit_exact(loaded, tmp_path):
    model, golden, folder = loaded
    model.save_pretrained(tmp_path)
    original_keys = set(load_file(folder / "model.safetensors"))
    assert set(load_file(tmp_path / "model.safetensors")) == original_keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {**config, **json.loads((folder / "config.json").read_text())}
    reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(reloaded(golden["input_ids"]), model(golden["input_ids"]))


def test_sharded_checkpoint_and_dtype(tmp_path):
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-gqa")
    model.save_pretrained(tmp_path, max_shard_bytes=60_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    resharded = HookedDiffusionTransformer.from_pretrained(tmp_path)
    tokens = torch.randint(0, 300, (2, 9))
    assert torch.equal(resharded(tokens), model(tokens))
    half = HookedDiffusionTransformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.W_E.dtype == torch.bfloat16 and half.cfg.dtype == torch.bfloat16
    assert (half(tokens).float() - model(tokens)).abs().max() < 0.5


def copy_fixture(tmp_path, name="llada-tiny-mha"):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    for golden in target.glob("golden*"):
        golden.unlink()
    return target


def test_unknown_hook_name_lists_close_matches():
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    tokens = torch.randint(0, 300, (1, 5))
    with pytest.raises(KeyError, match=r"blocks\.0\.hook_resid_post"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pots", lambda a, hook: a)])
    with pytest.raises(KeyError, match=r"did you mean.*blocks\.1\.attn\.hook_pattern"):
        model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_patern"])
    assert not model.list_hooks()


@pytest.mark.parametrize("change, message", [
    ("drop", "missing keys.*model.transformer.blocks.1.up_proj.weight"),
    ("extra", "unexpected keys.*model.transformer.blocks.0.extra.weight"),
    ("reshape", r"wrongly shaped keys.*blocks.0.q_proj.weight: checkpoint \(64, 32\), model \(64, 64\)"),
])
def test_bad_checkpoint_keys_are_named(tmp_path, change, message):
    folder = copy_fixture(tmp_path)
    weights = load_file(folder / "model.safetensors")
    if change == "drop":
        del weights["model.transformer.blocks.1.up_proj.weight"]
    elif change == "extra":
        weights["model.transformer.blocks.0.extra.weight"] = torch.zeros(3)
    else:
        weights["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        HookedDiffusionTransformer.from_pretrained(folder)


@pytest.mark.parametrize("key, value", [("block_type", "sequential"), ("alibi", True), ("layer_norm_type", "default")])
def test_unsupported_config_value_is_named(tmp_path, key, value):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        HookedDiffusionTransformer.from_pretrained(folder)


def test_missing_config_keys_take_the_config_class_defaults(tmp_path):
    """LLaDA's config class defaults (weight tying on, ...) differ from the checkpoint's values."""
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["weight_tying"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unexpected keys.*model.transformer.ff_out.weight"):
        HookedDiffusionTransformer.from_pretrained(folder)


def test_checkpoint_code_is_never_run(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "modeling_llada.py").write_text("raise RuntimeError('checkpoint code was executed')\n")
    (folder / "configuration_llada.py").write_text("raise RuntimeError('checkpoint code was executed')\n")
    model = HookedDiffusionTransformer.from_pretrained(folder)
    assert model.cfg.family == "llada"


def test_offline_hub_id_error_says_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pass its local folder"):
        HookedDiffusionTransformer.from_pretrained("GSAI-ML/LLaDA-8B-Instruct-does-not-exist-locally")


def test_bad_inputs_are_explained():
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="no tokenizer"):
        model("hello")
    with pytest.raises(ValueError, match="return_type"):
        model(torch.zeros(1, 3, dtype=torch.long), return_type="probs")


def test_masked_diffusion_loss_backpropagates():
    model = HookedDiffusionTransformer.from_pretrained(FIXTURES / "llada-tiny-mha")
    targets = torch.randint(0, 300, (2, 8))
    noisy = targets.clone()
    noisy[:, 4:] = model.cfg.mask_token_id
    model.requires_grad_(True)
    loss = model(noisy, return_type="loss", targets=targets)
    expected = F.cross_entropy(model(noisy)[:, 4:].reshape(-1, 320), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.embed.weight.grad is not None
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="targets"):
        model(noisy, return_type="loss")
