"""Multi-head attention (MHA or GQA) with TransformerLens hook points, and its masks (padding and
per-layer kinds: bidirectional, causal, block-causal, sliding window, and the window-relative
prefix kinds of a decoder pass reading a cache).

The fast path is `scaled_dot_product_attention`; the explicit path (scores, softmax, pattern) runs
only when `hook_attn_scores` or `hook_pattern` has a hook, e.g. while they are being cached.
Both compute the same function (tested to 1e-5).
"""

from __future__ import annotations

from typing import Optional, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from diffusion_lens.core.components.mlp import bias_or_zeros
from diffusion_lens.core.components.norm import RMSNorm
from diffusion_lens.core.components.rotary import Rotary
from diffusion_lens.core.config import AttentionKind, DiffusionConfig

# True = may attend; broadcast over heads (and over batch / queries where they are 1).
AttentionMask = Optional[Bool[Tensor, "#batch 1 #pos k_pos"]]


def attention_mask_for(
    cfg: DiffusionConfig, padding_mask: Optional[Int[Tensor, "batch k_pos"]], queries: Optional[range] = None
) -> AttentionMask:
    """Turn a [batch k_pos] padding mask of the canvas (1 = real token) into the boolean mask SDPA
    takes (True = may attend), following `cfg.attention_mask_mode` (documented on `DiffusionConfig`),
    for the queries at canvas columns `queries` (default: every column).

    Returns None when attention is fully bidirectional, which is also what every family does for
    an all-ones mask.

    Example:
        >>> attention_mask_for(cfg, torch.tensor([[0, 1, 1]]), queries=range(1, 3)).shape  # key_padding
        torch.Size([1, 1, 1, 3])
    """
    if padding_mask is None or cfg.attention_mask_mode == "ignored":
        return None
    valid = padding_mask.bool()
    if bool(valid.all()):
        return None
    queries = range(valid.shape[1]) if queries is None else queries
    keys = valid[:, None, None, :]
    if cfg.attention_mask_mode == "key_padding":
        return keys
    if cfg.attention_mask_mode == "query_key_padding":
        return keys & valid[:, None, queries.start : queries.stop, None]
    # causal_when_padded: the Feb-2025 LLaDA file switches the whole batch to causal attention.
    return keys & layer_kind_mask(cfg, "causal", queries, valid.shape[1], valid.device)


def layer_kind_mask(
    cfg: DiffusionConfig, kind: AttentionKind, queries: range, n_keys: int, device: Union[torch.device, str],
    block_size: Optional[int] = None,
    block_offsets: Optional[Int[Tensor, " batch"]] = None,
) -> Optional[Bool[Tensor, "*batch q_pos k_pos"]]:
    """Which keys (canvas columns 0..n_keys-1) the queries at canvas columns `queries` may attend in a
    layer of `kind` (bounds on `DiffusionConfig.layer_attention`); None for bidirectional.
    `block_size` sizes the blocks of "block_causal" (None: `cfg.attention_block_size`), counted from
    column 0, or per row from `block_offsets` [batch] (the column each row's first block starts at, e.g.
    its first real token under left padding: block of column c = (c - offset) // size), which makes the
    mask [batch q_pos k_pos].

    Queries are absolute columns, so a windowed forward gets exactly its [window canvas] rows; the
    `window_*` kinds are relative to the window `queries` itself (every query row is the same).

    Example:
        >>> layer_kind_mask(cfg, "causal", range(1, 3), 3, "cpu")   # columns 1, 2 of a 3-column canvas
        tensor([[ True,  True, False],
                [ True,  True,  True]])
    """
    if kind == "bidirectional":
        return None
    q = torch.arange(queries.start, queries.stop, device=device)[:, None]
    a = torch.arange(n_keys, device=device)[None, :]
    if kind == "causal":
        return a <= q
    if kind == "block_causal":
        size = cfg.attention_block_size if block_size is None else block_size
        if block_offsets is None:
            return a // size <= q // size
        shift = block_offsets.to(device)[:, None, None]
        return (a - shift).div(size, rounding_mode="floor") <= (q - shift).div(size, rounding_mode="floor")
    if kind == "sliding_causal":
        return (a <= q) & (a > q - cfg.sliding_window)
    if kind == "sliding":
        return (a - q).abs() <= cfg.sliding_window
    if kind == "window_prefix":
        return (a < queries.stop).expand(len(queries), n_keys)
    if kind == "window_sliding_prefix":
        return ((a < queries.stop) & (a >= queries.start - (cfg.sliding_window - 1))).expand(len(queries), n_keys)
    raise ValueError(f"Unknown attention kind {kind!r}; DiffusionConfig.layer_attention takes {AttentionKind.__args__}.")


def attention_masks_for(
    cfg: DiffusionConfig,
    padding_mask: Optional[Int[Tensor, "batch k_pos"]],
    queries: range,
    n_keys: int,
    device: Union[torch.device, str],
    kinds: Optional[tuple[str, ...]] = None,
    block_size: Optional[int] = None,
    block_offsets: Optional[Int[Tensor, " batch"]] = None,
) -> list[AttentionMask]:
    """One mask per layer for the queries at canvas columns `queries` over keys 0..n_keys-1: the
    padding mask (`attention_mask_for`) AND the layer's kind (`kinds`, default `cfg.layer_attention`;
    a pass's are `cfg.attention_kinds(pass_name)`).

    `block_size` (a sampler's block length, e.g. LLaDA2's `block_length`) makes the bidirectional
    and block-causal layers block-causal with blocks of `block_size` canvas columns counted from
    column 0 (prompt included), or per row from `block_offsets` [batch] (`layer_kind_mask`; left-padded
    rows anchored at their first real token); None keeps the kinds as configured.

    Each distinct kind's mask is built once per forward and shared by its layers; with every layer
    bidirectional and no padding to mask, no mask tensor is built at all (SDPA's fast path).

    Example:
        >>> masks = attention_masks_for(cfg, None, range(8, 16), 24, tokens.device)   # a window of 8
        >>> [None if m is None else tuple(m.shape) for m in masks]    # e.g. [None, (1, 1, 8, 24)]
    """
    padding = attention_mask_for(cfg, padding_mask, queries)
    kinds = cfg.layer_attention if kinds is None else kinds
    if block_offsets is not None and block_size is None:
        raise ValueError("block_offsets= (attention_block_offsets=) anchors the blocks of attention_block_size=; "
                         "pass attention_block_size= too, or drop the offsets.")
    if block_size is not None:
        kinds = _block_causal_kinds(cfg, kinds, block_size)
    if kinds is None:
        return [padding] * cfg.n_layers
    by_kind: dict[str, AttentionMask] = {}
    for kind in dict.fromkeys(kinds):
        layer = layer_kind_mask(cfg, kind, queries, n_keys, device, block_size, block_offsets)
        layer = None if layer is None else layer.view(-1, 1, *layer.shape[-2:])  # [#batch 1 q_pos k_pos]
        if layer is None or padding is None:
            by_kind[kind] = layer if padding is None else padding
        else:
            by_kind[kind] = padding & layer
    return [by_kind[kind] for kind in kinds]


def _block_causal_kinds(cfg: DiffusionConfig, kinds: Optional[tuple[str, ...]], block_size: int) -> tuple[str, ...]:
    """Every layer block-causal for a forward's `attention_block_size`; other kinds cannot take it."""
    if not (isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"attention_block_size={block_size!r} must be a positive number of canvas columns.")
    kinds = ("bidirectional",) * cfg.n_layers if kinds is None else kinds
    other = sorted(set(kinds) - {"bidirectional", "block_causal"})
    if other:
        raise ValueError(f"attention_block_size= makes bidirectional layers block-causal, but this model has {other} "
                         "layers, whose attention it cannot change; drop attention_block_size.")
    return ("block_causal",) * len(kinds)


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention with RoPE, optional q/k norm and a hook on each stage.

    Layer `layer`'s geometry comes from `cfg.head_dim(layer)` / `cfg.kv_heads(layer)`; with
    `cfg.layer_values_from_keys[layer]` there is no `v_proj` and the values are the raw `k_proj`
    output (before `k_norm`); `cfg.v_norm` adds a weightless per-head norm on the values.

    Example:
        >>> attn = Attention(cfg, Rotary(cfg), layer=0)
    """

    def __init__(self, cfg: DiffusionConfig, rotary: Rotary, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.rotary = rotary
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, cfg.kv_heads(layer), cfg.head_dim(layer)
        self.scale = cfg.attn_scale  # None: SDPA's default d_head ** -0.5
        n_q, n_kv, d_head = self.n_heads, self.n_kv_heads, self.d_head
        self.values_from_keys = bool(cfg.layer_values_from_keys and cfg.layer_values_from_keys[layer])
        self.q_proj = nn.Linear(cfg.d_model, n_q * d_head, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, n_kv * d_head, bias=cfg.qkv_bias)
        self.v_proj = None if self.values_from_keys else nn.Linear(cfg.d_model, n_kv * d_head, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(n_q * d_head, cfg.d_model, bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d_head, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32)
            self.k_norm = RMSNorm(d_head, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32)
        if cfg.v_norm:
            self.v_norm = RMSNorm(d_head, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32, weight=False)
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
        `mask` (`attention_masks_for`: this layer's kind AND the padding) says which, per query
        column; None attends to every key.

        Example:
            >>> out = block.attn(x, None, rope)                                     # plain
            >>> out = block.attn(x[:, 8:], None, rope_8, cache.layer(0), window_start=8)   # windowed
        """
        batch, n_pos, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x).view(batch, n_pos, self.n_heads, self.d_head)
        k = self.k_proj(x).view(batch, n_pos, self.n_kv_heads, self.d_head)
        v = k if self.v_proj is None else self.v_proj(x).view(batch, n_pos, self.n_kv_heads, self.d_head)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.v_norm:
            v = self.v_norm(v)
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
                q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads, scale=self.scale
            )
        z = self.hook_z(z.transpose(1, 2))  # [batch pos head d_head]
        if self.use_attn_result:
            return self._per_head_result(z)
        return self.o_proj(z.reshape(batch, n_pos, self.n_heads * self.d_head))

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:  # (repeat_interleave copies even for groups == 1)
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # Scale in place: one [batch head q k] temporary fewer (mm's backward does not need its output).
        scores = (q @ k.transpose(-1, -2)).mul_(self.d_head**-0.5 if self.scale is None else self.scale)
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
        return einops.rearrange(self.q_proj.weight, "(head d_head) d_model -> head d_model d_head", head=self.n_heads)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._expand_kv(self.k_proj.weight)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        """The value projection (k_proj's weight on layers whose values are the raw keys)."""
        return self._expand_kv((self.k_proj if self.v_proj is None else self.v_proj).weight)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(self.o_proj.weight, "d_model (head d_head) -> head d_head d_model", head=self.n_heads)

    def _expand_kv(self, weight: Tensor) -> Tensor:
        per_kv = einops.rearrange(weight, "(kv d_head) d_model -> kv d_model d_head", kv=self.n_kv_heads)
        return per_kv.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    # Biases in TransformerLens shapes: the real values where the family has them (Dream's q/k/v),
    # zeros elsewhere, so `x @ W_Q + b_Q` is always the query whatever the family.
    @property
    def b_Q(self) -> Float[Tensor, "head d_head"]:
        return bias_or_zeros(self.q_proj).view(self.n_heads, self.d_head)

    @property
    def b_K(self) -> Float[Tensor, "head d_head"]:
        return self._expand_kv_bias(bias_or_zeros(self.k_proj))

    @property
    def b_V(self) -> Float[Tensor, "head d_head"]:
        return self._expand_kv_bias(bias_or_zeros(self.k_proj if self.v_proj is None else self.v_proj))

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return bias_or_zeros(self.o_proj)

    def _expand_kv_bias(self, bias: Tensor) -> Tensor:
        per_kv = bias.view(self.n_kv_heads, self.d_head)
        return per_kv.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)
