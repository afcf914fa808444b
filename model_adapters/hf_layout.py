"""Key rules for the Hugging Face Llama / Qwen2 / OLMoE checkpoint layout.

Dream (Qwen2 blocks) and LLaDA-MoE (OLMoE blocks) store their embeddings, attention, norms and LM
head under the same names (`model.layers.{l}.self_attn.q_proj.weight`, ...); only the MLP part
differs. Adapters build their `key_rules` from these helpers so the shared part is written once.
"""

from __future__ import annotations

from diffusion_lens.checkpoints.adapters import KeyRule

LAYER = "model.layers.{l}"


def hf_decoder_rules(*, qkv_bias: bool, o_bias: bool = False, qk_norm: bool = False) -> tuple[KeyRule, ...]:
    """Embedding, per-layer norms and attention, final norm and LM head in the HF layout.

    Why: both directions of the key mapping (loading, `save_pretrained`) come from one table, so
    they cannot drift apart. A rule for a weight the configured model lacks (e.g. a bias) is
    harmless: the loader still reports such a checkpoint key as unexpected.

    Example:
        >>> rules = hf_decoder_rules(qkv_bias=True)  # Dream / Qwen2
        >>> rules[0].convert("model.embed_tokens.weight", to_internal=True)
        'embed.weight'
    """
    rules = [
        KeyRule("model.embed_tokens.weight", "embed.weight"),
        KeyRule(f"{LAYER}.input_layernorm.weight", "blocks.{l}.ln1.weight"),
        KeyRule(f"{LAYER}.post_attention_layernorm.weight", "blocks.{l}.ln2.weight"),
        KeyRule("model.norm.weight", "ln_final.weight"),
        KeyRule("lm_head.weight", "unembed.weight"),
    ]
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules.append(KeyRule(f"{LAYER}.self_attn.{proj}.weight", f"blocks.{{l}}.attn.{proj}.weight"))
        if (qkv_bias and proj != "o_proj") or (o_bias and proj == "o_proj"):
            rules.append(KeyRule(f"{LAYER}.self_attn.{proj}.bias", f"blocks.{{l}}.attn.{proj}.bias"))
    if qk_norm:
        for norm in ("q_norm", "k_norm"):
            rules.append(KeyRule(f"{LAYER}.self_attn.{norm}.weight", f"blocks.{{l}}.attn.{norm}.weight"))
    return tuple(rules)


def hf_dense_mlp_rules(checkpoint_prefix: str = f"{LAYER}.mlp") -> tuple[KeyRule, ...]:
    """SwiGLU MLP `gate_proj` / `up_proj` / `down_proj` under `checkpoint_prefix` -> `blocks.{l}.mlp`.

    Why: dense layers share these names across Qwen2 / Llama / OLMoE checkpoints, while MoE
    layers add their own rules next to them.

    Example:
        >>> hf_dense_mlp_rules()[2].convert("blocks.3.mlp.down_proj.weight", to_internal=False)
        'model.layers.3.mlp.down_proj.weight'
    """
    return tuple(
        KeyRule(f"{checkpoint_prefix}.{proj}.weight", f"blocks.{{l}}.mlp.{proj}.weight")
        for proj in ("gate_proj", "up_proj", "down_proj")
    )
