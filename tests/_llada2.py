"""Test helpers for the LLaDA2.x fixtures (tests/fixtures/llada2-tiny{,-b}, README-llada2.md beside them).

`golden_runs` reads every `golden_generate` run (tensors and recorded kwargs); `reference_forward` is
a plain-torch LLaDA2 forward written from ../shared/reference/llada2.md §4-§6 (block-causal attention
counted from column 0, padding masked on keys), so the samplers' loops are checked against the goldens
independently of the library's model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
VARIANTS = ("llada2-tiny", "llada2-tiny-b")

#: the fixtures' sampler names -> LLaDA2Sampler's `algorithm`
ALGORITHM = {"hf20": "llada2.0", "hf21": "llada2.1"}


def golden_runs(variant: str) -> dict[str, dict]:
    """{run: {"prompt", "output", "canvas", "trajectory", "window_end", "kwargs"}} of one fixture."""
    path = FIXTURES / variant / "golden_generate.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    runs: dict[str, dict] = {}
    for name, value in tensors.items():
        run, key = name.split(".", 1)
        runs.setdefault(run, {})[key] = value
    for run, entry in runs.items():
        entry["kwargs"] = json.loads(meta[f"{run}.kwargs"])
    return runs


def sampler_options(kwargs: dict) -> tuple[dict, int | None]:
    """(LLaDA2Sampler options, seed or None) for a recorded run's kwargs: upstream's keywords as they are,
    the fixture's `sampler` as `algorithm`, `greedy_patch` as `greedy` (LLaDA2.0 only)."""
    options = dict(kwargs)
    seed = options.pop("seed", None)
    algorithm = ALGORITHM[options.pop("sampler")]
    patched = options.pop("greedy_patch")
    options["algorithm"] = algorithm
    if algorithm == "llada2.0":
        options["greedy"] = patched
    return options, seed


class ReferenceLLaDA2:
    """Plain-torch LLaDA2 MoE forward on a fixture's weights (float32), for sampler tests."""

    def __init__(self, variant: str):
        folder = FIXTURES / variant
        self.c = json.loads((folder / "config.json").read_text())
        self.w = load_file(str(folder / "model.safetensors"))

    def _norm(self, u, w):
        return w * (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"]))

    def _mlp(self, h, prefix):
        w = self.w
        return F.linear(F.silu(F.linear(h, w[prefix + "gate_proj.weight"])) * F.linear(h, w[prefix + "up_proj.weight"]),
                        w[prefix + "down_proj.weight"])

    def _moe(self, h, i):
        c, w, p = self.c, self.w, f"model.layers.{i}.mlp."
        n, D = h.shape[0] * h.shape[1], h.shape[-1]
        flat = h.reshape(n, D)
        scores = torch.sigmoid(F.linear(flat, w[p + "gate.weight"]))
        biased = scores + w[p + "gate.expert_bias"]
        G, E = c["n_group"], c["num_experts"]
        group = biased.view(n, G, E // G).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group).scatter(1, group.topk(c["topk_group"], dim=-1, sorted=False).indices, 1)
        keep = keep[:, :, None].expand(n, G, E // G).reshape(n, E).bool()
        chosen = biased.masked_fill(~keep, float("-inf")).topk(c["num_experts_per_tok"], dim=-1).indices
        weight = scores.gather(1, chosen)
        if c["num_experts_per_tok"] > 1:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        weight = weight * c["routed_scaling_factor"]
        out = torch.zeros_like(flat)
        for slot in range(chosen.shape[1]):
            for e in chosen[:, slot].unique().tolist():
                rows = chosen[:, slot] == e
                out[rows] += weight[rows, slot, None] * self._mlp(flat[rows], f"{p}experts.{e}.")
        return out.view_as(h) + self._mlp(h, p + "shared_experts.")

    def __call__(self, ids, block_length=None, padding=None, block_offsets=None):
        """Logits [batch pos vocab] of `ids`; block-causal with `block_length` (blocks from column 0, or per
        row from `block_offsets` [batch]), pad keys masked where `padding` [batch pos] is 0; positions 0..pos-1."""
        c, w = self.c, self.w
        B, T = ids.shape
        H, K, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        r = int(d * c["partial_rotary_factor"])
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, r, 2).float() / r))
        ang = torch.arange(T).float()[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos(), emb.sin()

        def rope(u):
            rot, rest = u[..., :r], u[..., r:]
            half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], -1)
            return torch.cat([rot * cos + half * sin, rest], -1)

        allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
        if block_length is not None:
            shift = torch.zeros(B, dtype=torch.long) if block_offsets is None else block_offsets
            blk = (torch.arange(T)[None] - shift[:, None]).div(block_length, rounding_mode="floor")  # [B T]
            allowed = allowed & (blk[:, None, None, :] <= blk[:, None, :, None])
        if padding is not None:
            allowed = allowed & padding.bool()[:, None, None, :]
        bias = torch.zeros(B, 1, T, T).masked_fill(~allowed, float("-inf"))
        x = w["model.word_embeddings.weight"][ids]
        qk_norm = c.get("use_qk_norm", True)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"])
            qkv = F.linear(h, w[p + "attention.query_key_value.weight"], w.get(p + "attention.query_key_value.bias"))
            qkv = qkv.view(B, T, H + 2 * K, d).transpose(1, 2)
            q, k, v = qkv[:, :H], qkv[:, H:H + K], qkv[:, H + K:]
            if qk_norm:
                q = self._norm(q, w[p + "attention.query_layernorm.weight"])
                k = self._norm(k, w[p + "attention.key_layernorm.weight"])
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            z = z.transpose(1, 2).reshape(B, T, H * d)
            x = x + F.linear(z, w[p + "attention.dense.weight"], w.get(p + "attention.dense.bias"))
            h2 = self._norm(x, w[p + "post_attention_layernorm.weight"])
            x = x + (self._mlp(h2, p + "mlp.") if i < c["first_k_dense_replace"] else self._moe(h2, i))
        return F.linear(self._norm(x, w["model.norm.weight"]), w["lm_head.weight"])

    def forward_fn(self, windows: list | None = None):
        """A sampler `forward(state)` running this model on the state's input (block-causal per the state)."""

        def forward(state):
            if windows is not None:
                windows.append(state.model_input.shape[1])
            mask = state.model_attention_mask  # the whole canvas's; the forward reads the prefix model_input
            return self(state.model_input, state.attention_block_size,
                        None if mask is None else mask[:, : state.model_input.shape[1]], state.attention_block_offsets)

        return forward
