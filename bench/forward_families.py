"""Forward benchmarks for the Dream and LLaDA-MoE adapters (issue 4).

1. **Dream vs `transformers.Qwen2ForCausalLM`.** Dream's blocks are exactly Qwen2's; with an
   all-True boolean 4D attention mask, transformers passes the mask straight to SDPA without adding
   a causal mask, so `Qwen2ForCausalLM` computes Dream's bidirectional forward. Both models get the
   same random weights (Dream checkpoint keys are Qwen2 keys) and are checked to agree before
   timing. Goal: ours / Qwen2 <= 1.03 with no hooks attached.
2. **LLaDA-MoE: per-expert hooks off vs on.** The same model timed with no hooks, and with a no-op
   hook on every per-expert hook point (`mlp.experts.{e}.hook_pre/hook_pre_linear/hook_post/
   hook_out`) plus the router hooks: the cost of observing every expert.

Timing: warm-up rounds, then rounds in which each variant runs once (order rotated per round); the
ratio is the median over rounds of the within-round ratio, so slow drifts of background load cancel.

Run: `python bench/forward_families.py [--device cuda] [--dtype bfloat16] [--quick]`; results are
printed and written to `bench_out/forward_families.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from diffusion_lens import HookedDiffusionTransformer  # noqa: E402
from diffusion_lens.checkpoints import detect_adapter  # noqa: E402


# ------------------------------------------------------------------------------------- helpers
def random_checkpoint(folder: Path, config: dict, seed: int, *, expert_bias_std: float = 0.0) -> Path:
    """A random checkpoint in the family's own format: the model is built from `config` (a family
    config.json, detected as `from_pretrained` would) and written by `save_pretrained`, so the
    tensor names come from the family's adapter rather than from a table kept here. Weights are
    seeded: norms ~1, matrices N(0, 1/fan_in), biases small; with `expert_bias_std` the routers'
    `expert_bias` buffers are N(0, std^2), drawn after the weights, so that they move the choice."""
    adapter = detect_adapter(config)
    model = HookedDiffusionTransformer(adapter.to_config(config))
    model.adapter = adapter
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.copy_((0.0 if name.endswith("bias") else 1.0) + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
        for name, buffer in sorted(model.named_buffers()):
            if expert_bias_std and name.endswith("expert_bias"):
                buffer.copy_(expert_bias_std * torch.randn(buffer.shape, generator=gen))
    return model.save_pretrained(folder)


def time_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int, sync: Callable) -> dict:
    """Seconds per call of each function: `warmup` untimed rounds, then `repeats` rounds in which
    every function runs once, in an order rotated from round to round. Returns the per-round times
    (`rounds[name]`) and their medians (`median[name]`)."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    rounds = {name: [] for name in names}
    cpu_rounds = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            rounds[name].append(time.perf_counter() - start)
            cpu_rounds[name].append(time.process_time() - cpu_start)
    return {"median": {name: median(v) for name, v in rounds.items()}, "rounds": rounds, "cpu_rounds": cpu_rounds}


def paired_ratio(timings: dict, num: str, den: str, kind: str = "rounds") -> float:
    """Median over rounds of num/den within a round: runs of one round are adjacent in time, so
    slow drifts of background load cancel. `kind="cpu_rounds"` uses process CPU time, which other
    processes competing for the cores inflate much less than wall time (on CPU devices)."""
    return median(a / b for a, b in zip(timings[kind][num], timings[kind][den]))


# ------------------------------------------------------------------------------ Dream vs Qwen2
def dream_checkpoint(folder: Path, *, d_model, n_layers, n_heads, n_kv, d_mlp, vocab, seed=0) -> Path:
    """A random Dream checkpoint (Dream config.json, Qwen2 tensor names)."""
    config = {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": d_model, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "intermediate_size": d_mlp, "vocab_size": vocab,
        "rope_theta": 1e6, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": None, "rope_scaling": None, "max_position_embeddings": 4096,
        "mask_token_id": vocab - 1, "pad_token_id": vocab - 2, "eos_token_id": vocab - 2, "bos_token_id": vocab - 2,
        "torch_dtype": "float32",
    }
    return random_checkpoint(folder, config, seed)


def qwen2_from(folder: Path, dtype: torch.dtype, device: str):
    """`Qwen2ForCausalLM` with the checkpoint's weights (identical key names), SDPA attention."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = json.loads((folder / "config.json").read_text())
    config = Qwen2Config(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], rope_theta=c["rope_theta"], rms_norm_eps=c["rms_norm_eps"],
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=False, use_cache=False,
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config)
    missing, unexpected = model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.to(device=device, dtype=dtype).eval()


def bench_dream(opts: dict, device: str, dtype: torch.dtype, sync) -> dict:
    """Time our Dream forward against Qwen2ForCausalLM (same weights, bidirectional mask)."""
    size = dict(d_model=256, n_layers=2, n_heads=4, n_kv=2, d_mlp=688, vocab=4096) if opts["quick"] else \
        dict(d_model=1024, n_layers=4, n_heads=16, n_kv=4, d_mlp=2816, vocab=16384)
    batch, n_pos = (2, 64) if opts["quick"] else (opts["batch"], opts["n_pos"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = dream_checkpoint(Path(tmp) / "dream", **size)
        ours = HookedDiffusionTransformer.from_pretrained(folder, dtype=dtype, device=device)
        ref = qwen2_from(folder, dtype, device)
    tokens = torch.randint(0, size["vocab"] - 2, (batch, n_pos), generator=torch.Generator().manual_seed(1)).to(device)
    full = torch.ones(batch, 1, n_pos, n_pos, dtype=torch.bool, device=device)  # bidirectional for transformers
    with torch.inference_mode():
        diff = (ours(tokens).float() - ref(input_ids=tokens, attention_mask=full).logits.float()).abs().max().item()
        timings = time_interleaved(
            {"ours": lambda: ours(tokens), "qwen2": lambda: ref(input_ids=tokens, attention_mask=full).logits},
            repeats=opts["repeats"], warmup=opts["warmup"], sync=sync,
        )
    return {"shape": size, "batch": batch, "n_pos": n_pos, "max_abs_logit_diff": diff, "seconds": timings["median"],
            "ratio_ours_over_qwen2": paired_ratio(timings, "ours", "qwen2"),
            "cpu_time_ratio_ours_over_qwen2": paired_ratio(timings, "ours", "qwen2", "cpu_rounds")}


# ---------------------------------------------------------------------- LLaDA-MoE hooks off / on
def llada_moe_checkpoint(folder: Path, *, d_model, n_layers, n_heads, n_experts, top_k, d_expert, vocab, seed=0) -> Path:
    """A random LLaDA-MoE checkpoint (all layers MoE, q/k norm, no shared expert, as the 7B-A1B)."""
    config = {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "hidden_size": d_model,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_heads,
        "dense_intermediate_size": 4 * d_model, "expert_intermediate_size": d_expert,
        "shared_expert_intermediate_size": None, "num_experts": n_experts, "num_experts_per_tok": top_k,
        "moe_layer_freq": [1] * n_layers, "qk_layernorm": True, "partial_rotary_factor": 1.0, "rope_theta": 50000.0,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "pad_token_id": vocab - 2,
        "eos_token_id": vocab - 2, "moe_router_enable_expert_bias": False, "norm_topk_prob": False,
    }
    return random_checkpoint(folder, config, seed)


def bench_moe(opts: dict, device: str, dtype: torch.dtype, sync) -> dict:
    """Time our LLaDA-MoE forward with no hooks and with a no-op hook on every expert/router hook point."""
    size = dict(d_model=256, n_layers=2, n_heads=4, n_experts=8, top_k=2, d_expert=128, vocab=4096) if opts["quick"] \
        else dict(d_model=1024, n_layers=4, n_heads=8, n_experts=64, top_k=8, d_expert=512, vocab=16384)
    batch, n_pos = (2, 64) if opts["quick"] else (opts["batch"], opts["n_pos"])
    with tempfile.TemporaryDirectory() as tmp:
        model = HookedDiffusionTransformer.from_pretrained(
            llada_moe_checkpoint(Path(tmp) / "moe", **size), dtype=dtype, device=device)
    tokens = torch.randint(0, size["vocab"] - 2, (batch, n_pos), generator=torch.Generator().manual_seed(1)).to(device)
    expert_points = [n for n in model.hook_dict if ".mlp.experts." in n]
    router_points = [n for n in model.hook_dict if n.endswith(("hook_router_logits", "hook_router_probs", "hook_expert_weights"))]
    noop = lambda act, hook: None  # noqa: E731
    on = [(name, noop) for name in expert_points + router_points]

    def hooks_on():
        with model.hooks(fwd_hooks=on):
            return model(tokens)

    with torch.inference_mode():
        timings = time_interleaved({"hooks_off": lambda: model(tokens), "per_expert_hooks_on": hooks_on},
                                   repeats=opts["repeats"], warmup=opts["warmup"], sync=sync)
    return {"shape": size, "batch": batch, "n_pos": n_pos, "n_hooked_points": len(on), "seconds": timings["median"],
            "ratio_on_over_off": paired_ratio(timings, "per_expert_hooks_on", "hooks_off"),
            "cpu_time_ratio_on_over_off": paired_ratio(timings, "per_expert_hooks_on", "hooks_off", "cpu_rounds")}


def run_all(*, device: str = "cpu", dtype: Optional[torch.dtype] = None, batch: int = 4, n_pos: int = 256,
            repeats: int = 20, warmup: int = 3, quick: bool = False) -> dict:
    """Both benches; a JSON-ready dict (also used by `bench/forward.py --families`).

    Example:
        >>> results = run_all(quick=True, repeats=3)
        >>> print_results(results)
    """
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    opts = dict(batch=batch, n_pos=n_pos, repeats=repeats, warmup=warmup, quick=quick)
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dtype), "torch": torch.__version__,
        "dream_vs_qwen2": bench_dream(opts, device, dtype, sync),
        "llada_moe_expert_hooks": bench_moe(opts, device, dtype, sync),
    }


def print_results(results: dict) -> None:
    """One line per bench: times, within-round wall ratio, CPU-time ratio, parity."""
    d, m = results["dream_vs_qwen2"], results["llada_moe_expert_hooks"]
    print(f"{results['device']}, {results['dtype']}")
    print(f"Dream (ours) vs Qwen2ForCausalLM, batch {d['batch']} x {d['n_pos']}: "
          f"{d['seconds']['ours'] * 1e3:.2f} ms vs {d['seconds']['qwen2'] * 1e3:.2f} ms, "
          f"ratio {d['ratio_ours_over_qwen2']:.3f} (CPU time {d['cpu_time_ratio_ours_over_qwen2']:.3f}; goal <= 1.03; "
          f"max |logit diff| {d['max_abs_logit_diff']:.2e})")
    print(f"LLaDA-MoE {m['shape']['n_experts']} experts top-{m['shape']['top_k']}, batch {m['batch']} x {m['n_pos']}: "
          f"hooks off {m['seconds']['hooks_off'] * 1e3:.2f} ms, {m['n_hooked_points']} expert/router hooks on "
          f"{m['seconds']['per_expert_hooks_on'] * 1e3:.2f} ms, ratio {m['ratio_on_over_off']:.3f} "
          f"(CPU time {m['cpu_time_ratio_on_over_off']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n-pos", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench_out" / "forward_families.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_all(device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None, batch=args.batch,
                      n_pos=args.n_pos, repeats=args.repeats, warmup=args.warmup, quick=args.quick)
    print_results(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
