"""The step-0 canvas: the one place a prompt becomes `[prompt | response_length mask tokens]`.

Every sampler starts from it (LLaDA, MMaDA, Dream, `CanvasProbe`), and so does any analysis that
reads the model on the canvas a run starts from, so a change here (e.g. to padding) reaches all
of them at once.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Int
from torch import Tensor


def build_canvas(
    prompt: Int[Tensor, "batch prompt_pos"],
    attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
    response_length: int,
    mask_id: int,
) -> tuple[Int[Tensor, "batch pos"], Optional[Int[Tensor, "batch pos"]]]:
    """`(canvas, attention_mask)` entering step 0: the (left-padded) prompt followed by
    `response_length` mask tokens, and the mask extended with ones over the response columns
    (None when no row is padded: every family treats an all-ones mask as no mask).

    Why: the response starts at the same column `prompt.shape[1]` in every row, which is what
    `DenoisingState.response_start` and the position scopes rely on.

    Example:
        >>> canvas, mask = build_canvas(tokens, None, 16, model.cfg.mask_token_id)
        >>> canvas.shape                # [batch prompt_pos + 16]
        >>> (canvas[:, tokens.shape[1]:] == model.cfg.mask_token_id).all()
        tensor(True)
    """
    if response_length < 0:
        raise ValueError(f"response_length={response_length} must be >= 0.")
    batch = prompt.shape[0]
    canvas = torch.cat([prompt, prompt.new_full((batch, response_length), mask_id)], dim=1)
    if attention_mask is None or bool(attention_mask.bool().all()):
        return canvas, None
    if attention_mask.shape != prompt.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {tuple(prompt.shape)}.")
    return canvas, torch.cat([attention_mask, attention_mask.new_ones(batch, response_length)], dim=1)


__all__ = ["build_canvas"]
