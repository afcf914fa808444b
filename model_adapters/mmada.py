"""MMaDA-8B (Gen-Verse/MMaDA-8B-Base, MMaDA-8B-MixCoT): the text path of `MMadaModelLM`.

Reference: docs/families/llada.md, section MMaDA. MMaDA subclasses LLaDA's model with the
*original* (Feb-2025) modeling file, so this adapter is the LLaDA adapter with three differences:

- detection: `model_type` "mmada" / `architectures` ["MMadaModelLM"];
- attention mask: a padding mask with any zero makes the whole batch causal
  (`attention_mask_mode="causal_when_padded"`), as that file does. Load a dense LLaDA checkpoint
  with `adapter="mmada"` to get this legacy semantic for LLaDA snapshots older than 2025-10-21;
- the vocabulary is bigger (text ids, then the MAGVIT-v2 image codebook: `new_vocab_size`), which
  needs nothing special: the embedding / LM-head rows come from `vocab_size` / `embedding_size`.
  The multimodal keys (`llm_vocab_size`, `codebook_size`, `num_vq_tokens`, ...) are kept for
  `save_pretrained`.

Chat: `model.to_tokens(..., chat=True)` uses the checkpoint tokenizer's template. MMaDA's MixCoT demo
builds its prompt in code with a single newline after `<|end_header_id|>`; set
`model.tokenizer.chat_template` accordingly to reproduce it exactly.

Sampler: MMaDA's `mmu_generate` (LLaDA's older semi-autoregressive sampler with a float64
confidence softmax, no EOS flags, CFG without an attention mask).
"""

from __future__ import annotations

from diffusion_lens.checkpoints.adapters import register_adapter
from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers import MMaDASampler
from model_adapters.llada import LLaDAAdapter


@register_adapter
class MMaDAAdapter(LLaDAAdapter):
    """`MMadaModelLM` checkpoints: LLaDA keys and config, legacy causal-when-padded attention."""

    name = "mmada"
    model_types = ("mmada",)
    attention_mask_mode = "causal_when_padded"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") in self.model_types or "MMadaModelLM" in (config.get("architectures") or [])

    def sampler(self, cfg: DiffusionConfig) -> MMaDASampler:
        """`mmu_generate` with upstream defaults (128 steps, 128 new tokens = `gen_length`, one block,
        temperature 0, float64 confidence); override per call: `model.generate(..., temperature=1.0)`."""
        return MMaDASampler()

    def to_checkpoint_config(self, cfg: DiffusionConfig) -> dict:
        written = super().to_checkpoint_config(cfg)
        original = cfg.extra.get("checkpoint_config", {})
        written["model_type"] = original.get("model_type", "mmada")
        written["architectures"] = original.get("architectures", ["MMadaModelLM"])
        return written
