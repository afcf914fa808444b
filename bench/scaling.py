"""Data-parallel scaling: a layer x step-window `sensitivity` grid on `tiny-refusal`, 1 vs 2 processes.

Issue 18 (item 4). The same script is launched once alone (no process group) and then as 2 ranks of
a gloo process group on the CPU (`init_method=file://`), each process with one torch thread: the
code is the same, `sensitivity` shards its (cell, batch) runs over the ranks by itself and returns the
full grid on every rank. Per N it prints the wall time of the `sensitivity` call (slowest rank; the
model load and process start are excluded and reported apart), the speed-up against the N=1 run
measured in the same invocation, and whether every rank's grid equals the N=1 grid bit for bit.

Grid: every layer x 4 step windows (plus the baseline and the full ablation), on the direction
`make demo` style selection would use (difference of class means at the last post-instruction token
of layer 1), `--prompts` harmful prompts in batches of `--batch-size`, gen_length = steps = 16.

    .venv/bin/python bench/scaling.py                # ~1 min on a quiet 2-core machine

Prints the table and writes `bench_out/scaling.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OPTS = dict(gen_length=16, steps=16, block_length=16, seed=0)


def worker(folder: str, rank: int, size: int, n_prompts: int, batch_size: int) -> None:
    """One process: the grid, timed; writes {seconds, load_seconds, values...} for this rank."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    from diffusion_lens import HookedDiffusionTransformer
    from diffusion_lens.steering import mean_difference, sensitivity
    from diffusion_lens.studies.abliteration import prompt_sets

    model = HookedDiffusionTransformer.from_pretrained("tiny-refusal")
    sets = prompt_sets("tiny-refusal", None, None, n_train=8, n_eval=n_prompts)
    r = mean_difference(model, sets["harmful_train"], sets["harmless_train"], layers=[1], positions="post_instruction",
                        gen_length=16, progress=False).unit(1, "post_instruction[-1]").float()
    if size > 1:  # joined after the direction, which each process computes alone: only the grid is compared
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{Path(folder) / 'rendezvous'}", rank=rank,
                                world_size=size)
        dist.barrier()
    load_seconds = time.perf_counter() - started
    t0 = time.perf_counter()
    sens = sensitivity(model, r, sets["harmful_eval"], over=("layers", "steps"), window=4, batch_size=batch_size,
                       generate_kwargs=OPTS, progress=False)
    seconds = time.perf_counter() - t0
    if size > 1:
        dist.destroy_process_group()
    result = {"seconds": seconds, "load_seconds": load_seconds, "values": sens.values.tolist(),
              "baseline": sens.baseline, "full": sens.full, "shape": list(sens.values.shape)}
    (Path(folder) / f"n{size}_rank{rank}.json").write_text(json.dumps(result))


def launch(folder: Path, size: int, args) -> list[dict]:
    """Start `size` processes (one alone when 1) and wait for them; their results by rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(folder), str(rank), str(size),
                               str(args.prompts), str(args.batch_size)], env=env) for rank in range(size)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"N={size}: a worker failed (exit codes {codes}).")
    return [json.loads((folder / f"n{size}_rank{rank}.json").read_text()) for rank in range(size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16, help="harmful prompts (even; half per language)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="bench_out/scaling.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (1, 2):
            folder = Path(tmp) / f"n{size}"
            folder.mkdir()
            rows.append((size, launch(folder, size, args)))
    reference = rows[0][1][0]
    key = ("values", "baseline", "full")
    table = []
    print(f"sensitivity grid {reference['shape'][0]} layers x {reference['shape'][1]} step windows (+2 cells), "
          f"{args.prompts} prompts, batch {args.batch_size}, gen_length=steps={OPTS['steps']}, 1 thread per process")
    print(f"{'N':>2}  {'grid wall s':>11}  {'speed-up':>8}  {'start+load s':>12}  identical")
    for size, ranks in rows:
        wall = max(r["seconds"] for r in ranks)
        identical = all(all(r[k] == reference[k] for k in key) for r in ranks)
        row = {"processes": size, "seconds": round(wall, 2), "speedup": round(rows[0][1][0]["seconds"] / wall, 2),
               "load_seconds": round(max(r["load_seconds"] for r in ranks), 2), "identical": identical}
        table.append(row)
        print(f"{size:>2}  {row['seconds']:>11.2f}  {row['speedup']:>7.2f}x  {row['load_seconds']:>12.2f}  {identical}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": table, "prompts": args.prompts, "batch_size": args.batch_size,
                               "generate_kwargs": OPTS, "machine": platform.platform(),
                               "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
