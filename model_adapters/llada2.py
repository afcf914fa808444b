"""LLaDA2.0 / LLaDA2.1 mini and flash (inclusionAI): `LLaDA2MoeModelLM` checkpoints, model_type `llada2_moe`.

Reference: shared/reference/llada2.md (config keys §2, checkpoint keys §3, forward §4, masks §5,
MoE §6); the family page is docs/families/llada2.md.

- Attention: one fused `query_key_value` projection, rows [q heads; k heads; v heads], split into
  q/k/v_proj on load and stacked again by `save_pretrained` (`FusedKeyRule`); per-head q/k RMSNorm
  before RoPE unless config.json says `use_qk_norm: false` (the published files have no such key and
  upstream's class default is True); partial rotary (`partial_rotary_factor` -> `cfg.rotary_dim`),
  cos/sin cast to the model dtype; `head_dim` read, not derived; optional biases on the fused
  projection (`use_qkv_bias`) and on the output `dense` (`use_bias`).
- Masks: a plain forward is bidirectional and a padding mask masks pad keys (`key_padding`),
  positions 0..pos-1 whatever the padding. Block-causal attention (bidirectional inside a block,
  causal across blocks, blocks counted from canvas column 0) comes from the sampler's block length:
  `model(tokens, attention_block_size=block_length)`. Upstream's eager path turns a 2-D padding
  mask or no mask into causal attention; that accident is not reproduced (tests pin the difference).
- MLP: layers below `first_k_dense_replace` are dense SwiGLU; the others a mixture of experts with a
  sigmoid router in fp32, `expert_bias` used only to choose, group-limited top-k (`n_group`,
  `topk_group`), weights renormalised (k > 1) and times `routed_scaling_factor`, plus an ungated
  shared expert of width moe_intermediate_size * num_shared_experts.
- Ids: config.json carries neither a mask nor an EOS id. The published tokenizer's mask is 156895
  and its EOS (= pad) 156892, used when the vocab has those rows; otherwise set
  `model.cfg.mask_token_id` / `eos_token_id` or pass `mask_id=` / `eos_id=` to the sampler.
"""

from __future__ import annotations

from diffusion_lens.checkpoints.adapters import FusedKeyRule, KeyRule, ModelAdapter, register_adapter, unsupported
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers import LLaDA2Sampler
from model_adapters.hf_layout import LAYER, hf_dense_mlp_rules

# `LLaDA2MoeConfig.__init__` defaults (reference §2), used only for keys missing from config.json.
CONFIG_CLASS_DEFAULTS = {
    "vocab_size": 30592, "hidden_size": 1024, "intermediate_size": None, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 0, "hidden_act": "silu", "use_qkv_bias": False,
    "use_bias": True, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "embedding_dropout": 0.1,
    "attention_dropout": 0.1, "output_dropout": 0.1, "initializer_range": 0.006, "max_position_embeddings": 16384,
    "rope_theta": 10000.0, "use_cache": True, "max_window_layers": 28, "rope_scaling": None,
    "pad_token_id": 126081, "num_experts": 16, "num_shared_experts": 0, "num_experts_per_tok": 2, "n_group": 8,
    "topk_group": 4, "routed_scaling_factor": 2.5, "moe_intermediate_size": None, "first_k_dense_replace": 0,
    "head_dim": None, "output_router_logits": False, "use_qk_norm": True, "partial_rotary_factor": 0.5,
}
# Sizes whose class default (or a 0 that crashes upstream) would describe some other model.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "moe_intermediate_size")
PUBLISHED_MASK_TOKEN_ID = 156895  # the diffusion mask token of the LLaDA2 tokenizer (upstream's mask_id default)
PUBLISHED_EOS_TOKEN_ID = 156892  # EOS and pad of the LLaDA2 tokenizer (upstream's eos_id default)

_ARCHITECTURE = {
    "architectures": ["LLaDA2MoeModelLM"],
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "model_type": "llada2_moe",
}

_ATTN = f"{LAYER}.attention"


def _qkv_rule(kind: str) -> FusedKeyRule:
    return FusedKeyRule(f"{_ATTN}.query_key_value.{kind}",
                        tuple(f"blocks.{{l}}.attn.{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj")))


@register_adapter
class LLaDA2Adapter(ModelAdapter):
    """`LLaDA2MoeModelLM` checkpoints: fused QKV, per-head q/k norm, partial RoPE, sigmoid-routed MoE."""

    name = "llada2"
    key_rules = (
        KeyRule("model.word_embeddings.weight", "embed.weight"),
        KeyRule(f"{LAYER}.input_layernorm.weight", "blocks.{l}.ln1.weight"),
        KeyRule(f"{LAYER}.post_attention_layernorm.weight", "blocks.{l}.ln2.weight"),
        KeyRule(f"{_ATTN}.query_layernorm.weight", "blocks.{l}.attn.q_norm.weight"),
        KeyRule(f"{_ATTN}.key_layernorm.weight", "blocks.{l}.attn.k_norm.weight"),
        KeyRule(f"{_ATTN}.dense.weight", "blocks.{l}.attn.o_proj.weight"),
        KeyRule(f"{_ATTN}.dense.bias", "blocks.{l}.attn.o_proj.bias"),
        KeyRule("model.norm.weight", "ln_final.weight"),
        KeyRule("lm_head.weight", "unembed.weight"),
        KeyRule(f"{LAYER}.mlp.gate.weight", "blocks.{l}.mlp.router.weight"),
        KeyRule(f"{LAYER}.mlp.gate.expert_bias", "blocks.{l}.mlp.expert_bias"),
    ) + hf_dense_mlp_rules() + tuple(  # dense layers (below first_k_dense_replace)
        KeyRule(f"{LAYER}.mlp.experts.{{e}}.{proj}.weight", f"blocks.{{l}}.mlp.experts.{{e}}.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj")
    ) + tuple(
        KeyRule(f"{LAYER}.mlp.shared_experts.{proj}.weight", f"blocks.{{l}}.mlp.shared_expert.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj")
    )
    fused_key_rules = (_qkv_rule("weight"), _qkv_rule("bias"))

    config_defaults = CONFIG_CLASS_DEFAULTS
    required_config_keys = REQUIRED_KEYS
    supported_config_values = {
        "hidden_act": ("silu",),
        "rope_scaling": (None, {"rope_type": "default"}, {"type": "default"}),
    }
    # Read by the config class, ignored by upstream's forward (reference §2): it always routes with a
    # sigmoid plus expert bias in fp32, always renormalises, never slides the attention window.
    inert_config_values = {
        "moe_router_enable_expert_bias": (True,), "score_function": ("sigmoid",), "router_dtype": ("fp32",),
        "norm_topk_prob": (True,), "norm_softmax": (False,), "use_rmsnorm": (True,), "norm_head": (False,),
        "use_sliding_window": (False,), "using_split_qkv_in_self_attention": (False,),
    }

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == "llada2_moe" or "LLaDA2MoeModelLM" in (config.get("architectures") or [])

    def to_config(self, config: dict) -> DiffusionConfig:
        c = self.read(config)
        sizes = [key for key in REQUIRED_KEYS if not (isinstance(c[key], int) and c[key] > 0)]
        if sizes:
            raise ValueError(f"llada2 config.json needs a positive value for {sizes}; got "
                             f"{ {key: c[key] for key in sizes} }. Is this a complete LLaDA2 config.json?")
        n_layers, n_experts = c["num_hidden_layers"], c["num_experts"]
        moe_layers = () if n_experts is None else tuple(range(c["first_k_dense_replace"], n_layers))
        if len(moe_layers) < n_layers and not c["intermediate_size"]:
            raise ValueError("llada2 config.json has dense layers (first_k_dense_replace > 0 or num_experts null) "
                             "but no intermediate_size.")
        shared = c["num_shared_experts"]
        if shared == 0:  # upstream builds a zero-width shared MLP ([0, hidden] weights) that adds nothing
            raise unsupported(self.name, "num_shared_experts", 0, "null (no shared expert) or a positive count")
        d_head = c["head_dim"] or c["hidden_size"] // c["num_attention_heads"]
        vocab = c["vocab_size"]
        return DiffusionConfig(
            d_model=c["hidden_size"],
            n_layers=n_layers,
            n_heads=c["num_attention_heads"],
            n_key_value_heads=c["num_key_value_heads"],
            d_head=d_head,
            d_mlp=c["intermediate_size"] or c["moe_intermediate_size"],
            d_vocab=vocab,
            rope_theta=float(c["rope_theta"]),
            rotary_dim=int(d_head * c["partial_rotary_factor"]),
            rope_in_fp32=False,
            norm_eps=c["rms_norm_eps"],
            qkv_bias=bool(c["use_qkv_bias"]),
            attn_out_bias=bool(c["use_bias"]),
            qk_norm=bool(c["use_qk_norm"]),
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
            attention_mask_mode="key_padding",
            mask_token_id=c.get("mask_token_id", PUBLISHED_MASK_TOKEN_ID if vocab > PUBLISHED_MASK_TOKEN_ID else None),
            eos_token_id=c.get("eos_token_id", PUBLISHED_EOS_TOKEN_ID if vocab > PUBLISHED_EOS_TOKEN_ID else None),
            pad_token_id=c["pad_token_id"],
            bos_token_id=c.get("bos_token_id"),
            n_experts=n_experts if moe_layers else None,
            n_experts_per_token=c["num_experts_per_tok"] if moe_layers else None,
            d_expert_mlp=c["moe_intermediate_size"] if moe_layers else None,
            d_shared_expert_mlp=c["moe_intermediate_size"] * shared if moe_layers and shared else None,
            moe_layers=moe_layers,
            router_expert_bias=bool(moe_layers),
            router_score="sigmoid",
            router_n_groups=c["n_group"] if moe_layers else None,
            router_topk_groups=c["topk_group"] if moe_layers else None,
            router_renormalize=True,
            routed_scaling_factor=float(c["routed_scaling_factor"]),
            router_fp32=True,
            family=self.name,
            n_ctx=c["max_position_embeddings"],
            extra={"checkpoint_config": dict(config)},
        )

    def sampler(self, cfg: DiffusionConfig) -> LLaDA2Sampler:
        """LLaDA2.0's threshold decoding with the model card's settings (block_length 32, steps 32, threshold
        0.95, gen_length 512, eos_early_stop); config.json does not say 2.0 or 2.1, so LLaDA2.1 checkpoints
        take `algorithm="llada2.1"` (token editing) as a generate option.

        Example:
            >>> model.adapter.sampler(model.cfg)
            LLaDA2Sampler(algorithm='llada2.0', gen_length=512, block_length=32, steps=32, ...)
        """
        return LLaDA2Sampler()

    def to_checkpoint_config(self, cfg: DiffusionConfig) -> dict:
        """config.json for `cfg`: the loaded file with every value `cfg` determines written back (a value
        equal to the file's, e.g. 600000 for 600000.0, keeps the file's spelling), `dtype` the weights'."""
        original = cfg.extra.get("checkpoint_config")
        written = dict(original) if original else {**CONFIG_CLASS_DEFAULTS, **_ARCHITECTURE}
        first_moe = cfg.moe_layers[0] if cfg.moe_layers else cfg.n_layers
        if cfg.moe_layers != tuple(range(first_moe, cfg.n_layers)):
            raise ValueError(f"LLaDA2 checkpoints have MoE layers first_k_dense_replace..n_layers-1; this model's "
                             f"moe_layers={cfg.moe_layers} cannot be written as a LLaDA2 config.json.")
        values = dict(
            vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_key_value_heads,
            partial_rotary_factor=cfg.rotary_dim / cfg.d_head, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
            use_qkv_bias=cfg.qkv_bias, use_bias=cfg.attn_out_bias, use_qk_norm=cfg.qk_norm,
            tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=cfg.pad_token_id,
            routed_scaling_factor=cfg.routed_scaling_factor,
            head_dim=None if cfg.d_head == cfg.d_model // cfg.n_heads and written.get("head_dim") is None else cfg.d_head,
            dtype=str(cfg.dtype).removeprefix("torch."),
        )
        if cfg.moe_layers:
            values.update(first_k_dense_replace=first_moe, num_experts=cfg.n_experts,
                          num_experts_per_tok=cfg.n_experts_per_token, moe_intermediate_size=cfg.d_expert_mlp,
                          n_group=cfg.router_n_groups, topk_group=cfg.router_topk_groups,
                          num_shared_experts=cfg.d_shared_expert_mlp // cfg.d_expert_mlp if cfg.d_shared_expert_mlp else None)
        else:
            values.update(num_experts=None)
        if first_moe > 0:
            values.update(intermediate_size=cfg.d_mlp)
        if cfg.n_ctx is not None:
            values.update(max_position_embeddings=cfg.n_ctx)
        for key in ("mask_token_id", "eos_token_id"):
            if key in written:
                values[key] = getattr(cfg, key)
        effective = {**CONFIG_CLASS_DEFAULTS, **written}
        for key, value in values.items():
            if effective.get(key) != value:
                written[key] = value
        return written
