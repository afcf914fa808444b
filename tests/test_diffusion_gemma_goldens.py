"""The DiffusionGemma goldens (issue 13) as recorded: the files' own invariants.

Issue 13 adds the adapter and sampler that must reproduce these files (atol 1e-4 forward, token
for token in `generate`). Until then these tests pin what the files say about themselves, so that a
damaged or mis-copied fixture is caught here and not mistaken for a model bug: counts and sizes as
the README lists them, shapes consistent with `config.json`, the stored tensors consistent with one
another (softcap, router renormalisation, layer scalars per pass, caches, masks) and the generation
traces consistent with the spec's sampler (acceptance, re-noising, frozen rows, stopping, EOS/pad
finalization). `test_each_check_catches_a_damaged_copy` corrupts copies to show each check can fail.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests._diffusion_gemma import (
    PASSES, RUNS, entropy_bound_accept, planned_blocks, read_config, read_forward, read_runs,
)
from tests.conftest import FIXTURES

FOLDERS = ["diffusion-gemma-tiny", "diffusion-gemma-tiny-dense"]
SHARED = FIXTURES.parents[2] / "shared" / "fixtures"  # ../shared beside the repository
FILES = ("config.json", "generation_config.json", "model.safetensors", "golden_forward.safetensors",
         "golden_generate.safetensors")
README = {  # the README's tables: sizes in bytes, tensor counts, model facts
    "diffusion-gemma-tiny": dict(
        sizes=(2306, 408, 1136184, 1273832, 220119), counts=(114, 242, 221), vocab=320, d_model=64,
        types="SFSF", n_heads=4, kv=(2, 1, 2, 1), hd=(16, 32, 16, 32), window=8, d_mlp=96, experts=(4, 2, 32),
        canvas=16, fwd_pads=3, gen_pads=2, gen_prompt=9, max_new=32, steps=12),
    "diffusion-gemma-tiny-dense": dict(
        sizes=(2165, 408, 417764, 467840, 108046), counts=(92, 189, 221), vocab=288, d_model=48,
        types="SSF", n_heads=6, kv=(3, 3, 3), hd=(8, 8, 16), window=6, d_mlp=80, experts=(1, 1, 24),
        canvas=8, fwd_pads=4, gen_pads=3, gen_prompt=8, max_new=16, steps=10),
}
BOS, PAD = 2, 0
VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def rms(x, weight=None, eps=1e-6):
    x = x * (x.pow(2).mean(-1, keepdim=True) + eps).pow(-0.5)
    return x if weight is None else x * weight


def close(actual, expected, atol=1e-5, what=""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


# --- checks (plain functions of a folder, so the corruption test can run them on damaged copies) ---


def check_files(folder: Path):
    facts = README[folder.name]
    assert tuple((folder / f).stat().st_size for f in FILES) == facts["sizes"], "file sizes differ from the README"
    for name, count in zip(FILES[2:], facts["counts"]):
        with safe_open(str(folder / name), "pt") as file:
            assert len(list(file.keys())) == count, name
    assert len(read_runs(folder).runs) == 12


def check_config(folder: Path):
    cfg, facts = read_config(folder), README[folder.name]
    assert (cfg.vocab, cfg.d_model, cfg.n_layers, cfg.n_heads) == (
        facts["vocab"], facts["d_model"], len(facts["types"]), facts["n_heads"])
    assert "".join("S" if cfg.sliding(i) else "F" for i in range(cfg.n_layers)) == facts["types"]
    assert (cfg.kv_heads, cfg.head_dim, cfg.sliding_window, cfg.canvas_length) == (facts["kv"], facts["hd"],
                                                                                  facts["window"], facts["canvas"])
    assert (cfg.d_mlp, (cfg.n_experts, cfg.top_k, cfg.d_expert)) == (facts["d_mlp"], facts["experts"])
    assert (cfg.softcap, cfg.pad_id, cfg.eos_id, cfg.bos_id) == (30.0, PAD, 1, BOS)  # softcap: the class default
    gen = read_runs(folder).generation_config
    assert (gen["max_new_tokens"], gen["max_denoising_steps"], gen["eos_token_id"], gen["pad_token_id"]) == (
        facts["max_new"], facts["steps"], [1, 106, 50], PAD)
    assert (gen["t_min"], gen["t_max"], gen["sampler_config"]["entropy_bound"], gen["stability_threshold"],
            gen["confidence_threshold"]) == (0.4, 0.8, 0.1, 1, 0.005)


def check_weights(folder: Path):
    cfg, weights = read_config(folder), load_file(folder / "model.safetensors")
    D, V, H, I, (E, _, Ie) = cfg.d_model, cfg.vocab, cfg.n_heads, cfg.d_mlp, (cfg.n_experts, cfg.top_k, cfg.d_expert)
    expected = {"model.decoder.embed_tokens.weight": (V, D), "model.decoder.norm.weight": (D,),
                "model.decoder.self_conditioning.pre_norm.weight": (D,),
                "model.decoder.self_conditioning.gate_proj.weight": (I, D),
                "model.decoder.self_conditioning.up_proj.weight": (I, D),
                "model.decoder.self_conditioning.down_proj.weight": (D, I)}
    for i in range(cfg.n_layers):
        hd, kv, p = cfg.head_dim[i], cfg.kv_heads[i], f"model.decoder.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                     "pre_feedforward_layernorm_2"):
            expected[f"{p}{norm}.weight"] = (D,)
        expected |= {f"{p}self_attn.q_proj.weight": (H * hd, D), f"{p}self_attn.k_proj.weight": (kv * hd, D),
                     f"{p}self_attn.o_proj.weight": (D, H * hd), f"{p}self_attn.q_norm.weight": (hd,),
                     f"{p}self_attn.k_norm.weight": (hd,), f"{p}mlp.gate_proj.weight": (I, D),
                     f"{p}mlp.up_proj.weight": (I, D), f"{p}mlp.down_proj.weight": (D, I),
                     f"{p}router.proj.weight": (E, D), f"{p}router.scale": (D,), f"{p}router.per_expert_scale": (E,),
                     f"{p}experts.gate_up_proj": (E, 2 * Ie, D), f"{p}experts.down_proj": (E, D, Ie),
                     f"{p}layer_scalar": (1,), f"model.encoder.language_model.layers.{i}.layer_scalar": (1,)}
        if cfg.sliding(i):  # full layers take their values from k_proj
            expected[f"{p}self_attn.v_proj.weight"] = (kv * hd, D)
        encoder_scalar = weights[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        assert not torch.equal(weights[f"{p}layer_scalar"], encoder_scalar)  # on purpose: each pass uses its own
    text = {k: tuple(t.shape) for k, t in weights.items() if not k.startswith(VISION)}
    assert text == expected  # no lm_head (tied), no encoder copies of the decoder's tensors
    assert len(weights) - len(text) == 18 and all(t.dtype == torch.float32 for t in weights.values())


def check_forward_shapes(folder: Path):
    cfg, fwd = read_config(folder), read_forward(folder)
    D, V, C, H, E, K = cfg.d_model, cfg.vocab, cfg.canvas_length, cfg.n_heads, cfg.n_experts, cfg.top_k
    P = fwd.prompt_len
    assert (P, int(fwd.metadata["fwd_pads_row1"]), int(fwd.metadata["canvas_length"])) == (
        P, README[folder.name]["fwd_pads"], C)
    assert P > cfg.sliding_window - 1  # the sliding cache truncation matters
    for name, t in dict(input_ids=fwd.input_ids, attention_mask=fwd.attention_mask).items():
        assert t.shape == (2, P) and t.dtype == torch.int64, name
    assert fwd.canvas.shape == fwd.canvas2.shape == fwd.block1_tokens.shape == (2, C)
    assert fwd.sc_logits.shape == (2, C, V)
    for p, rec in fwd.passes.items():
        T, past = rec.input_ids.shape[1], rec.past_len
        assert T == (P if p == "enc" else C) and rec.attention_mask.shape == (2, past + T), p
        assert rec.position_ids.tolist() == list(range(past, past + T)), p  # enc2: the canvas's own decoder positions
        assert rec.last_hidden_state.shape == (2, T, D), p
        assert (rec.logits is None) == rec.is_encoder and (rec.embed is None) == (p == "dec2"), p
        assert all(t is None or t.shape == (2, C, V) for t in (rec.logits, rec.logits_presoftcap)), p
        assert all(t is None or t.shape == (2, T, D) for t in (rec.embed, rec.inputs_embeds, rec.soft_embeddings,
                                                                rec.sc_signal)), p
        for i, layer in enumerate(rec.layers):
            hd, kv, n_i = cfg.head_dim[i], cfg.kv_heads[i], cfg.cache_len(i, P)
            r = layer.router
            assert layer.out.shape == (2, T, D) and r.logits.shape == r.probs.shape == (2 * T, E), (p, i)
            assert r.topk_weights.shape == r.topk_index.shape == (2 * T, K), (p, i)
            assert r.topk_index.dtype == torch.int64, (p, i)
            shapes = dict(ln1=(2, T, D), attn_out=(2, T, D), attn_out_normed=(2, T, D), resid_mid=(2, T, D),
                          ln2=(2, T, D), mlp_out=(2, T, D), mlp_out_normed=(2, T, D), moe_out_normed=(2, T, D),
                          ffn_out=(2, T, D), k_proj=(2, T, kv * hd), v_proj=(2, T, kv * hd), q_normed=(2, T, H, hd),
                          k_normed=(2, T, kv, hd), v_normed=(2, T, kv, hd), attn_z=(2, T, H * hd), moe_in=(2 * T, D),
                          moe_out=(2 * T, D), attn_pattern=(2, H, C, n_i + C))
            assert {h: tuple(t.shape) for h, t in layer.hooks.items()} == {h: shapes[h] for h in layer.hooks}, (p, i)
            if rec.cache is not None:
                keys, values = rec.cache[i]
                assert keys.shape == values.shape == (2, kv, cfg.cache_len(i, past + T), hd), (p, i)


def check_forward_inputs(folder: Path):
    cfg, fwd = read_config(folder), read_forward(folder)
    P, C, pads = fwd.prompt_len, cfg.canvas_length, int(fwd.metadata["fwd_pads_row1"])
    ids, mask = fwd.input_ids, fwd.attention_mask
    assert ids[0, 0] == BOS and ids[1, pads] == BOS and (ids[1, :pads] == PAD).all()
    for text in (ids[0, 1:], ids[1, pads + 1:]):
        assert ((text >= 3) & (text < 300)).all()
    assert mask[0].tolist() == [1] * P and mask[1].tolist() == [0] * pads + [1] * (P - pads)
    ones = torch.ones(2, C, dtype=torch.int64)
    dec_mask = torch.cat([mask, ones], 1)
    assert torch.equal(fwd.passes["dec"].attention_mask, dec_mask)  # the prompt mask padded with ones
    assert torch.equal(fwd.passes["enc2"].attention_mask, dec_mask)
    assert torch.equal(fwd.passes["dec2"].attention_mask, torch.cat([dec_mask, ones], 1))
    assert all(((c >= 0) & (c < cfg.vocab)).all() for c in (fwd.canvas, fwd.canvas2))
    dec_logits = fwd.passes["dec"].logits
    assert torch.equal(fwd.block1_tokens, dec_logits.argmax(-1))
    close(fwd.sc_logits, dec_logits / float(fwd.metadata["sc_logits_divisor"]), atol=1e-6, what="sc_logits")


def check_forward_values(folder: Path):
    cfg, fwd, w = read_config(folder), read_forward(folder), load_file(folder / "model.safetensors")
    E_, scale = w["model.decoder.embed_tokens.weight"], math.sqrt(cfg.d_model)
    pads = int(fwd.metadata["fwd_pads_row1"])
    for p, rec in fwd.passes.items():
        if rec.logits is not None:
            assert rec.logits.isfinite().all() and rec.logits.abs().max() <= cfg.softcap, p
        if rec.embed is not None:
            close(rec.embed, E_[rec.input_ids] * scale, what=f"{p}.embed")
        if rec.inputs_embeds is not None:  # the decoder input is always unit-RMS
            signal = rec.sc_signal if rec.sc_signal is not None else 0
            close(rec.inputs_embeds, rms(E_[rec.input_ids] * scale + signal), what=f"{p}.inputs_embeds")
        pre = f"model.{'encoder.language_model' if rec.is_encoder else 'decoder'}.layers."
        for i, layer in enumerate(rec.layers):
            r, what = layer.router, f"{p}.layers.{i}"
            assert ((r.topk_index >= 0) & (r.topk_index < cfg.n_experts)).all(), what
            close(r.probs, r.logits.softmax(-1), atol=1e-6, what=f"{what}.router.probs")
            assert torch.equal(r.topk_index, r.probs.topk(cfg.top_k, -1).indices), what
            chosen = r.probs.gather(-1, r.topk_index)
            per_expert = w[f"model.decoder.layers.{i}.router.per_expert_scale"][r.topk_index]
            close(r.topk_weights, chosen / chosen.sum(-1, keepdim=True) * per_expert, atol=1e-6, what=what)
            close((r.topk_weights / per_expert).sum(-1), torch.ones(r.topk_weights.shape[0]), atol=1e-6, what=what)
            if "ffn_out" in layer.hooks:  # each pass multiplies by its own layer_scalar
                close(layer.out, (layer.hooks["resid_mid"] + layer.hooks["ffn_out"]) * w[f"{pre}{i}.layer_scalar"],
                      what=f"{what}.out")
            if rec.is_encoder and "attn_out" in layer.hooks:  # pad queries that see only pads: exactly zero
                assert (layer.hooks["attn_out"][1, :pads] == 0).all(), what
            if "attn_out_normed" in layer.hooks:
                before = rec.inputs_embeds if i == 0 else rec.layers[i - 1].out
                close(layer.hooks["resid_mid"], before + layer.hooks["attn_out_normed"], what=f"{what}.resid_mid")
            if "attn_pattern" in layer.hooks:
                pattern, n_i = layer.hooks["attn_pattern"], cfg.cache_len(i, rec.past_len)
                close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), what=f"{what}.attn_pattern")
                hidden = rec.attention_mask[:, rec.past_len - n_i:] == 0  # pad keys among the cache + canvas keys
                assert (pattern[hidden[:, None, None, :].expand_as(pattern)] == 0).all(), what
        final = w["model.decoder.norm.weight"]
        close(rec.last_hidden_state, rms(rec.layers[-1].out, final), what=f"{p}.last_hidden_state")
    dec, dec_sc = fwd.passes["dec"], fwd.passes["dec_sc"]
    close(dec.logits, cfg.softcap * torch.tanh(dec.logits_presoftcap / cfg.softcap), what="dec softcap")
    assert torch.equal(dec.embed, dec_sc.embed) and not torch.allclose(dec.logits, dec_sc.logits, atol=1e-2)
    close(dec_sc.soft_embeddings, fwd.sc_logits.softmax(-1) @ E_ * scale, what="dec_sc.soft_embeddings")
    enc, enc2 = fwd.passes["enc"], fwd.passes["enc2"]
    for i in range(cfg.n_layers):
        keys, values = enc.cache[i]
        n_i = keys.shape[2]  # values carry no RoPE; keys are rotated, which keeps each head's norm
        close(values, enc.layers[i].hooks["v_normed"][:, -n_i:].transpose(1, 2), atol=1e-6,
              what=f"enc.cache.{i}.values")
        close(keys.norm(dim=-1), enc.layers[i].hooks["k_normed"][:, -n_i:].transpose(1, 2).norm(dim=-1), atol=1e-4,
              what=f"enc.cache.{i}.keys")
        if not cfg.sliding(i):  # full layers append: the prompt's cache stays as it was
            assert all(torch.equal(grown[:, :, :n_i], kept) for grown, kept in zip(enc2.cache[i], enc.cache[i])), i


def check_generate(folder: Path):
    cfg, gen = read_config(folder), read_runs(folder)
    C, V, P, pads = cfg.canvas_length, cfg.vocab, gen.prompt_len, gen.pads_row1
    assert (P, pads) == (README[folder.name]["gen_prompt"], README[folder.name]["gen_pads"])
    row0 = gen.runs["single_default"].prompt_ids[0]
    assert row0[0] == BOS and ((row0[1:] >= 3) & (row0[1:] < 300)).all()
    for name, run in gen.runs.items():
        batch, t, eff = name.startswith("batch_"), run.trace, run.effective_config
        B, N, k, S = 2 if batch else 1, eff["max_denoising_steps"], run.n_blocks, run.n_steps
        # the call: prompt, mask, kwargs, and the config generate() resolved from them and generation_config.json
        assert run.prompt_ids.shape == (B, P) and torch.equal(run.prompt_ids[0], row0), name
        assert (run.attention_mask is not None) == batch, name
        assert (run.init_canvas is not None) == (name == "single_init_canvas"), name
        if batch:
            assert run.prompt_ids[1, :pads].eq(PAD).all() and run.prompt_ids[1, pads] == BOS, name
            assert run.attention_mask.tolist() == [[1] * P, [0] * pads + [1] * (P - pads)], name
        for key, value in eff.items():
            given = run.kwargs.get(key, gen.generation_config.get(key))
            if key == "sampler_config":
                assert value == given["entropy_bound"], name
            else:
                assert value == given, (name, key)
        # output = prompt + the committed (finalized) argmax blocks
        assert run.blocks.shape == (k, B, C) and run.sequences.shape == (B, P + k * C), name
        assert torch.equal(run.sequences, torch.cat([run.prompt_ids, *run.blocks], 1)), name
        assert torch.equal(run.encoder_input_block1plus, run.blocks[:-1]), name
        # step bookkeeping per block: N, N-1, ...; early exit only when every row finished
        assert all(f.shape[0] == S for f in vars(t).values()) and t.block.tolist() == sorted(t.block.tolist()), name
        assert set(t.block.tolist()) == set(range(k)), name
        for b in range(k):
            steps = run.steps_of_block(b)
            assert len(steps) <= N and t.cur_step[steps].tolist() == list(range(N, N - len(steps), -1)), (name, b)
            assert t.finished[steps[-1]].all() or len(steps) == N, (name, b)
            assert not any(t.finished[s].all() for s in steps[:-1]), (name, b)
            assert t.has_self_conditioning[steps].tolist() == [False] + [True] * (len(steps) - 1), (name, b)
        step_t = torch.tensor(t.cur_step.tolist(), dtype=torch.int32) / N  # upstream: int32 tensor / int, float32
        assert torch.equal(t.temperature, eff["t_min"] + (eff["t_max"] - eff["t_min"]) * step_t), name
        if run.init_canvas is not None:
            assert torch.equal(t.decoder_input[0], run.init_canvas), name
        for ids in (t.decoder_input, t.sampled, t.renoised, t.argmax):
            assert ((ids >= 0) & (ids < V)).all(), name
        # acceptance, re-noising, frozen rows, stopping
        assert torch.equal(t.accepted_mask, entropy_bound_accept(t.entropy, eff["sampler_config"])), name
        assert t.accepted_mask.any(-1).all(), name  # the lowest-entropy position is always accepted
        assert torch.equal(t.renoised[t.accepted_mask], t.sampled[t.accepted_mask]), name
        for s in range(S):
            frozen = run.finished_before(s)
            assert torch.equal(t.finished[s], frozen | t.stop_signal[s]), (name, s)  # monotone within a block
            if s + 1 < S and t.block[s + 1] == t.block[s]:
                expected = torch.where(frozen[:, None], t.decoder_input[s], t.renoised[s])
                assert torch.equal(t.decoder_input[s + 1], expected), (name, s)
            if frozen.any():
                assert torch.equal(t.argmax[s][frozen], t.argmax[s - 1][frozen]), (name, s)
            live = ~frozen
            close(t.mean_entropy[s][live], t.entropy[s][live].mean(-1), atol=1e-6, what=f"{name} step {s}")
            first = s == 0 or t.block[s - 1] != t.block[s]
            stable = torch.ones(B, dtype=torch.bool) if eff["stability_threshold"] == 0 else \
                torch.zeros(B, dtype=torch.bool) if first else (t.argmax[s] == t.argmax[s - 1]).all(-1)
            confident = t.mean_entropy[s] < eff["confidence_threshold"]
            assert torch.equal(t.stop_signal[s][live], (stable & confident)[live]), (name, s)
        # EOS / pad finalization of each block, the block count, tokens per forward
        eos, done = torch.tensor(eff["eos_token_id"]), torch.zeros(B, dtype=torch.bool)
        passes = torch.zeros(B)
        for b in range(k):
            for s in run.steps_of_block(b):
                passes += ~(run.finished_before(s) | done)
            new, prev = run.committed_argmax(b).clone(), done
            is_eos = torch.isin(new, eos)
            now = is_eos.any(-1)
            if eff["max_length"] is not None:
                now |= P + (b + 1) * C >= eff["max_length"]
            done = prev | now
            if done.any():
                new[prev] = PAD
                count = is_eos.cumsum(-1)
                new[(count > 0) & ~((count == 1) & is_eos)] = PAD  # after the first EOS (kept): pad
            assert torch.equal(run.blocks[b], new), (name, b)
            if done.all():
                assert b == k - 1, (name, b)
        assert k == planned_blocks(run, C, P) or done.all(), name
        generated = run.sequences[:, P:]
        close(run.tokens_per_forward, (generated != PAD).sum(-1) / passes, atol=1e-6, what=f"{name}.tokens_per_forward")
        after_eos = torch.isin(generated, eos).cumsum(-1) - torch.isin(generated, eos).int() > 0
        assert (generated[after_eos] == PAD).all(), name
    runs = gen.runs
    assert runs["single_genconfig"].kwargs == {} and all(len(runs["single_one_step"].steps_of_block(b)) == 1
                                                          for b in range(runs["single_one_step"].n_blocks))
    long = runs["single_max_length"]  # MaxLengthCriteria stops after a block, which may overshoot max_length
    assert long.n_blocks == 1 and long.sequences.shape[1] == P + C > long.kwargs["max_length"]


CHECKS = [check_files, check_config, check_weights, check_forward_shapes, check_forward_inputs, check_forward_values,
          check_generate]


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_golden_invariants(check, folder):
    check(FIXTURES / folder)


@pytest.mark.parametrize("folder", FOLDERS)
def test_copies_are_byte_identical_to_shared(folder):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} absent (a clone without ../shared): nothing to compare the copies with")
    for name in FILES:
        assert (FIXTURES / folder / name).read_bytes() == (SHARED / folder / name).read_bytes(), name
    ours = (FIXTURES / "README-diffusion-gemma.md").read_text().split("\n", 2)[2]  # minus the "copied from" line
    assert ours == (SHARED / "README-diffusion-gemma.md").read_text()


@pytest.mark.parametrize("folder", FOLDERS)
def test_hub_config_form_resolves_like_the_saved_form(folder):
    """The published config.json has `global_head_dim` / `num_global_key_value_heads` and no
    `per_layer_config`; both forms must give the same per-layer dims (global_head_dim defaults to 512)."""
    saved = json.loads((FIXTURES / folder / "config.json").read_text())
    hub = json.loads(json.dumps(saved))
    overrides = hub["text_config"].pop("per_layer_config")
    full = next(iter(overrides.values()))
    hub["text_config"]["global_head_dim"] = full["head_dim"]
    if "num_key_value_heads" in full:
        hub["text_config"]["num_global_key_value_heads"] = full["num_key_value_heads"]
    hub["text_config"]["final_logit_softcapping"] = 30.0
    assert read_config(hub) == read_config(saved)
    padded = json.loads(json.dumps(saved))  # save_pretrained may zero-pad the layer keys ("05")
    padded["text_config"]["per_layer_config"] = {f"{int(k):02d}": v for k, v in overrides.items()}
    assert read_config(padded) == read_config(saved)
    del hub["text_config"]["global_head_dim"]
    assert {read_config(hub).head_dim[i] for i, t in enumerate(saved["text_config"]["layer_types"])
            if t == "full_attention"} == {512}


def test_runs_are_listed_in_readme_order():
    assert list(read_runs(FIXTURES / FOLDERS[0]).runs) == list(RUNS)
    assert list(read_forward(FIXTURES / FOLDERS[0]).passes) == list(PASSES)


def _damage(folder: Path, file: str, edits: dict) -> None:
    with safe_open(str(folder / file), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(folder / file)
    for key, edit in edits.items():
        tensors[key] = edit(tensors[key].clone())
    save_file(tensors, folder / file, metadata)


def _set(tensor, index, value):
    tensor[index] = value
    return tensor


def _flip_accepted(renoised):
    renoised[0, 0, :] = (renoised[0, 0, :] + 1) % 320  # every position: the accepted ones lose their sample
    return renoised


DAMAGES = {  # what a bad copy or a bad regeneration could look like -> the check that must notice
    "truncated weights": (check_files, "model.safetensors", None),
    "logit past the softcap": (check_forward_values, "golden_forward.safetensors",
                               {"dec2.logits": lambda t: t.index_put_((torch.tensor(0),), torch.tensor(31.0))}),
    "router top-k swapped": (check_forward_values, "golden_forward.safetensors",
                             {"enc.layers.0.router.topk_index": lambda t: t.flip(-1)}),
    "encoder scalar changed": (check_forward_values, "model.safetensors",
                               {"model.encoder.language_model.layers.1.layer_scalar": lambda t: t * 1.01}),
    "canvas mask grown": (check_forward_inputs, "golden_forward.safetensors",
                          {"dec2.decoder_attention_mask": lambda t: t.index_fill_(1, torch.tensor([0]), 1)}),
    "accepted token re-noised": (check_generate, "golden_generate.safetensors",
                                 {"gen.single_default.trace.renoised": _flip_accepted}),
    "stop flag dropped": (check_generate, "golden_generate.safetensors",
                          {"gen.batch_early_stop.trace.finished": lambda t: t.logical_and_(torch.zeros_like(t[0]))}),
    "pad after EOS lost": (check_generate, "golden_generate.safetensors",  # row 0 ends with EOS in block 1
                           {"gen.batch_eos.sequences": lambda t: _set(t, (0, -1), 7),
                            "gen.batch_eos.blocks": lambda t: _set(t, (-1, 0, -1), 7)}),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_check_catches_a_damaged_copy(damage, tmp_path):
    check, file, edits = DAMAGES[damage]
    copy = tmp_path / FOLDERS[0]
    shutil.copytree(FIXTURES / FOLDERS[0], copy)
    if edits is None:
        (copy / file).write_bytes((copy / file).read_bytes()[:-4])
    else:
        _damage(copy, file, edits)
    with pytest.raises((AssertionError, ValueError, KeyError)):
        check(copy)
