"""Deprecated module: its names moved for one release (each access warns with the new home).

Prompt preparation lives in `diffusion_lens.prompts` (`prepare_prompts`, `PreparedPrompts`,
`instruction_template`, `left_pad`, `batch_indices`, ...), `collect_activations` in
`diffusion_lens.steering.collect`, position selectors in `diffusion_lens.steering.positions`; the
step-0 canvas is built by `generate` (`CanvasProbe`), so `CanvasBatch` / `step0_canvases` are gone.

Example:
    >>> from diffusion_lens.prompts import prepare_prompts          # not steering.activations
"""

from __future__ import annotations

import warnings

from diffusion_lens import prompts as _prompts
from diffusion_lens.steering import collect as _collect
from diffusion_lens.steering import positions as _positions

_MOVED = {
    **{name: ("diffusion_lens.prompts", _prompts) for name in (
        "InstructionTemplate", "PreparedPrompts", "PromptsInput", "batch_indices", "check_batch_size",
        "in_prompt_order", "instruction_template", "left_pad", "prepare_prompts")},
    "collect_activations": ("diffusion_lens.steering.collect", _collect),
    **{name: ("diffusion_lens.steering.positions", _positions) for name in ("POOLED", "TEMPLATE", "PositionSpec")},
}
_GONE = {
    "CanvasBatch": "generate(model, tokens, sampler=CanvasProbe(gen_length=...), stop_after=0) builds the step-0 canvas",
    "step0_canvases": "generate(model, tokens, sampler=CanvasProbe(gen_length=...), stop_after=0) builds the step-0 canvas",
    "first_response_logits": "diffusion_lens.evals.scores.first_response_logits(model, prepared) runs the forwards too",
}


def __getattr__(name: str):
    if name in _MOVED:
        where, module = _MOVED[name]
        warnings.warn(f"diffusion_lens.steering.activations.{name} moved to {where}.{name}; the old import works "
                      "until the next release.", DeprecationWarning, stacklevel=2)
        return getattr(module, name)
    if name in _GONE:
        raise AttributeError(f"diffusion_lens.steering.activations.{name} was removed: {_GONE[name]}.")
    raise AttributeError(f"module 'diffusion_lens.steering.activations' has no attribute {name!r}.")
