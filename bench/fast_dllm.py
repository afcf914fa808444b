"""Fast-dLLM's KV caches and parallel commit rules in `model.generate`: speed, hook cost, correctness.

Printed (and written to bench_out/fast_dllm.json):

  1. headline, at the shape of issue 12 (random LLaDA weights, 8 layers, d_model 512, batch 1,
     prompt 128, gen_length 256, block_length 32, steps 256 = the quota schedule, fp32): tokens per
     second and forwards per generated token, uncached vs `kv_cache="prefix"` vs `"dual"`, the
     speedup against the uncached run timed in the same rounds, and the FLOP fraction each cache
     computes (analytic, summed over the run's recorded windows) with the ideal speedup it implies;
  2. grid (shrunk to gen_length 128, one round, so that the whole bench fits in ~8 minutes on 2
     cores): rule (schedule, a low threshold, factor) x cache mode x (no hook, an ablation hook at
     every layer input); speedups against the uncached run of the same rule, the ideal speedup
     from FLOPs, and the hook cost (CPU time per FLOP with the ablation hook / without, = per run
     when both runs compute the same windows; one round, so only indicative);
  3. hook cost per cache mode, the goal row (<= 1.05; bench/generate.py measures 1.02-1.04
     uncached): quota schedule at gen_length 64, with and without the ablation hook, 4 rounds;
  4. correctness (run first): an independent bare-torch loop of Fast-dLLM's algorithm, written
     from the spec (shared/reference/fast_dllm.md sections 4.1-4.5) over `transformers.LlamaForCausalLM` holding
     the same weights (`bench/_reference.py`), its cache a `DynamicCache` built from the full
     forward's keys and values; tokens and forward counts must equal `model.generate`'s for every
     mode and rule; an identity hook at every layer must leave the tokens unchanged in every mode;
     threshold 0.9 must give the schedule's tokens (next paragraph).

Random weights give flat confidences (the best token's probability is ~0.005 with vocab 4096), so
threshold 0.9 commits exactly one token per forward here (the forced best), which is the schedule
with steps = gen_length token for token (checked in every mode, so it is not timed again); the low
threshold is read off the model: the 75th percentile of the first forward's confidences over block 0.
`factor=4` commits 3 tokens per forward whenever at least 4 candidates are left (ranks 2 and 3 pass
1 - 4/(j+1) <= 0; rank 4 needs 0.2).

Timing as bench/generate.py: rounds that run every configuration once in a rotated order, the
median over rounds of per-round ratios, process CPU time (headline clock) and wall time; one torch
thread by default.

Run: `.venv/bin/python bench/fast_dllm.py [--repeats N] [--grid-repeats N] [--grid-gen G]
[--hook-repeats N] [--threads T]` (~7-8 min with the defaults on a 2-core machine).
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
from typing import Optional

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import REPO_ROOT, ModelShape, available_threads, build_pair, random_tokens  # noqa: E402
from generate import round_ratio, time_rounds  # noqa: E402

from diffusion_lens import hooks as H  # noqa: E402

SHAPE = ModelShape(n_layers=8, d_model=512, n_heads=8, d_mlp=1536, vocab=4096)
PROMPT, GEN, BLOCK = 128, 256, 32
GRID_GEN = 128
HOOK_GEN = 64  # the hook-cost rounds
CHECK = dict(prompt=16, gen_length=32, block_length=16)  # correctness runs (bare loops are not timed)
MODES = (None, "prefix", "dual")
FACTOR = 4.0
HOOK_GOAL = 1.05


def mode_name(mode: Optional[str]) -> str:
    return mode or "uncached"


# ---------------------------------------------------------------- the bare Fast-dLLM loop (spec)
def _propose(logits: torch.Tensor, candidates: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy proposal (never the mask id) and its float64 softmax probability; -inf off candidates."""
    chosen = logits.index_fill(-1, torch.tensor([mask_id]), float("-inf")).argmax(-1)
    confidence = torch.softmax(logits.double(), -1).gather(-1, chosen[..., None]).squeeze(-1)
    return chosen, confidence.masked_fill(~candidates, float("-inf"))


def _select(confidence: torch.Tensor, candidates: torch.Tensor, rule: dict, quota: Optional[list[int]]) -> torch.Tensor:
    """Per row: top quota[r] (schedule); >= threshold plus the best; or the factor rule (spec 4.2)."""
    select = torch.zeros_like(candidates)
    for r in range(confidence.shape[0]):
        n = int(candidates[r].sum())
        if n == 0:
            continue
        order = confidence[r].argsort(descending=True)[:n]
        if "factor" in rule:
            ranked = confidence[r][order]
            fails = [j for j in range(1, n) if ranked[j] < 1 - rule["factor"] / (j + 2)]
            m = fails[0] if fails else n - 1
            k = m + 1 if m in (0, n - 1) else m
        elif "threshold" in rule:
            k = 1 + int((confidence[r][order[1:]] >= rule["threshold"]).sum())
        else:
            k = quota[r]
        select[r, order[:k]] = True
    return select


@torch.no_grad()
def bare_fast_dllm(ref, prompt: torch.Tensor, mask_id: int, *, gen_length: int, block_length: int, steps: int,
                   kv_cache: Optional[str], rule: dict) -> tuple[torch.Tensor, int]:
    """Fast-dLLM's LLaDA loop (generate / generate_with_prefix_cache / generate_with_dual_cache) at
    temperature 0 over `ref.hf` (`LlamaForCausalLM`, bidirectional via an all-True 4D mask); the
    intended semantics (the mask id is never proposed, no dual step cap). Returns (canvas, forwards).

    Per block [s, e): one full forward over the canvas (candidates: masks left of e), which also
    yields every column's keys/values; then, until the block has no mask, a forward of the window
    (prefix: [s, L), keys of [0, s) from the cache; dual: [s, e), keys of [0, s) and [e, L) from
    the cache), candidates: the block's masks. Attention is bidirectional, so the cached keys may
    come before the window's in any order."""
    hf = ref.hf
    batch, width = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id, dtype=prompt.dtype)], 1)
    n_pos, n_blocks = x.shape[1], gen_length // block_length
    per_block, forwards = steps // n_blocks, 0
    for b in range(n_blocks):
        s, e = width + b * block_length, width + (b + 1) * block_length
        n_masked = (x[:, s:e] == mask_id).sum(1)
        quota = [[int(n) // per_block + (i < int(n) % per_block) for i in range(per_block)] for n in n_masked]
        i, kv = 0, None
        while i == 0 or bool((x[:, s:e] == mask_id).any()):
            if kv_cache is None or i == 0:
                lo, hi = 0, n_pos
                out = hf(input_ids=x, attention_mask=torch.ones(batch, 1, n_pos, n_pos, dtype=torch.bool),
                         use_cache=kv_cache is not None)
                if kv_cache is not None:
                    kv = [(layer.keys, layer.values) for layer in out.cache.layers]
                candidates = x == mask_id
                candidates[:, e:] = False
            else:
                lo, hi = s, n_pos if kv_cache == "prefix" else e
                kept = [(torch.cat([k[:, :, :lo], k[:, :, hi:]], 2), torch.cat([v[:, :, :lo], v[:, :, hi:]], 2))
                        for k, v in kv]
                out = hf(input_ids=x[:, lo:hi], attention_mask=torch.ones(batch, 1, hi - lo, n_pos, dtype=torch.bool),
                         position_ids=torch.arange(lo, hi)[None].expand(batch, -1),
                         cache=DynamicCache(ddp_cache_data=kept), use_cache=True)
                candidates = torch.zeros_like(x, dtype=torch.bool)
                candidates[:, s:e] = x[:, s:e] == mask_id
            forwards += 1
            chosen, confidence = _propose(out.logits, candidates[:, lo:hi], mask_id)
            select = _select(confidence, candidates[:, lo:hi], rule, [q[i] for q in quota] if not rule else None)
            x[:, lo:hi] = torch.where(select, chosen, x[:, lo:hi])
            i += 1
    return x, forwards


# ----------------------------------------------------------------------------------- FLOPs
def forward_flops(shape: ModelShape, n_computed: int, n_keys: int) -> float:
    """Multiply-adds x 2 of one forward computing `n_computed` positions that attend to `n_keys`:
    linear layers and the LM head scale with the computed positions, attention with computed
    queries x all keys. Norms, RoPE, softmax and the embedding lookup are left out (O(n d))."""
    d, dh = shape.d_model, shape.d_head
    linear = d * dh * (2 * shape.n_heads + 2 * shape.kv_heads) + 3 * d * shape.d_mlp
    attention = 2 * n_keys * shape.n_heads * dh
    return 2.0 * n_computed * (shape.n_layers * (linear + attention) + d * shape.vocab)


def run_flops(shape: ModelShape, states, n_pos: int) -> float:
    """FLOPs of a recorded run: its forwards' computed windows (`DenoisingState.computed`)."""
    return sum(forward_flops(shape, len(range(n_pos)[s.computed]), n_pos) for s in states)


# ------------------------------------------------------------------------------------- main
def low_threshold(model, prompt: torch.Tensor, gen_length: int, block_length: int, q: float = 0.75) -> float:
    """The q-quantile of the first forward's confidences over block 0 (random weights: flat ~0.005)."""
    mask_id = model.cfg.mask_token_id
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask_id)], 1)
    with torch.no_grad():
        logits = model(x)[:, prompt.shape[1]: prompt.shape[1] + block_length]
    _, confidence = _propose(logits, torch.ones(logits.shape[:2], dtype=torch.bool), mask_id)
    return float(torch.quantile(confidence.flatten(), q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds of the headline (default 1)")
    parser.add_argument("--grid-repeats", type=int, default=1, help="timed rounds of the grid (default 1)")
    parser.add_argument("--grid-gen", type=int, default=GRID_GEN, help=f"grid gen_length (default {GRID_GEN})")
    parser.add_argument("--hook-repeats", type=int, default=4, help="timed rounds of the hook cost (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then exact)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "fast_dllm.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    ours, ref = build_pair(SHAPE, seed=0)
    mask_id = ours.cfg.mask_token_id
    prompt = random_tokens(SHAPE, 1, PROMPT, seed=1)
    direction = torch.randn(SHAPE.d_model, generator=torch.Generator().manual_seed(2))
    direction = direction / direction.norm()

    def ablate(x, hook):
        return x - (x @ direction)[..., None] * direction

    ablation = [H.at("blocks.*.hook_resid_pre", ablate)]
    identity = [H.at("blocks.*.hook_resid_pre", lambda x, hook: x)]
    tau = low_threshold(ours, prompt, GEN, BLOCK)
    rules = {"schedule": {}, f"threshold {tau:.5f}": dict(threshold=tau), f"factor {FACTOR:g}": dict(factor=FACTOR)}
    print(f"torch {torch.__version__}, {args.threads} threads on {available_threads()} cores, {platform.machine()}; "
          f"model {SHAPE.describe()}, fp32, batch 1")
    print(f"headline: prompt {PROMPT}, gen_length {GEN}, block_length {BLOCK}, steps {GEN} (quota schedule), "
          f"{args.repeats} round(s); SHRUNK to fit ~8 min on 2 cores: grid at gen_length {args.grid_gen}, "
          f"{args.grid_repeats} round(s); hook cost at gen_length {HOOK_GEN}, {args.hook_repeats} rounds; "
          f"correctness at prompt {CHECK['prompt']}, gen_length {CHECK['gen_length']}")
    print(f"low threshold {tau:.5f} = 75th percentile of the first forward's confidences over block 0 "
          f"(random weights: flat, ~0.005); threshold 0.9 commits one token per forward here: the schedule's "
          "tokens (checked below), so the grid does not time it again\n")

    # 1. Correctness (untimed): bare Fast-dLLM loop over the transformers reference vs generate.
    check_prompt = random_tokens(SHAPE, 1, CHECK["prompt"], seed=3)
    shape_opts = dict(gen_length=CHECK["gen_length"], block_length=CHECK["block_length"], steps=CHECK["gen_length"])
    checks = []
    print(f"correctness (prompt {CHECK['prompt']}, gen_length {CHECK['gen_length']}, block_length "
          f"{CHECK['block_length']}, steps {CHECK['gen_length']}): generate vs bare Fast-dLLM loop over transformers")
    for mode in MODES:
        for rule_name, rule in rules.items():
            out = ours.generate(check_prompt, kv_cache=mode, progress=False, return_trajectory=False,
                                **shape_opts, **rule)
            bare, n_bare = bare_fast_dllm(ref, check_prompt, mask_id, kv_cache=mode, rule=rule, **shape_opts)
            same = torch.equal(out.sequences, bare) and out.n_forwards == n_bare
            hooked = high = None
            if not rule:
                hooked = torch.equal(ours.generate(check_prompt, kv_cache=mode, hooks=identity, progress=False,
                                                   return_trajectory=False, **shape_opts).sequences, out.sequences)
                high = torch.equal(ours.generate(check_prompt, kv_cache=mode, threshold=0.9, progress=False,
                                                 return_trajectory=False, **shape_opts).sequences, out.sequences)
            checks.append(dict(mode=mode_name(mode), rule=rule_name, tokens_identical=same, forwards=out.n_forwards,
                               bare_forwards=n_bare, identity_hook_unchanged=hooked, threshold_09_is_schedule=high))
            hook_text = "" if hooked is None else (
                f"; identity hook leaves tokens unchanged: {'yes' if hooked else 'NO'}"
                f"; threshold 0.9 = schedule: {'yes' if high else 'NO'}")
            print(f"  {mode_name(mode):<8} {rule_name:<18} tokens identical: {'yes' if same else 'NO'} "
                  f"({out.n_forwards} / {n_bare} forwards){hook_text}")

    # 2. Headline: uncached vs prefix vs dual, quota schedule, full shape.
    outputs: dict[str, object] = {}

    def timed(name: str, gen_length: int, mode, rule: dict, hooks=()):
        options = dict(gen_length=gen_length, block_length=BLOCK, steps=gen_length, kv_cache=mode, hooks=hooks,
                       progress=False, return_trajectory=False, record=True, **rule)
        return lambda: outputs.__setitem__(name, ours.generate(prompt, **options))

    load = [os.getloadavg()[0]]
    head = time_rounds({mode_name(m): timed(mode_name(m), GEN, m, {}) for m in MODES}, args.repeats, warmup=0)
    n_pos = PROMPT + GEN
    flops = {m: run_flops(SHAPE, outputs[mode_name(m)].states, n_pos) for m in MODES}
    print(f"\nheadline (prompt {PROMPT}, gen_length {GEN}, block {BLOCK}, steps {GEN}); speedup = uncached / mode, "
          "median of per-round ratios")
    print(f"{'mode':<9} {'fwd':>4} {'fwd/tok':>7} {'tok/s':>6} {'cpu s':>7} {'speedup cpu':>11} {'wall':>6} "
          f"{'FLOP frac':>9} {'ideal':>6} {'cpu/ideal':>9}")
    headline = []
    for m in MODES:
        name, out = mode_name(m), outputs[mode_name(m)]
        cpu, wall = round_ratio(head["cpu"], "uncached", name), round_ratio(head["wall"], "uncached", name)
        fraction = flops[m] / flops[None]
        row = dict(mode=name, forwards=out.n_forwards, forwards_per_token=out.n_forwards / GEN,
                   tokens_per_s=GEN / median(head["wall"][name]), cpu_s=median(head["cpu"][name]),
                   speedup_cpu=cpu, speedup_wall=wall, flop_fraction=fraction, ideal_speedup=1 / fraction,
                   measured_over_ideal=cpu * fraction)
        headline.append(row)
        print(f"{name:<9} {row['forwards']:>4} {row['forwards_per_token']:>7.2f} {row['tokens_per_s']:>6.1f} "
              f"{row['cpu_s']:>7.1f} {cpu:>11.2f} {wall:>6.2f} {fraction:>9.3f} {1 / fraction:>6.2f} "
              f"{row['measured_over_ideal']:>9.2f}")
    load.append(os.getloadavg()[0])

    # 3. Grid (shrunk): rule x mode x hook.
    fns = {}
    for rule_name, rule in rules.items():
        for m in MODES:
            fns[(rule_name, mode_name(m), "none")] = timed(f"{rule_name}|{mode_name(m)}|none", args.grid_gen, m, rule)
            fns[(rule_name, mode_name(m), "ablate")] = timed(f"{rule_name}|{mode_name(m)}|ablate", args.grid_gen, m,
                                                             rule, ablation)
    grid_times = time_rounds({"|".join(k): f for k, f in fns.items()}, args.grid_repeats, warmup=0)
    load.append(os.getloadavg()[0])
    print(f"\ngrid (prompt {PROMPT}, gen_length {args.grid_gen}, block {BLOCK}, steps {args.grid_gen}); speedup = "
          "uncached / mode for the same rule and hook; ideal = uncached FLOPs / mode FLOPs; hook cost = CPU time "
          "per FLOP with the ablation hook / without")
    print(f"{'rule':<18} {'mode':<9} {'fwd':>4} {'fwd/tok':>7} {'tok/s':>6} {'speedup cpu':>11} {'wall':>6} "
          f"{'ideal':>6} {'ablate: fwd':>11} {'speedup':>7} {'hook cost':>9}")
    grid = []
    for rule_name in rules:
        for m in MODES:
            key = {h: f"{rule_name}|{mode_name(m)}|{h}" for h in ("none", "ablate")}
            base = {h: f"{rule_name}|uncached|{h}" for h in ("none", "ablate")}
            fwd = {h: outputs[key[h]].n_forwards for h in key}
            work = {k: run_flops(SHAPE, outputs[k].states, PROMPT + args.grid_gen)
                    for k in (key["none"], key["ablate"], base["none"])}
            per_flop = {c: [a / work[key["ablate"]] / (b / work[key["none"]])
                            for a, b in zip(grid_times[c][key["ablate"]], grid_times[c][key["none"]])]
                        for c in ("cpu", "wall")}
            hook_cpu = median(per_flop["cpu"])
            fraction = work[key["none"]] / work[base["none"]]
            row = dict(rule=rule_name, mode=mode_name(m), forwards=fwd["none"], forwards_ablate=fwd["ablate"],
                       forwards_per_token=fwd["none"] / args.grid_gen,
                       tokens_per_s=args.grid_gen / median(grid_times["wall"][key["none"]]),
                       speedup_cpu=round_ratio(grid_times["cpu"], base["none"], key["none"]),
                       speedup_wall=round_ratio(grid_times["wall"], base["none"], key["none"]),
                       flop_fraction=fraction, ideal_speedup=1 / fraction,
                       speedup_cpu_ablate=round_ratio(grid_times["cpu"], base["ablate"], key["ablate"]),
                       hook_cost_cpu=hook_cpu, hook_cost_wall=median(per_flop["wall"]))
            grid.append(row)
            print(f"{rule_name:<18} {row['mode']:<9} {fwd['none']:>4} {row['forwards_per_token']:>7.2f} "
                  f"{row['tokens_per_s']:>6.1f} {row['speedup_cpu']:>11.2f} {row['speedup_wall']:>6.2f} "
                  f"{1 / fraction:>6.2f} {fwd['ablate']:>11} {row['speedup_cpu_ablate']:>7.2f} {hook_cpu:>9.3f}")
    if args.grid_repeats < 3:
        print(f"  (grid hook cost from {args.grid_repeats} round(s): noise; the goal is judged below)")

    # 4. Hook cost: the same windows with and without the ablation hook, several rounds.
    pairs = {f"{mode_name(m)}|{h}": timed(f"hook|{mode_name(m)}|{h}", HOOK_GEN, m, {}, hooks)
             for m in MODES for h, hooks in (("none", ()), ("ablate", ablation))}
    hook_times = time_rounds(pairs, args.hook_repeats, warmup=0)
    load.append(os.getloadavg()[0])
    print(f"\nhook cost (prompt {PROMPT}, gen_length {HOOK_GEN}, block {BLOCK}, steps {HOOK_GEN}, quota schedule, "
          f"{args.hook_repeats} rounds): ablation at every hook_resid_pre / no hook, same forwards and windows")
    print(f"{'mode':<9} {'cpu':>6} {'goal':>5}       {'wall':>6}   cpu medians (s)")
    hook_rows = []
    for m in MODES:
        name = mode_name(m)
        cpu = round_ratio(hook_times["cpu"], f"{name}|ablate", f"{name}|none")
        wall = round_ratio(hook_times["wall"], f"{name}|ablate", f"{name}|none")
        hook_rows.append(dict(mode=name, cpu_ratio=cpu, wall_ratio=wall, goal=HOOK_GOAL,
                              ablate_cpu_s=median(hook_times["cpu"][f"{name}|ablate"]),
                              none_cpu_s=median(hook_times["cpu"][f"{name}|none"])))
        print(f"{name:<9} {cpu:>6.3f} {HOOK_GOAL:>5.2f} {'PASS' if cpu <= HOOK_GOAL else 'MISS':<5} {wall:>6.3f}   "
              f"{hook_rows[-1]['ablate_cpu_s']:6.2f} / {hook_rows[-1]['none_cpu_s']:6.2f}")

    elapsed = time.perf_counter() - started
    print(f"\nload average {' -> '.join(f'{x:.2f}' for x in load)} on {available_threads()} cores; "
          f"bench ran {elapsed / 60:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        torch=torch.__version__, threads=args.threads, cores=available_threads(), model=SHAPE.describe(),
        prompt=PROMPT, gen_length=GEN, block_length=BLOCK, grid_gen_length=args.grid_gen, low_threshold=tau,
        factor=FACTOR, repeats=args.repeats, grid_repeats=args.grid_repeats, correctness=checks,
        headline=headline, grid=grid, hook_cost=hook_rows, hook_gen_length=HOOK_GEN, hook_repeats=args.hook_repeats,
        headline_times_s=head, grid_times_s=grid_times, hook_times_s=hook_times, load_average=load,
        elapsed_s=elapsed,
    ), indent=2) + "\n")
    print(f"wrote {args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out}")
    ok = all(c["tokens_identical"] and c["identity_hook_unchanged"] in (None, True)
             and c["threshold_09_is_schedule"] in (None, True) for c in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
