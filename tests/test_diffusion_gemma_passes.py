"""Issue 13 (part 2): DiffusionGemma's two passes over one `KVCache` (prompt + every block), and
self-conditioning.

The window-relative mask kinds of the decoder against hand-written masks; pass selection (layer
scalars and attention kinds from config fields, never a family name); the golden sequence of
tests/fixtures/README-diffusion-gemma.md run exactly as `generate()` does, `enc` -> `dec` ->
`dec_sc` -> `enc2` -> `dec2` sharing one cache, every recorded tensor group at atol 1e-4 (caches
included); the decoder's own cache writes shown harmless; and a live comparison with transformers'
`DiffusionGemmaForBlockDiffusion` on a fresh random config.
"""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_lens import HookedDiffusionTransformer
from diffusion_lens.core.components import attention_masks_for, layer_kind_mask
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.core.kv_cache import KVCache
from tests._diffusion_gemma import randomize_weights, read_config, read_forward
from tests.conftest import FIXTURES

ATOL = RTOL = 1e-4
GEMMA = ["diffusion-gemma-tiny", "diffusion-gemma-tiny-dense"]


def by_rows(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[char == "1" for char in row] for row in rows])


def _cfg(**overrides) -> DiffusionConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_mlp=48, d_vocab=40, d_head=8, block_layout="gemma4",
                n_experts=2, n_experts_per_token=1, d_expert_mlp=4, layer_scalar_passes=("encoder", "decoder"),
                default_pass="encoder")
    return DiffusionConfig(**{**base, **overrides})


# ---------------------------------------------------------------- masks and pass selection
def test_window_prefix_kinds_match_hand_written_masks():
    """Window [4, 6) of 9 columns, sliding_window 3: the prefix kinds never see columns 6..8."""
    cfg = _cfg(layer_attention=("sliding_causal", "causal"), sliding_window=3)
    assert torch.equal(layer_kind_mask(cfg, "window_prefix", range(4, 6), 9, "cpu"), by_rows(["111111000"] * 2))
    assert torch.equal(layer_kind_mask(cfg, "window_sliding_prefix", range(4, 6), 9, "cpu"),
                       by_rows(["001111000"] * 2))  # W - 1 = 2 columns before the window, then the window
    assert torch.equal(layer_kind_mask(cfg, "window_sliding_prefix", range(0, 3), 5, "cpu"), by_rows(["11100"] * 3))
    # the encoder's kinds over the same cache: causal (and windowed) hide later columns too
    assert torch.equal(layer_kind_mask(cfg, "sliding_causal", range(4, 6), 9, "cpu"), by_rows(["001110000", "000111000"]))


def test_pass_kinds_combine_with_the_padded_prompt_mask():
    cfg = _cfg(layer_attention=("sliding_causal", "causal"), sliding_window=3,
               pass_layer_attention={"decoder": ("window_sliding_prefix", "window_prefix")})
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])  # a left-padded prompt of 4, then ones (reference Q15)
    sliding, full = attention_masks_for(cfg, padding, range(4, 6), 9, "cpu", cfg.attention_kinds("decoder"))
    assert torch.equal(sliding[0, 0], by_rows(["001111000"] * 2))
    assert torch.equal(full[0, 0], by_rows(["011111000"] * 2))
    assert cfg.attention_kinds("encoder") == cfg.attention_kinds(None) == ("sliding_causal", "causal")


def test_pass_fields_are_checked():
    assert _cfg().resolve_pass(None) == "encoder" and _cfg().resolve_pass("decoder") == "decoder"
    with pytest.raises(ValueError, match="pass_name='decode' is not one of"):
        _cfg().resolve_pass("decode")
    with pytest.raises(ValueError, match="leave pass_name=None"):
        DiffusionConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=48, d_vocab=40).resolve_pass("decoder")
    with pytest.raises(ValueError, match="default_pass='decoder' is not one of"):
        _cfg(layer_scalar_passes=("encoder",), default_pass="decoder")
    with pytest.raises(ValueError, match="needs a default_pass"):
        _cfg(default_pass=None)
    with pytest.raises(ValueError, match="self_conditioning_pass='dec' is not one of"):
        _cfg(self_conditioning_pass="dec")
    with pytest.raises(ValueError, match="pass_layer_attention names passes \\['draft'\\]"):
        _cfg(pass_layer_attention={"draft": ("causal", "causal")})
    with pytest.raises(ValueError, match="pass_layer_attention\\['decoder'\\] has 1 entries"):
        _cfg(pass_layer_attention={"decoder": ("causal",)})
    with pytest.raises(ValueError, match="sliding_window must be"):
        _cfg(pass_layer_attention={"decoder": ("window_sliding_prefix", "window_prefix")})
    roundtrip = DiffusionConfig.from_dict(json.loads(json.dumps(_cfg(
        pass_layer_attention={"decoder": ("window_prefix",) * 2}, self_conditioning_pass="decoder").to_dict(), default=str)))
    assert roundtrip.pass_layer_attention == {"decoder": ("window_prefix", "window_prefix")}


# ---------------------------------------------------------------- the golden pass sequence
@pytest.fixture(scope="module", params=GEMMA)
def gemma(request):
    folder = FIXTURES / request.param
    return HookedDiffusionTransformer.from_pretrained(folder), read_forward(folder), read_config(folder)


def _canvas_mask(golden, facts, n_pos: int) -> torch.Tensor:
    """The prompt mask padded with ones to the cache's width (prompt + blocks), as generate() builds it."""
    return torch.cat([golden.attention_mask, torch.ones(2, n_pos - golden.prompt_len, dtype=torch.long)], 1)


def _check_layers(check, cache, record, model, fine: bool, window_start: int = 0) -> None:
    cfg = model.cfg
    for i, layer in enumerate(record.layers):
        b = f"blocks.{i}"
        check("layers.out", cache[f"{b}.hook_resid_post"], layer.out)
        scores = cache[f"{b}.mlp.hook_router_logits"].reshape(-1, cfg.n_experts)
        probs = cache[f"{b}.mlp.hook_router_probs"].reshape(-1, cfg.n_experts)
        weights = cache[f"{b}.mlp.hook_expert_weights"].reshape(-1, cfg.n_experts)
        check("router logits/probs", scores, layer.router.logits)
        check("router logits/probs", probs, layer.router.probs)
        index = layer.router.topk_index
        assert torch.equal(probs.topk(cfg.n_experts_per_token, dim=-1).indices, index)
        check("router topk weights", weights.gather(-1, index), layer.router.topk_weights)
        if not fine:
            continue
        hooks, block = layer.hooks, model.blocks[i]
        check("ln1", cache[f"{b}.ln1.hook_normalized"] * block.ln1.weight, hooks["ln1"])
        for name in ("q", "k", "v"):
            check("q/k/v normed", cache[f"{b}.attn.hook_{name}"], hooks[f"{name}_normed"])
        check("attn_z", cache[f"{b}.attn.hook_z"].flatten(-2), hooks["attn_z"])
        check("attn_out", cache[f"{b}.ln_attn_out.hook_normalized"] * cache[f"{b}.ln_attn_out.hook_scale"], hooks["attn_out"])
        check("attn_out", cache[f"{b}.hook_attn_out"], hooks["attn_out_normed"])
        check("resid_mid", cache[f"{b}.hook_resid_mid"], hooks["resid_mid"])
        check("dense / moe branches", cache[f"{b}.mlp.ln_dense_in.hook_normalized"] * block.mlp.ln_dense_in.weight, hooks["ln2"])
        check("dense / moe branches", cache[f"{b}.mlp.hook_dense_out"], hooks["mlp_out_normed"])
        check("dense / moe branches", cache[f"{b}.mlp.hook_routed_out"].flatten(0, 1), hooks["moe_out"])
        check("dense / moe branches", cache[f"{b}.mlp.hook_moe_out"], hooks["moe_out_normed"])
        check("ffn_out", cache[f"{b}.hook_mlp_out"], hooks["ffn_out"])
        check("attn_pattern", cache[f"{b}.attn.hook_pattern"], _kept_columns(cache[f"{b}.attn.hook_pattern"], hooks["attn_pattern"], window_start))


def _kept_columns(ours: torch.Tensor, theirs: torch.Tensor, start: int) -> torch.Tensor:
    """Upstream's pattern [.. C n_i + C] over the n_i cached columns it kept and the window, placed at
    ours' [.. C n_pos] columns (ours spans the whole cache: columns upstream does not hold get weight 0)."""
    out = torch.zeros_like(ours)
    n_kept = theirs.shape[-1] - ours.shape[-2]
    out[..., start - n_kept : start + ours.shape[-2]] = theirs
    return out


def test_enc_dec_dec_sc_enc2_dec2_share_one_cache_and_match_every_golden(gemma):
    model, golden, facts = gemma
    P, C = golden.prompt_len, facts.canvas_length
    cache = KVCache.empty(model.cfg, batch=2, n_pos=P + 2 * C, like=model.W_E)
    mask = _canvas_mask(golden, facts, P + 2 * C)
    worst: dict[str, float] = {}

    def checker(prefix: str, rows=None):
        def check(group: str, ours: torch.Tensor, expected: torch.Tensor):
            assert ours.shape == expected.shape, (prefix, group, ours.shape, expected.shape)
            if rows is not None:
                ours, expected = ours[rows] if ours.shape[:2] == rows.shape else ours, \
                    expected[rows] if expected.shape[:2] == rows.shape else expected
            torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{prefix} {group}: {m}")
            key = f"{prefix}.{group}"
            worst[key] = max(worst.get(key, 0.0), (ours - expected).abs().max().item())
        return check

    # enc: the prompt, columns [0, P); pad queries of row 1 are garbage upstream, so real rows only
    enc = golden.passes["enc"]
    _, acts = model.run_with_cache(enc.input_ids, mask, kv_cache=cache, pass_name="encoder",
                                   names_filter="blocks.*.hook_resid_post")
    for i, layer in enumerate(enc.layers):
        checker("enc", enc.query_mask)("layers.out", acts[f"blocks.{i}.hook_resid_post"], layer.out)
    assert model.cfg.resolve_pass(None) == "encoder"

    # dec and dec_sc: the canvas at columns [P, P + C), reading the prompt's cache
    for name in ("dec", "dec_sc"):
        record, check = golden.passes[name], checker(name)
        logits, acts = model.run_with_cache(record.input_ids, mask, kv_cache=cache, window_start=P, pass_name="decoder",
                                            self_conditioning_logits=record.self_conditioning_logits)
        check("embed", acts["hook_embed"], record.embed)
        check("inputs_embeds", acts["blocks.0.hook_resid_pre"], record.inputs_embeds)
        if name == "dec":
            assert torch.equal(acts["self_conditioning.hook_signal"], torch.zeros_like(record.inputs_embeds))
            presoftcap = model.unembed(acts["ln_final.hook_normalized"] * model.ln_final.weight)
            check("logits", presoftcap, record.logits_presoftcap)
        else:
            check("self-conditioning", acts["self_conditioning.hook_soft_embed"], record.soft_embeddings)
            check("self-conditioning", acts["self_conditioning.hook_signal"], record.sc_signal)
        check("logits", logits, record.logits)
        check("last_hidden_state", acts["ln_final.hook_normalized"] * model.ln_final.weight, record.last_hidden_state)
        _check_layers(check, acts, record, model, fine=name == "dec", window_start=P)

    # enc2: the committed block 1 appended at [P, P + C), overwriting the decoder's canvas keys
    enc2, check = golden.passes["enc2"], checker("enc2")
    assert torch.equal(enc2.position_ids, torch.arange(P, P + C))  # its canvas positions = our columns
    _, acts = model.run_with_cache(enc2.input_ids, mask, kv_cache=cache, window_start=P, pass_name="encoder")
    check("embed", acts["hook_embed"], enc2.embed)
    check("last_hidden_state", acts["ln_final.hook_normalized"] * model.ln_final.weight, enc2.last_hidden_state)
    _check_layers(check, acts, enc2, model, fine=False)
    written = P + C
    real = mask[:, :written].bool()
    for layer, (keys, values) in enumerate(enc2.cache):
        kept = keys.shape[2]
        assert kept == facts.cache_len(layer, written)
        rows = real[:, -kept:]
        for ours, expected in ((cache.keys[layer], keys), (cache.values[layer], values)):
            ours = ours[:, :, written - kept : written].transpose(1, 2)[rows]  # pad columns hold garbage states
            checker("enc2")("cache", ours, expected.transpose(1, 2)[rows])

    # dec2: a fresh canvas at [P + C, P + 2C), reading prompt + block 1
    dec2, check = golden.passes["dec2"], checker("dec2")
    logits, acts = model.run_with_cache(dec2.input_ids, mask, kv_cache=cache, window_start=P + C, pass_name="decoder")
    check("logits", logits, dec2.logits)
    check("inputs_embeds", acts["blocks.0.hook_resid_pre"], dec2.inputs_embeds)
    check("last_hidden_state", acts["ln_final.hook_normalized"] * model.ln_final.weight, dec2.last_hidden_state)
    _check_layers(check, acts, dec2, model, fine=False)
    assert logits.abs().max() <= model.cfg.final_logit_softcap
    print({group: f"{value:.1e}" for group, value in sorted(worst.items())})


def test_decoder_cache_writes_are_harmless_and_later_columns_invisible(gemma):
    """The decoder writes its canvas K/V at its window; the block's encoder append overwrites them, and
    neither pass reads a column at or after its window's end (garbage there changes nothing)."""
    model, golden, facts = gemma
    P, C = golden.prompt_len, facts.canvas_length
    mask = _canvas_mask(golden, facts, P + 2 * C)
    enc, dec, enc2 = (golden.passes[p] for p in ("enc", "dec", "enc2"))

    def run(with_decoder: bool, garbage: bool):
        cache = KVCache.empty(model.cfg, batch=2, n_pos=P + 2 * C, like=model.W_E)
        if garbage:
            for tensor in (*cache.keys, *cache.values):
                tensor.normal_()
        model(enc.input_ids, mask, kv_cache=cache, pass_name="encoder")
        logits = model(dec.input_ids, mask, kv_cache=cache, window_start=P, pass_name="decoder") if with_decoder else None
        model(enc2.input_ids, mask, kv_cache=cache, window_start=P, pass_name="encoder")
        return logits, cache

    with torch.no_grad():
        plain_logits, plain = run(True, garbage=False)
        _, no_decoder = run(False, garbage=False)
        noisy_logits, noisy = run(True, garbage=True)
    torch.testing.assert_close(noisy_logits, plain_logits, atol=0, rtol=0)
    real = mask[:, None, : P + C, None].bool()
    for layer in range(model.cfg.n_layers):
        for ours, other in ((plain.keys[layer], no_decoder.keys[layer]), (plain.values[layer], no_decoder.values[layer])):
            assert torch.equal(ours, other), layer
        for ours, other in ((plain.keys[layer], noisy.keys[layer]), (plain.values[layer], noisy.values[layer])):
            ours, other = ours[:, :, : P + C], other[:, :, : P + C]
            torch.testing.assert_close(ours[real.expand_as(ours)], other[real.expand_as(other)], atol=0, rtol=0)


def test_passes_apply_their_own_scalars_and_self_conditioning_is_checked(gemma):
    model, golden, facts = gemma
    P, C = golden.prompt_len, facts.canvas_length
    dec = golden.passes["dec"]
    mask = _canvas_mask(golden, facts, P + C)
    cache = KVCache.empty(model.cfg, batch=2, n_pos=P + C, like=model.W_E)
    model(golden.input_ids, mask, kv_cache=cache)  # pass_name=None: the default (encoder) pass
    decoder = model(dec.input_ids, mask, kv_cache=cache, window_start=P, pass_name="decoder")
    torch.testing.assert_close(decoder, dec.logits, atol=ATOL, rtol=RTOL)
    saved = [block.decoder_layer_scalar.clone() for block in model.blocks]
    try:  # the decoder with the encoder's scalars is another function
        for block in model.blocks:
            block.decoder_layer_scalar.copy_(block.encoder_layer_scalar)
        swapped = model(dec.input_ids, mask, kv_cache=cache, window_start=P, pass_name="decoder")
    finally:
        for block, scalar in zip(model.blocks, saved):
            block.decoder_layer_scalar.copy_(scalar)
    assert (swapped - dec.logits).abs().max() > 1e-2
    with pytest.raises(ValueError, match="read only by the self-conditioning pass"):
        model(golden.input_ids, mask[:, :P], self_conditioning_logits=torch.zeros(2, P, model.cfg.d_vocab_out))
    with pytest.raises(ValueError, match="self_conditioning_logits have shape"):
        model(dec.input_ids, mask, kv_cache=cache, window_start=P, pass_name="decoder",
              self_conditioning_logits=torch.zeros(2, C, 7))
    with pytest.raises(ValueError, match="pass_name='decode' is not one of"):
        model(dec.input_ids, mask, kv_cache=cache, window_start=P, pass_name="decode")


# ---------------------------------------------------------------- live reference: transformers' own two passes
def test_passes_match_transformers_on_a_fresh_random_config(tmp_path):
    """enc -> dec (self-conditioned) -> enc2 -> dec2 against upstream's encoder / decoder modules and
    their DynamicCache, on a config unlike both fixtures (5 layers, W 5 < C 6, three experts)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # the live reference
    from transformers.cache_utils import DynamicCache  # the live reference's cache

    vision = json.loads((FIXTURES / GEMMA[0] / "config.json").read_text())["vision_config"]
    text = dict(
        vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, global_head_dim=24, num_global_key_value_heads=1, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        num_experts=3, top_k_experts=2, moe_intermediate_size=12, rms_norm_eps=1e-6,
    )
    C = 6
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=C)
    generator = torch.Generator().manual_seed(2613)
    reference = DiffusionGemmaForBlockDiffusion(config).eval()
    randomize_weights(reference, generator, self_conditioning_divisor=10)
    reference.save_pretrained(tmp_path)
    model = HookedDiffusionTransformer.from_pretrained(tmp_path)

    P = 7
    prompt = torch.randint(3, 96, (2, P), generator=generator)
    prompt_mask = torch.ones(2, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    canvas, block1, canvas2 = (torch.randint(0, 96, (2, C), generator=generator) for _ in range(3))
    sc_logits = torch.randn(2, C, 96, generator=generator) * 3
    ones = torch.ones(2, C, dtype=torch.long)
    ours_mask = torch.cat([prompt_mask, ones, ones], 1)
    cache = KVCache.empty(model.cfg, batch=2, n_pos=P + 2 * C, like=model.W_E)
    upstream = DynamicCache(config=config.text_config)
    hf = reference.model
    with torch.no_grad():
        hf.encoder(input_ids=prompt, attention_mask=prompt_mask, position_ids=torch.arange(P)[None].expand(2, -1),
                   cache=upstream)
        model(prompt, ours_mask, kv_cache=cache, pass_name="encoder")
        steps = ((canvas, sc_logits, P), (canvas2, None, P + C))
        for k, (ids, sc, start) in enumerate(steps):
            dec_mask = ours_mask[:, : start + C]
            theirs = hf.decoder(decoder_input_ids=ids, self_conditioning_logits=sc, decoder_attention_mask=dec_mask,
                                decoder_position_ids=torch.arange(start, start + C)[None].expand(2, -1), cache=upstream)
            theirs = reference.lm_head(theirs.last_hidden_state)
            cap = model.cfg.final_logit_softcap
            theirs = torch.tanh(theirs / cap) * cap
            ours = model(ids, ours_mask, kv_cache=cache, window_start=start, pass_name="decoder",
                         self_conditioning_logits=sc)
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"decoder step {k}: {m}")
            if k == 0:  # self-conditioning moved the logits (the re-run's canvas K/V writes are harmless)
                plain = model(ids, ours_mask, kv_cache=cache, window_start=start, pass_name="decoder")
                assert (plain - ours).abs().max() > 1e-2
                # the committed block, appended by both encoders at its canvas positions
                hf.encoder(input_ids=block1, attention_mask=dec_mask, cache=upstream,
                           position_ids=torch.arange(P, P + C)[None].expand(2, -1))
                model(block1, ours_mask, kv_cache=cache, window_start=P, pass_name="encoder")
