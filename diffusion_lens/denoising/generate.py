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
  * a tqdm bar over steps (`progress=False` turns it off; it is off anyway outside a TTY);
  * per-step work as options of the one door, `generate`: `stop_after=s` ends the run after step
    s's forward, `capture_logits=[...]` keeps raw logits (`out.logits`), `record=True` keeps every
    step's `DenoisingState` (`out.states`) and `replay=recorded` re-runs a recorded run's forwards
    on its canvases (teacher forcing, `diffusion_lens.denoising.replay`).

The driver's options are `generate`'s keyword-only parameters, listed once there
(`DRIVER_OPTIONS` is read from its signature); every other keyword is a sampler option.
`model.generate` is this function, so `inspect.signature(model.generate)` shows them all.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.core.hook_lists import flatten_hooks
from diffusion_lens.core.kv_cache import KVCache
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
from diffusion_lens.denoising.replay import ReplaySampler, with_prompt, write_prompt
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
    when one was requested; `response_start`: the column where every response starts;
    `logits`: {step: raw forward output [batch pos vocab]} for the steps in `capture_logits`
    (conditional rows; `model.token_logits` aligns them to tokens; under a KV cache a cached
    step's logits cover only its window, `states[step].computed`); `states`: the `DenoisingState`
    entering every step run, with `record=True` (what `replay=` takes); `n_forwards`: the forwards run.

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
    logits: dict = field(default_factory=dict)
    states: Optional[list[DenoisingState]] = None
    n_forwards: Optional[int] = None  # model forwards run (= steps; fewer than n_steps under threshold= / factor=)

    @property
    def responses(self) -> Int[Tensor, "batch gen"]:
        """The generated columns of `sequences`."""
        return self.sequences[:, self.response_start :]


def resolve_sampler(model: HookedDiffusionCore, sampler: Optional[Sampler], options: dict) -> Sampler:
    """The sampler to run: `sampler`, else the adapter's (upstream defaults), with `options` applied.

    An option the sampler does not have raises a TypeError naming the sampler's options and
    generate's own (`DRIVER_OPTIONS`).

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
        sampler = model.adapter.sampler(model.cfg)
    if options:
        try:
            sampler = sampler.with_options(**options)
        except TypeError as error:  # name both kinds of keyword, so a typo of either is found
            raise TypeError(f"{error} generate's own options are {list(DRIVER_OPTIONS)}.") from None
    n_steps, length = sampler.n_steps(), sampler.response_length()
    if n_steps > length and sampler.commits_a_token_per_step:
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
    """One denoising run: publishes states, installs per-step observer hooks, captures logits and states."""

    def __init__(self, model, observers: Sequence, capture_logits: Sequence[int], record: bool):
        self.model = model
        self.points = tuple(model.hook_dict.values())
        self.observers = list(observers)
        self.capture = set(capture_logits)
        self.logits: dict[int, Tensor] = {}
        self.states: Optional[list[DenoisingState]] = [] if record else None
        self.kv_cache: Optional[KVCache] = None  # filled by each full forward of a KV-cached run

    def publish(self, state: Optional[DenoisingState]) -> None:
        for point in self.points:
            point.__dict__["state"] = state  # plain attribute: skips nn.Module.__setattr__

    def _model_forward(self, state: DenoisingState) -> Optional[Float[Tensor, "rows pos vocab"]]:
        """The model on `state.model_input` (in `state.pass_name`, with its self-conditioning logits;
        None without the LM head when the sampler does not need them and `capture_logits` does not ask):
        plain, or under a KV cache either a full forward that (re)fills the cache or a forward of
        `state.window` that reads every other column from it. A run whose first forward already
        computes a window (`kv_cache="passes"`, or a block-causal window from column 0: LLaDA2's
        `kv_cache="prefix"`, whose later columns are not read) gets a cache of the canvas width there."""
        options = {key: value for key, value in (("pass_name", state.pass_name),
                                                ("self_conditioning_logits", state.self_conditioning_logits),
                                                ("attention_block_size", state.attention_block_size),
                                                ("attention_block_offsets", state.attention_block_offsets))
                  if value is not None}
        if not (state.needs_logits or state.step in self.capture):
            options["return_type"] = None
        if state.kv_cache is None:  # a window without a KV cache is a canvas prefix (block diffusion: LLaDA2)
            mask = state.model_attention_mask
            if state.window is not None:
                if state.window[0] != 0:
                    raise RuntimeError(f"Step {state.step} computes columns {state.window} without a KV cache; only a "
                                       "prefix (0, stop) can run without one (the sampler must set kv_cache=).")
                mask = None if mask is None else mask[:, : state.window[1]]
            return self.model(state.model_input, mask, **options)
        rows, cfg, like = state.model_input.shape[0], self.model.cfg, self.model.embed.weight
        if state.window is None:
            n_pos, cache = state.model_input.shape[1], self.kv_cache
            if cache is None or cache.batch != rows or cache.n_pos != n_pos:
                cache = self.kv_cache = KVCache.empty(cfg, rows, n_pos, like=like, devices=self.model.block_devices())
            return self.model(state.model_input, state.model_attention_mask, kv_cache=cache, **options)
        if self.kv_cache is None:
            if state.kv_cache != "passes" and not (state.window[0] == 0 and state.attention_block_size is not None):
                raise RuntimeError(f"Step {state.step} reads the KV cache, but no full forward of this run has built it.")
            self.kv_cache = KVCache.empty(cfg, rows, state.n_pos, like=like, devices=self.model.block_devices())
        return self.model(state.model_input, state.model_attention_mask, kv_cache=self.kv_cache,
                          window_start=state.window[0], **options)

    def forward(self, state: DenoisingState) -> Optional[Float[Tensor, "rows pos vocab"]]:
        self.publish(state)
        if self.states is not None:
            self.states.append(state)
        model = self.model
        step_hooks = [pair for obs in self.observers if obs.wants(state) for pair in obs.hook_pairs]
        if step_hooks:
            with model.hooks(fwd_hooks=step_hooks):
                logits = self._model_forward(state)
        else:
            logits = self._model_forward(state)
        if logits is None:
            return None
        if state.step in self.capture:
            # conditional rows only; cloned because the sampler may edit logits in place
            self.logits[state.step] = logits[: state.batch].clone()
        return model.token_logits(logits)


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


def check_hooks_fit(
    model, hooks: list, reducers: Sequence, n_steps: int, n_blocks: int, n_pos: int, batch: int, *,
    exact: bool = True, windows: Optional[list] = None, response_start: Optional[int] = None,
) -> None:
    """Resolve every hook and reducer against the run before its first forward: names and globs
    must select hook points, `H.at` schedules (`fn.schedule`) must fit the steps, blocks and canvas
    (`exact=False`: `n_steps` is an upper bound; `windows`: the columns each step computes under a
    KV cache, see `HookSchedule.check`), reducer steps must be steps of the run. Each failure raises
    with what the run has.

    Example:
        >>> check_hooks_fit(model, [H.at("blocks.0.hook_resid_post", fn, steps=9)], [], n_steps=8, n_blocks=1,
        ...                 n_pos=22, batch=1)   # ValueError: ... This run has steps 0..7, 1 block ...
    """
    for name, fn in hooks:
        model.hook_names(name)
        schedule = getattr(fn, "schedule", None)
        if schedule is not None:
            schedule.check_passes(model.cfg.layer_scalar_passes)
            schedule.check(n_steps, n_blocks, n_pos, batch, exact=exact, windows=windows, response_start=response_start)
    for reducer in reducers:
        reducer.check_run(model, n_steps, exact=exact)


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
    stop_after: Optional[int] = None,
    capture_logits: Sequence[int] = (),
    record: bool = False,
    replay: Optional[GenerationOutput] = None,
    grad: bool = False,
    **sampler_options,
) -> GenerationOutput:
    """Denoise a response for each prompt with the family's sampler, hooks and step caches.

    Why: the one entry point for per-step work: one call runs the reference sampler while hooks
    steer / record with `hook.state`, and the options below observe, record, replay or cut the run.
    `sampler_options` override the sampler's (e.g. steps, gen_length or max_new_tokens,
    block_length, temperature, cfg_scale, remasking for LLaDA; `kv_cache="prefix" | "dual"`,
    `threshold=`, `factor=`, `refresh=` for Fast-dLLM's cached, parallel decoding, where hooks see
    only the columns each forward computes: docs "Caching and what hooks see"); the same names work for every
    family (`Sampler.with_options`); an unknown keyword raises a TypeError naming both the
    sampler's options and these. `hooks`: a `(name, fn)` pair, a list or nested lists of them;
    each is checked against the run before the first forward (a typo, a step or block the run does
    not have, an index outside the canvas: ValueError / KeyError). `seed` makes sampling
    reproducible without touching the global RNG (`generator` gives a generator directly). With
    neither, temperature-0 runs are deterministic (remaining draws seeded with `DEFAULT_SEED` = 0)
    and sampled runs draw from the global RNG, as upstream.
    `cache=dict(names=, steps=, positions=, device=, dtype=, include_unconditional=, passes=)` -> `out.cache`
    (refused before the run if predicted over `max_cache_bytes`; under a KV cache each step keeps the
    requested columns its forward computed, `out.cache[step].positions`). `reducers=[StreamingMean(...)]`.
    `stop_after=s`: end the run after step s's forward (`out.sequences` is the canvas after it).
    `capture_logits=[s, ...]`: raw logits of those steps in `out.logits`. `record=True`: every
    step's `DenoisingState` in `out.states`. `replay=recorded` (an output made with `record=True`):
    re-run its forwards on its canvases, with `input` (the recorded prompt, or another of the same
    token shape) in the prompt columns; sampler options and `sampler=` do not apply then.
    `grad=True` runs with autograd on (otherwise off), so captured logits carry gradients back to
    hook tensors that require them: learning a steering vector through the step-0 forward
    (`sampler=CanvasProbe(gen_length)`, `capture_logits=[0]`); the weights' own `requires_grad` decide theirs.

    Example:
        >>> out = model.generate("Tell me a joke", gen_length=64, steps=64, block_length=32)
        >>> out.texts[0], out.sequences.shape, out.trajectory.shape   # [steps batch pos]
        >>> out = model.generate(tokens, hooks=[H.at("blocks.1.hook_resid_post", fn, steps=[2, 3])])
        >>> first = model.generate(tokens, stop_after=0, capture_logits=[0]).logits[0]   # one forward
        >>> clean = model.generate(tokens, record=True, steps=8, gen_length=16)
        >>> steered = model.generate(tokens, replay=clean, hooks=ablate(model, r), capture_logits=[3])
    """
    tokens, attention_mask = prepare_input(model, input, attention_mask, chat)
    if replay is not None:
        sampler, attention_mask = _replay_sampler(replay, tokens, attention_mask, sampler, sampler_options)
    else:
        sampler = resolve_sampler(model, sampler, sampler_options)
    batch, response_start = tokens.shape
    n_pos = response_start + sampler.response_length()
    n_steps = sampler.n_steps()
    last = _check_steps(stop_after, capture_logits, n_steps)
    check_context(model, response_start, sampler.response_length())
    hooks = flatten_hooks(hooks)
    check_hooks_fit(model, hooks, reducers, n_steps, sampler.n_blocks(), n_pos, batch,
                    exact=sampler.fixed_steps(), windows=sampler.step_windows(response_start), response_start=response_start)
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
        request = CacheRequest.build(model, cache, n_steps, exact=sampler.fixed_steps())
        if max_cache_bytes is not None:  # (estimating refuses data-dependent MoE expert hooks)
            check_budget(estimate(model, request, batch, n_pos, response_start, sampler.n_copies()), request, max_cache_bytes)
        recorder = StepRecorder(model, request, response_start, n_pos, batch, sampler.n_copies(),
                                n_steps if sampler.fixed_steps() else None)
        observers.append(recorder)
    generator = resolve_generator(sampler, seed, generator, tokens.device)
    run = _Run(model, observers, capture_logits, record)

    from tqdm.auto import tqdm  # lazy: tqdm.auto probes for notebooks at import

    bar = tqdm(total=last + 1, desc="denoising", unit="step", disable=None if progress else True, leave=False)
    canvases: list[Tensor] = []
    canvas, n_forwards = tokens, 0
    try:
        with torch.set_grad_enabled(grad), model.hooks(fwd_hooks=hooks):
            for state, canvas in sampler.run(model.cfg, tokens, attention_mask, run.forward, generator):
                n_forwards += 1
                if return_trajectory:
                    canvases.append(canvas)
                bar.update()
                if state.step >= last:
                    break
    finally:
        run.publish(None)
        bar.close()

    missed = sorted(set(capture_logits) - set(run.logits))
    if missed:
        raise ValueError(f"capture_logits steps {missed} were not reached: this run took {n_forwards} "
                         "forwards (its commit rule is adaptive, so n_steps is an upper bound); ask for earlier steps.")
    texts = None
    if model.tokenizer is not None:
        texts = model.to_string(canvas[:, response_start:], skip_special_tokens=True)
    full_mask = None
    if attention_mask is not None:
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, canvas.shape[1] - response_start)], 1)
    return GenerationOutput(
        sequences=canvas,
        texts=texts,
        # a sampler that ends before its last planned block (DiffusionGemma) yields a shorter final canvas
        trajectory=torch.stack([c[:, : canvas.shape[1]] for c in canvases]) if return_trajectory and canvases else None,
        cache=recorder.result() if recorder is not None else None,
        response_start=response_start,
        attention_mask=full_mask,
        logits=run.logits,
        states=run.states,
        n_forwards=n_forwards,
    )


#: The generate driver's own options (its keyword-only parameters); any other keyword is a sampler option.
DRIVER_OPTIONS: tuple[str, ...] = tuple(
    name for name, p in inspect.signature(generate).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def _check_steps(stop_after: Optional[int], capture_logits: Sequence[int], n_steps: int) -> int:
    """The last step to run; `stop_after` and `capture_logits` must name steps this run reaches."""
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or not 0 <= stop_after < n_steps):
        raise ValueError(f"stop_after={stop_after!r} is not a step of this run: pass an int in 0..{n_steps - 1}.")
    last = n_steps - 1 if stop_after is None else stop_after
    bad = sorted(s for s in capture_logits if not 0 <= s <= last)
    if bad:
        raise ValueError(f"capture_logits steps {bad} are not run: this run has steps 0..{last}"
                         f"{' (stop_after)' if stop_after is not None else ''}.")
    return last


def _replay_sampler(
    recorded: GenerationOutput,
    tokens: Int[Tensor, "batch prompt_pos"],
    attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
    sampler: Optional[Sampler],
    sampler_options: dict,
) -> tuple[ReplaySampler, Optional[Int[Tensor, "batch prompt_pos"]]]:
    """The replay of `recorded` with `tokens` in the prompt columns, and the recorded prompt mask."""
    if sampler is not None or sampler_options:
        given = ["sampler"] * (sampler is not None) + sorted(sampler_options)
        raise ValueError(f"replay= re-runs the recorded steps, so {given} cannot apply; drop them.")
    if not isinstance(recorded, GenerationOutput) or recorded.states is None:
        raise ValueError("replay= takes the output of generate(..., record=True) (its `states`).")
    states = recorded.states
    width = recorded.response_start
    recorded_mask = states[0].attention_mask
    recorded_mask = None if recorded_mask is None else recorded_mask[:, :width]
    if tuple(tokens.shape) != (states[0].batch, width):
        raise ValueError(f"replay= needs a prompt of the recorded shape {(states[0].batch, width)}; got "
                         f"{tuple(tokens.shape)}. Pass token ids padded like the recorded prompt.")
    if attention_mask is not None and (recorded_mask is None or not attention_mask.equal(recorded_mask.to(attention_mask))):
        raise ValueError("The prompt's attention mask differs from the recorded run's; a replay keeps the recorded "
                         "padding, so pass a prompt padded the same way.")
    if not tokens.equal(states[0].canvas[:, :width].to(tokens.device)):
        states = with_prompt(states, tokens)
    final = write_prompt(recorded.sequences, tokens.to(recorded.sequences.device))
    return ReplaySampler.of(states, final), recorded_mask


def split_generate_kwargs(model: HookedDiffusionCore, generate_kwargs: Optional[dict]) -> tuple[Sampler, dict]:
    """(the sampler with its options applied, the driver options) from one `generate`-style
    keyword dict; `sampler=` inside it picks the sampler. The split is `DRIVER_OPTIONS`.

    Example:
        >>> sampler, driver = split_generate_kwargs(model, dict(steps=8, gen_length=16, seed=0))
        >>> sampler.n_steps(), driver
        (8, {'seed': 0})
    """
    options = dict(generate_kwargs or {})
    driver = {k: options.pop(k) for k in list(options) if k in DRIVER_OPTIONS and k != "sampler"}
    return resolve_sampler(model, options.pop("sampler", None), options), driver


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
    hooks, attention_mask, seed, max_cache_bytes, ...; not the ones this call sets).

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
    sampler, driver = split_generate_kwargs(model, generate_kwargs)
    taken = sorted(set(driver) & {"cache", "stop_after", "capture_logits", "record", "replay"})
    if taken:
        raise ValueError(f"run_with_cache(step=...) sets {taken} itself; call model.generate for other uses.")
    wanted = resolve_steps(steps, sampler.n_steps(), exact=sampler.fixed_steps())
    request = dict(names=names_filter, steps=wanted, positions=positions, device=device, dtype=dtype)
    out = generate(model, input, cache=request, sampler=sampler, stop_after=wanted[-1], capture_logits=wanted,
                   **{"progress": False, "return_trajectory": False, **driver})
    if single:
        return out.logits[wanted[0]], out.cache[wanted[0]]
    return out.logits, out.cache


def estimate_cache_bytes(
    model: HookedDiffusionCore,
    input: Union[GenerateInput, tuple[int, int]],
    *,
    cache: Union[dict, CacheRequest],
    **generate_kwargs,
) -> int:
    """Exact bytes that `generate(input, cache=cache, **generate_kwargs)` would store (nothing is run); an
    upper bound when forwards compute windows (a KV cache) or the run's length is adaptive.

    Why: size a cache request before paying for it; shapes come from the config and the sampler.
    `input` is what you would pass to generate (only tokenized), or a `(batch, prompt_width)` pair;
    `generate_kwargs` are generate's (the same dict works for both calls).

    Example:
        >>> request = dict(names="blocks.*.hook_resid_post", steps=[0, 5], positions="response")
        >>> model.estimate_cache_bytes(tokens, cache=request, steps=8, gen_length=16, block_length=8)
        >>> model.generate(tokens, cache=request, steps=8, gen_length=16, block_length=8).cache.nbytes  # same
    """
    sampler, driver = split_generate_kwargs(model, generate_kwargs)
    if driver.get("replay") is not None:
        sampler = ReplaySampler.of(driver["replay"].states or (), driver["replay"].sequences)
    if isinstance(input, tuple) and len(input) == 2 and all(isinstance(v, int) for v in input):
        batch, response_start = input
    else:
        tokens, _ = prepare_input(model, input, driver.get("attention_mask"), driver.get("chat", True))
        batch, response_start = tokens.shape
    request = CacheRequest.build(model, cache, sampler.n_steps(), exact=sampler.fixed_steps())
    n_pos = response_start + sampler.response_length()
    return estimate(model, request, batch, n_pos, response_start, sampler.n_copies()).total


__all__ = [
    "DRIVER_OPTIONS", "GenerationOutput", "estimate_cache_bytes", "generate", "resolve_sampler", "run_with_step_cache",
    "split_generate_kwargs",
]
