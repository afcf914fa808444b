"""Steering overhead and mean_difference throughput / memory (issue 5).

Generation, same prompts, same sampler options, one random LLaDA-shaped model (fp32):

    unsteered          model.generate, no hooks
    ablate (runtime)   ablate(model, r) at every layer: 3 hooks per block, every step / position
                       / unsteered                                   goal <= 1.08
    orthogonalized     orthogonalize_weights(copy, r), no hooks / unsteered   goal 1.00 +- noise
    map (runtime)      AffineMap at every hook_mlp_out (Linear-ACT shape: per-dim omega, beta)
                       / unsteered                                   (for reference)
    map (folded)       fold(copy, map), no hooks / unsteered         goal 1.00 +- noise

Timing: warm-up, then rounds in which every variant runs once, in an order rotated from round
to round; each ratio is the median over rounds of variant / unsteered within the round (the
runs of a round are adjacent in time, so slow drifts in background load cancel).

mean_difference: N = 64, 256, 1024 prompts (half per class), all layers, the last prompt token,
step-0 canvas; prompts/s and the peak memory above the pre-run level (CUDA: max allocated;
CPU: peak RSS sampled every 2 ms). Flat memory is the goal: the reducers keep sums only.

Run: `.venv/bin/python bench/steering.py [--threads T] [--repeats N] [--device cpu|cuda]`.
Results go to bench_out/steering.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion_lens import DiffusionConfig, HookedDiffusionTransformer  # noqa: E402
from diffusion_lens.checkpoints.adapters import get_adapter  # noqa: E402
from diffusion_lens.steering import AffineMap, ablate, fold, mean_difference, orthogonalize_weights  # noqa: E402


def build_model(args) -> HookedDiffusionTransformer:
    """A random model with LLaDA's layout (so the LLaDA sampler and adapter apply)."""
    vocab = args.vocab
    cfg = DiffusionConfig(
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_mlp=args.d_mlp, d_vocab=vocab,
        mask_token_id=vocab - 1, eos_token_id=vocab - 2, pad_token_id=vocab - 2, model_name="bench-random",
        family="llada",
    )
    torch.manual_seed(0)
    model = HookedDiffusionTransformer(cfg).to(args.device).eval().requires_grad_(False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.normal_(0.0, param.shape[1] ** -0.5)
    model.adapter = get_adapter("llada")
    return model


def timed(fn, device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_generation(args, model) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab - 8, (args.batch, args.prompt_len), generator=g).to(args.device)
    opts = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length, progress=False,
                return_trajectory=False)
    d = model.cfg.d_model
    r = torch.randn(d, generator=g).to(args.device)
    sites = [f"blocks.{layer}.hook_mlp_out" for layer in range(model.cfg.n_layers)]
    amap = AffineMap({s: 1.0 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64) for s in sites},
                     {s: 0.1 * torch.randn(d, generator=g, dtype=torch.float64) for s in sites}, kind="linear")
    ortho = copy.deepcopy(model)
    orthogonalize_weights(ortho, r)
    folded = copy.deepcopy(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bias fold cannot be saved in LLaDA's format; irrelevant here
        fold(folded, amap)
    ablation_hooks = ablate(model, r)
    map_hooks = amap.as_hooks()
    variants = {
        "unsteered": lambda: model.generate(tokens, **opts),
        "ablate (runtime)": lambda: model.generate(tokens, hooks=ablation_hooks, **opts),
        "orthogonalized": lambda: ortho.generate(tokens, **opts),
        "map (runtime)": lambda: model.generate(tokens, hooks=map_hooks, **opts),
        "map (folded)": lambda: folded.generate(tokens, **opts),
    }
    # identity checks on the measured runs: the edited models reproduce the hooked ones
    same_ablate = torch.equal(model.generate(tokens, hooks=ablation_hooks, **opts).sequences,
                              ortho.generate(tokens, **opts).sequences)
    same_map = torch.equal(model.generate(tokens, hooks=map_hooks, **opts).sequences, folded.generate(tokens, **opts).sequences)
    names = list(variants)
    for _ in range(args.warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for round_index in range(args.repeats):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            times[name].append(timed(variants[name], args.device))
    ratios = {name: statistics.median(t / u for t, u in zip(times[name], times["unsteered"])) for name in names}
    return {"median_s": {n: statistics.median(t) for n, t in times.items()}, "ratio": ratios,
            "same_tokens": {"orthogonalized == ablate": same_ablate, "folded == map": same_map}}


class PeakRSS:
    """Peak resident memory above the level at start, sampled in a background thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process = psutil.Process(os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss - self.base)


def bench_mean_difference(args, model) -> list[dict]:
    rows = []
    for n in args.n_prompts:
        g = torch.Generator().manual_seed(n)
        prompts = torch.randint(0, args.vocab - 8, (n, args.prompt_len), generator=g)
        pos, neg = prompts[: n // 2], prompts[n // 2:]
        kwargs = dict(layers="all", positions=["last_prompt"], gen_length=args.gen_length, batch_size=args.md_batch)
        mean_difference(model, pos[: args.md_batch], neg[: args.md_batch], **kwargs)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            seconds = timed(lambda: mean_difference(model, pos, neg, **kwargs), args.device)
            peak = torch.cuda.max_memory_allocated() - base
            kind = "cuda max allocated"
        else:
            with PeakRSS() as rss:
                seconds = timed(lambda: mean_difference(model, pos, neg, **kwargs), args.device)
            peak = rss.peak
            kind = f"cpu peak rss above {rss.base / 2**20:.0f} MiB"
        rows.append({"n_prompts": n, "seconds": seconds, "prompts_per_s": n / seconds, "peak_mib": peak / 2**20,
                     "memory": kind})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--d-mlp", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--n-prompts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--md-batch", type=int, default=32)
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args)
    print(f"model: {model}; device {args.device}, threads {args.threads}, {platform.processor() or platform.machine()}")
    result = {"args": vars(args), "torch": torch.__version__}
    if not args.skip_generation:
        print(f"generate: batch {args.batch}, prompt {args.prompt_len}, gen_length {args.gen_length}, steps {args.steps}, "
              f"{args.repeats} rotated rounds")
        gen = bench_generation(args, model)
        result["generation"] = gen
        goals = {"ablate (runtime)": "goal <= 1.08", "orthogonalized": "goal 1.00 +- noise",
                 "map (folded)": "goal 1.00 +- noise", "map (runtime)": "", "unsteered": ""}
        for name, ratio in gen["ratio"].items():
            print(f"  {name:18s} {gen['median_s'][name]:8.3f} s   ratio {ratio:5.3f}   {goals[name]}")
        print(f"  identical tokens: {gen['same_tokens']}")
    print(f"mean_difference: all {model.cfg.n_layers} layers, positions ['last_prompt'], gen_length {args.gen_length}, "
          f"batch {args.md_batch}")
    rows = bench_mean_difference(args, model)
    result["mean_difference"] = rows
    for row in rows:
        print(f"  N={row['n_prompts']:5d}  {row['seconds']:7.2f} s  {row['prompts_per_s']:8.1f} prompts/s  "
              f"peak +{row['peak_mib']:7.1f} MiB ({row['memory']})")
    out = ROOT / "bench_out"
    out.mkdir(exist_ok=True)
    (out / "steering.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out / 'steering.json'}")


if __name__ == "__main__":
    main()
