"""`CanvasProbe`: one forward on the step-0 canvas, for analyses that need no family's algorithm."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.canvas import build_canvas
from diffusion_lens.denoising.samplers.base import Forward, Sampler
from diffusion_lens.denoising.state import DenoisingState


@dataclasses.dataclass(frozen=True)
class CanvasProbe(Sampler):
    """A one-step "sampler": the canvas every sampler starts from (prompt + `gen_length` masks),
    one forward, no token choice.

    Why: step-0 analyses (class means, probes) run through `generate`, so `hook.state`, scheduled
    hooks and streaming reducers work, without naming a family's sampler or its options
    (`gen_length=0` reads the prompt alone). A model without a mask token (DiffusionGemma, whose
    canvas is noise) has no such canvas: only `gen_length=0` works there; its steering readers run
    the family's sampler instead (`collect_activations(..., pass_name=)`).

    Example:
        >>> r = StreamingMean("blocks.*.hook_resid_pre", positions="response")
        >>> model.generate(tokens, sampler=CanvasProbe(gen_length=32), reducers=[r], progress=False)
    """

    gen_length: int = 128
    mask_id: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.gen_length, bool) or not isinstance(self.gen_length, int) or self.gen_length < 0:
            raise ValueError(f"CanvasProbe(gen_length={self.gen_length!r}): pass an int >= 0.")

    def n_steps(self) -> int:
        return 1

    def response_length(self) -> int:
        return self.gen_length

    def run(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        mask_id = cfg.mask_token_id if self.mask_id is None else self.mask_id
        if mask_id is None and self.gen_length:
            raise ValueError(
                f"CanvasProbe(gen_length={self.gen_length}) reads the prompt followed by mask tokens, and this model has "
                "no mask token (its canvas is noise, e.g. DiffusionGemma). Read the prompt alone with gen_length=0, or "
                "a forward of the model's own sampler (collect_activations / mean_difference with pass_name=)."
            )
        # without a mask token there are no response columns to fill (gen_length 0), nor undecided positions
        canvas, full_mask = build_canvas(prompt, attention_mask, self.gen_length, -1 if mask_id is None else mask_id)
        undecided = torch.zeros_like(canvas, dtype=torch.bool) if mask_id is None else None
        state = DenoisingState(
            step=0, n_steps=1, block=0, n_blocks=1, step_in_block=0, steps_in_block=1, canvas=canvas,
            response_start=prompt.shape[1], mask_id=mask_id, attention_mask=full_mask, model_input=canvas,
            model_attention_mask=full_mask, _is_masked=undecided,
        )
        forward(state)
        yield state, canvas


__all__ = ["CanvasProbe"]
