"""Peak memory of `HookedDiffusionTransformer.from_pretrained` on 0.7-1 GiB bf16 sharded checkpoints.

For each family (`--family`, default all), writes a random checkpoint in its format (bf16, two
shards + model.safetensors.index.json) to a temporary folder:

    llada            LLaDA keys, 536M params (1.0 GiB)
    diffusion_gemma  `DiffusionGemmaForBlockDiffusion` keys and config from transformers itself
                     (`_reference.write_diffusion_gemma_checkpoint`): text weights once under
                     `model.decoder.*` with fused experts, a `layer_scalar` per pass, no lm_head
                     (tied), and a 5.9 MiB vision tower that we carry for save_pretrained; 356M
                     params (0.66 GiB)

then loads it in fresh child processes, one per method:

    ours    HookedDiffusionTransformer.from_pretrained(folder, dtype=torch.bfloat16)
    naive   model built in bf16, then safetensors.torch.load_file per shard + load_state_dict
            (the in-run reference: what one writes without a streaming loader; the tie kept)

and prints, for each, the peak resident-set increase during loading divided by the bytes the
loaded model holds: its parameters and buffers, a tied weight once, plus the carried tensors
(goal for ours <= 1.15). The child imports everything first, records its RSS, resets the kernel's
peak-RSS counter (writing 5 to /proc/self/clear_refs; if that is refused, the peak from before is
kept and reported as such), loads, and reads VmHWM. A 1 ms RSS sampler thread runs alongside as a
cross-check and splits the peak into anonymous and file-backed (mmapped) pages.

Run: `make bench` or `.venv/bin/python bench/load_memory.py [--family llada|diffusion_gemma|all]
[--tmpdir DIR] [--keep]`. Writes bench_out/load_memory.json (one key per family measured).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import (  # noqa: E402
    REPO_ROOT, ModelShape, diffusion_gemma_tensor_shapes, write_diffusion_gemma_checkpoint, write_llada_checkpoint,
)

import torch  # noqa: E402

# 8 x (4 * 2048^2 + 3 * 2048 * 5504) + 2 * 32000 * 2048 + norms = 536M params = 1.0 GiB in bf16.
SHAPE = ModelShape(n_layers=8, d_model=2048, n_heads=16, d_mlp=5504, vocab=32000)
# The 26B-A4B's layout (5 sliding layers per full one, GQA, one wider KV head on full layers, dense MLP
# + 16 fused experts in every layer), 8 layers: 353M text params + a 2-layer vision tower (3.1M).
GEMMA_TEXT = dict(
    vocab_size=65536, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=4, head_dim=128, global_head_dim=256, num_global_key_value_heads=1, sliding_window=512,
    layer_types=["sliding_attention"] * 5 + ["full_attention", "sliding_attention", "full_attention"],
    num_experts=16, top_k_experts=4, moe_intermediate_size=512, rms_norm_eps=1e-6,
)
GEMMA_VISION = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    head_dim=64, patch_size=16, position_embedding_size=1024, pooling_kernel_size=2, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "axial", "rope_theta": 100.0}, standardize=True,
)
FAMILIES = ("llada", "diffusion_gemma")
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
    safetensors.torch.load_file, rename the keys and copy them in with load_state_dict. Carried
    tensors (a vision tower) are kept as load_file returns them; a tied LM head gets the
    embedding's tensor, so the tie the model was built with stays."""
    from safetensors.torch import load_file

    from diffusion_lens import HookedDiffusionTransformer
    from diffusion_lens.checkpoints.adapters import detect_adapter
    from diffusion_lens.checkpoints.loading import checkpoint_files, read_config

    config = read_config(folder)
    adapter = detect_adapter(config)
    cfg = adapter.to_config(config)
    cfg.dtype = torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = HookedDiffusionTransformer(cfg)
    finally:
        torch.set_default_dtype(previous)
    state_dict = {}
    for file in checkpoint_files(folder):
        for key, tensor in load_file(file).items():
            if adapter.is_carried(key):
                model.carried_tensors[key] = tensor
            else:
                state_dict[adapter.to_internal_key(key)] = tensor
    if cfg.tie_word_embeddings:
        state_dict["unembed.weight"] = state_dict["embed.weight"]
    model.load_state_dict(state_dict, strict=True)
    del state_dict
    return model


def held_bytes(model) -> tuple[int, list[str]]:
    """(bytes, dtypes) of what a loaded model must hold: every parameter and buffer storage once
    (a tied weight is one storage) plus the carried checkpoint tensors."""
    tensors = [*model.state_dict().values(), *model.carried_tensors.values()]
    sizes = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(sizes.values()), sorted({str(t.dtype) for t in tensors})


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
    weight_bytes, dtypes = held_bytes(model)
    tied = model.cfg.tie_word_embeddings and model.unembed.weight.data_ptr() == model.embed.weight.data_ptr()
    peak_increase = after["VmHWM"] - before["VmRSS"]
    return {
        "method": method,
        "seconds": seconds,
        "weight_bytes": weight_bytes,
        "dtypes": dtypes,
        "carried_bytes": sum(t.numel() * t.element_size() for t in model.carried_tensors.values()),
        "tie_kept": tied if model.cfg.tie_word_embeddings else None,
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


def checkpoint_plan(family: str) -> tuple[str, int, Callable[[Path], None]]:
    """(description, checkpoint bytes, writer into a folder) of `family`'s random bf16 checkpoint."""
    if family == "llada":
        def write(folder: Path) -> None:
            write_llada_checkpoint(folder, SHAPE, dtype=torch.bfloat16, seed=0, n_shards=2)

        return SHAPE.describe(), 2 * SHAPE.n_params, write
    from transformers import DiffusionGemmaConfig  # the checkpoint's config class (heavy import)

    shapes = diffusion_gemma_tensor_shapes(DiffusionGemmaConfig(text_config=GEMMA_TEXT, vision_config=GEMMA_VISION))
    n_params = sum(math.prod(dims) for dims in shapes.values())
    n_vision = sum(math.prod(dims) for key, dims in shapes.items() if _is_vision(key))
    t = GEMMA_TEXT
    describe = (f"{t['num_hidden_layers']}L d{t['hidden_size']} {t['num_attention_heads']}h/{t['num_key_value_heads']}kv "
                f"mlp{t['intermediate_size']} {t['num_experts']} experts x {t['moe_intermediate_size']} vocab{t['vocab_size']} "
                f"+ vision tower {2 * n_vision / 2**20:.1f} MiB ({n_params / 1e6:.1f}M params)")

    def write(folder: Path) -> None:
        write_diffusion_gemma_checkpoint(folder, GEMMA_TEXT, GEMMA_VISION, dtype=torch.bfloat16, seed=0, n_shards=2)

    return describe, 2 * n_params, write


def _is_vision(key: str) -> bool:
    return key.startswith(("model.encoder.vision_tower.", "model.encoder.embed_vision."))


def measure_family(family: str, tmp_parent: Path, keep: bool) -> Optional[dict]:
    """Write `family`'s checkpoint, load it with every method in a child process; None if no disk."""
    describe, weight_bytes, write = checkpoint_plan(family)
    free = shutil.disk_usage(tmp_parent).free
    print(f"\n{family}: {describe}, bf16, 2 shards = {weight_bytes / 2**30:.2f} GiB; "
          f"free disk in {tmp_parent}: {free / 2**30:.1f} GiB")
    if free < 2 * weight_bytes:
        print(f"not enough free disk in {tmp_parent} (need {2 * weight_bytes / 2**30:.1f} GiB); use --tmpdir.")
        return None
    folder = Path(tempfile.mkdtemp(prefix=f"dlens-load-bench-{family}-", dir=tmp_parent))
    try:
        start = time.perf_counter()
        write(folder)
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        print(f"wrote {folder} ({', '.join(shards)} + index) in {time.perf_counter() - start:.1f} s")
        results = {method: run_child(method, folder) for method in METHODS}
    finally:
        if keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return {"shape": describe, "results": results, "pass": results["ours"]["ratio"] <= GOAL}


def print_table(measured: dict[str, dict]) -> None:
    print(f"\n{'family':<16} {'method':<7} {'load s':>7} {'held MiB':>9} {'peak +RSS MiB':>14} {'ratio':>6} {'goal':>6}  "
          f"{'':<4} {'sampled (anon / file-backed) MiB':>33}")
    for family, entry in measured.items():
        for method, r in entry["results"].items():
            goal = f"{GOAL:.2f}" if method == "ours" else "ref"
            verdict = ("PASS" if r["ratio"] <= GOAL else "MISS") if method == "ours" else ""
            sampled = f"{r['sampled_peak_increase'] / 2**20:.0f} ({r['sampled_peak_anon_increase'] / 2**20:.0f} / " \
                      f"{(r['sampled_peak_file'] - r['file_before']) / 2**20:.0f})"
            print(f"{family:<16} {method:<7} {r['seconds']:>7.2f} {r['weight_bytes'] / 2**20:>9.0f} "
                  f"{r['peak_increase'] / 2**20:>14.0f} {r['ratio']:>6.3f} {goal:>6}  {verdict:<4} {sampled:>33}")
    results = [r for entry in measured.values() for r in entry["results"].values()]
    if not all(r["hwm_reset"] for r in results):
        print("note: /proc/self/clear_refs was refused, so the peak is VmHWM (which may predate the load) "
              "minus the RSS before loading.")
    untied = [f"{family} {r['method']}" for family, entry in measured.items() for r in entry["results"].values()
              if r["tie_kept"] is False]
    if untied:
        print(f"WARNING: the tied LM head does not share the embedding's storage after loading: {', '.join(untied)}")
    print("ratio = (peak RSS during loading - RSS before loading) / held bytes (parameters and buffers, a tied "
          "weight once, plus carried tensors); the RSS counts file pages mmapped by safetensors.load_file too.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=(*FAMILIES, "all"), default="all", help="which checkpoint(s) (default all)")
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

    tmp_parent = Path(args.tmpdir or tempfile.gettempdir())
    families = FAMILIES if args.family == "all" else (args.family,)
    measured = {family: measure_family(family, tmp_parent, args.keep) for family in families}
    if any(entry is None for entry in measured.values()):
        return 1
    print_table(measured)
    report = {"bench": "load_memory", "goal": GOAL, "torch": torch.__version__, **measured,
              "pass": all(entry["pass"] for entry in measured.values())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shown = args.out.relative_to(REPO_ROOT) if args.out.is_relative_to(REPO_ROOT) else args.out
    print(f"\nwrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
