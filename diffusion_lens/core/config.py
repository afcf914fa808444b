"""`DiffusionConfig`: every architectural fact the core model needs, and nothing family-specific.

Adapters in `model_adapters/` translate a checkpoint's `config.json` into this dataclass. The core
reads only these fields, so a difference between families is always a field here, never an
`if family == ...` in the model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Optional

import torch

AttentionMaskMode = Literal["key_padding", "causal_when_padded", "query_key_padding", "ignored"]
PositionIdsMode = Literal["absolute", "renumber_padded"]
AttentionKind = Literal["bidirectional", "causal", "block_causal", "sliding_causal", "sliding"]


@dataclass
class DiffusionConfig:
    """Shape and behaviour of a masked-diffusion transformer (pre-norm, RMSNorm, RoPE, SwiGLU).

    Attribute names follow TransformerLens (`d_model`, `n_heads`, `d_mlp`, `d_vocab`, ...), so the
    TransformerLens `ActivationCache` analysis methods work on our caches unchanged.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    n_key_value_heads: Optional[int] = None  # None -> n_heads (MHA); fewer -> GQA
    d_head: Optional[int] = None  # None -> d_model // n_heads
    d_vocab_out: Optional[int] = None  # rows of the LM head / embedding ("embedding_size"); None -> d_vocab

    # Positions
    # Longest canvas (prompt + response) the checkpoint was trained for, from its config.json
    # (`max_sequence_length` / `max_position_embeddings`); None when unknown (a hand-built config).
    n_ctx: Optional[int] = None
    rope_theta: float = 10000.0
    rotary_dim: Optional[int] = None  # None -> d_head (full rotation); smaller -> partial RoPE
    rope_in_fp32: bool = True  # rotate in fp32 then cast back (LLaDA); False casts cos/sin first (Qwen2/Dream)
    # RoPE positions when the forward gets a padding mask with a zero and no explicit position_ids:
    #   absolute         0..pos-1 whatever the padding (LLaDA, MMaDA, LLaDA-MoE)
    #   renumber_padded  real tokens cumsum(mask)-1, pad positions 1 (Dream's sampler)
    position_ids_mode: PositionIdsMode = "absolute"

    # Norms and biases
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (LLaDA-MoE)
    clip_qkv: Optional[float] = None
    tie_word_embeddings: bool = False

    # Attention-mask semantics for a [batch pos] padding mask (1 = real token):
    #   key_padding         padded keys are masked, all queries computed (LLaDA, current HF file)
    #   causal_when_padded  any zero makes the whole batch causal (LLaDA Feb-2025 file, MMaDA)
    #   query_key_padding   pad queries and keys masked, pad rows output zero (Dream's 4D mask)
    #   ignored             the mask never changes the output (LLaDA-MoE)
    attention_mask_mode: AttentionMaskMode = "key_padding"
    # Which keys each layer's query at canvas column q may attend (key column a), one kind per layer;
    # None = every layer bidirectional, the fast path (no mask tensor unless padding needs one).
    # Applied on top of the padding mask above (both must allow a key):
    #   bidirectional   every key (LLaDA, Dream, MMaDA, LLaDA-MoE)
    #   causal          a <= q
    #   block_causal    a // attention_block_size <= q // attention_block_size: bidirectional inside a
    #                   block, causal across blocks counted from canvas column 0, prompt included (LLaDA2)
    #   sliding_causal  q - sliding_window < a <= q: the query and the sliding_window - 1 columns before
    #                   it (DiffusionGemma's causal sliding layers)
    #   sliding         |a - q| <= sliding_window, the inclusive bound of DiffusionGemma's bidirectional
    #                   ("all") sliding layers, whose config already holds the halved window
    layer_attention: Optional[tuple[AttentionKind, ...]] = None
    attention_block_size: Optional[int] = None  # canvas columns per block of block_causal layers
    sliding_window: Optional[int] = None  # the window of sliding / sliding_causal layers (bounds above)

    # Prediction alignment: logits at residual position j-1 predict token j (Dream). 0 = no shift.
    logit_shift: int = 0

    # Special tokens
    mask_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None

    # Mixture of experts (None / empty for dense models)
    n_experts: Optional[int] = None
    n_experts_per_token: Optional[int] = None
    d_expert_mlp: Optional[int] = None
    d_shared_expert_mlp: Optional[int] = None
    moe_layers: tuple[int, ...] = ()  # indices of blocks whose MLP is a mixture of experts
    router_expert_bias: bool = False

    dtype: torch.dtype = torch.float32
    model_name: str = "custom"
    family: str = "custom"  # the adapter that produced this config; informational only
    extra: dict = field(default_factory=dict)  # adapter-private facts kept for save_pretrained

    # TransformerLens-compatibility constants (read by ActivationCache analysis methods).
    normalization_type: str = field(default="RMS", init=False)
    attn_only: bool = field(default=False, init=False)
    final_rms: bool = field(default=True, init=False)
    positional_embedding_type: str = field(default="rotary", init=False)
    act_fn: str = field(default="silu", init=False)  # every family's MLP is SwiGLU: silu(gate) * up
    # Where the weights live; kept in sync by the model (with `dtype`) on `.to()`, `.cuda()`, `.half()`.
    device: str = field(default="cpu", init=False)

    def __post_init__(self) -> None:
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "pass d_head explicitly."
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_vocab_out is None:
            self.d_vocab_out = self.d_vocab
        if self.rotary_dim is None:
            self.rotary_dim = self.d_head
        self.moe_layers = tuple(self.moe_layers)
        if self.layer_attention is not None and not isinstance(self.layer_attention, str):  # a list from JSON
            self.layer_attention = tuple(self.layer_attention)
        self._validate()

    def _validate(self) -> None:
        problems = []
        if self.n_heads % self.n_key_value_heads:
            problems.append(
                f"n_heads={self.n_heads} must be a multiple of n_key_value_heads={self.n_key_value_heads}"
            )
        if not 0 < self.rotary_dim <= self.d_head or self.rotary_dim % 2:
            problems.append(f"rotary_dim={self.rotary_dim} must be even and in (0, d_head={self.d_head}]")
        if self.attention_mask_mode not in AttentionMaskMode.__args__:
            problems.append(
                f"attention_mask_mode={self.attention_mask_mode!r} is not one of {AttentionMaskMode.__args__}"
            )
        if self.position_ids_mode not in PositionIdsMode.__args__:
            problems.append(
                f"position_ids_mode={self.position_ids_mode!r} is not one of {PositionIdsMode.__args__}"
            )
        problems += self._attention_layout_problems()
        if self.n_ctx is not None and self.n_ctx <= 0:
            problems.append(f"n_ctx={self.n_ctx} must be a positive number of positions (or None when unknown)")
        if self.logit_shift not in (0, 1):
            problems.append(f"logit_shift={self.logit_shift} must be 0 or 1")
        if self.moe_layers:
            if not (self.n_experts and self.n_experts_per_token and self.d_expert_mlp):
                problems.append("moe_layers is set, so n_experts, n_experts_per_token and d_expert_mlp are required")
            elif not 0 < self.n_experts_per_token <= self.n_experts:
                problems.append(f"n_experts_per_token={self.n_experts_per_token} must be in 1..n_experts={self.n_experts}")
            bad = [layer for layer in self.moe_layers if not 0 <= layer < self.n_layers]
            if bad:
                problems.append(f"moe_layers {bad} are outside 0..{self.n_layers - 1}")
        if problems:
            raise ValueError("Invalid DiffusionConfig: " + "; ".join(problems))

    def _attention_layout_problems(self) -> list[str]:
        kinds = set(self.layer_attention or ())
        problems = []
        if isinstance(self.layer_attention, str):
            return [f"layer_attention={self.layer_attention!r} must name one kind per layer, "
                    f"e.g. ({self.layer_attention!r},) * n_layers"]
        if self.layer_attention is not None:
            if len(self.layer_attention) != self.n_layers:
                problems.append(
                    f"layer_attention has {len(self.layer_attention)} entries for n_layers={self.n_layers}; "
                    "give one kind per layer (or None for all bidirectional)"
                )
            unknown = sorted(kinds - set(AttentionKind.__args__))
            if unknown:
                problems.append(f"layer_attention kinds {unknown} are not among {AttentionKind.__args__}")
        for size_field, users in (("attention_block_size", {"block_causal"}), ("sliding_window", {"sliding", "sliding_causal"})):
            value = getattr(self, size_field)
            if kinds & users and not (isinstance(value, int) and value > 0):
                problems.append(f"layer_attention has {sorted(kinds & users)} layers, so {size_field} must be a "
                                f"positive number of canvas columns, got {value!r}")
            if value is not None and not kinds & users:
                problems.append(f"{size_field}={value} is set but no layer_attention entry is one of {sorted(users)}, "
                                "which are the only layers it shapes; drop it or name those layers")
        return problems

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def n_params(self) -> int:
        """Parameter count implied by the config (embeddings included)."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_key_value_heads)
        dense = 3 * self.d_model * self.d_mlp
        expert = 3 * self.d_model * (self.d_expert_mlp or 0)
        shared = 3 * self.d_model * (self.d_shared_expert_mlp or 0)
        moe = (self.n_experts or 0) * expert + shared + self.d_model * (self.n_experts or 0)
        blocks = sum(attn + (moe if layer in self.moe_layers else dense) for layer in range(self.n_layers))
        unembed = 0 if self.tie_word_embeddings else self.d_vocab_out * self.d_model
        return blocks + self.d_vocab_out * self.d_model + unembed

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "DiffusionConfig":
        values = dict(values)
        if isinstance(values.get("dtype"), str):
            values["dtype"] = getattr(torch, values["dtype"])
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown DiffusionConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


__all__ = ["DiffusionConfig", "AttentionKind", "AttentionMaskMode", "PositionIdsMode"]
