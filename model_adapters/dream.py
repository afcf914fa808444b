"""Dream-v0 (Dream-org/Dream-v0-Instruct-7B, Dream-v0-Base-7B) and DiffuCoder (apple/DiffuCoder-7B-*).

Reference: docs/families/dream.md. A Qwen2.5 decoder with causal masking switched off:

- Qwen2 blocks: q/k/v biases (o_proj, MLP and LM head without), GQA, RMSNorm, half-split RoPE whose
  cos/sin tables are cast to the model dtype before rotating (`rope_in_fp32=False`).
- Padding follows upstream's sampler: a 4D mask hiding pad queries *and* keys (pad rows output
  zero, `attention_mask_mode="query_key_padding"`) and RoPE positions renumbered per row
  (`position_ids_mode="renumber_padded"`). Both are applied by the core forward from a plain
  [batch pos] mask, so `model(tokens, attention_mask)` matches upstream's padded call.
- Logits are shifted by one position (`logit_shift=1`): residual position j-1 predicts token j.
  `model.token_logits(logits)` is the one place that applies it.

`config.json` is always read in full: `DreamConfig`'s class defaults (vocab 151936, 32 layers...)
differ from every published checkpoint, so they only fill keys that are absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion_lens.checkpoints.adapters import ModelAdapter, register_adapter, unsupported
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers.dream import DreamSampler
from model_adapters.hf_layout import hf_decoder_rules, hf_dense_mlp_rules

# `DreamConfig.__init__` defaults, used only for keys missing from config.json.
CONFIG_CLASS_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
    "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "use_cache": False, "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
    "attention_dropout": 0.0, "mask_token_id": 151666, "pad_token_id": 151643,
}

# Keys written by `save_pretrained` when a config did not come from a checkpoint.
_ARCHITECTURE = {
    "architectures": ["DreamModel"],
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "model_type": "Dream",
}


@register_adapter
class DreamAdapter(ModelAdapter):
    """`DreamModel` checkpoints (model_type "Dream"): Qwen2 keys, shifted logits, `diffusion_generate`."""

    name = "dream"
    key_rules = hf_decoder_rules(qkv_bias=True) + hf_dense_mlp_rules()
    config_defaults = CONFIG_CLASS_DEFAULTS
    # DreamConfig's size defaults (hidden 4096, 32 layers...) match no published checkpoint; absent
    # constants (rope_theta, rms_norm_eps) take its defaults, as upstream does.
    required_config_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "vocab_size")
    supported_config_values = {
        "hidden_act": ("silu",),
        "use_sliding_window": (False,),  # sliding_window / max_window_layers act only when this is true
        "rope_scaling": (None, {"rope_type": "default"}, {"type": "default"}),
    }
    inert_config_values = {"attention_dropout": (0, 0.0), "use_mrope": (False,)}  # use_mrope: unused upstream

    def matches(self, config: dict) -> bool:
        return str(config.get("model_type", "")).lower() == "dream" or "DreamModel" in (
            config.get("architectures") or []
        )

    def load_tokenizer(self, folder):
        """Dream ships a remote-code `DreamTokenizer` (a copy of Qwen2's byte-level BPE) and no
        tokenizer.json; we build the built-in `Qwen2TokenizerFast` from the same vocab.json,
        merges.txt and tokenizer_config.json (added tokens, chat template, special tokens) instead
        of running that code. Checkpoints with a standard tokenizer class load through AutoTokenizer.

        Example:
            >>> tok = get_adapter("dream").load_tokenizer(Path("Dream-v0-Instruct-7B"))
            >>> tok.mask_token_id
            151666
        """
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        tokenizer_class = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.is_file() else None
        if tokenizer_class != "DreamTokenizer":
            return super().load_tokenizer(folder)
        from transformers import Qwen2TokenizerFast

        return Qwen2TokenizerFast.from_pretrained(str(folder))

    def read(self, config: dict) -> dict:
        """`ModelAdapter.read`, plus Qwen2's rule num_key_value_heads None -> num_attention_heads."""
        c = super().read(config)
        if c["num_key_value_heads"] is None:
            c["num_key_value_heads"] = c["num_attention_heads"]
        return c

    def to_config(self, config: dict) -> DiffusionConfig:
        c = self.read(config)
        if c["hidden_size"] % c["num_attention_heads"]:
            raise unsupported(self.name, "hidden_size / num_attention_heads",
                              (c["hidden_size"], c["num_attention_heads"]), "hidden_size divisible by heads")
        d_head = c["hidden_size"] // c["num_attention_heads"]
        if c.get("head_dim") not in (None, d_head):
            # Upstream ignores head_dim and always uses hidden_size // heads; a different value
            # means a checkpoint this code was not written for.
            raise unsupported(self.name, "head_dim", c["head_dim"], (d_head,))
        return DiffusionConfig(
            d_model=c["hidden_size"],
            n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"],
            n_key_value_heads=c["num_key_value_heads"],
            d_mlp=c["intermediate_size"],
            d_vocab=c["vocab_size"],
            rope_theta=float(c["rope_theta"]),
            rope_in_fp32=False,
            position_ids_mode="renumber_padded",
            norm_eps=c["rms_norm_eps"],
            qkv_bias=True,
            tie_word_embeddings=bool(c["tie_word_embeddings"]),
            attention_mask_mode="query_key_padding",
            logit_shift=1,
            mask_token_id=c["mask_token_id"],
            eos_token_id=c.get("eos_token_id"),
            pad_token_id=c["pad_token_id"],
            bos_token_id=c.get("bos_token_id"),
            family=self.name,
            n_ctx=config.get("max_position_embeddings"),
            extra={"checkpoint_config": dict(config)},
        )

    def sampler(self, cfg: DiffusionConfig) -> DreamSampler:
        """`diffusion_generate` with the documented upstream defaults (512 steps, temperature 0,
        alg "origin"; `DreamSampler` lists them and the transformers-4.46 effective defaults);
        override per call: `model.generate(..., max_new_tokens=64, steps=64, alg="entropy")`."""
        return DreamSampler()

    def to_checkpoint_config(self, cfg: DiffusionConfig) -> dict:
        written = {**CONFIG_CLASS_DEFAULTS, **_ARCHITECTURE, **cfg.extra.get("checkpoint_config", {})}
        written.update(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_key_value_heads, intermediate_size=cfg.d_mlp, vocab_size=cfg.d_vocab,
            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
            mask_token_id=cfg.mask_token_id, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id,
            bos_token_id=cfg.bos_token_id, torch_dtype=str(cfg.dtype).removeprefix("torch."),
        )
        if cfg.n_ctx is not None:
            written["max_position_embeddings"] = cfg.n_ctx
        return written
