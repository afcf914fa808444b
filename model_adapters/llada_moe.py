"""LLaDA-MoE-7B-A1B Base / Instruct (inclusionAI): `LLaDAMoEModelLM` checkpoints, OLMoE-style blocks.

Reference: docs/families/llada_moe.md (config keys, checkpoint keys, routing, sampler).

- Detection: its config.json says `model_type: "llada"` like the dense LLaDA, so this adapter
  claims a config by `architectures` (`LLaDAMoEModelLM`) or by the presence of `num_experts`
  (the dense adapter declines any config with `num_experts`). dllm's renamed `"lladamoe"`
  model_type is accepted too.
- Attention: per-head RMSNorm on q and k before RoPE (`qk_layernorm` -> `cfg.qk_norm`), partial
  rotary (`partial_rotary_factor` -> `cfg.rotary_dim`), cos/sin cast to the model dtype as HF does
  (`rope_in_fp32=False`), and the attention mask is ignored upstream
  (`attention_mask_mode="ignored"`).
- MLP: `moe_layer_freq[l]` picks a mixture of experts (1) or a dense SwiGLU (0) per layer; router
  softmax in fp32, expert bias added after the softmax, top-k without renormalisation, optional
  shared expert (`diffusion_lens.core.components.moe`). `norm_topk_prob`, `moe_router_score_function`
  and `routed_scaling_factor` are read but, as upstream, have no effect.
- The config has no mask id. The published tokenizer's `<|mdm_mask|>` is 156895, which we use when
  the vocab has that row; for other vocabularies set `model.cfg.mask_token_id` (or pass `mask_id=`
  to the sampler).
- Sampler: LLaDA's (the model card ships LLaDA's `generate`; recommended steps 128, gen 128,
  block 32).
"""

from __future__ import annotations

from diffusion_lens.checkpoints.adapters import KeyRule, ModelAdapter, register_adapter, unsupported
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers import LLaDASampler
from model_adapters.hf_layout import LAYER, hf_decoder_rules, hf_dense_mlp_rules

# MoE `LLaDAConfig.__init__` defaults, used only for keys missing from config.json. The -1 sizes
# mean "must be given": a checkpoint without them is rejected below.
CONFIG_CLASS_DEFAULTS = {
    "vocab_size": -1, "hidden_size": -1, "dense_intermediate_size": -1, "expert_intermediate_size": -1,
    "shared_expert_intermediate_size": -1, "num_hidden_layers": -1, "num_attention_heads": -1,
    "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 4096,
    "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": False, "pad_token_id": 1,
    "bos_token_id": None, "eos_token_id": 50279, "tie_word_embeddings": False, "rope_theta": -1,
    "partial_rotary_factor": -1, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
    "clip_qkv": None, "num_experts_per_tok": -1, "num_experts": -1, "output_router_logits": False,
    "router_aux_loss_coef": 0.01, "norm_topk_prob": None, "qk_layernorm": None, "moe_layer_freq": [],
    "moe_router_enable_expert_bias": None, "moe_router_score_function": None, "routed_scaling_factor": 1,
    "router_num_group": -2, "router_topk_group": -2,
}
# Sizes the config class defaults to -1 ("must be given"): required, and positive.
POSITIVE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                 "num_experts_per_tok", "expert_intermediate_size", "rope_theta", "partial_rotary_factor")
PUBLISHED_MASK_TOKEN_ID = 156895  # `<|mdm_mask|>` in the LLaDA-MoE / LLaDA2 tokenizer

_ARCHITECTURE = {
    "architectures": ["LLaDAMoEModelLM"],
    "auto_map": {
        "AutoConfig": "configuration_lladamoe.LLaDAConfig",
        "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
        "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
    },
    "model_type": "llada",
}

_EXPERT = f"{LAYER}.mlp.experts.{{e}}"


@register_adapter
class LLaDAMoEAdapter(ModelAdapter):
    """`LLaDAMoEModelLM` checkpoints: OLMoE keys, q/k norm, MoE MLPs, mask ignored, LLaDA sampler."""

    name = "llada_moe"
    key_rules = (
        hf_decoder_rules(qkv_bias=True, o_bias=True, qk_norm=True)
        + hf_dense_mlp_rules()  # layers with moe_layer_freq[l] == 0
        + (
            KeyRule(f"{LAYER}.mlp.gate.weight", "blocks.{l}.mlp.router.weight"),
            KeyRule(f"{LAYER}.mlp.expert_bias", "blocks.{l}.mlp.expert_bias"),
        )
        + tuple(
            KeyRule(f"{_EXPERT}.{proj}.weight", f"blocks.{{l}}.mlp.experts.{{e}}.{proj}.weight")
            for proj in ("gate_proj", "up_proj", "down_proj")
        )
        + tuple(
            KeyRule(f"{LAYER}.shared_expert.{proj}.weight", f"blocks.{{l}}.mlp.shared_expert.{proj}.weight")
            for proj in ("gate_proj", "up_proj", "down_proj")
        )
    )

    config_defaults = CONFIG_CLASS_DEFAULTS
    required_config_keys = POSITIVE_KEYS + ("moe_layer_freq",)
    supported_config_values = {
        "hidden_act": ("silu",),
        "rope_scaling": (None, {"rope_type": "default"}, {"type": "default"}),
    }
    # Read by the config class, unused by upstream's forward (softmax top-k, no renormalisation, no scaling).
    inert_config_values = {
        "norm_topk_prob": (None, False), "moe_router_score_function": (None, "softmax"),
        "routed_scaling_factor": (1, None), "router_num_group": (None, -2), "router_topk_group": (None, -2),
        "attention_dropout": (0, 0.0),
    }

    def matches(self, config: dict) -> bool:
        return (
            "LLaDAMoEModelLM" in (config.get("architectures") or [])
            or config.get("model_type") == "lladamoe"
            or (config.get("model_type") == "llada" and "num_experts" in config)
        )

    def read(self, config: dict) -> dict:
        """`ModelAdapter.read`, plus num_key_value_heads None -> num_attention_heads."""
        c = super().read(config)
        if c["num_key_value_heads"] is None:
            c["num_key_value_heads"] = c["num_attention_heads"]
        return c

    def to_config(self, config: dict) -> DiffusionConfig:
        c = self.read(config)
        sizes = [key for key in POSITIVE_KEYS if c[key] is None or c[key] <= 0]
        if sizes:
            raise ValueError(f"llada_moe config.json needs a positive value for {sizes}; got "
                             f"{ {key: c[key] for key in sizes} }. Is this a complete LLaDA-MoE config.json?")
        n_layers = c["num_hidden_layers"]
        freq = c["moe_layer_freq"]
        if not isinstance(freq, list) or len(freq) != n_layers or any(f not in (0, 1) for f in freq):
            raise unsupported(self.name, "moe_layer_freq", freq, f"a list of {n_layers} entries, each 0 or 1")
        moe_layers = tuple(layer for layer, f in enumerate(freq) if f == 1)
        if len(moe_layers) < n_layers and (c["dense_intermediate_size"] or -1) <= 0:
            raise ValueError("llada_moe config.json has dense layers (moe_layer_freq 0) but no dense_intermediate_size.")
        d_head = c["hidden_size"] // c["num_attention_heads"]
        rotary_dim = int(d_head * c["partial_rotary_factor"])
        shared = c["shared_expert_intermediate_size"]
        mask_id = c.get("mask_token_id")
        if mask_id is None and c["vocab_size"] > PUBLISHED_MASK_TOKEN_ID:
            mask_id = PUBLISHED_MASK_TOKEN_ID
        return DiffusionConfig(
            d_model=c["hidden_size"],
            n_layers=n_layers,
            n_heads=c["num_attention_heads"],
            n_key_value_heads=c["num_key_value_heads"],
            d_mlp=c["dense_intermediate_size"] if c["dense_intermediate_size"] > 0 else c["expert_intermediate_size"],
            d_vocab=c["vocab_size"],
            rope_theta=float(c["rope_theta"]),
            rotary_dim=rotary_dim,
            rope_in_fp32=False,
            norm_eps=c["rms_norm_eps"],
            qkv_bias=bool(c["attention_bias"]),
            attn_out_bias=bool(c["attention_bias"]),
            qk_norm=bool(c["qk_layernorm"]),
            clip_qkv=c["clip_qkv"],
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
            attention_mask_mode="ignored",
            mask_token_id=mask_id,
            eos_token_id=c["eos_token_id"],
            pad_token_id=c["pad_token_id"],
            bos_token_id=c["bos_token_id"],
            n_experts=c["num_experts"],
            n_experts_per_token=c["num_experts_per_tok"],
            d_expert_mlp=c["expert_intermediate_size"],
            d_shared_expert_mlp=shared if shared and shared > 0 else None,
            moe_layers=moe_layers,
            router_expert_bias=bool(c["moe_router_enable_expert_bias"]),
            family=self.name,
            n_ctx=config.get("max_position_embeddings"),
            extra={"checkpoint_config": dict(config)},
        )

    def sampler(self, cfg: DiffusionConfig) -> LLaDASampler:
        """LLaDA's `generate` (the model card ships it): upstream defaults 128 steps, gen_length 128,
        one block, temperature 0; the card's demo uses block_length 32. Without a mask id in
        config.json, pass `mask_id=...` or set `model.cfg.mask_token_id` for non-published vocabularies."""
        return LLaDASampler()

    def to_checkpoint_config(self, cfg: DiffusionConfig) -> dict:
        written = {**CONFIG_CLASS_DEFAULTS, **_ARCHITECTURE, **cfg.extra.get("checkpoint_config", {})}
        written.update(
            vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_key_value_heads,
            rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.rotary_dim / cfg.d_head,
            rms_norm_eps=cfg.norm_eps, attention_bias=cfg.qkv_bias, qk_layernorm=cfg.qk_norm,
            clip_qkv=cfg.clip_qkv, tie_word_embeddings=cfg.tie_word_embeddings,
            num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_token,
            expert_intermediate_size=cfg.d_expert_mlp, shared_expert_intermediate_size=cfg.d_shared_expert_mlp,
            moe_layer_freq=[int(layer in cfg.moe_layers) for layer in range(cfg.n_layers)],
            moe_router_enable_expert_bias=cfg.router_expert_bias,
            eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        )
        if cfg.n_ctx is not None:
            written["max_position_embeddings"] = cfg.n_ctx
        if cfg.d_mlp and any(layer not in cfg.moe_layers for layer in range(cfg.n_layers)):
            written["dense_intermediate_size"] = cfg.d_mlp
        if cfg.mask_token_id is not None and "mask_token_id" in written:
            written["mask_token_id"] = cfg.mask_token_id
        return written
