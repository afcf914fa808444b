"""Deprecated: recording and replaying a run are options of `generate` now.

`record_run(model, tokens, **kw)` -> `model.generate(tokens, record=True, **kw)` (`out.states`,
`out.logits` with `capture_logits=`); `replay(model, run, hooks=h, steps=s)` ->
`model.generate(prompt, replay=recorded, hooks=h, capture_logits=s, stop_after=max(s))`;
`CanvasProbe`, `with_prompt` and `split_generate_kwargs` live in `diffusion_lens.denoising`. These wrappers stay for one
release and warn (DeprecationWarning).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.denoising.generate import GenerationOutput, generate
from diffusion_lens.denoising.samplers.probe import CanvasProbe as _CanvasProbe
from diffusion_lens.denoising.state import DenoisingState


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}.", DeprecationWarning,
                  stacklevel=3)


@dataclass
class RecordedRun:
    """Deprecated (`record_run`'s result): `model.generate(..., record=True)` returns the states itself.

    Example:
        >>> run = record_run(model, tokens, steps=8, gen_length=16, block_length=8)   # DeprecationWarning
        >>> run.states[3].is_masked.sum(), run.output.trajectory[3]
    """

    output: GenerationOutput
    states: list[DenoisingState]
    prompt: Int[Tensor, "batch prompt_pos"]
    attention_mask: Optional[Int[Tensor, "batch prompt_pos"]]
    logits: dict = field(default_factory=dict)  # {step: per-token logits [batch pos vocab]} when captured

    @property
    def n_steps(self) -> int:
        return len(self.states)


def record_run(
    model,
    prompt: Int[Tensor, "batch prompt_pos"],
    attention_mask: Optional[Int[Tensor, "batch prompt_pos"]] = None,
    *,
    capture_logits: Sequence[int] = (),
    **generate_kwargs,
) -> RecordedRun:
    """Deprecated: use `model.generate(prompt, record=True, capture_logits=...)`.

    Example:
        >>> out = model.generate(tokens, record=True, steps=8, gen_length=16, block_length=8)
        >>> len(out.states), out.trajectory.shape
    """
    _deprecated("record_run", "model.generate(..., record=True)")
    out = generate(model, prompt, attention_mask=attention_mask, record=True, capture_logits=list(capture_logits),
                   **{"progress": False, "return_trajectory": True, **generate_kwargs})
    logits = {s: model.token_logits(t) for s, t in out.logits.items()}
    return RecordedRun(out, out.states, prompt, attention_mask, logits)


def replay(
    model,
    run: RecordedRun,
    *,
    hooks: Sequence = (),
    steps: Optional[Sequence[int]] = None,
    states: Optional[Sequence[DenoisingState]] = None,
    cache: Optional[dict] = None,
) -> Union[dict[int, Float[Tensor, "batch pos vocab"]], tuple[dict, Any]]:
    """Deprecated: use `model.generate(prompt, replay=recorded, hooks=..., capture_logits=steps)`
    (per-token logits: `model.token_logits(out.logits[s])`).

    Example:
        >>> steered = model.generate(tokens, replay=recorded, hooks=ablate(model, r), capture_logits=[0, 3],
        ...                          stop_after=3)
        >>> steered.logits[3].shape            # [batch pos vocab]
    """
    _deprecated("replay", "model.generate(prompt, replay=recorded, capture_logits=steps)")
    recorded = run.output if states is None else dataclasses.replace(run.output, states=list(states))
    n = len(recorded.states)
    wanted = list(range(n)) if steps is None else sorted({int(s) for s in steps})
    bad = [s for s in wanted if not 0 <= s < n]
    if bad:
        raise ValueError(f"Steps {bad} are outside the recorded run's 0..{n - 1}.")
    first = recorded.states[0]
    prompt = first.canvas[:, : first.response_start]
    mask = None if first.attention_mask is None else first.attention_mask[:, : first.response_start]
    out = generate(model, prompt, attention_mask=mask, hooks=hooks, replay=recorded, cache=cache, progress=False,
                   return_trajectory=False, stop_after=max(wanted), capture_logits=wanted)
    logits = {s: model.token_logits(t) for s, t in out.logits.items()}
    return (logits, out.cache) if cache is not None else logits


@dataclasses.dataclass(frozen=True)
class CanvasProbe(_CanvasProbe):
    """Deprecated alias of `diffusion_lens.denoising.CanvasProbe`.

    Example:
        >>> from diffusion_lens.denoising import CanvasProbe
        >>> model.generate(tokens, sampler=CanvasProbe(gen_length=32), progress=False)
    """

    def __post_init__(self):
        _deprecated("diffusion_lens.steering.CanvasProbe", "diffusion_lens.denoising.CanvasProbe")
        super().__post_init__()


__all__ = ["CanvasProbe", "RecordedRun", "record_run", "replay"]
