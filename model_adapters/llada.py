"""LLaDA-8B Base / Instruct and LLaDA-1.5 (GSAI-ML): `LLaDAModelLM` checkpoints, "llama" blocks.

Reference: docs/families/llada.md (config keys, checkpoint keys, attention mask, sampler). The
upstream config class fills every missing key with an OLMo-era default (weight tying on, LayerNorm,
no RoPE, dropout 0.1...), so `to_config` starts from those class defaults, never from ours, and
rejects any value whose math we do not implement.
"""

from __future__ import annotations

from diffusion_lens.checkpoints.adapters import KeyRule, ModelAdapter, register_adapter, unsupported
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers import LLaDASampler

# `LLaDAConfig` / `ModelConfig` defaults applied to keys absent from config.json.
CONFIG_CLASS_DEFAULTS = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4,
    "mlp_hidden_size": None, "activation_type": "swiglu", "block_type": "sequential",
    "block_group_size": 1, "alibi": False, "alibi_bias_max": 8.0, "rope": False,
    "rope_full_precision": True, "flash_attention": False, "attention_dropout": 0.1,
    "multi_query_attention": None, "attention_layer_norm": False, "residual_dropout": 0.1,
    "embedding_dropout": 0.1, "input_emb_norm": False, "layer_norm_type": "default",
    "layer_norm_with_affine": True, "rms_norm_eps": 1e-05, "attention_layer_norm_with_affine": True,
    "max_sequence_length": 1024, "rope_theta": 10000.0, "include_qkv_bias": False,
    "include_bias": False, "bias_for_layer_norm": None, "scale_logits": False, "vocab_size": 50257,
    "embedding_size": 50304, "weight_tying": True, "eos_token_id": 50256, "pad_token_id": 50256,
    "mask_token_id": 50256, "init_device": None, "init_fn": "normal", "init_std": 0.02,
    "init_cutoff_factor": None, "precision": None,
}

# The values this library implements, for each key that changes the math. `rope_scaling` is not a
# LLaDA key: a config that sets it comes with a modified modeling file this library does not run.
SUPPORTED_VALUES = {
    "block_type": ("llama",),
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "rope": (True,),
    "alibi": (False,),
    "block_group_size": (1,),
    "include_bias": (False,),
    "bias_for_layer_norm": (False, None),
    "scale_logits": (False,),
    "input_emb_norm": (False,),
    "attention_layer_norm": (False,),
    "rope_scaling": (None,),
}
# Keys whose class default describes another model (d_model 768, 12 layers, ...). Constants such as
# rope_theta follow upstream's class default when absent, as upstream does; the mask id does not,
# because upstream's sampler hard-codes 126336 while ours reads config.json.
REQUIRED_KEYS = ("d_model", "n_layers", "n_heads", ("mlp_hidden_size", "mlp_ratio"), "vocab_size", "mask_token_id")
# Dropout acts only in training; flash_attention picks a kernel for the same math.
INERT_VALUES = {"attention_dropout": (0, 0.0), "residual_dropout": (0, 0.0), "embedding_dropout": (0, 0.0),
                "flash_attention": (False,)}

BLOCK = "model.transformer.blocks.{l}"
EOT_TOKEN = "<|eot_id|>"  # end of turn; the chat template closes every message with it


@register_adapter
class LLaDAAdapter(ModelAdapter):
    name = "llada"
    key_rules = (
        KeyRule("model.transformer.wte.weight", "embed.weight"),
        KeyRule(f"{BLOCK}.attn_norm.weight", "blocks.{l}.ln1.weight"),
        KeyRule(f"{BLOCK}.q_proj.weight", "blocks.{l}.attn.q_proj.weight"),
        KeyRule(f"{BLOCK}.k_proj.weight", "blocks.{l}.attn.k_proj.weight"),
        KeyRule(f"{BLOCK}.v_proj.weight", "blocks.{l}.attn.v_proj.weight"),
        KeyRule(f"{BLOCK}.q_proj.bias", "blocks.{l}.attn.q_proj.bias"),
        KeyRule(f"{BLOCK}.k_proj.bias", "blocks.{l}.attn.k_proj.bias"),
        KeyRule(f"{BLOCK}.v_proj.bias", "blocks.{l}.attn.v_proj.bias"),
        KeyRule(f"{BLOCK}.attn_out.weight", "blocks.{l}.attn.o_proj.weight"),
        KeyRule(f"{BLOCK}.ff_norm.weight", "blocks.{l}.ln2.weight"),
        KeyRule(f"{BLOCK}.ff_proj.weight", "blocks.{l}.mlp.gate_proj.weight"),  # the activated branch
        KeyRule(f"{BLOCK}.up_proj.weight", "blocks.{l}.mlp.up_proj.weight"),
        KeyRule(f"{BLOCK}.ff_out.weight", "blocks.{l}.mlp.down_proj.weight"),
        KeyRule("model.transformer.ln_f.weight", "ln_final.weight"),
        KeyRule("model.transformer.ff_out.weight", "unembed.weight"),  # LM head (not the block ff_out)
    )
    config_defaults = CONFIG_CLASS_DEFAULTS
    required_config_keys = REQUIRED_KEYS
    supported_config_values = SUPPORTED_VALUES
    inert_config_values = INERT_VALUES
    model_types = ("llada",)
    attention_mask_mode = "key_padding"  # current HF file: bidirectional, padded keys masked

    def matches(self, config: dict) -> bool:
        return config.get("model_type") in self.model_types and "num_experts" not in config

    def to_config(self, config: dict) -> DiffusionConfig:
        c = self.read(config)
        n_kv = c["n_kv_heads"]
        mqa = c["multi_query_attention"]
        if n_kv is None:
            n_kv = 1 if mqa else c["n_heads"]
        elif mqa is not None and n_kv != (1 if mqa else c["n_heads"]):
            # upstream's effective_n_kv_heads raises on this contradiction
            raise unsupported(self.name, "multi_query_attention", mqa,
                              f"null, or {bool(not mqa)} with n_kv_heads={n_kv} (true means n_kv_heads 1 or null)")
        return DiffusionConfig(
            d_model=c["d_model"],
            n_layers=c["n_layers"],
            n_heads=c["n_heads"],
            n_key_value_heads=n_kv,
            d_mlp=c["mlp_hidden_size"] or c["mlp_ratio"] * c["d_model"],
            d_vocab=c["vocab_size"],
            d_vocab_out=c["embedding_size"] or c["vocab_size"],
            rope_theta=float(c["rope_theta"]),
            rope_in_fp32=bool(c["rope_full_precision"]),
            norm_eps=c["rms_norm_eps"],
            qkv_bias=bool(c["include_qkv_bias"]),
            clip_qkv=c.get("clip_qkv"),
            tie_word_embeddings=bool(c["weight_tying"]),
            attention_mask_mode=self.attention_mask_mode,
            mask_token_id=c["mask_token_id"],
            eos_token_id=c["eos_token_id"],
            pad_token_id=c["pad_token_id"],
            bos_token_id=c.get("bos_token_id"),
            family=self.name,
            n_ctx=config.get("max_sequence_length"),
            extra={"checkpoint_config": dict(config)},
        )

    def sampler(self, cfg: DiffusionConfig) -> LLaDASampler:
        """Upstream `generate.py` defaults: 128 steps, gen_length 128, one block, temperature 0,
        low-confidence remasking (override per call: `model.generate(..., steps=64)`)."""
        return LLaDASampler()

    def on_loaded(self, model) -> None:
        """`cfg.eot_token_id` <- the tokenizer's `<|eot_id|>` (126348 in LLaDA-8B-Instruct), the
        "EoT" of the sampler's `confidence_eos_eot_inf`; config.json does not record it."""
        tokenizer = model.tokenizer
        if tokenizer is not None and model.cfg.eot_token_id is None:
            model.cfg.eot_token_id = tokenizer.get_vocab().get(EOT_TOKEN)

    def to_checkpoint_config(self, cfg: DiffusionConfig) -> dict:
        original = dict(cfg.extra.get("checkpoint_config", {}))
        written = {
            **CONFIG_CLASS_DEFAULTS,
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "activation_type": "silu", "block_type": "llama", "layer_norm_type": "rms", "rope": True,
            "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
            "bias_for_layer_norm": False, "use_cache": False,
        }
        written.update(original)
        written.update(
            d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads,
            mlp_hidden_size=cfg.d_mlp, vocab_size=cfg.d_vocab, embedding_size=cfg.d_vocab_out,
            rope_theta=cfg.rope_theta, rope_full_precision=cfg.rope_in_fp32, rms_norm_eps=cfg.norm_eps,
            include_qkv_bias=cfg.qkv_bias, weight_tying=cfg.tie_word_embeddings,
            mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        )
        if cfg.n_ctx is not None:
            written["max_sequence_length"] = cfg.n_ctx
        return written
