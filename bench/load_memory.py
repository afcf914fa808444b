"""Peak memory of `HookedDiffusionTransformer.from_pretrained` on a ~1 GiB bf16 sharded checkpoint.

Writes a random LLaDA-format checkpoint (bf16, two shards + model.safetensors.index.json) to a
temporary folder, then loads it in fresh child processes, one per method:

    ours    HookedDiffusionTransformer.from_pretrained(folder, dtype=torch.bfloat16)
    naive   model built in bf16, then safetensors.torch.load_file per shard + load_state_dict
            (the in-run reference: what one writes without a streaming loader)

and prints, for each, the peak resident-set increase during loading divided by the weight bytes
(goal for ours <= 1.15). The child imports everything first, records its RSS, resets the kernel's
peak-RSS counter (writing 5 to /proc/self/clear_refs; if that is refused, the peak from before is
kept and reported as such), loads, and reads VmHWM. A 1 ms RSS sampler thread runs alongside as a
cross-check and splits the peak into anonymous and file-backed (mmapped) pages.

Run: `make bench` or `.venv/bin/python bench/load_memory.py [--tmpdir DIR] [--keep]`.
Writes bench_out/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import REPO_ROOT, ModelShape, write_llada_checkpoint  # noqa: E402

import torch  # noqa: E402

# 8 x (4 * 2048^2 + 3 * 2048 * 5504) + 2 * 32000 * 2048 + norms = 536M params = 1.0 GiB in bf16.
SHAPE = ModelShape(n_layers=8, d_model=2048, n_heads=16, d_mlp=5504, vocab=32000)
GOAL = 1.15
METHODS = ("ours", "naive")


# ------------------------------------------------------------------------------ child process
def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = _status()
    return s["VmHWM"] <= s["VmRSS"] + 64 * 1024


class _Sampler(threading.Thread):
    """Polls /proc/self/status every `interval` s, keeping the maxima (a cross-check of VmHWM)."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval, self.stop, self.peak = interval, threading.Event(), {}

    def run(self) -> None:
        while not self.stop.is_set():
            for key, value in _status().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            time.sleep(self.interval)


def _load_naive(folder: Path):
    """Build the model in bf16 with real (randomly initialised) parameters, read every shard with
    safetensors.torch.load_file, rename the keys and copy them in with load_state_dict."""
    from safetensors.torch import load_file

    from diffusion_lens import HookedDiffusionTransformer
    from diffusion_lens.checkpoints.adapters import get_adapter
    from diffusion_lens.checkpoints.loading import checkpoint_files, read_config

    adapter = get_adapter("llada")
    cfg = adapter.to_config(read_config(folder))
    cfg.dtype = torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = HookedDiffusionTransformer(cfg)
    finally:
        torch.set_default_dtype(previous)
    state_dict = {}
    for file in checkpoint_files(folder):
        state_dict.update({adapter.to_internal_key(k): v for k, v in load_file(file).items()})
    model.load_state_dict(state_dict, strict=True)
    del state_dict
    return model


def child(method: str, folder: Path) -> dict:
    """Load `folder` with `method` in this (fresh) process and measure; returns a result dict."""
    import diffusion_lens.checkpoints.loading  # noqa: F401  (imports are not part of the measurement)
    import model_adapters  # noqa: F401
    from diffusion_lens import HookedDiffusionTransformer

    import gc

    gc.collect()
    before = _status()
    reset = _reset_peak()
    baseline_hwm = _status()["VmHWM"]
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    if method == "ours":
        model = HookedDiffusionTransformer.from_pretrained(folder, dtype=torch.bfloat16)
    else:
        model = _load_naive(folder)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    after = _status()
    params = list(model.state_dict().values())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    dtypes = sorted({str(p.dtype) for p in params})
    peak_increase = after["VmHWM"] - before["VmRSS"]
    return {
        "method": method,
        "seconds": seconds,
        "weight_bytes": weight_bytes,
        "dtypes": dtypes,
        "rss_before": before["VmRSS"],
        "hwm_reset": reset,
        "hwm_before_load": baseline_hwm,
        "hwm_after_load": after["VmHWM"],
        "rss_after_load": after["VmRSS"],
        "peak_increase": peak_increase,
        "ratio": peak_increase / weight_bytes,
        "retained_increase": after["VmRSS"] - before["VmRSS"],
        "sampled_peak_increase": sampler.peak.get("VmRSS", 0) - before["VmRSS"],
        "sampled_peak_anon_increase": sampler.peak.get("RssAnon", 0) - before["RssAnon"],
        "sampled_peak_file": sampler.peak.get("RssFile", 0),
        "file_before": before["RssFile"],
    }


# ----------------------------------------------------------------------------- parent process
def run_child(method: str, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} child failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tmpdir", type=Path, default=None, help="where to write the checkpoint (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "load_memory.json")
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return 0
    if not Path("/proc/self/status").exists():
        print("load_memory needs Linux /proc to read peak RSS; skipped.")
        return 0

    weight_bytes = 2 * SHAPE.n_params
    tmp_parent = Path(args.tmpdir or tempfile.gettempdir())
    free = shutil.disk_usage(tmp_parent).free
    print(f"checkpoint: {SHAPE.describe()}, bf16, 2 shards = {weight_bytes / 2**30:.2f} GiB; "
          f"free disk in {tmp_parent}: {free / 2**30:.1f} GiB")
    if free < 2 * weight_bytes:
        print(f"not enough free disk in {tmp_parent} (need {2 * weight_bytes / 2**30:.1f} GiB); use --tmpdir.")
        return 1

    folder = Path(tempfile.mkdtemp(prefix="dlens-load-bench-", dir=tmp_parent))
    try:
        start = time.perf_counter()
        write_llada_checkpoint(folder, SHAPE, dtype=torch.bfloat16, seed=0, n_shards=2)
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        print(f"wrote {folder} ({', '.join(shards)} + index) in {time.perf_counter() - start:.1f} s")
        results = {method: run_child(method, folder) for method in METHODS}
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\n{'method':<7} {'load s':>7} {'weights MiB':>12} {'peak +RSS MiB':>14} {'ratio':>6} {'goal':>6}  "
          f"{'':<4} {'sampled (anon / file-backed) MiB':>33}")
    for method, r in results.items():
        goal = f"{GOAL:.2f}" if method == "ours" else "ref"
        verdict = ("PASS" if r["ratio"] <= GOAL else "MISS") if method == "ours" else ""
        sampled = f"{r['sampled_peak_increase'] / 2**20:.0f} ({r['sampled_peak_anon_increase'] / 2**20:.0f} / " \
                  f"{(r['sampled_peak_file'] - r['file_before']) / 2**20:.0f})"
        print(f"{method:<7} {r['seconds']:>7.2f} {r['weight_bytes'] / 2**20:>12.0f} {r['peak_increase'] / 2**20:>14.0f} "
              f"{r['ratio']:>6.3f} {goal:>6}  {verdict:<4} {sampled:>33}")
    if not all(r["hwm_reset"] for r in results.values()):
        print("note: /proc/self/clear_refs was refused, so the peak is VmHWM (which may predate the load) "
              "minus the RSS before loading.")
    print("ratio = (peak RSS during loading - RSS before loading) / weight bytes; the RSS counts file pages "
          "mmapped by safetensors.load_file too.")
    report = {"bench": "load_memory", "shape": SHAPE.describe(), "goal": GOAL, "torch": torch.__version__,
              "results": results, "pass": results["ours"]["ratio"] <= GOAL}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shown = args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out
    print(f"\nwrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
