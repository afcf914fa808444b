"""Bidirectional multi-head attention (MHA or GQA) with TransformerLens hook points.

The fast path is `scaled_dot_product_attention`; the explicit path (scores, softmax, pattern) runs
only when `hook_attn_scores` or `hook_pattern` has a hook, e.g. while they are being cached.
Both compute the same function (tested to 1e-5).
"""

from __future__ import annotations

from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from diffusion_lens.core.components.mlp import bias_or_zeros
from diffusion_lens.core.components.norm import RMSNorm
from diffusion_lens.core.components.rotary import Rotary
from diffusion_lens.core.config import DiffusionConfig

AttentionMask = Optional[Bool[Tensor, "batch 1 _q_pos k_pos"]]  # broadcast over heads (and queries)


def attention_mask_for(
    cfg: DiffusionConfig, padding_mask: Optional[Int[Tensor, "batch pos"]]
) -> AttentionMask:
    """Turn a [batch pos] padding mask (1 = real token) into the boolean mask SDPA takes
    (True = may attend), following `cfg.attention_mask_mode` (documented on `DiffusionConfig`).

    Returns None when attention is fully bidirectional, which is also what every family does for
    an all-ones mask.
    """
    if padding_mask is None or cfg.attention_mask_mode == "ignored":
        return None
    valid = padding_mask.bool()
    if bool(valid.all()):
        return None
    n_pos = valid.shape[1]
    keys = valid[:, None, None, :]
    if cfg.attention_mask_mode == "key_padding":
        return keys
    if cfg.attention_mask_mode == "query_key_padding":
        return keys & valid[:, None, :, None]
    # causal_when_padded: the Feb-2025 LLaDA file switches the whole batch to causal attention.
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=valid.device).tril()
    return keys & causal


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention with RoPE, optional q/k norm and a hook on each stage."""

    def __init__(self, cfg: DiffusionConfig, rotary: Rotary):
        super().__init__()
        self.cfg = cfg
        self.rotary = rotary
        n_q, n_kv, d_head = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
        self.q_proj = nn.Linear(cfg.d_model, n_q * d_head, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, n_kv * d_head, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, n_kv * d_head, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(n_q * d_head, cfg.d_model, bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d_head, cfg.norm_eps)
            self.k_norm = RMSNorm(d_head, cfg.norm_eps)
        self.use_attn_result = False  # opt-in per-head `hook_result`, as in TransformerLens

        self.hook_q = HookPoint()  # [batch pos head d_head]
        self.hook_k = HookPoint()  # [batch pos kv_head d_head]
        self.hook_v = HookPoint()  # [batch pos kv_head d_head]
        self.hook_rot_q = HookPoint()  # [batch pos head d_head] after RoPE
        self.hook_rot_k = HookPoint()  # [batch pos kv_head d_head] after RoPE
        self.hook_attn_scores = HookPoint()  # [batch head q_pos k_pos]
        self.hook_pattern = HookPoint()  # [batch head q_pos k_pos]
        self.hook_z = HookPoint()  # [batch pos head d_head]
        self.hook_result = HookPoint()  # [batch pos head d_model], only when use_attn_result

    @property
    def needs_pattern(self) -> bool:
        return bool(self.hook_attn_scores._forward_hooks or self.hook_pattern._forward_hooks)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: AttentionMask,
        rope: tuple[Tensor, Tensor],
        kv: Optional[tuple[Tensor, Tensor]] = None,
        window_start: int = 0,
    ) -> Float[Tensor, "batch pos d_model"]:
        """`x` holds the canvas positions computed this forward; with `kv` (this layer's
        `KVCache` tensors) they are columns [window_start, window_start + pos) of the canvas, and
        the queries attend to the keys / values of every column, this window's written in first.

        Example:
            >>> out = block.attn(x, None, rope)                                     # plain
            >>> out = block.attn(x[:, 8:], None, rope_8, cache.layer(0), window_start=8)   # windowed
        """
        batch, n_pos, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(batch, n_pos, cfg.n_heads, cfg.d_head)
        k = self.k_proj(x).view(batch, n_pos, cfg.n_key_value_heads, cfg.d_head)
        v = self.v_proj(x).view(batch, n_pos, cfg.n_key_value_heads, cfg.d_head)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q = self.hook_rot_q(self.rotary(q, *rope))
        k = self.hook_rot_k(self.rotary(k, *rope))

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch head pos d_head]
        if kv is not None:  # windowed forward: write this window's keys / values, attend to every position
            cached_k, cached_v = kv
            cached_k[:, :, window_start : window_start + n_pos] = k
            cached_v[:, :, window_start : window_start + n_pos] = v
            k, v = cached_k, cached_v
        if self.needs_pattern:
            z = self._explicit_attention(q, k, v, mask)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=cfg.n_key_value_heads != cfg.n_heads
            )
        z = self.hook_z(z.transpose(1, 2))  # [batch pos head d_head]
        if self.use_attn_result:
            return self._per_head_result(z)
        return self.o_proj(z.reshape(batch, n_pos, cfg.n_heads * cfg.d_head))

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        groups = self.cfg.n_heads // self.cfg.n_key_value_heads
        if groups > 1:  # (repeat_interleave copies even for groups == 1)
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # Scale in place: one [batch head q k] temporary fewer (mm's backward does not need its output).
        scores = (q @ k.transpose(-1, -2)).mul_(self.cfg.d_head**-0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = torch.softmax(scores.float(), dim=-1)
        if mask is not None:
            # A fully masked query row (a pad query under query_key_padding) attends to nothing
            # and outputs zero, as SDPA does. Without a mask no row is fully masked.
            pattern = pattern.nan_to_num(0.0)
        pattern = pattern.to(q.dtype)
        pattern = self.hook_pattern(pattern)
        return pattern @ v

    def _per_head_result(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
        result = einops.einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
        out = self.hook_result(result).sum(dim=2)
        return out if self.o_proj.bias is None else out + self.o_proj.bias

    # TransformerLens weight views (kv heads expanded for GQA), read-only copies of the weights.
    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return einops.rearrange(self.q_proj.weight, "(head d_head) d_model -> head d_model d_head", head=self.cfg.n_heads)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._expand_kv(self.k_proj.weight)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return self._expand_kv(self.v_proj.weight)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(self.o_proj.weight, "d_model (head d_head) -> head d_head d_model", head=self.cfg.n_heads)

    def _expand_kv(self, weight: Tensor) -> Tensor:
        per_kv = einops.rearrange(weight, "(kv d_head) d_model -> kv d_model d_head", kv=self.cfg.n_key_value_heads)
        return per_kv.repeat_interleave(self.cfg.n_heads // self.cfg.n_key_value_heads, dim=0)

    # Biases in TransformerLens shapes: the real values where the family has them (Dream's q/k/v),
    # zeros elsewhere, so `x @ W_Q + b_Q` is always the query whatever the family.
    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return bias_or_zeros(self.q_proj).view(self.cfg.n_heads, self.cfg.d_head)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._expand_kv_bias(bias_or_zeros(self.k_proj))

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._expand_kv_bias(bias_or_zeros(self.v_proj))

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return bias_or_zeros(self.o_proj)

    def _expand_kv_bias(self, bias: Tensor) -> Tensor:
        per_kv = bias.view(self.cfg.n_key_value_heads, self.cfg.d_head)
        return per_kv.repeat_interleave(self.cfg.n_heads // self.cfg.n_key_value_heads, dim=0)
