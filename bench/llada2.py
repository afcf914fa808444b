"""LLaDA2 forward (issue 14 item 6): ours vs an in-run plain-torch reference on the same random weights.

transformers (5.x) has no LLaDA2 / BailingMoeV2 class, so the reference is upstream's forward written
compactly from shared/reference/llada2.md §4-§6, reading the checkpoint's own tensor names: fused
QKV, per-head q/k RMSNorm, partial RoPE, SDPA with an additive block-causal mask, a dense first layer,
then MoE layers with the fp32 sigmoid / group-limited router and upstream's `moe_infer` dispatch
(tokens sorted by expert, each expert run once on its slice, scattered back, weighted sum over the
k slots) plus the ungated shared expert. Both models read one checkpoint written by our
`save_pretrained` (random weights, random expert biases); logits are checked to agree (max |diff| /
max |logit| < 1e-4, router choices compared) before timing.

Default shape (~350M parameters, a narrow LLaDA2.0-mini): 6 layers (layer 0 dense), d_model 1024,
16 heads / 4 kv heads of 64 (half rotary), 32 experts of 512 top-8 in 8 groups (topk_group 4), one
shared expert, vocab 32000; fp32, one thread, batch 2 x 256 positions, block-causal (blocks of 32),
no hooks. Goal: ours / reference <= 1.05.

Timing: warm-up rounds, then rounds in which each variant runs once (order rotated); the ratio is
the median over rounds of the within-round ratio (wall and process CPU time).

Run: `python bench/llada2.py [--quick] [--repeats N] [--threads 1]`; prints the table and writes
`bench_out/llada2.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import REPO_ROOT  # noqa: E402
from forward_families import paired_ratio, random_checkpoint, time_interleaved  # noqa: E402

from diffusion_lens import HookedDiffusionTransformer  # noqa: E402

SHAPES = {
    "default": dict(d_model=1024, n_layers=6, n_heads=16, n_kv=4, d_head=64, d_dense=2816, n_experts=32, top_k=8,
                    d_expert=512, n_group=8, topk_group=4, vocab=32000),
    "quick": dict(d_model=128, n_layers=3, n_heads=4, n_kv=2, d_head=32, d_dense=256, n_experts=16, top_k=4,
                  d_expert=64, n_group=4, topk_group=2, vocab=1000),
}


def llada2_config(*, d_model, n_layers, n_heads, n_kv, d_head, d_dense, n_experts, top_k, d_expert, n_group,
                  topk_group, vocab) -> dict:
    """A LLaDA2 config.json (the mini's conventions: first layer dense, one shared expert, q/k norm)."""
    return {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": vocab,
        "hidden_size": d_model, "intermediate_size": d_dense, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": d_head, "partial_rotary_factor": 0.5,
        "rope_theta": 600000.0, "rms_norm_eps": 1e-6, "use_qkv_bias": False, "use_bias": False,
        "tie_word_embeddings": False, "num_experts": n_experts, "num_experts_per_tok": top_k,
        "num_shared_experts": 1, "moe_intermediate_size": d_expert, "n_group": n_group, "topk_group": topk_group,
        "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "max_position_embeddings": 4096,
        "pad_token_id": vocab - 2, "dtype": "float32",
    }




class ReferenceLLaDA2(torch.nn.Module):
    """Upstream's LLaDA2 forward (reference §4-§6) on a checkpoint's tensors, SDPA, `moe_infer` dispatch."""

    def __init__(self, folder: Path):
        super().__init__()
        self.c = json.loads((folder / "config.json").read_text())
        self.w = load_file(str(folder / "model.safetensors"))

    def norm(self, u, w):
        return w * (u.float() * torch.rsqrt(u.float().pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"])).to(u.dtype)

    def mlp(self, h, p):
        w = self.w
        return F.linear(F.silu(F.linear(h, w[p + "gate_proj.weight"])) * F.linear(h, w[p + "up_proj.weight"]),
                        w[p + "down_proj.weight"])

    def moe(self, h, p):
        c, w = self.c, self.w
        shape, E, G, k = h.shape, c["num_experts"], c["n_group"], c["num_experts_per_tok"]
        x = h.reshape(-1, shape[-1])
        n = x.shape[0]
        logits = F.linear(x.float(), w[p + "gate.weight"].float())
        scores = logits.sigmoid()
        biased = scores + w[p + "gate.expert_bias"]
        group = biased.view(n, G, -1).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group).scatter_(1, group.topk(c["topk_group"], dim=-1, sorted=False).indices, 1)
        keep = keep.unsqueeze(-1).expand(n, G, E // G).reshape(n, E)
        ids = biased.masked_fill(keep == 0, float("-inf")).topk(k, dim=-1).indices
        weight = scores.gather(1, ids)
        if k > 1:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        weight = weight * c["routed_scaling_factor"]
        # moe_infer: tokens sorted by expert id, each expert once on its contiguous slice, scattered back
        counts = torch.bincount(ids.view(-1), minlength=E).tolist()
        order = ids.view(-1).argsort()
        sorted_tokens = x[order // k]
        outs, start = [], 0
        for e, count in enumerate(counts):
            if count:
                outs.append(self.mlp(sorted_tokens[start:start + count], f"{p}experts.{e}."))
                start += count
        flat = torch.cat(outs)
        routed = torch.empty_like(flat)
        routed[order] = flat
        y = routed.view(n, k, -1).float().mul_(weight.unsqueeze(-1)).sum(1).to(h.dtype)
        return y.view(shape) + self.mlp(h, p + "shared_experts."), ids

    def forward(self, ids, block_length: int):
        """(logits [batch pos vocab] fp32, chosen experts per MoE layer), block-causal with `block_length`."""
        c, w = self.c, self.w
        B, T = ids.shape
        H, K, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        r = int(d * c["partial_rotary_factor"])
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, r, 2).float() / r))
        emb = torch.arange(T).float()[:, None] * inv[None]
        emb = torch.cat([emb, emb], -1)
        cos, sin = emb.cos(), emb.sin()
        blocks = torch.arange(T) // block_length
        mask = torch.zeros(T, T).masked_fill(blocks[None, :] > blocks[:, None], float("-inf"))[None, None]

        def rope(u):
            rot, rest = u[..., :r], u[..., r:]
            half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], -1)
            return torch.cat([rot * cos + half * sin, rest], -1)

        x = w["model.word_embeddings.weight"][ids]
        chosen = []
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self.norm(x, w[p + "input_layernorm.weight"])
            qkv = F.linear(h, w[p + "attention.query_key_value.weight"]).view(B, T, H + 2 * K, d).transpose(1, 2)
            q = rope(self.norm(qkv[:, :H], w[p + "attention.query_layernorm.weight"]))
            k = rope(self.norm(qkv[:, H:H + K], w[p + "attention.key_layernorm.weight"]))
            k, v = k.repeat_interleave(H // K, 1), qkv[:, H + K:].repeat_interleave(H // K, 1)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, H * d)
            x = x + F.linear(z, w[p + "attention.dense.weight"])
            h2 = self.norm(x, w[p + "post_attention_layernorm.weight"])
            if i < c["first_k_dense_replace"]:
                x = x + self.mlp(h2, p + "mlp.")
            else:
                y, ids_i = self.moe(h2, p + "mlp.")
                x = x + y
                chosen.append(ids_i)
        return F.linear(self.norm(x, w["model.norm.weight"]), w["lm_head.weight"]).float(), chosen


def run(*, quick: bool, batch: int, n_pos: int, block_length: int, repeats: int, warmup: int) -> dict:
    size = SHAPES["quick" if quick else "default"]
    config = llada2_config(**size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(Path(tmp) / "llada2", config, seed=0, expert_bias_std=0.01)
        ours = HookedDiffusionTransformer.from_pretrained(folder)
        ref = ReferenceLLaDA2(folder)
    n_params = sum(p.numel() for p in ours.parameters())
    tokens = torch.randint(0, size["vocab"] - 2, (batch, n_pos), generator=torch.Generator().manual_seed(1))
    names = [f"blocks.{layer}.mlp.hook_expert_weights" for layer in ours.cfg.moe_layers]
    with torch.inference_mode():
        logits, cache = ours.run_with_cache(tokens, attention_block_size=block_length, names_filter=names)
        ref_logits, ref_chosen = ref(tokens, block_length)
        ours_chosen = [(cache[name] != 0).flatten(0, 1) for name in names]
        ref_sets = [torch.zeros_like(o).scatter_(1, ids, True) for o, ids in zip(ours_chosen, ref_chosen)]
        same_routing = sum(int((a == b).all(-1).sum()) for a, b in zip(ours_chosen, ref_sets))
        diff = (logits - ref_logits).abs().max().item()
        scale = ref_logits.abs().max().item()
        timings = time_interleaved(
            {"ours": lambda: ours(tokens, attention_block_size=block_length),
             "reference": lambda: ref(tokens, block_length)},
            repeats=repeats, warmup=warmup, sync=lambda: None,
        )
    return {
        "device": f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__, "dtype": "torch.float32",
        "shape": size, "n_params": n_params, "batch": batch, "n_pos": n_pos, "block_length": block_length,
        "max_abs_logit_diff": diff, "max_abs_logit": scale, "relative_diff": diff / scale,
        "tokens_routed_identically": f"{same_routing} / {len(names) * batch * n_pos}",
        "seconds": timings["median"], "rounds": timings["rounds"],
        "ratio_ours_over_reference": paired_ratio(timings, "ours", "reference"),
        "cpu_time_ratio_ours_over_reference": paired_ratio(timings, "ours", "reference", "cpu_rounds"),
    }


def print_results(r: dict) -> None:
    s = r["shape"]
    print(f"LLaDA2 forward, {r['device']}, {r['dtype']}, {r['n_params'] / 1e6:.0f}M params ({s['n_layers']} layers, "
          f"d_model {s['d_model']}, {s['n_experts']} experts top-{s['top_k']}, {s['n_group']} groups / "
          f"top {s['topk_group']}), batch {r['batch']} x {r['n_pos']}, block-causal {r['block_length']}, no hooks")
    print(f"parity: max |logit diff| {r['max_abs_logit_diff']:.2e} (max |logit| {r['max_abs_logit']:.1f}, relative "
          f"{r['relative_diff']:.1e}); tokens x MoE layers routed identically {r['tokens_routed_identically']}")
    print(f"| {'model':<10} | {'ms / forward':>12} |")
    for name, seconds in r["seconds"].items():
        print(f"| {name:<10} | {seconds * 1e3:>12.1f} |")
    print(f"ratio ours / reference: {r['ratio_ours_over_reference']:.3f} wall, "
          f"{r['cpu_time_ratio_ours_over_reference']:.3f} CPU time (goal <= 1.05)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--n-pos", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, for a smoke test")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench_out" / "llada2.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(quick=args.quick, batch=args.batch, n_pos=args.n_pos, block_length=args.block_length,
                  repeats=args.repeats, warmup=args.warmup)
    if results["relative_diff"] > 1e-4:
        raise SystemExit(f"ours and the reference disagree: relative logit diff {results['relative_diff']:.1e} > 1e-4")
    print_results(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
