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
AttentionKind = Literal["bidirectional", "causal", "block_causal", "sliding_causal", "sliding", "window_prefix",
                        "window_sliding_prefix"]
MlpAct = Literal["silu", "gelu_tanh"]
BlockLayout = Literal["pre_norm", "gemma4"]
RopeKind = Literal["default", "proportional"]
RouterScore = Literal["softmax", "sigmoid"]


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
    # Per-layer attention geometry (DiffusionGemma: full-attention layers have wider heads and fewer
    # KV heads than sliding ones); None = every layer has d_head / n_key_value_heads.
    layer_head_dims: Optional[tuple[int, ...]] = None
    layer_kv_heads: Optional[tuple[int, ...]] = None

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
    # Per-layer RoPE, one spec per layer; None = every layer rotates rotary_dim dims with rope_theta.
    # A spec is {"kind": "default" | "proportional", "theta": float, "partial_rotary_factor": float}:
    #   default       inv_freq[j] = theta^(-2j/d), j < d/2, over the layer's whole head dim d
    #   proportional  the same exponents over the whole d, but only the first int(factor * d // 2)
    #                 frequencies rotate (the others are 0: cos 1, sin 0) (DiffusionGemma's full layers)
    # Tables are built once per distinct spec (and head dim) per forward.
    layer_rope: Optional[tuple[dict, ...]] = None

    # Norms and biases
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (LLaDA-MoE)
    clip_qkv: Optional[float] = None
    tie_word_embeddings: bool = False
    # RMSNorm: False = normalise in fp32, cast back, then times the weight (LLaDA, Qwen2, OLMoE);
    # True = the weight multiplies in fp32 before the cast back (Gemma-4).
    norm_weight_in_fp32: bool = False
    attn_scale: Optional[float] = None  # attention logits scale; None -> d_head ** -0.5 (DiffusionGemma 1.0)
    # Layers whose values are the raw k_proj output (no v_proj; DiffusionGemma's full layers); None = none.
    layer_values_from_keys: Optional[tuple[bool, ...]] = None
    v_norm: bool = False  # a weightless per-head RMSNorm on the values (DiffusionGemma)
    mlp_act: MlpAct = "silu"  # activation of every gated MLP / expert: silu(gate) * up, or gelu(tanh)(gate) * up
    # Block layout:
    #   pre_norm  resid_mid = x + attn(ln1(x)); resid_post = resid_mid + mlp(ln2(resid_mid)) (every family but Gemma)
    #   gemma4    sandwich norms, a dense MLP and a mixture of experts in parallel in every layer, the
    #             residual times a per-layer scalar (core/components/gemma4.py; DiffusionGemma)
    block_layout: BlockLayout = "pre_norm"
    # Named passes of one set of weights (DiffusionGemma: "encoder", "decoder"). A forward picks one
    # with `pass_name=` (None = `default_pass`, the pass a plain forward runs); the pass selects the
    # gemma4 layout's per-layer scalar buffers (`blocks.{l}.{pass}_layer_scalar`, one set per name)
    # and the per-layer attention kinds (`pass_layer_attention[pass]`, else `layer_attention`).
    layer_scalar_passes: tuple[str, ...] = ()
    default_pass: Optional[str] = None
    pass_layer_attention: dict[str, tuple[AttentionKind, ...]] = field(default_factory=dict)
    # The pass whose input runs the self-conditioning MLP (core/components/self_conditioning.py;
    # DiffusionGemma's "decoder"): the previous step's logits, softly embedded, through a gated MLP of
    # width d_mlp, added to the token embeddings and normalised. None = no such module.
    self_conditioning_pass: Optional[str] = None
    embed_scale: Optional[float] = None  # embeddings times this (cast to the weight dtype); None = 1 (Gemma: sqrt(d_model))
    final_logit_softcap: Optional[float] = None  # logits = c * tanh(logits / c); None = no softcap
    logits_in_fp32: bool = False  # the LM head's output cast to fp32 before the softcap (Gemma-4)

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
    # Kinds relative to the forward's window [s, e) of the canvas (every query of the window alike):
    #   window_prefix          a < e: every column before the window and the whole window, none after
    #                          (DiffusionGemma's decoder, full layers)
    #   window_sliding_prefix  s - (sliding_window - 1) <= a < e: the sliding_window - 1 columns
    #                          before the window and the whole window (DiffusionGemma's decoder, sliding
    #                          layers: its window is only the encoder cache's truncation, reference Q1)
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
    # Router (core/components/moe.py documents each step and what its hooks hold):
    #   softmax  probs = softmax(logits); + expert_bias after it, used to choose and to weight (OLMoE, LLaDA-MoE)
    #   sigmoid  scores = sigmoid(logits); + expert_bias only to choose, weights from the unbiased
    #            scores (DeepSeek-V3, LLaDA2)
    router_score: RouterScore = "softmax"
    # Group-limited top-k: experts in router_n_groups contiguous groups, each group scored by the sum
    # of its two largest selection scores, only the router_topk_groups best groups eligible. None = off.
    router_n_groups: Optional[int] = None
    router_topk_groups: Optional[int] = None
    router_renormalize: bool = False  # top-k weights / (their sum + 1e-20) when n_experts_per_token > 1
    routed_scaling_factor: float = 1.0  # the routing weights times this
    # True: router logits from fp32 inputs and weights, expert outputs weighted and summed in fp32,
    # then cast (LLaDA2); False: the router in the model dtype, weights cast to it (LLaDA-MoE).
    router_fp32: bool = False

    dtype: torch.dtype = torch.float32
    model_name: str = "custom"
    family: str = "custom"  # the adapter that produced this config; informational only
    extra: dict = field(default_factory=dict)  # adapter-private facts kept for save_pretrained

    # TransformerLens-compatibility constants (read by ActivationCache analysis methods).
    normalization_type: str = field(default="RMS", init=False)
    attn_only: bool = field(default=False, init=False)
    final_rms: bool = field(default=True, init=False)
    positional_embedding_type: str = field(default="rotary", init=False)
    act_fn: str = field(default="silu", init=False)  # the gated MLP's activation, set from mlp_act
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
        for name in ("layer_attention", "layer_head_dims", "layer_kv_heads", "layer_rope", "layer_values_from_keys"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):  # a list from JSON
                setattr(self, name, tuple(value))
        self.layer_scalar_passes = tuple(self.layer_scalar_passes)
        self.pass_layer_attention = {name: tuple(kinds) for name, kinds in self.pass_layer_attention.items()}
        self.act_fn = "silu" if self.mlp_act == "silu" else "gelu_pytorch_tanh"
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
        problems += self._per_layer_problems()
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
        problems += self._router_problems()
        if problems:
            raise ValueError("Invalid DiffusionConfig: " + "; ".join(problems))

    def _attention_layout_problems(self) -> list[str]:
        if isinstance(self.layer_attention, str):
            return [f"layer_attention={self.layer_attention!r} must name one kind per layer, "
                    f"e.g. ({self.layer_attention!r},) * n_layers"]
        problems, kinds = [], set()
        per_pass = {f"pass_layer_attention[{name!r}]": layout for name, layout in self.pass_layer_attention.items()}
        for label, layout in {"layer_attention": self.layer_attention, **per_pass}.items():
            if layout is None:
                continue
            kinds |= set(layout)
            if len(layout) != self.n_layers:
                problems.append(
                    f"{label} has {len(layout)} entries for n_layers={self.n_layers}; "
                    "give one kind per layer (or None for all bidirectional)"
                )
            unknown = sorted(set(layout) - set(AttentionKind.__args__))
            if unknown:
                problems.append(f"{label} kinds {unknown} are not among {AttentionKind.__args__}")
        sliding = {"sliding", "sliding_causal", "window_sliding_prefix"}
        for size_field, users in (("attention_block_size", {"block_causal"}), ("sliding_window", sliding)):
            value = getattr(self, size_field)
            if kinds & users and not (isinstance(value, int) and value > 0):
                problems.append(f"layer_attention has {sorted(kinds & users)} layers, so {size_field} must be a "
                                f"positive number of canvas columns, got {value!r}")
            if value is not None and not kinds & users:
                problems.append(f"{size_field}={value} is set but no layer_attention entry is one of {sorted(users)}, "
                                "which are the only layers it shapes; drop it or name those layers")
        return problems

    def _router_problems(self) -> list[str]:
        problems = []
        if self.router_score not in RouterScore.__args__:
            problems.append(f"router_score={self.router_score!r} is not one of {RouterScore.__args__}")
        groups, kept = self.router_n_groups, self.router_topk_groups
        if (groups is None) != (kept is None):
            problems.append(f"router_n_groups={groups} and router_topk_groups={kept} go together: set both or neither")
        elif groups is not None:
            n_experts, top_k = self.n_experts or 0, self.n_experts_per_token or 0
            if groups <= 0 or n_experts % groups or n_experts // groups < 2:
                problems.append(f"router_n_groups={groups} must split n_experts={n_experts} into equal groups of at "
                                "least 2 experts (a group is scored by its two best experts)")
            elif not 0 < kept <= groups or top_k > kept * (n_experts // groups):
                problems.append(f"router_topk_groups={kept} must be in 1..router_n_groups={groups} and keep at least "
                                f"n_experts_per_token={top_k} experts eligible")
        return problems

    def _per_layer_problems(self) -> list[str]:
        problems = []
        for name in ("layer_head_dims", "layer_kv_heads", "layer_rope", "layer_values_from_keys"):
            value = getattr(self, name)
            if value is not None and len(value) != self.n_layers:
                problems.append(f"{name} has {len(value)} entries for n_layers={self.n_layers}; give one per layer or None")
        for layer, kv in enumerate(self.layer_kv_heads or ()):
            if self.n_heads % kv:
                problems.append(f"layer_kv_heads[{layer}]={kv} must divide n_heads={self.n_heads}")
        for layer, spec in enumerate(self.layer_rope or ()):
            if not isinstance(spec, dict) or spec.get("kind") not in RopeKind.__args__ or "theta" not in spec \
                    or set(spec) - {"kind", "theta", "partial_rotary_factor"}:
                problems.append(f"layer_rope[{layer}]={spec!r} must be a dict with kind in {RopeKind.__args__}, theta "
                                "and (proportional only) partial_rotary_factor")
        if self.mlp_act not in MlpAct.__args__:
            problems.append(f"mlp_act={self.mlp_act!r} is not one of {MlpAct.__args__}")
        if self.block_layout not in BlockLayout.__args__:
            problems.append(f"block_layout={self.block_layout!r} is not one of {BlockLayout.__args__}")
        if self.block_layout == "gemma4" and not (self.n_experts and self.n_experts_per_token and self.d_expert_mlp):
            problems.append("block_layout='gemma4' runs a mixture of experts in every layer, so n_experts, "
                            "n_experts_per_token and d_expert_mlp are required")
        if self.layer_scalar_passes and self.block_layout != "gemma4":
            problems.append("layer_scalar_passes is only read by block_layout='gemma4'")
        named = {"default_pass": self.default_pass, "self_conditioning_pass": self.self_conditioning_pass}
        for label, name in named.items():
            if name is not None and name not in self.layer_scalar_passes:
                problems.append(f"{label}={name!r} is not one of layer_scalar_passes={self.layer_scalar_passes}")
        unknown = sorted(set(self.pass_layer_attention) - set(self.layer_scalar_passes))
        if unknown:
            problems.append(f"pass_layer_attention names passes {unknown} that are not among "
                            f"layer_scalar_passes={self.layer_scalar_passes}")
        if self.layer_scalar_passes and self.default_pass is None:
            problems.append(f"layer_scalar_passes={self.layer_scalar_passes} needs a default_pass naming the pass "
                            "a forward without pass_name= runs")
        return problems

    def resolve_pass(self, pass_name: Optional[str]) -> Optional[str]:
        """The pass a forward runs: `pass_name`, or `default_pass` when None; an unknown name raises.

        Example:
            >>> cfg.resolve_pass(None), cfg.resolve_pass("decoder")   # ('encoder', 'decoder') on DiffusionGemma
        """
        if pass_name is None:
            return self.default_pass
        if pass_name not in self.layer_scalar_passes:
            raise ValueError(f"pass_name={pass_name!r} is not one of this model's passes {self.layer_scalar_passes}"
                             + ("" if self.layer_scalar_passes else " (it has one pass: leave pass_name=None)"))
        return pass_name

    def attention_kinds(self, pass_name: Optional[str]) -> Optional[tuple[AttentionKind, ...]]:
        """Per-layer attention kinds of a resolved pass: `pass_layer_attention[pass]`, else `layer_attention`.

        Example:
            >>> cfg.attention_kinds("decoder")   # ('window_sliding_prefix', 'window_prefix', ...) on DiffusionGemma
        """
        return self.pass_layer_attention.get(pass_name, self.layer_attention) if pass_name else self.layer_attention

    def head_dim(self, layer: int) -> int:
        """Head dim of `layer` (`layer_head_dims`, else `d_head`).

        Example:
            >>> cfg.head_dim(1)   # 32 on diffusion-gemma-tiny's full layer, 16 on its sliding ones
        """
        return self.d_head if self.layer_head_dims is None else self.layer_head_dims[layer]

    def kv_heads(self, layer: int) -> int:
        """KV heads of `layer` (`layer_kv_heads`, else `n_key_value_heads`).

        Example:
            >>> cfg.kv_heads(1)
        """
        return self.n_key_value_heads if self.layer_kv_heads is None else self.layer_kv_heads[layer]

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def n_params(self) -> int:
        """Parameters of the model this config builds: embeddings (a tied LM head once), every norm
        weight and bias, per-layer head geometry, experts; buffers (layer scalars, expert biases) not.

        Why: sizes a checkpoint before loading it; equals `sum(p.numel() for p in model.parameters())`.

        Example:
            >>> model.cfg.n_params == sum(p.numel() for p in model.parameters())
            True
        """
        d = self.d_model

        def gated(width: int) -> int:  # GatedMLP: gate, up, down (+ their biases)
            return 3 * d * width + (2 * width + d if self.mlp_bias else 0)

        total = self.d_vocab_out * d * (1 if self.tie_word_embeddings else 2) + d  # + ln_final
        for layer in range(self.n_layers):
            d_head, n_kv = self.head_dim(layer), self.kv_heads(layer)
            from_keys = bool(self.layer_values_from_keys and self.layer_values_from_keys[layer])
            qkv_heads = self.n_heads + n_kv * (1 if from_keys else 2)  # no v_proj when values come from keys
            total += (qkv_heads * d_head) * (d + self.qkv_bias) + self.n_heads * d_head * d + self.attn_out_bias * d
            total += 2 * d_head * self.qk_norm + 2 * d  # q/k norms; ln1 and ln2 (gemma4: ln_attn_out)
            n_experts = self.n_experts or 0
            router = n_experts * d
            if self.block_layout == "gemma4":  # dense MLP and fused experts (no bias) in parallel, 5 more norms
                experts = n_experts * 3 * d * self.d_expert_mlp
                total += gated(self.d_mlp) + experts + router + d + n_experts + 5 * d  # + scale, per_expert_scale
            elif layer in self.moe_layers:
                shared = gated(self.d_shared_expert_mlp) if self.d_shared_expert_mlp else 0
                total += n_experts * gated(self.d_expert_mlp) + router + shared
            else:
                total += gated(self.d_mlp)
        if self.self_conditioning_pass is not None:  # pre_norm and a gated MLP (post_norm has no weight)
            total += d + gated(self.d_mlp)
        return total

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


__all__ = ["DiffusionConfig", "AttentionKind", "AttentionMaskMode", "BlockLayout", "MlpAct", "PositionIdsMode", "RopeKind",
           "RouterScore"]
