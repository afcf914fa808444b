"""Teacher-forced replays: the forwards of a recorded run, on its canvases, with other hooks or another prompt.

`generate(..., record=True)` keeps every step's `DenoisingState` (`out.states`);
`generate(prompt, replay=out)` re-runs those forwards on the recorded canvases (with `prompt`
written into the prompt columns), so a steered and an unsteered replay see exactly the same
inputs at every step and differ only by their hooks. The replay is a `Sampler`, so the driver
publishes each step's state as usual and scheduled hooks (`H.at`) behave as in the original run.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers.base import Forward, Sampler
from diffusion_lens.denoising.state import DenoisingState


@dataclasses.dataclass(frozen=True)
class ReplaySampler(Sampler):
    """A sampler that replays recorded states and canvases instead of choosing tokens.

    Why: teacher forcing through the ordinary driver (hooks, caches, `capture_logits`, `stop_after`
    all work); built by `generate(..., replay=recorded)` with `ReplaySampler.of`.

    Example:
        >>> sampler = ReplaySampler.of(recorded.states, recorded.sequences)
        >>> model.generate(prompt, sampler=sampler, capture_logits=[0]).logits[0].shape
    """

    states: tuple = ()
    afters: tuple = ()

    @classmethod
    def of(cls, states: Sequence[DenoisingState], final: Int[Tensor, "batch pos"]) -> "ReplaySampler":
        """The replay of `states` (the canvas after step s is the canvas entering step s + 1, and
        `final` after the last one).

        Example:
            >>> ReplaySampler.of(out.states, out.sequences).n_steps() == len(out.states)
            True
        """
        if not states:
            raise ValueError("There is nothing to replay: the recording has no states (record it with record=True).")
        states = tuple(states)
        return cls(states=states, afters=tuple(s.canvas for s in states[1:]) + (final,))

    def n_steps(self) -> int:
        return len(self.states)

    def n_blocks(self) -> int:
        return self.states[0].n_blocks

    def response_length(self) -> int:
        first = self.states[0]
        return first.n_pos - first.response_start

    def n_copies(self) -> int:
        return self.states[0].n_copies

    def run(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        for state, after in zip(self.states, self.afters):
            forward(state)
            yield state, after


def with_prompt(states: Sequence[DenoisingState], prompt: Int[Tensor, "batch prompt_pos"]) -> list[DenoisingState]:
    """Copies of `states` with the prompt columns of every canvas replaced by `prompt`.

    The response trajectory stays the recorded one (teacher forcing); `prompt` must have the
    recorded prompt's shape. Under classifier-free guidance the unconditional rows (prompt fully
    masked) are kept as recorded. `generate(prompt, replay=recorded)` calls it for you.

    Example:
        >>> corrupt_states = with_prompt(clean.states, corrupt_tokens)
    """
    width = states[0].response_start
    if tuple(prompt.shape) != (states[0].batch, width):
        raise ValueError(f"prompt must have shape {(states[0].batch, width)} (the recorded prompt's); got {tuple(prompt.shape)}.")
    prompt = prompt.to(states[0].canvas.device)
    out = []
    for state in states:
        canvas = write_prompt(state.canvas, prompt)
        model_input = state.model_input
        if model_input is not None:
            model_input = torch.cat([canvas, model_input[state.batch :]]) if state.n_copies > 1 else canvas
            model_input = model_input[:, state.computed]  # a KV-cached forward computes its window only
        out.append(dataclasses.replace(state, canvas=canvas, previous_canvas=write_prompt(state.previous_canvas, prompt),
                                       model_input=model_input, _is_masked=None))
    return out


def write_prompt(canvas: Optional[Tensor], prompt: Int[Tensor, "batch prompt_pos"]) -> Optional[Tensor]:
    """A copy of `canvas` [batch pos] with its first prompt columns set to `prompt` (None stays None).

    Example:
        >>> write_prompt(out.sequences, corrupt_tokens)[:, : corrupt_tokens.shape[1]].equal(corrupt_tokens)
        True
    """
    if canvas is None:
        return None
    canvas = canvas.clone()
    canvas[:, : prompt.shape[1]] = prompt
    return canvas


__all__ = ["ReplaySampler", "with_prompt", "write_prompt"]
