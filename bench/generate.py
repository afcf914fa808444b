"""Overhead of `model.generate` (LLaDA sampler) against the same sampler as a bare torch loop.

The bare loop below is LLaDA's reference algorithm written out in plain torch (semi-autoregressive
blocks, per-block token schedule, low-confidence remasking, temperature 0), calling
`transformers.LlamaForCausalLM` holding the same random weights as ours, run bidirectionally with
an all-True 4D mask and sdpa (`bench/_reference.py`, shared with `bench/forward.py`). Printed:

    generate, no hooks                              / bare loop (reference)     goal <= 1.03
    generate, no hooks                              / bare loop over OUR forward (loop overhead only)
    generate + ablation hook at every layer input   / generate, no hooks        goal <= 1.08
    generate + cache hook_resid_post, all layers,
      4 steps                                       / generate, no hooks        goal <= 1.15
    tokens identical: generate vs bare loop (reference) and vs bare loop (ours)
    cache bytes of that request vs model.estimate_cache_bytes

Default size: 4 layers, d_model 256, 4 heads, d_mlp 768, vocab 4096; batch 4, prompt 16,
gen_length 64, steps 64, block_length 32; fp32 CPU, 1 torch thread by default. Timing: interleaved
rounds (each run once per round, order rotated), ratio = median over rounds of the per-round
ratio. Two clocks: process CPU time (the headline: on a shared machine other processes steal
wall time at random, but not this process's CPU time; exact with one thread) and wall time.

Run: `.venv/bin/python bench/generate.py [--repeats N] [--threads T]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import REPO_ROOT, ModelShape, available_threads, build_pair, random_tokens  # noqa: E402

from diffusion_lens import hooks as H  # noqa: E402

SHAPE = ModelShape(n_layers=4, d_model=256, n_heads=4, d_mlp=768, vocab=4096)
BATCH, PROMPT, GEN, STEPS, BLOCK = 4, 16, 64, 64, 32
CACHE_STEPS = [0, 21, 42, 63]
GOALS = {"plain": 1.03, "ablate": 1.08, "cache": 1.15}


def time_rounds(fns: dict, repeats: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """{clock: {name: [seconds per round]}} for clocks "cpu" (process CPU time) and "wall"."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {"cpu": {n: [] for n in names}, "wall": {n: [] for n in names}}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            cpu, wall = time.process_time(), time.perf_counter()
            fns[name]()
            times["cpu"][name].append(time.process_time() - cpu)
            times["wall"][name].append(time.perf_counter() - wall)
    return times


def round_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return median(a / b for a, b in zip(times[num], times[den]))


@torch.no_grad()
def bare_loop(forward, prompt: torch.Tensor, mask_id: int, gen_length: int, steps: int, block_length: int):
    """LLaDA's sampler at temperature 0, low-confidence remasking, no CFG, no padding; one loop."""
    batch, width = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id, dtype=prompt.dtype)], dim=1)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = width + b * block_length, width + (b + 1) * block_length
        n_masked = (x[:, lo:hi] == mask_id).sum(1)
        quota = (n_masked // per_block)[:, None].repeat(1, per_block)
        quota[torch.arange(per_block)[None, :] < (n_masked % per_block)[:, None]] += 1
        for s in range(per_block):
            masked = x == mask_id
            logits = forward(x)
            guess = logits.argmax(-1)
            prob = torch.softmax(logits, dim=-1).gather(-1, guess[..., None]).squeeze(-1)
            prob[:, hi:] = float("-inf")
            guess = torch.where(masked, guess, x)
            prob = torch.where(masked, prob, torch.full_like(prob, float("-inf")))
            commit = torch.zeros_like(masked)
            for row in range(batch):
                k = int(quota[row, s])
                if k:
                    commit[row, torch.topk(prob[row], k).indices] = True
            x = torch.where(commit, guess, x)
    return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then exact)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours, ref = build_pair(SHAPE, seed=0)
    mask_id = ours.cfg.mask_token_id
    prompt = random_tokens(SHAPE, BATCH, PROMPT, seed=1)
    options = dict(steps=STEPS, gen_length=GEN, block_length=BLOCK, progress=False, return_trajectory=False)
    direction = torch.randn(SHAPE.d_model, generator=torch.Generator().manual_seed(2))
    direction = direction / direction.norm()

    def ablate(x, hook):
        return x - (x @ direction)[..., None] * direction

    ablation = [H.at("blocks.*.hook_resid_pre", ablate)]
    cache_request = dict(names="blocks.*.hook_resid_post", steps=CACHE_STEPS)

    runs = {
        "bare_reference": lambda: bare_loop(ref, prompt, mask_id, GEN, STEPS, BLOCK),
        "bare_ours": lambda: bare_loop(ours, prompt, mask_id, GEN, STEPS, BLOCK),
        "plain": lambda: ours.generate(prompt, **options),
        "ablate": lambda: ours.generate(prompt, hooks=ablation, **options),
        "cache": lambda: ours.generate(prompt, cache=cache_request, **options),
    }

    print(f"torch {torch.__version__}, {args.threads} threads on {available_threads()} cores, {platform.machine()}; "
          f"model {SHAPE.describe()}; batch {BATCH}, prompt {PROMPT}, gen_length {GEN}, steps {STEPS}, "
          f"block_length {BLOCK}")
    # Correctness first: identical tokens, exact cache size.
    generated = runs["plain"]().sequences
    same_ref = torch.equal(generated, runs["bare_reference"]())
    same_ours = torch.equal(generated, runs["bare_ours"]())
    cached = runs["cache"]()
    estimate = ours.estimate_cache_bytes(prompt, cache=cache_request, steps=STEPS, gen_length=GEN, block_length=BLOCK)
    print(f"tokens identical: generate vs bare loop (reference) {same_ref}; vs bare loop (ours) {same_ours}")
    print(f"cache: {cached.cache.nbytes} bytes stored, estimate {estimate} bytes "
          f"({'exact' if estimate == cached.cache.nbytes else 'MISMATCH'}); "
          f"{len(CACHE_STEPS)} steps x {SHAPE.n_layers} layers x [{BATCH} x {PROMPT + GEN} x {SHAPE.d_model}] fp32\n")

    load_before = os.getloadavg()
    times = time_rounds(runs, args.repeats, args.warmup)
    load_after = os.getloadavg()
    rows = [
        ("plain", "bare_reference", "generate, no hooks / bare loop (reference)", GOALS["plain"]),
        ("plain", "bare_ours", "generate, no hooks / bare loop (our forward)", None),
        ("bare_ours", "bare_reference", "bare loop (our forward) / bare loop (reference)", None),
        ("ablate", "plain", "generate + ablation at every layer input / generate", GOALS["ablate"]),
        ("cache", "plain", "generate + cache resid_post x 4 layers x 4 steps / generate", GOALS["cache"]),
    ]
    print(f"{'':<62} {'cpu':>6} {'goal':>5}      {'wall':>6}   cpu medians (ms)")
    results = []
    for num, den, label, goal in rows:
        cpu, wall = round_ratio(times["cpu"], num, den), round_ratio(times["wall"], num, den)
        verdict = "" if goal is None else ("ok" if cpu <= goal else "OVER")
        goal_text = "" if goal is None else f"{goal:.2f}"
        print(f"{label:<62} {cpu:>6.3f} {goal_text:>5} {verdict:<4} {wall:>6.3f}   "
              f"{1e3 * median(times['cpu'][num]):7.1f} / {1e3 * median(times['cpu'][den]):7.1f}")
        results.append(dict(label=label, numerator=num, denominator=den, goal=goal, cpu_ratio=cpu, wall_ratio=wall,
                            numerator_cpu_ms=1e3 * median(times["cpu"][num]),
                            denominator_cpu_ms=1e3 * median(times["cpu"][den])))
    print(f"\n{args.repeats} rounds; ratios are medians over rounds of per-round ratios; "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f} on {available_threads()} cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        torch=torch.__version__, threads=args.threads, cores=available_threads(), model=SHAPE.describe(),
        batch=BATCH, prompt=PROMPT, gen_length=GEN, steps=STEPS, block_length=BLOCK,
        tokens_identical_reference=same_ref, tokens_identical_ours=same_ours,
        cache_bytes=cached.cache.nbytes, cache_estimate=estimate, results=results,
        times_s=times, load_average=[load_before[0], load_after[0]],
    ), indent=2) + "\n")
    print(f"wrote {args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out}")
    ok = same_ref and same_ours and estimate == cached.cache.nbytes
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
