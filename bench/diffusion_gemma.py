"""DiffusionGemma (issue 13, item 6): our two passes and `generate` against transformers' own
`DiffusionGemmaForBlockDiffusion`, on the same random weights.

The reference is built from a random `DiffusionGemmaConfig`, filled with seeded weights (the scheme of
tests/test_diffusion_gemma_passes.py), written with its own `save_pretrained` and loaded by ours with
`from_pretrained`: one set of weights, two implementations. Three measures, each ours / transformers:

    encoder   the prompt's causal pass writing a fresh KV cache (`model(..., pass_name="encoder",
              return_type=None)`: no LM head, as in `generate`, vs `model.model.encoder(...)` with a
              fresh `DynamicCache`)
    decoder   one self-conditioned denoising step over a canvas, reading the prompt's cache
              (`model(..., pass_name="decoder")` vs `model.model.decoder(...)` + lm_head + softcap)
    generate  `model.generate` vs upstream's `generate`, same seed from the global RNG, same
              generation config; the tokens must be identical (checked before timing)

No hooks anywhere; goal <= 1.05 per row. fp32, CPU, one torch thread by default (CPU time is then
exact). Timing as bench/generate.py: warm-up, then rounds in which every run goes once in an order
rotated per round; a ratio is the median over rounds of the within-round ratio, on process CPU time
(headline) and wall time. Peak memory of loading a sharded bf16 checkpoint (the other half of item
6) is not measured here (bench/load_memory.py measures it, DiffusionGemma included).

Run: `.venv/bin/python bench/diffusion_gemma.py [--repeats N] [--threads T] [--quick]`; ~2.5 min with
the defaults on a 2-core machine. Writes bench_out/diffusion_gemma.json; exits 1 if the tokens
or the logits disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import REPO_ROOT, available_threads  # noqa: E402
from generate import round_ratio, time_rounds  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from diffusion_lens import HookedDiffusionTransformer  # noqa: E402
from diffusion_lens.core.kv_cache import KVCache  # noqa: E402
from tests._diffusion_gemma import randomize_weights  # noqa: E402  (the fixtures' scheme, one copy)

# The 26B-A4B's layout (5 sliding layers per full layer, GQA, a wider single-KV-head full attention,
# dense MLP + MoE in every layer), shrunk: 6 layers (not 30), d_model 768 (not 2816), 16 experts
# top-4 (not 128 top-8), vocab 32768 (not 262144).
TEXT = dict(
    vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4, head_dim=96, global_head_dim=192, num_global_key_value_heads=1, sliding_window=64,
    layer_types=["sliding_attention"] * 5 + ["full_attention"], num_experts=16, top_k_experts=4,
    moe_intermediate_size=512, rms_norm_eps=1e-6,
)
QUICK = dict(TEXT, vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, global_head_dim=64, sliding_window=16,
             layer_types=["sliding_attention", "full_attention"], num_experts=4, top_k_experts=2,
             moe_intermediate_size=64)
CANVAS = 32
BATCH, PROMPT = 2, 64
GENERATE = dict(max_new_tokens=2 * CANVAS, max_denoising_steps=4)  # two blocks, <= 4 decoder steps each
GOAL = 1.05


def build_pair(text: dict, folder: Path, seed: int = 0):
    """(ours, reference): a random `DiffusionGemmaForBlockDiffusion`, saved, and ours loaded from it."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion  # the reference

    vision = json.loads((REPO_ROOT / "tests" / "fixtures" / "diffusion-gemma-tiny" / "config.json").read_text())["vision_config"]
    config = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=CANVAS)
    reference = DiffusionGemmaForBlockDiffusion(config).eval()
    randomize_weights(reference, torch.Generator().manual_seed(seed), self_conditioning_divisor=10)
    reference.save_pretrained(folder)
    return HookedDiffusionTransformer.from_pretrained(folder), reference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (default 4)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then exact)")
    parser.add_argument("--quick", action="store_true", help="a tiny shape, for a smoke test")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "diffusion_gemma.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.cache_utils import DynamicCache  # the reference's cache

    text = QUICK if args.quick else TEXT
    with tempfile.TemporaryDirectory() as tmp:
        ours, reference = build_pair(text, Path(tmp))
    n_params = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for n, p in reference.named_parameters() if "vision" not in n)
    hf, P, C, V = reference.model, PROMPT, CANVAS, text["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, V, (BATCH, P), generator=gen)
    prompt_mask = torch.ones(BATCH, P, dtype=torch.long)
    prompt_mask[1, :5] = 0  # a left-padded row
    canvas = torch.randint(0, V, (BATCH, C), generator=gen)
    sc_logits = torch.randn(BATCH, C, V, generator=gen) * 3
    mask = torch.cat([prompt_mask, torch.ones(BATCH, C, dtype=torch.long)], 1)
    positions = torch.arange(P)[None].expand(BATCH, -1)
    canvas_positions = torch.arange(P, P + C)[None].expand(BATCH, -1)
    cap = ours.cfg.final_logit_softcap

    def ours_encoder(cache=None):
        cache = cache if cache is not None else KVCache.empty(ours.cfg, batch=BATCH, n_pos=P + C, like=ours.W_E)
        return ours(prompt, mask, kv_cache=cache, pass_name="encoder", return_type=None)

    def ref_encoder(cache=None):
        cache = cache if cache is not None else DynamicCache(config=reference.config.text_config)
        return hf.encoder(input_ids=prompt, attention_mask=prompt_mask, position_ids=positions, cache=cache)

    ours_cache = KVCache.empty(ours.cfg, batch=BATCH, n_pos=P + C, like=ours.W_E)
    ref_cache = DynamicCache(config=reference.config.text_config)

    def ours_decoder():
        return ours(canvas, mask, kv_cache=ours_cache, window_start=P, pass_name="decoder",
                    self_conditioning_logits=sc_logits)

    def ref_decoder():
        out = hf.decoder(decoder_input_ids=canvas, self_conditioning_logits=sc_logits, decoder_attention_mask=mask,
                         decoder_position_ids=canvas_positions, cache=ref_cache)
        return torch.tanh(reference.lm_head(out.last_hidden_state) / cap) * cap

    def ours_generate():
        torch.manual_seed(7)
        return ours.generate(prompt, attention_mask=prompt_mask, chat=False, progress=False, **GENERATE).sequences

    def ref_generate():
        torch.manual_seed(7)
        out = reference.generate(prompt, attention_mask=prompt_mask, **GENERATE)
        return out.sequences if hasattr(out, "sequences") else out

    print(f"torch {torch.__version__}, {args.threads} threads on {available_threads()} cores; DiffusionGemma "
          f"{n_params / 1e6:.1f}M params (transformers' text model: {n_ref / 1e6:.1f}M), {text['num_hidden_layers']} "
          f"layers, d_model {text['hidden_size']}, {text['num_experts']} experts top-{text['top_k_experts']}, vocab {V}; "
          f"batch {BATCH}, prompt {P} (one row left-padded), canvas {C}, generate {GENERATE}")
    with torch.inference_mode():
        ours_encoder(ours_cache)
        ref_encoder(ref_cache)
        theirs = ref_decoder()
        decoder_diff = ((ours_decoder() - theirs).abs().max() / theirs.abs().max()).item()
        ours_tokens, ref_tokens = ours_generate(), ref_generate()
        same = torch.equal(ours_tokens, ref_tokens)
        print(f"decoder max |logit diff| / max |logit| {decoder_diff:.1e}; tokens identical: {'yes' if same else 'no'} "
              f"({tuple(ours_tokens.shape)} vs {tuple(ref_tokens.shape)})")
        runs = {
            "ours_encoder": ours_encoder, "ref_encoder": ref_encoder,
            "ours_decoder": ours_decoder, "ref_decoder": ref_decoder,
            "ours_generate": ours_generate, "ref_generate": ref_generate,
        }
        load_before = os.getloadavg()
        times = time_rounds(runs, args.repeats, args.warmup)
        load_after = os.getloadavg()
    rows = [
        ("ours_encoder", "ref_encoder", "encoder (prompt) / transformers encoder"),
        ("ours_decoder", "ref_decoder", "decoder (canvas + cache, self-cond.) / transformers"),
        ("ours_generate", "ref_generate", "generate / transformers generate"),
    ]
    print(f"\n{'':<52} {'cpu':>6} {'goal':>5}      {'wall':>6}   cpu medians (ms)")
    results = []
    for num, den, label in rows:
        cpu, wall = round_ratio(times["cpu"], num, den), round_ratio(times["wall"], num, den)
        verdict, goal_text = "PASS" if cpu <= GOAL else "MISS", f"{GOAL:.2f}"
        num_ms, den_ms = (1e3 * sorted(times["cpu"][n])[len(times["cpu"][n]) // 2] for n in (num, den))
        print(f"{label:<52} {cpu:>6.3f} {goal_text:>5} {verdict:<4} {wall:>6.3f}   {num_ms:8.1f} / {den_ms:8.1f}")
        results.append(dict(label=label, numerator=num, denominator=den, goal=GOAL, cpu_ratio=cpu, wall_ratio=wall,
                            numerator_cpu_ms=num_ms, denominator_cpu_ms=den_ms))
    print(f"\n{args.repeats} rounds; ratios are medians over rounds of per-round ratios; "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f} on {available_threads()} cores; "
          f"peak memory of loading: not measured here")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        torch=torch.__version__, threads=args.threads, cores=available_threads(), text_config=text, n_params=n_params,
        batch=BATCH, prompt=P, canvas=C, generate=GENERATE, decoder_max_relative_logit_diff=decoder_diff,
        tokens_identical=same, results=results, times_s=times, load_average=[load_before[0], load_after[0]],
    ), indent=2) + "\n")
    print(f"wrote {args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out}")
    return 0 if same and decoder_diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
