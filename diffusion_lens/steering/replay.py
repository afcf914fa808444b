"""Teacher-forced replays of a denoising run.

A replay re-runs the forwards of a recorded run on the *recorded* canvases, so a steered and an
unsteered replay see exactly the same inputs at every step and differ only by their hooks. It is
a `Sampler` (the denoising contract), so the generate driver publishes each step's
`DenoisingState` to the hook points as usual and step / block / position scheduled hooks
(`diffusion_lens.denoising.hooks.at`) behave as in the original run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.denoising.generate import GenerationOutput, denoise
from diffusion_lens.denoising.samplers.base import Sampler
from diffusion_lens.denoising.state import DenoisingState


@dataclass
class RecordedRun:
    """A generation with the `DenoisingState` of every step (`states[s]` is the state entering step s)
    and the canvas after every step (`output.trajectory[s]`).

    Example:
        >>> run = record_run(model, tokens, steps=8, gen_length=16, block_length=8)
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
    hooks: Sequence = (),
    stop_after: Optional[int] = None,
    capture_logits: Sequence[int] = (),
    **generate_kwargs,
) -> RecordedRun:
    """Generate from token ids and keep every step's `DenoisingState` (for replays), plus the
    per-token logits (conditional rows, logit shift applied) of the steps in `capture_logits`.

    Example:
        >>> run = record_run(model, tokens, steps=8, gen_length=16, block_length=8)
        >>> len(run.states), run.output.trajectory.shape
    """
    states: list[DenoisingState] = []

    def keep_state(act, hook):
        state = hook.state
        if state is not None and (not states or states[-1].step != state.step):
            states.append(state)

    generate_kwargs.setdefault("progress", False)
    out, raw = denoise(model, prompt, attention_mask=attention_mask, hooks=[hooks, ("hook_embed", keep_state)],
                       return_trajectory=True, stop_after=stop_after, capture_logits=list(capture_logits),
                       **generate_kwargs)
    return RecordedRun(out, states, prompt, attention_mask, {s: model.token_logits(t) for s, t in raw.items()})


DRIVER_ARGS = frozenset({"hooks", "seed", "generator", "chat", "progress", "max_cache_bytes", "cache", "reducers"})


def split_generate_kwargs(model, generate_kwargs: Optional[dict]) -> tuple[Sampler, dict]:
    """(the sampler with its options applied, the remaining generate-driver arguments) from one
    `generate`-style keyword dict; `sampler=` inside it picks the sampler.

    Example:
        >>> sampler, driver = split_generate_kwargs(model, dict(steps=8, gen_length=16, seed=0))
        >>> sampler.n_steps(), driver
        (8, {'seed': 0})
    """
    from diffusion_lens.denoising.generate import resolve_sampler

    options = dict(generate_kwargs or {})
    driver = {k: options.pop(k) for k in list(options) if k in DRIVER_ARGS}
    sampler = resolve_sampler(model, options.pop("sampler", None), options)
    return sampler, driver


@dataclasses.dataclass(frozen=True)
class ReplaySampler(Sampler):
    """A sampler that replays recorded states and canvases instead of choosing tokens.

    `logits` collects the per-token logits (conditional rows, logit shift applied) of the steps in
    `capture` (all steps when None). Usually built by `replay`.

    Example:
        >>> sampler = ReplaySampler(states=tuple(run.states), afters=tuple(run.output.trajectory))
        >>> model.generate(run.prompt, sampler=sampler, hooks=hooks, progress=False)
        >>> sampler.logits[0].shape
    """

    states: tuple = ()
    afters: tuple = ()
    capture: Optional[frozenset] = None
    logits: dict = field(default_factory=dict, compare=False)

    def n_steps(self) -> int:
        return len(self.states)

    def n_blocks(self) -> int:
        return self.states[0].n_blocks

    def response_length(self) -> int:
        first = self.states[0]
        return first.n_pos - first.response_start

    def n_copies(self) -> int:
        return self.states[0].n_copies

    def run(self, model, prompt, attention_mask, forward, generator=None) -> Iterator[tuple[DenoisingState, Tensor]]:
        for state, after in zip(self.states, self.afters):
            logits = forward(state)
            if self.capture is None or state.step in self.capture:
                self.logits[state.step] = logits[: state.batch].detach()
            yield state, after


def replay(
    model,
    run: RecordedRun,
    *,
    hooks: Sequence = (),
    steps: Optional[Sequence[int]] = None,
    states: Optional[Sequence[DenoisingState]] = None,
    cache: Optional[dict] = None,
) -> Union[dict[int, Float[Tensor, "batch pos vocab"]], tuple[dict, Any]]:
    """Re-run the forwards of `run` (teacher-forced on its canvases) with `hooks`; returns
    {step: per-token logits [batch pos vocab]} for `steps` (all when None). Stops after the last
    wanted step. `states` replaces the recorded states (e.g. with another prompt written in).
    With `cache` (a `generate` cache request, e.g. dict(names=[...], steps=[...])) the result is
    `(logits, StepCache)`.

    Example:
        >>> run = record_run(model, tokens, steps=8, gen_length=16, block_length=8)
        >>> steered = replay(model, run, hooks=ablate(model, r), steps=[0, 3])
        >>> steered[3].shape            # [batch pos vocab]
    """
    states = list(run.states if states is None else states)
    wanted = None if steps is None else frozenset(int(s) for s in steps)
    if wanted is not None:
        unknown = sorted(s for s in wanted if not 0 <= s < len(states))
        if unknown:
            raise ValueError(f"Steps {unknown} are outside the recorded run's 0..{len(states) - 1}.")
    afters = tuple(run.output.trajectory[i] for i in range(len(states)))
    sampler = ReplaySampler(states=tuple(states), afters=afters, capture=wanted)
    last = len(states) - 1 if wanted is None else max(wanted)
    first = states[0]
    prompt = first.canvas[:, : first.response_start]
    mask = None if first.attention_mask is None else first.attention_mask[:, : first.response_start]
    out, _ = denoise(model, prompt, attention_mask=mask, hooks=hooks, sampler=sampler, return_trajectory=False,
                     progress=False, stop_after=last, cache=cache)
    logits = dict(sampler.logits)
    return (logits, out.cache) if cache is not None else logits


def with_prompt(states: Sequence[DenoisingState], prompt: Int[Tensor, "batch prompt_pos"]) -> list[DenoisingState]:
    """Copies of `states` with the prompt columns of every canvas replaced by `prompt`.

    The response trajectory stays the recorded one (teacher forcing); `prompt` must have the
    recorded prompt's shape. Under classifier-free guidance the unconditional rows (prompt fully
    masked) are kept as recorded.

    Example:
        >>> corrupt_states = with_prompt(clean_run.states, corrupt_tokens)
        >>> logits = replay(model, clean_run, states=corrupt_states)
    """
    out = []
    width = states[0].response_start
    if tuple(prompt.shape) != (states[0].batch, width):
        raise ValueError(f"prompt must have shape {(states[0].batch, width)} (the recorded prompt's); got {tuple(prompt.shape)}.")
    prompt = prompt.to(states[0].canvas.device)

    def put(canvas: Optional[Tensor]) -> Optional[Tensor]:
        if canvas is None:
            return None
        canvas = canvas.clone()
        canvas[:, :width] = prompt
        return canvas

    for state in states:
        canvas = put(state.canvas)
        model_input = state.model_input
        if model_input is not None:
            model_input = torch.cat([canvas, model_input[state.batch :]]) if state.n_copies > 1 else canvas
        out.append(dataclasses.replace(state, canvas=canvas, previous_canvas=put(state.previous_canvas),
                                       model_input=model_input, _is_masked=None))
    return out


__all__ = ["RecordedRun", "ReplaySampler", "record_run", "replay", "split_generate_kwargs", "with_prompt"]


@dataclasses.dataclass(frozen=True)
class CanvasProbe(Sampler):
    """A one-step "sampler": the canvas every sampler starts from (prompt + `gen_length` masks),
    one forward, no token choice. It lets step-0 analyses run through the generate driver (so
    `hook.state`, scheduled hooks and streaming reducers work) without naming a family's sampler
    or its options.

    Example:
        >>> from diffusion_lens.denoising import StreamingMean
        >>> r = StreamingMean("blocks.*.hook_resid_pre", positions="response")
        >>> model.generate(tokens, sampler=CanvasProbe(gen_length=32), reducers=[r], progress=False)
    """

    gen_length: int = 128
    mask_id: Optional[int] = None

    def n_steps(self) -> int:
        return 1

    def response_length(self) -> int:
        return self.gen_length

    def run(self, model, prompt, attention_mask, forward, generator=None) -> Iterator[tuple[DenoisingState, Tensor]]:
        mask_id = model.cfg.mask_token_id if self.mask_id is None else self.mask_id
        if mask_id is None:
            raise ValueError("The model config has no mask_token_id; pass CanvasProbe(mask_id=...).")
        batch, width = prompt.shape
        canvas = torch.cat([prompt, prompt.new_full((batch, self.gen_length), mask_id)], dim=1)
        full_mask = None
        if attention_mask is not None:
            full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, self.gen_length)], dim=1)
        state = DenoisingState(
            step=0, n_steps=1, block=0, n_blocks=1, step_in_block=0, steps_in_block=1, canvas=canvas,
            response_start=width, mask_id=mask_id, attention_mask=full_mask, model_input=canvas,
            model_attention_mask=full_mask,
        )
        forward(state)
        yield state, canvas


__all__ += ["CanvasProbe"]
