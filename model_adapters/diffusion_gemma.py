"""DiffusionGemma (google/diffusiongemma-26B-A4B-it): `DiffusionGemmaForBlockDiffusion` checkpoints, text path.

Reference: ../shared/reference/diffusion_gemma.md (config, keys, forward math); goldens in
tests/fixtures/diffusion-gemma-tiny*/ (README-diffusion-gemma.md).

Every architectural fact is a `DiffusionConfig` field: per-layer head dims / KV heads
(`layer_head_dims`, `layer_kv_heads`), per-layer RoPE (`layer_rope`: default on sliding layers,
proportional partial RoPE on full ones), attention scale 1.0, values from the raw keys on full
layers (`layer_values_from_keys`) through a weightless `v_norm`, q/k norms without `1 + w`, norms
that multiply their weight in fp32 (`norm_weight_in_fp32`), gelu-tanh MLPs, the Gemma-4 block
(`block_layout="gemma4"`: sandwich norms, dense MLP and MoE in parallel, per-layer scalars),
`embed_scale` sqrt(d_model) and `final_logit_softcap` (30.0 when config.json omits it).

One set of text weights runs in two passes (`cfg.layer_scalar_passes`), picked per forward with
`model(..., pass_name=)`; a plain forward runs the encoder (`cfg.default_pass`):

- `"encoder"`: the encoder's `layer_scalar`s and causal attention (`causal` on full layers,
  `sliding_causal` with `sliding_window` on sliding ones). Over a `KVCache` whose canvas is the
  prompt and every block (P + n_blocks * C columns), it encodes the prompt (window [0, P)) and then
  each committed block k (window [P + kC, P + (k+1)C)) at the positions it had as a canvas.
- `"decoder"`: the decoder's `layer_scalar`s, the self-conditioning MLP at its input
  (`self_conditioning_logits=`, `cfg.self_conditioning_pass`), and the window-relative kinds
  (`cfg.pass_layer_attention["decoder"]`): full layers see every column before the window's end,
  sliding layers the `W - 1` columns before the window plus the whole window (reference §5.3, Q1).
  The decoder writes its canvas's keys / values into the cache at the window's columns; that is
  harmless, since no other pass reads them before the next decoder step or the block's encoder
  append overwrites them, and later columns stay invisible to both passes.

Padding: pass the prompt's mask padded with ones to the cache's width (reference Q15).

Config layouts: the hub file (`global_head_dim`, default 512, and `num_global_key_value_heads` for
full layers) and the `save_pretrained` one (`per_layer_config`, keys layer indices or layer types)
are both read; `to_checkpoint_config` writes the loaded config.json back, its `dtype` the weights'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from diffusion_lens.checkpoints.adapters import KeyRule, ModelAdapter, register_adapter, unsupported
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers import EntropyBoundSampler

# `DiffusionGemmaTextConfig` class defaults (reference §2.2) for the keys that do not describe sizes.
TEXT_CONFIG_DEFAULTS = {
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "attention_bias": False,
    "attention_dropout": 0.0, "sliding_window": 512, "layer_types": None, "rope_parameters": None,
    "final_logit_softcapping": 30.0, "use_bidirectional_attention": None, "pad_token_id": 0,
    "eos_token_id": 1, "bos_token_id": 2, "max_position_embeddings": 131072, "global_head_dim": 512,
    "num_global_key_value_heads": None,
}
DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
}
REQUIRED_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "num_experts", "top_k_experts", "moe_intermediate_size")
SUPPORTED_TEXT_VALUES = {
    "hidden_activation": ("gelu_pytorch_tanh",),
    "attention_bias": (False,),
    "use_bidirectional_attention": (None, "vision"),  # "all" (bidirectional encoder) is not implemented
}
# Encoder attention per layer type (reference §5.2): causal, and causal within the window.
ENCODER_ATTENTION = {"sliding_attention": "sliding_causal", "full_attention": "causal"}
# Decoder attention per layer type (reference §5.3): the cached context before the (canvas) window,
# truncated to W - 1 columns on sliding layers, and the whole window; nothing after it.
DECODER_ATTENTION = {"sliding_attention": "window_sliding_prefix", "full_attention": "window_prefix"}
# generation_config.json keys that are `EntropyBoundSampler` options (`sampler_config` holds the entropy bound)
GENERATION_OPTIONS = ("max_new_tokens", "max_length", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                      "confidence_threshold", "eos_token_id", "pad_token_id")

_TEXT = "model.decoder"
_LAYER = f"{_TEXT}.layers.{{l}}"


def _layer_rules() -> tuple[KeyRule, ...]:
    names = {
        "input_layernorm.weight": "ln1.weight",
        "self_attn.q_proj.weight": "attn.q_proj.weight", "self_attn.k_proj.weight": "attn.k_proj.weight",
        "self_attn.v_proj.weight": "attn.v_proj.weight", "self_attn.o_proj.weight": "attn.o_proj.weight",
        "self_attn.q_norm.weight": "attn.q_norm.weight", "self_attn.k_norm.weight": "attn.k_norm.weight",
        "post_attention_layernorm.weight": "ln_attn_out.weight",
        "pre_feedforward_layernorm.weight": "mlp.ln_dense_in.weight",
        "mlp.gate_proj.weight": "mlp.dense.gate_proj.weight", "mlp.up_proj.weight": "mlp.dense.up_proj.weight",
        "mlp.down_proj.weight": "mlp.dense.down_proj.weight",
        "post_feedforward_layernorm_1.weight": "mlp.ln_dense_out.weight",
        "router.proj.weight": "mlp.router.proj.weight", "router.scale": "mlp.router.scale",
        "router.per_expert_scale": "mlp.router.per_expert_scale",
        "pre_feedforward_layernorm_2.weight": "mlp.ln_moe_in.weight",
        "experts.gate_up_proj": "mlp.experts.gate_up_proj", "experts.down_proj": "mlp.experts.down_proj",
        "post_feedforward_layernorm_2.weight": "mlp.ln_moe_out.weight",
        "post_feedforward_layernorm.weight": "mlp.ln_out.weight",
        "layer_scalar": "decoder_layer_scalar",
    }
    return tuple(KeyRule(f"{_LAYER}.{key}", f"blocks.{{l}}.{internal}") for key, internal in names.items())


@register_adapter
class DiffusionGemmaAdapter(ModelAdapter):
    """`DiffusionGemmaForBlockDiffusion` checkpoints (text path: encoder and decoder passes, see the module docstring)."""

    name = "diffusion_gemma"
    key_rules = (
        KeyRule(f"{_TEXT}.embed_tokens.weight", "embed.weight"),
        KeyRule(f"{_TEXT}.norm.weight", "ln_final.weight"),
        KeyRule("lm_head.weight", "unembed.weight"),  # tied: never in the file
        KeyRule("model.encoder.language_model.layers.{l}.layer_scalar", "blocks.{l}.encoder_layer_scalar"),
        KeyRule(f"{_TEXT}.self_conditioning.pre_norm.weight", "self_conditioning.pre_norm.weight"),
        KeyRule(f"{_TEXT}.self_conditioning.gate_proj.weight", "self_conditioning.mlp.gate_proj.weight"),
        KeyRule(f"{_TEXT}.self_conditioning.up_proj.weight", "self_conditioning.mlp.up_proj.weight"),
        KeyRule(f"{_TEXT}.self_conditioning.down_proj.weight", "self_conditioning.mlp.down_proj.weight"),
    ) + _layer_rules()
    carried_checkpoint_keys = (r"model\.encoder\.vision_tower\..*", r"model\.encoder\.embed_vision\..*")

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == "diffusion_gemma"

    def read(self, config: dict) -> dict:
        """The text config (`config["text_config"]`) checked and completed with the class defaults;
        `tie_word_embeddings` and `canvas_length` come from the top level."""
        if not isinstance(config.get("text_config"), dict):
            raise ValueError("diffusion_gemma config.json has no text_config object; is it a complete "
                             "DiffusionGemmaConfig (save_pretrained or hub) file?")
        text = config["text_config"]
        absent = [key for key in REQUIRED_TEXT_KEYS if text.get(key) is None]
        if absent:
            raise ValueError(f"diffusion_gemma config.json's text_config lacks {absent}; upstream's config class "
                             "would fill them with defaults that do not describe these weights.")
        c = {**TEXT_CONFIG_DEFAULTS, **text}
        for key, allowed in SUPPORTED_TEXT_VALUES.items():
            if c.get(key) not in allowed:
                raise unsupported(self.name, f"text_config.{key}", c.get(key), allowed)
        if config.get("tie_word_embeddings", True) is not True:
            raise unsupported(self.name, "tie_word_embeddings", config["tie_word_embeddings"], (True,))
        return c

    def to_config(self, config: dict) -> DiffusionConfig:
        c = self.read(config)
        n_layers = c["num_hidden_layers"]
        types = list(c["layer_types"] or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                          for i in range(n_layers)])
        if len(types) != n_layers or set(types) - set(ENCODER_ATTENTION):
            raise unsupported(self.name, "text_config.layer_types", types,
                              f"{n_layers} entries among {sorted(ENCODER_ATTENTION)}")
        types[-1] = "full_attention"  # upstream forces the last layer to full attention
        head_dims, kv_heads = self._per_layer(c, types)
        rope = {**DEFAULT_ROPE, **(c["rope_parameters"] or {})}
        sliding = "sliding_attention" in types
        return DiffusionConfig(
            d_model=c["hidden_size"], n_layers=n_layers, n_heads=c["num_attention_heads"], d_mlp=c["intermediate_size"],
            d_vocab=c["vocab_size"], n_key_value_heads=c["num_key_value_heads"], d_head=c["head_dim"],
            layer_head_dims=tuple(head_dims), layer_kv_heads=tuple(kv_heads),
            n_ctx=c["max_position_embeddings"], layer_rope=tuple(self._rope(rope, kind) for kind in types),
            rope_in_fp32=False, norm_eps=c["rms_norm_eps"], qk_norm=True, tie_word_embeddings=True,
            norm_weight_in_fp32=True, attn_scale=1.0, layer_values_from_keys=tuple(t == "full_attention" for t in types),
            v_norm=True, mlp_act="gelu_tanh", block_layout="gemma4", layer_scalar_passes=("encoder", "decoder"),
            default_pass="encoder", self_conditioning_pass="decoder", embed_scale=math.sqrt(c["hidden_size"]),
            final_logit_softcap=c["final_logit_softcapping"],
            logits_in_fp32=True,  # §4.6: fp32(y @ E^T), then the softcap
            layer_attention=tuple(ENCODER_ATTENTION[t] for t in types),
            pass_layer_attention={"encoder": tuple(ENCODER_ATTENTION[t] for t in types),
                                  "decoder": tuple(DECODER_ATTENTION[t] for t in types)},
            sliding_window=c["sliding_window"] if sliding else None,
            eos_token_id=c["eos_token_id"], pad_token_id=c["pad_token_id"], bos_token_id=c["bos_token_id"],
            n_experts=c["num_experts"], n_experts_per_token=c["top_k_experts"], d_expert_mlp=c["moe_intermediate_size"],
            family=self.name, extra={"checkpoint_config": dict(config), "canvas_length": config.get("canvas_length", 256)},
        )

    @staticmethod
    def _per_layer(c: dict, types: list[str]) -> tuple[list[int], list[int]]:
        """Head dim and KV heads per layer: `per_layer_config` (save_pretrained) when present, else
        `global_head_dim` / `num_global_key_value_heads` on full layers (hub file)."""
        head_dims, kv_heads = [c["head_dim"]] * len(types), [c["num_key_value_heads"]] * len(types)
        if "per_layer_config" in c:
            for key, override in c["per_layer_config"].items():
                layers = [i for i, t in enumerate(types) if t == key] if key in ENCODER_ATTENTION else [int(key)]
                for i in layers:
                    head_dims[i] = override.get("head_dim", head_dims[i])
                    kv_heads[i] = override.get("num_key_value_heads", kv_heads[i])
        else:
            for i, kind in enumerate(types):
                if kind == "full_attention":
                    head_dims[i] = c["global_head_dim"]
                    kv_heads[i] = c["num_global_key_value_heads"] or kv_heads[i]
        return head_dims, kv_heads

    def _rope(self, rope: dict, layer_type: str) -> dict:
        params = rope[layer_type]
        if params.get("factor", 1.0) != 1.0 or params.get("rope_type") not in ("default", "proportional"):
            raise unsupported(self.name, f"text_config.rope_parameters.{layer_type}", params,
                              "rope_type default / proportional without a factor")
        spec = {"kind": params["rope_type"], "theta": float(params["rope_theta"])}
        if params["rope_type"] == "proportional":
            spec["partial_rotary_factor"] = float(params.get("partial_rotary_factor", 1.0))
        return spec

    def to_checkpoint_config(self, cfg: DiffusionConfig) -> dict:
        """The loaded config.json with its `dtype` the weights' (a bf16 model saves bf16 tensors, and
        transformers loads them as config.json's `dtype` says); nothing here edits the architecture.

        Example:
            >>> model.to(torch.bfloat16).adapter.to_checkpoint_config(model.cfg)["dtype"]   # 'bfloat16'
        """
        return {**cfg.extra["checkpoint_config"], "dtype": str(cfg.dtype).removeprefix("torch.")}

    def on_loaded(self, model) -> None:
        """Keep `generation_config.json` (the only source of EOS and pad, reference Q8) for `sampler`."""
        path = Path(model.checkpoint_folder) / "generation_config.json"
        if path.is_file():
            model.cfg.extra["generation_config"] = json.loads(path.read_text())

    def sampler(self, cfg: DiffusionConfig) -> EntropyBoundSampler:
        """The entropy-bound block sampler with `generation_config.json`'s values over upstream's
        defaults (reference §6.1); without that file no EOS stopping and no padding (Q8).

        Example:
            >>> model.adapter.sampler(model.cfg).max_denoising_steps   # 12 for the tiny fixture
        """
        given = dict(cfg.extra.get("generation_config", {}))
        bound = given.pop("sampler_config", {}) or {}
        options = {name: given[name] for name in GENERATION_OPTIONS if given.get(name) is not None}
        if "entropy_bound" in bound:
            options["entropy_bound"] = bound["entropy_bound"]
        if isinstance(options.get("eos_token_id"), int):
            options["eos_token_id"] = [options["eos_token_id"]]
        return EntropyBoundSampler(canvas_length=cfg.extra["canvas_length"], **options)
