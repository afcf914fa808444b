"""Forward-pass overhead of HookedDiffusionTransformer against transformers' LlamaForCausalLM.

Both models hold the same random LLaDA weights (bench/_reference.py); the reference runs
bidirectionally through an all-True 4D boolean mask, so it computes the same function, which the
printed max |logit difference| shows. Measured at batch 4 x 128 positions, fp32, CPU, under
`torch.inference_mode`, on a 4-layer d_model-256 and a 2-layer d_model-1024 model:

    forward   ours, no hooks                                   / reference    goal <= 1.03
    hooks     ours, 4 hooks on hook_resid_post adding a vector / reference    goal <= 1.06
              (added per call with `model.hooks(...)`, as a steering user would)
    cache     ours, `run_with_cache()` of every hook point     / reference    goal <= 1.20
              (glibc's default allocator settings; a second, informational run pins them)

Timing: warm-up rounds, then rounds in which each of the four runs once, in an order rotated
from round to round; the ratio is the median over rounds of ours/reference within a round (runs
of a round are adjacent in time, so drifts in background load cancel). Medians of the raw times,
the same ratio on process CPU time and the median minor page faults per call are printed too.
Results go to bench_out/forward.json.

Run: `make bench` or `.venv/bin/python bench/forward.py [--repeats N] [--threads T]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import (  # noqa: E402
    REPO_ROOT, ModelShape, available_threads, build_pair, build_reference, max_abs_diff,
    random_tokens, read_llada_checkpoint, time_interleaved,
)

BATCH, N_POS, VOCAB = 4, 128, 4096
SHAPES = (
    ModelShape(n_layers=4, d_model=256, n_heads=4, d_mlp=768, vocab=VOCAB),
    ModelShape(n_layers=2, d_model=1024, n_heads=8, d_mlp=3072, vocab=VOCAB),
)
GOALS = {"forward": 1.03, "hooks": 1.06, "cache": 1.20}
LABELS = {
    "forward": "forward, no hooks",
    "hooks": "4 add-hooks on hook_resid_post",
    "cache": "run_with_cache, {allocator}",
}
N_HOOKS = 4
PARITY_TOL = 1e-4
GOLDEN_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "llada-tiny-mha"


def reference_vs_golden() -> float:
    """max |logits| difference between the reference (LlamaForCausalLM, bidirectional) on the
    llada-tiny-mha fixture weights and the logits upstream LLaDA code recorded for that fixture."""
    from safetensors.torch import load_file

    shape, state_dict = read_llada_checkpoint(GOLDEN_FIXTURE)
    golden = load_file(GOLDEN_FIXTURE / "golden_forward.safetensors")
    ref = build_reference(state_dict, shape)
    with torch.inference_mode():
        return max_abs_diff(ref(golden["input_ids"]), golden["logits"])


def _hooked_reference_logits(ref, tokens, vector, n_layers):
    """The reference with the same additions as our hooks: forward hooks on Llama decoder layers."""
    def add(module, args, output):
        return output + vector

    handles = [ref.hf.model.layers[i % n_layers].register_forward_hook(add) for i in range(N_HOOKS)]
    try:
        return ref(tokens)
    finally:
        for handle in handles:
            handle.remove()


def bench_shape(shape: ModelShape, repeats: int, warmup: int, min_seconds: float) -> dict:
    ours, ref = build_pair(shape, dtype=torch.float32, seed=0)
    tokens = random_tokens(shape, BATCH, N_POS)
    vector = 0.5 * torch.randn(shape.d_model, generator=torch.Generator().manual_seed(2))

    def add_vector(resid, hook):
        return resid + vector

    hooks = [(f"blocks.{i % shape.n_layers}.hook_resid_post", add_vector) for i in range(N_HOOKS)]

    def ours_hooked():
        with ours.hooks(fwd_hooks=hooks):
            return ours(tokens)

    with torch.inference_mode():
        # Correctness: each of the three timed runs computes what the reference computes.
        ref_logits = ref(tokens)
        diffs = {"forward": max_abs_diff(ours(tokens), ref_logits)}
        diffs["hooks"] = max_abs_diff(ours_hooked(), _hooked_reference_logits(ref, tokens, vector, shape.n_layers))
        cache_logits, cache = ours.run_with_cache(tokens)
        hidden = ref.hf(input_ids=tokens, attention_mask=ref.mask(tokens), use_cache=False,
                        output_hidden_states=True).hidden_states
        cached_resid = [cache["hook_embed"]] + [cache[f"blocks.{i}.hook_resid_post"] for i in range(shape.n_layers - 1)]
        cached_resid.append(cache["ln_final.hook_normalized"] * ours.ln_final.weight)
        diffs["cache"] = max(max_abs_diff(cache_logits, ref_logits),
                             *(max_abs_diff(a, b) for a, b in zip(cached_resid, hidden)))
        n_cached = len(cache)
        cached_mb = sum(t.numel() * t.element_size() for t in cache.cache_dict.values()) / 2**20
        del cache, cache_logits, hidden, cached_resid

        timing = time_interleaved(
            {
                "reference": lambda: ref(tokens),
                "forward": lambda: ours(tokens),
                "hooks": ours_hooked,
                "cache": lambda: ours.run_with_cache(tokens),
            },
            repeats=repeats, warmup=warmup, min_seconds=min_seconds,
        )
    rows = {}
    for key, goal in GOALS.items():
        ratio = timing.ratio(key, "reference")
        rows[key] = {
            "label": LABELS[key].format(allocator=allocator_label()),
            "ours_ms": 1e3 * timing.median(key),
            "reference_ms": 1e3 * timing.median("reference"),
            "ratio": ratio,
            "ratio_of_medians": timing.ratio_of_medians(key, "reference"),
            "cpu_ratio": timing.ratio(key, "reference", cpu=True),
            "faults_per_call": timing.faults_per_call(key),
            "reference_faults_per_call": timing.faults_per_call("reference"),
            "goal": goal,
            "pass": ratio <= goal,
            "max_abs_diff": diffs[key],
            "parity_ok": diffs[key] <= PARITY_TOL,
        }
    return {
        "shape": shape.describe(),
        "shape_fields": {k: getattr(shape, k) for k in shape.__dataclass_fields__},
        "rounds": len(timing.times["reference"]),
        "cache_entries": n_cached,
        "cache_mb": cached_mb,
        "measures": rows,
    }


def print_table(results: list[dict]) -> None:
    head = (f"{'model':<44} {'measure':<36} {'ours ms':>8} {'ref ms':>8} {'ratio':>6} {'r.o.m.':>6} "
            f"{'cpu':>6} {'faults':>6} {'goal':>5}  {'':<4} {'max|dlogit|':>11}")
    print(head)
    print("-" * len(head))
    for res in results:
        for i, row in enumerate(res["measures"].values()):
            model = res["shape"] if i == 0 else ""
            verdict = "PASS" if row["pass"] else "MISS"
            parity = "" if row["parity_ok"] else "  PARITY FAIL"
            print(f"{model:<44} {row['label']:<36} {row['ours_ms']:>8.2f} {row['reference_ms']:>8.2f} "
                  f"{row['ratio']:>6.3f} {row['ratio_of_medians']:>6.3f} {row['cpu_ratio']:>6.3f} "
                  f"{row['faults_per_call']:>6.0f} {row['goal']:>5.2f}  {verdict:<4} {row['max_abs_diff']:>11.2e}{parity}")
    print("ratio = median over rounds of ours/reference wall time within a round (PASS/MISS uses it); "
          "r.o.m. = ratio of the\nmedian wall times; cpu = the per-round ratio of process CPU time "
          "(less sensitive to preemption by other processes);\nfaults = median minor page faults per call "
          "(fresh pages from the OS; the reference's are shown in the JSON).")


# glibc settings that keep freed memory in the process instead of returning it to the OS (see
# bench/README.md): with them, a cache's activations reuse pages instead of faulting in fresh ones.
TUNED_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(2**30), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


def allocator_label() -> str:
    return "allocator pinned" if any(k in os.environ for k in TUNED_MALLOC_ENV) else "default allocator"


def print_cache_summary(default: list[dict], pinned: list[dict]) -> None:
    """The cache row under glibc's default settings next to the same row with them pinned."""
    print(f"\n{'run_with_cache of every hook point':<44} {'allocator':<18} {'ratio':>6} {'cpu':>6} "
          f"{'faults/call':>11} {'goal':>5}")
    for ours, tuned in zip(default, pinned):
        for res, label in ((ours, "default"), (tuned, "pinned (info)")):
            row = res["measures"]["cache"]
            goal = f"{row['goal']:>5.2f}  {'PASS' if row['pass'] else 'MISS'}" if res is ours else ""
            print(f"{res['shape'] if res is ours else '':<44} {label:<18} {row['ratio']:>6.3f} "
                  f"{row['cpu_ratio']:>6.3f} {row['faults_per_call']:>11.0f} {goal}")


def run_tuned_child(args) -> dict:
    """The same bench in a child process whose glibc keeps freed memory (TUNED_MALLOC_ENV)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tuned.json"
        cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--min-seconds", str(args.min_seconds), "--threads", str(args.threads), "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, **TUNED_MALLOC_ENV})
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per model (default 30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="keep adding rounds until this long")
    parser.add_argument("--threads", type=int, default=available_threads(), help="torch threads (default: all cores)")
    parser.add_argument("--no-malloc-check", action="store_true",
                        help="skip the second run with glibc's trimming turned off")
    parser.add_argument("--families", action="store_true",
                        help="also run bench/forward_families.py: Dream vs Qwen2ForCausalLM, LLaDA-MoE expert hooks off/on")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "forward.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    golden_diff = reference_vs_golden()
    if not args.child:
        print(f"torch {torch.__version__}, {args.threads} threads on {available_threads()} cores, "
              f"batch {BATCH} x {N_POS} positions, fp32, load average {load_before[0]:.2f}")
        print(f"reference vs upstream LLaDA golden logits (llada-tiny-mha fixture): max |diff| {golden_diff:.2e}\n")

    start = time.perf_counter()
    results = [bench_shape(shape, args.repeats, args.warmup, args.min_seconds) for shape in SHAPES]
    load_after = os.getloadavg()

    import transformers

    report = {
        "bench": "forward", "batch": BATCH, "n_pos": N_POS, "dtype": "float32", "device": "cpu",
        "threads": args.threads, "cores": available_threads(), "repeats": args.repeats,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "malloc_env": {k: os.environ[k] for k in TUNED_MALLOC_ENV if k in os.environ},
        "load_average_before": load_before, "load_average_after": load_after,
        "seconds": time.perf_counter() - start,
        "reference_vs_golden_max_abs_diff": golden_diff,
        "goals": GOALS, "results": results,
        "all_pass": all(r["pass"] for res in results for r in res["measures"].values()),
        "all_parity_ok": golden_diff <= PARITY_TOL and all(
            r["parity_ok"] for res in results for r in res["measures"].values()),
    }
    if args.child:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0

    print_table(results)
    if max(load_before[0], load_after[0]) > args.threads:
        print(f"note: load average {load_before[0]:.2f} -> {load_after[0]:.2f} exceeds the {args.threads} "
              "threads used; other processes share these cores, so times are noisy.")
    if not args.no_malloc_check and sys.platform.startswith("linux"):
        print("\nSame bench with glibc keeping freed memory "
              + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC_ENV.items()) + " (informational):")
        tuned = run_tuned_child(args)
        print_table(tuned["results"])
        report["malloc_tuned"] = tuned
        print_cache_summary(results, tuned["results"])
    if args.families:
        import forward_families

        print("\nOther families (bench/forward_families.py):")
        report["families"] = forward_families.run_all(batch=BATCH, n_pos=N_POS, repeats=args.repeats, warmup=args.warmup)
        forward_families.print_results(report["families"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shown = args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out
    print(f"\nwrote {shown}")
    return 0 if report["all_parity_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
