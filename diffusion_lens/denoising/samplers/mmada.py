"""MMaDA's text sampler (`MMadaModelLM.mmu_generate`, and `generate.py::generate` in Gen-Verse/MMaDA).

Reference: docs/families/llada.md, section MMaDA. It is LLaDA's older semi-autoregressive sampler,
so this is `LLaDASampler` with MMaDA's differences as fixed options:

  * the low-confidence softmax runs in float64 (`confidence_dtype=torch.float64`);
  * no EOS / EoT flags (upstream has none; setting them here is an extension);
  * classifier-free guidance runs without an attention mask, which is what `LLaDASampler` does
    once padded batches are refused (the driver drops all-ones masks).

Padded batches are refused: upstream builds a prompt-sized pairwise mask and crashes on them, and
MMaDA's model (the Feb-2025 LLaDA file) would make the whole batch causal anyway.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers.base import Forward
from diffusion_lens.denoising.samplers.llada import LLaDASampler
from diffusion_lens.denoising.state import DenoisingState


@dataclasses.dataclass(frozen=True)
class MMaDASampler(LLaDASampler):
    """`mmu_generate` (MMaDA-8B Base / MixCoT text generation), token for token.

    Why: MMaDA's confidence is a float64 softmax, which orders near-ties differently from LLaDA's
    model-dtype softmax in bf16. Options and defaults are upstream's (`max_new_tokens` is called
    `gen_length` here, as for every LLaDA-family sampler): 128 steps, 128 new tokens, one block of
    128, temperature 0, cfg_scale 0, low-confidence remasking. The MixCoT demo uses temperature 1.

    Example:
        >>> out = model.generate("Explain diffusion LMs", gen_length=128, steps=128, block_length=128,
        ...                      temperature=1.0)
        >>> out = model.generate(tokens, sampler=MMaDASampler(gen_length=16, steps=8, block_length=8, cfg_scale=1.5))
    """

    confidence_dtype: Optional[torch.dtype] = torch.float64

    def run(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        if attention_mask is not None and bool((attention_mask == 0).any()):
            raise ValueError(
                "MMaDA's mmu_generate cannot run a left-padded batch (upstream crashes, and MMaDA's model "
                "turns the whole batch causal when any row is padded). Generate prompts of different "
                "lengths one at a time, or pass equal-length prompts."
            )
        yield from super().run(cfg, prompt, None, forward, generator)


__all__ = ["MMaDASampler"]
