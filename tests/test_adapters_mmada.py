"""Issue 4: the MMaDA adapter: forward parity on mmada-tiny (bigger vocab, image-codebook id in the
input), the legacy causal-when-padded mask on the llada-tiny padded goldens, save/load, and the
`mmu_generate` sampler goldens."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffusion_lens import HookedDiffusionTransformer
from tests.adapter_parity import assert_pairs_close, ln_out
from tests.conftest import FIXTURES

MMADA = FIXTURES / "mmada-tiny"


@pytest.fixture(scope="module")
def mmada():
    return HookedDiffusionTransformer.from_pretrained(MMADA), load_file(MMADA / "golden_forward.safetensors")


def llada_key_pairs(model, golden):
    ids = golden["input_ids"]
    logits, cache = model.run_with_cache(ids)
    flat = lambda t: t.reshape(*ids.shape, -1)  # noqa: E731
    pairs = {"logits": logits}
    for layer, block in enumerate(model.blocks):
        up, ours = f"act.model.transformer.blocks.{layer}", f"blocks.{layer}"
        pairs.update({
            f"hidden_states.{layer}": cache[f"{ours}.hook_resid_pre"],
            f"{up}.attn_norm.out": ln_out(cache, f"{ours}.ln1", block.ln1),
            f"{up}.q_proj.out": flat(cache[f"{ours}.attn.hook_q"]),
            f"{up}.k_proj.out": flat(cache[f"{ours}.attn.hook_k"]),
            f"{up}.v_proj.out": flat(cache[f"{ours}.attn.hook_v"]),
            f"{up}.rotary_emb.out.q": cache[f"{ours}.attn.hook_rot_q"].transpose(1, 2),
            f"{up}.rotary_emb.out.k": cache[f"{ours}.attn.hook_rot_k"].transpose(1, 2),
            f"{up}.attn_out.in": flat(cache[f"{ours}.attn.hook_z"]),
            f"{up}.attn_out.out": cache[f"{ours}.hook_attn_out"],
            f"{up}.ff_norm.out": ln_out(cache, f"{ours}.ln2", block.ln2),
            f"{up}.ff_proj.out": cache[f"{ours}.mlp.hook_pre"],
            f"{up}.act.out": F.silu(cache[f"{ours}.mlp.hook_pre"]),
            f"{up}.up_proj.out": cache[f"{ours}.mlp.hook_pre_linear"],
            f"{up}.ff_out.in": cache[f"{ours}.mlp.hook_post"],
            f"{up}.ff_out.out": cache[f"{ours}.hook_mlp_out"],
            f"{up}.out": cache[f"{ours}.hook_resid_post"],
        })
    final = ln_out(cache, "ln_final", model.ln_final)
    pairs["act.model.transformer.ln_f.out"] = pairs["act.model.transformer.ff_out.in"] = final
    pairs[f"hidden_states.{model.cfg.n_layers}"] = final
    pairs["act.model.transformer.ff_out.out"] = logits
    return pairs


def test_forward_every_golden_tensor_matches(mmada):
    model, golden = mmada
    assert model.adapter.name == "mmada" and model.cfg.d_vocab_out == 384
    assert (golden["input_ids"] >= 320).any()  # an image-codebook id goes through the same path
    pairs = llada_key_pairs(model, golden)
    assert set(pairs) | {"input_ids"} == set(golden)
    assert assert_pairs_close(pairs, golden) < 1e-5


@pytest.mark.parametrize("name", ["llada-tiny-mha", "llada-tiny-gqa"])
def test_legacy_causal_when_padded_mode_matches_the_feb_2025_file(name):
    """Loading a dense LLaDA checkpoint with adapter='mmada' gives MMaDA's (original LLaDA file's)
    mask semantics: any padded row makes the whole batch causal.

    Real-token rows match `legacy.logits`. Pad query rows do not, by design: upstream adds two
    finfo.min biases there, so a pad query (which may see no key) attends uniformly to every key,
    whereas we give fully masked rows a zero attention output. No upstream consumer reads those rows
    (MMaDA's sampler cannot even run on padded input)."""
    folder = FIXTURES / name
    legacy = HookedDiffusionTransformer.from_pretrained(folder, adapter="mmada")
    current = HookedDiffusionTransformer.from_pretrained(folder)
    assert legacy.cfg.attention_mask_mode == "causal_when_padded"
    padded = load_file(folder / "golden_forward_padded.safetensors")
    ids, mask = padded["input_ids"], padded["attention_mask"]
    out = legacy(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], padded["legacy.logits"][real], atol=1e-4, rtol=1e-4)
    # The unpadded row 1 is causal too: it differs from the current semantics by whole logits.
    assert (out[1] - current(ids, mask)[1]).abs().max() > 0.5
    plain = load_file(folder / "golden_forward.safetensors")["input_ids"]
    torch.testing.assert_close(legacy(plain, torch.ones_like(plain)), padded["legacy.logits_no_mask"], atol=1e-4, rtol=1e-4)


def test_save_pretrained_round_trip_in_mmada_format(mmada, tmp_path):
    model, golden = mmada
    model.save_pretrained(tmp_path)
    original, saved = load_file(MMADA / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    config = json.loads((tmp_path / "config.json").read_text())
    source = json.loads((MMADA / "config.json").read_text())
    assert {k: config[k] for k in source} == source
    reloaded = HookedDiffusionTransformer.from_pretrained(tmp_path)
    assert reloaded.adapter.name == "mmada"
    assert torch.equal(reloaded(golden["input_ids"]), model(golden["input_ids"]))


# ---------------------------------------------------------------- sampler (`mmu_generate`)
@pytest.mark.parametrize("run", ["mmu_generate", "mmu_generate_cfg"])
def test_mmu_generate_goldens_token_exact(mmada, run):
    from tests.adapter_parity import run_metadata

    model, _ = mmada
    golden = load_file(MMADA / "golden_generate.safetensors")
    meta = run_metadata(MMADA / "golden_generate.safetensors")
    options = dict(meta[f"{run}.kwargs"])
    options["gen_length"] = options.pop("max_new_tokens")  # LLaDA-family name of the same option
    out = model.generate(golden[f"{run}.prompt"], mask_id=int(meta["mask_id"]), progress=False, **options)
    assert torch.equal(out.sequences, golden[f"{run}.output"])
    assert out.trajectory.shape[0] == options["steps"]


def test_mmada_sampler_is_llada_with_float64_confidence_and_refuses_padding(mmada):
    from diffusion_lens.denoising.samplers import LLaDASampler, MMaDASampler

    model, _ = mmada
    sampler = model.adapter.sampler(model.cfg)
    assert isinstance(sampler, MMaDASampler) and sampler.confidence_dtype == torch.float64
    assert (sampler.steps, sampler.gen_length, sampler.block_size(), sampler.temperature) == (128, 128, 128, 0.0)
    assert sampler.block_length is None and sampler.n_blocks() == 1  # one block: follows gen_length
    golden = load_file(MMADA / "golden_generate.safetensors")
    llada = model.generate(golden["mmu_generate.prompt"], sampler=LLaDASampler(steps=8, gen_length=16, block_length=8),
                           progress=False)
    assert torch.equal(llada.sequences, golden["llada_generate.output"])  # same algorithm, as upstream records
    prompt = golden["mmu_generate.prompt"]
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(prompt, attention_mask=torch.ones_like(prompt).index_fill_(1, torch.tensor([0]), 0),
                       steps=8, gen_length=16, block_length=8, progress=False)
