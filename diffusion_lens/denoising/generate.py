"""The generate driver: inputs -> canvas, hooks and caches installed, state published, sampler run.

The sampler (from the family adapter, or passed in) owns the algorithm; this module owns what
surrounds it and is the same for every family:
  * input: a string, a list of strings (chat template unless `chat=False`; left padding plus an
    attention mask) or token ids [batch pos] / [pos] with an optional attention mask;
  * `hooks`: installed once for the whole run (a TransformerLens `(name, fn)` pair, a list or
    nested lists of them, e.g. from `diffusion_lens.denoising.hooks.at` or `steering.ablate`), removed on exit
    even if a hook raises;
  * checks before the first forward: every hook name, every `H.at` schedule (steps, blocks, index
    positions), every reducer and cache request is resolved against the run, and the canvas must
    fit the model's context (`cfg.n_ctx`);
  * determinism: without `seed` / `generator`, a run whose sampler is not `stochastic()`
    (temperature 0) takes its remaining draws from a generator seeded with `DEFAULT_SEED`, so it is
    the same on every call; sampled runs use the global RNG, as upstream;
  * caches and reducers: their hooks are installed only around the forwards of the steps they
    want (so other steps pay nothing), after the user's hooks (they see steered activations);
  * the step's `DenoisingState` is published as `hook.state` on every hook point before each
    forward and reset to None at the end, even on exceptions;
  * a tqdm bar over steps (`progress=False` turns it off; it is off anyway outside a TTY).
"""

from __future__ import annotations

from dataclasses import dataclass
import warnings
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.core.hook_lists import flatten_hooks
from diffusion_lens.core.model import HookedDiffusionCore
from diffusion_lens.denoising.cache import (
    DEFAULT_MAX_CACHE_BYTES,
    CacheRequest,
    StepCache,
    StepRecorder,
    check_budget,
    estimate,
    resolve_steps,
)
from diffusion_lens.denoising.samplers.base import DEFAULT_SEED, Sampler
from diffusion_lens.denoising.state import DenoisingState

GenerateInput = Union[str, Sequence[str], Int[Tensor, "batch pos"], Int[Tensor, " pos"]]
_UNSET = object()


@dataclass
class GenerationOutput:
    """Result of `model.generate`.

    `sequences` [batch pos]: the full final canvas (prompt, left pads included, then response);
    `texts`: the decoded responses (None without a tokenizer); `trajectory` [steps batch pos]:
    the canvas after every step (None with `return_trajectory=False`); `cache`: the `StepCache`
    when one was requested; `response_start`: the column where every response starts.

    Example:
        >>> out = model.generate(tokens, steps=8, gen_length=16, block_length=8)
        >>> out.responses.shape, out.trajectory.shape   # [batch 16], [8 batch pos]
        >>> (out.trajectory == model.cfg.mask_token_id).sum((1, 2))   # masks left after each step
    """

    sequences: Int[Tensor, "batch pos"]
    texts: Optional[list[str]]
    trajectory: Optional[Int[Tensor, "steps batch pos"]]
    cache: Optional[StepCache]
    response_start: int
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None

    @property
    def responses(self) -> Int[Tensor, "batch gen"]:
        """The generated columns of `sequences`."""
        return self.sequences[:, self.response_start :]


def resolve_sampler(model: HookedDiffusionCore, sampler: Optional[Sampler], options: dict) -> Sampler:
    """The sampler to run: `sampler`, else the adapter's (upstream defaults), with `options` applied.

    More steps than response positions is an error: every step commits at least one token, so
    the extra forwards could only change nothing.

    Example:
        >>> resolve_sampler(model, None, dict(steps=8, gen_length=16, block_length=8))
        LLaDASampler(steps=8, gen_length=16, block_length=8, ...)
    """
    if sampler is None:
        if model.adapter is None:
            raise ValueError(
                "This model has no adapter, so its sampler is unknown; pass one, e.g. "
                "generate(..., sampler=diffusion_lens.denoising.LLaDASampler(steps=64, gen_length=64))."
            )
        sampler = model.adapter.sampler(model)
    sampler = sampler.with_options(**options) if options else sampler
    n_steps, length = sampler.n_steps(), sampler.response_length()
    if n_steps > length:
        raise ValueError(
            f"steps={n_steps} is more than the response length ({length} positions): a step commits at least one "
            f"token, so {n_steps - length} forwards would be wasted. Pass steps<={length}, or a longer response "
            f"(gen_length= / max_new_tokens=)."
        )
    return sampler


def prepare_input(
    model: HookedDiffusionCore, input: GenerateInput, attention_mask: Optional[Tensor], chat: bool
) -> tuple[Int[Tensor, "batch pos"], Optional[Int[Tensor, "batch pos"]]]:
    """Token ids and attention mask (None when no row is padded) for a generate input.

    Example:
        >>> tokens, mask = prepare_input(model, ["Hi", "Tell me a joke"], None, chat=True)  # left-padded
        >>> tokens, mask = prepare_input(model, token_ids, None, chat=True)                 # mask None
    """
    if isinstance(input, Tensor):
        tokens = model._as_tokens(input)
        if tokens.shape[0] == 0:
            raise ValueError(f"generate got token ids of shape {tuple(input.shape)}: no prompt to denoise.")
        if attention_mask is not None:
            attention_mask = attention_mask if attention_mask.ndim == 2 else attention_mask[None]
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}."
                )
            attention_mask = attention_mask.to(tokens.device)
    else:
        if not isinstance(input, str) and len(input) == 0:
            raise ValueError("generate got an empty list of prompts; pass a string, a non-empty list or token ids.")
        if attention_mask is not None:
            raise ValueError("attention_mask is computed from text inputs; pass it only with token ids.")
        tokens, attention_mask = model.to_tokens(input, chat=chat, return_attention_mask=True)
    if attention_mask is not None and bool(attention_mask.bool().all()):
        attention_mask = None  # every family treats an all-ones mask as no mask
    return tokens, attention_mask


class _Run:
    """One denoising run: publishes states, installs per-step observer hooks, captures logits."""

    def __init__(self, model, observers: Sequence, capture_logits: Sequence[int]):
        self.model = model
        self.points = tuple(model.hook_dict.values())
        self.observers = list(observers)
        self.capture = set(capture_logits)
        self.logits: dict[int, Tensor] = {}

    def publish(self, state: Optional[DenoisingState]) -> None:
        for point in self.points:
            point.__dict__["state"] = state  # plain attribute: skips nn.Module.__setattr__

    def forward(self, state: DenoisingState) -> Float[Tensor, "rows pos vocab"]:
        self.publish(state)
        model = self.model
        step_hooks = [pair for obs in self.observers if obs.wants(state) for pair in obs.hook_pairs]
        if step_hooks:
            with model.hooks(fwd_hooks=step_hooks):
                logits = model(state.model_input, state.model_attention_mask)
        else:
            logits = model(state.model_input, state.model_attention_mask)
        if state.step in self.capture:
            # conditional rows only; cloned because the sampler may edit logits in place
            self.logits[state.step] = logits[: state.batch].clone()
        return model.token_logits(logits)


def denoise(
    model: HookedDiffusionCore,
    input: GenerateInput,
    *,
    attention_mask: Optional[Tensor] = None,
    hooks=(),
    cache: Optional[Union[dict, CacheRequest]] = None,
    reducers: Sequence = (),
    return_trajectory: bool = True,
    progress: bool = True,
    chat: bool = True,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    sampler: Optional[Sampler] = None,
    max_cache_bytes: Optional[int] = DEFAULT_MAX_CACHE_BYTES,
    stop_after: Optional[int] = None,
    capture_logits: Sequence[int] = (),
    **sampler_options,
) -> tuple[GenerationOutput, dict[int, Tensor]]:
    """`generate` plus two internal knobs: stop after a step, and capture raw logits at some steps."""
    sampler = resolve_sampler(model, sampler, sampler_options)
    tokens, attention_mask = prepare_input(model, input, attention_mask, chat)
    batch, response_start = tokens.shape
    n_pos = response_start + sampler.response_length()
    n_steps = sampler.n_steps()
    check_context(model, response_start, sampler.response_length())
    hooks = flatten_hooks(hooks)
    check_hooks_fit(model, hooks, reducers, n_steps, sampler.n_blocks(), n_pos, batch)
    if attention_mask is not None and model.cfg.attention_mask_mode == "ignored":
        warnings.warn(
            "This model ignores the attention mask (cfg.attention_mask_mode='ignored', as upstream), so the "
            "left pads of shorter prompts take part in attention and each row's result depends on its batch-mates. "
            "Generate prompts of different lengths one at a time to get unbatched results.",
            stacklevel=3,
        )
    observers = list(reducers)
    recorder = None
    if cache is not None:
        request = CacheRequest.build(model, cache, n_steps)
        if max_cache_bytes is not None:  # (estimating refuses data-dependent MoE expert hooks)
            check_budget(estimate(model, request, batch, n_pos, response_start, sampler.n_copies()), request, max_cache_bytes)
        recorder = StepRecorder(model, request, response_start, n_pos, batch, sampler.n_copies(), n_steps)
        observers.append(recorder)
    generator = resolve_generator(sampler, seed, generator, tokens.device)
    last = n_steps - 1 if stop_after is None else stop_after
    run = _Run(model, observers, capture_logits)

    from tqdm.auto import tqdm

    bar = tqdm(total=last + 1, desc="denoising", unit="step", disable=None if progress else True, leave=False)
    canvases: list[Tensor] = []
    canvas = tokens
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            for state, canvas in sampler.run(model, tokens, attention_mask, run.forward, generator):
                if return_trajectory:
                    canvases.append(canvas)
                bar.update()
                if state.step >= last:
                    break
    finally:
        run.publish(None)
        bar.close()

    texts = None
    if model.tokenizer is not None:
        texts = model.to_string(canvas[:, response_start:], skip_special_tokens=True)
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, canvas.shape[1] - response_start)], 1)
    out = GenerationOutput(
        sequences=canvas,
        texts=texts,
        trajectory=torch.stack(canvases) if return_trajectory and canvases else None,
        cache=recorder.cache if recorder is not None else None,
        response_start=response_start,
        attention_mask=full_mask,
    )
    return out, run.logits


def check_context(model: HookedDiffusionCore, prompt_width: int, response_length: int) -> None:
    """Raise before the run when prompt + response is longer than the model's context (`cfg.n_ctx`).

    Example:
        >>> check_context(model, prompt_width=1000, response_length=128)   # ValueError on a 1024-position model
    """
    n_ctx = model.cfg.n_ctx
    if n_ctx is not None and prompt_width + response_length > n_ctx:
        raise ValueError(
            f"The prompt ({prompt_width} positions, padded) plus the response ({response_length}) is "
            f"{prompt_width + response_length} positions, more than this model's context n_ctx={n_ctx}. "
            f"Shorten the prompt or the response (gen_length= / max_new_tokens=)."
        )


def check_hooks_fit(model, hooks: list, reducers: Sequence, n_steps: int, n_blocks: int, n_pos: int, batch: int) -> None:
    """Resolve every hook and reducer against the run before its first forward: names and globs
    must select hook points, `H.at` schedules (`fn.schedule`) must fit the steps, blocks and canvas,
    reducer steps must be steps of the run. Each failure raises with what the run has.

    Example:
        >>> check_hooks_fit(model, [H.at("blocks.0.hook_resid_post", fn, steps=9)], [], n_steps=8, n_blocks=1,
        ...                 n_pos=22, batch=1)   # ValueError: ... This run has steps 0..7, 1 block ...
    """
    for name, fn in hooks:
        model.hook_names(name)
        schedule = getattr(fn, "schedule", None)
        if schedule is not None:
            schedule.check(n_steps, n_blocks, n_pos, batch)
    for reducer in reducers:
        reducer.check_run(model, n_steps)


def resolve_generator(
    sampler: Sampler, seed: Optional[int], generator: Optional[torch.Generator], device: torch.device
) -> Optional[torch.Generator]:
    """The generator a run draws from: `generator`, else one seeded with `seed`; without either, one
    seeded with `DEFAULT_SEED` for deterministic (temperature 0) runs, None (the global RNG, as
    upstream) for stochastic ones.

    Example:
        >>> resolve_generator(LLaDASampler(remasking="random"), None, None, "cpu")  # seeded with DEFAULT_SEED
    """
    if seed is not None and generator is not None:
        raise ValueError("Pass seed= or generator=, not both: the generator would silently win over the seed.")
    if generator is not None:
        return generator
    if seed is None and sampler.stochastic():
        return None
    return torch.Generator(device=device).manual_seed(DEFAULT_SEED if seed is None else seed)


def generate(
    model: HookedDiffusionCore,
    input: GenerateInput,
    *,
    attention_mask: Optional[Tensor] = None,
    hooks=(),
    cache: Optional[Union[dict, CacheRequest]] = None,
    reducers: Sequence = (),
    return_trajectory: bool = True,
    progress: bool = True,
    chat: bool = True,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    sampler: Optional[Sampler] = None,
    max_cache_bytes: Optional[int] = DEFAULT_MAX_CACHE_BYTES,
    **sampler_options,
) -> GenerationOutput:
    """Denoise a response for each prompt with the family's sampler, hooks and step caches.

    Why: one call runs the reference sampler while hooks steer / record with `hook.state`.
    `sampler_options` override the sampler's (e.g. steps, gen_length or max_new_tokens,
    block_length, temperature, cfg_scale, remasking for LLaDA); the same names work for every
    family (`Sampler.with_options`). `hooks`: a `(name, fn)` pair, a list or nested lists of them;
    each is checked against the run before the first forward (a typo, a step or block the run does
    not have, an index outside the canvas: ValueError / KeyError). `seed` makes sampling
    reproducible without touching the global RNG (`generator` gives a generator directly). With
    neither, temperature-0 runs are deterministic (remaining draws seeded with `DEFAULT_SEED` = 0)
    and sampled runs draw from the global RNG, as upstream.
    `cache=dict(names=, steps=, positions=, device=, dtype=, include_unconditional=)` -> `out.cache`
    (refused before the run if predicted over `max_cache_bytes`). `reducers=[StreamingMean(...)]`.

    Example:
        >>> out = model.generate("Tell me a joke", gen_length=64, steps=64, block_length=32)
        >>> out.texts[0], out.sequences.shape, out.trajectory.shape   # [steps batch pos]
        >>> out = model.generate(tokens, hooks=[H.at("blocks.1.hook_resid_post", fn, steps=[2, 3])])
    """
    out, _ = denoise(
        model, input, attention_mask=attention_mask, hooks=hooks, cache=cache, reducers=reducers,
        return_trajectory=return_trajectory, progress=progress, chat=chat, seed=seed, generator=generator,
        sampler=sampler, max_cache_bytes=max_cache_bytes, **sampler_options,
    )
    return out


def run_with_step_cache(
    model: HookedDiffusionCore,
    input: GenerateInput,
    *,
    step: Union[int, Sequence[int]],
    names_filter=None,
    device: Optional[Union[str, torch.device]] = None,
    remove_batch_dim: bool = False,
    positions="all",
    dtype: Optional[torch.dtype] = None,
    **generate_kwargs,
):
    """The forward(s) at denoising step(s) `step`: the sampler runs up to the last one.

    Returns `(logits, ActivationCache)` for an int step, where logits are the raw forward output
    at that step [batch pos vocab] (conditional rows under CFG); for a list of steps,
    `({step: logits}, StepCache)`. Other keyword arguments go to `generate` (sampler options,
    hooks, attention_mask, seed, max_cache_bytes, ...).

    Example:
        >>> logits, cache = model.run_with_cache(tokens, step=3, steps=8, gen_length=16, block_length=8)
        >>> logits_by_step, step_cache = model.run_with_cache(tokens, step=[0, 5], steps=8, gen_length=16)
    """
    if remove_batch_dim:
        raise ValueError("remove_batch_dim is not supported with step=...; index the batch of the cache instead.")
    single = isinstance(step, int)
    steps = [step] if single else list(step)
    if not steps:
        raise ValueError("step=[] asks for no step; pass an int or a non-empty list.")
    generate_kwargs.setdefault("progress", False)
    generate_kwargs.setdefault("return_trajectory", False)
    sampler_options = {k: generate_kwargs.pop(k) for k in list(generate_kwargs) if k not in _GENERATE_ARGS}
    sampler = resolve_sampler(model, generate_kwargs.pop("sampler", None), sampler_options)
    wanted = resolve_steps(steps, sampler.n_steps())
    request = dict(names=names_filter, steps=wanted, positions=positions, device=device, dtype=dtype)
    out, logits = denoise(
        model, input, cache=request, sampler=sampler, stop_after=wanted[-1], capture_logits=wanted, **generate_kwargs
    )
    if single:
        return logits[wanted[0]], out.cache[wanted[0]]
    return logits, out.cache


_GENERATE_ARGS = {
    "attention_mask", "hooks", "reducers", "return_trajectory", "progress", "chat", "seed", "generator",
    "max_cache_bytes", "sampler",
}


def estimate_cache_bytes(
    model: HookedDiffusionCore,
    input: Union[GenerateInput, tuple[int, int]],
    *,
    cache: Union[dict, CacheRequest],
    attention_mask: Optional[Tensor] = None,
    chat: bool = True,
    sampler: Optional[Sampler] = None,
    **sampler_options,
) -> int:
    """Exact bytes that `generate(input, cache=cache, **sampler_options)` would store (nothing is run).

    Why: size a cache request before paying for it; shapes come from the config and the sampler.
    `input` is what you would pass to generate (only tokenized), or a `(batch, prompt_width)` pair.

    Example:
        >>> request = dict(names="blocks.*.hook_resid_post", steps=[0, 5], positions="response")
        >>> model.estimate_cache_bytes(tokens, cache=request, steps=8, gen_length=16, block_length=8)
        >>> model.generate(tokens, cache=request, steps=8, gen_length=16, block_length=8).cache.nbytes  # same
    """
    sampler = resolve_sampler(model, sampler, sampler_options)
    if isinstance(input, tuple) and len(input) == 2 and all(isinstance(v, int) for v in input):
        batch, response_start = input
    else:
        tokens, _ = prepare_input(model, input, attention_mask, chat)
        batch, response_start = tokens.shape
    request = CacheRequest.build(model, cache, sampler.n_steps())
    n_pos = response_start + sampler.response_length()
    return estimate(model, request, batch, n_pos, response_start, sampler.n_copies()).total


__all__ = ["GenerationOutput", "generate", "run_with_step_cache", "estimate_cache_bytes", "resolve_sampler", "denoise"]
