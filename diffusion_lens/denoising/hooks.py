"""Denoising-aware scheduling of TransformerLens hook functions (`from diffusion_lens import hooks as H`).

`H.at(name, fn, steps=..., denoise_blocks=..., positions=..., guidance=..., passes=...)` wraps an
ordinary hook function `fn(act, hook)` so that it runs only at some denoising steps / denoising
blocks / model passes and changes only some canvas positions. It returns a `(name, hook_fn)` pair for
`model.generate(hooks=[...])`, `model.run_with_hooks(fwd_hooks=[...])` or `model.hooks(...)`.

Vocabulary: a *denoising block* is a semi-autoregressive block of the response (`denoise_blocks=`,
`hook.state.block`); a *layer* is a transformer block (`blocks.3.hook_resid_post` is layer 3's
hook point; `layers=` elsewhere); *positions* are canvas columns; *guidance* is classifier-free
guidance. The old keywords `blocks=` and `cfg=` still work for one release, with a
DeprecationWarning.

Design (position scopes on padded batches): `fn` always sees the full activation (all rows, all
positions) and `hook.state`; what it returns is merged back only at the scoped positions of each
row (`torch.where(mask, fn(act), act)`), so a scoped hook can never touch another position. `fn`
may also modify its argument in place and return None: it is given a copy when a scope is set.
Scopes are listed in `diffusion_lens.denoising.positions` (the one position vocabulary); per-row
scopes ("masked", "prompt" with left padding, ...) are evaluated per row. Attention maps
[batch head q_pos k_pos] are scoped on their query positions. Under classifier-free guidance
(`hook.state.guidance`) the forward has [conditional; unconditional] rows; scopes are computed on
the conditional canvas and applied to both halves unless `guidance="conditional"` or
`"unconditional"`.

Checked before the run: `model.generate` resolves every scheduled hook against the run it is
about to start (`HookSchedule.check`): a name or glob that matches no hook point, a step or
denoising block the run does not have, or an index list outside the canvas raises with what the
run has ("this run has steps 0..7, 1 denoising block and 22 canvas positions") before the first
forward. Negative steps and denoising blocks count from the end of the run (`steps=-1` is the last
step), as in `cache=dict(steps=...)`, `run_with_cache(step=-1)` and `StepCache[-1]`. Callable
schedules are the caller's logic and are not checked.

Under a KV cache (`generate(kv_cache="prefix" | "dual")`) a cached forward computes only some canvas
columns (`hook.state.computed`); its activations hold exactly those, and a scope is applied to the
columns computed. Positions a forward does not compute are not touched by it: an intervention on
prompt positions takes effect at each block's full forward (which builds the cache) and reaches the
cached steps through the keys and values it changed. A scheduled hook whose steps compute none of
its positions can never fire, and is refused before the run.

Passes: a model that runs its weights in more than one pass (DiffusionGemma's causal "encoder" over
the prompt and committed blocks, and its "decoder" over the noise canvas; `cfg.layer_scalar_passes`)
publishes the pass of every forward as `hook.pass_name`, in `generate` and in plain forwards alike;
`passes="decoder"` (or a list) runs the hook in those passes only. A pass the model does not run is
an error when the hook is installed.

Outside generation (a plain forward: `hook.state is None`) there is no step: `steps` /
`denoise_blocks` filters do not apply (the hook runs, as it would at every step), because steering
builders use the same hooks to score single forwards; scopes that need the state ("response",
"masked", a callable) raise; index tensors and bool masks work everywhere, and an index outside
the activation raises. A glob or callable name that matches no hook point raises there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from diffusion_lens.core.deprecation import no_keywords_left, renamed_attribute, renamed_keyword
from diffusion_lens.core.hook_lists import HookName, name_filter
from diffusion_lens.denoising.positions import (
    PositionScope,
    broadcast_mask,
    check_scope,
    check_scope_fits,
    position_axis,
    rows_mask,
    scope_mask,
)
from diffusion_lens.denoising.state import DenoisingState

Schedule = Union[None, int, range, Sequence[int], Callable[[DenoisingState], bool]]
HookFn = Callable[[Tensor, object], Optional[Tensor]]


@dataclass(frozen=True)
class HookSchedule:
    """What `H.at` was asked for, kept on the hook function it returns (`fn.schedule`).

    Why: the generate driver checks every scheduled hook against the run before the first
    forward, so a step, denoising block or position the run does not have is an error, not a
    silent no-op. `steps` / `denoise_blocks` are None (all), an int, a range, a frozenset of ints
    (negative = from the end of the run) or a callable of the `DenoisingState`.

    Example:
        >>> name, fn = H.at("blocks.1.hook_resid_post", f, steps=[0, -1])
        >>> fn.schedule.check(n_steps=8, n_blocks=1, n_pos=22, batch=2)   # fine
        >>> fn.schedule.check(n_steps=1, n_blocks=1, n_pos=22, batch=2)   # ValueError: ... steps 0..0 ...
    """

    name: HookName
    steps: Schedule = None
    denoise_blocks: Schedule = None
    positions: PositionScope = None
    guidance: str = "both"
    passes: Optional[frozenset[str]] = None  # model passes the hook runs in (`hook.pass_name`); None = all

    blocks = renamed_attribute("blocks", "denoise_blocks", "HookSchedule")
    cfg = renamed_attribute("cfg", "guidance", "HookSchedule")

    def check(
        self, n_steps: int, n_blocks: int, n_pos: int, batch: int, *, exact: bool = True,
        windows: Optional[Sequence[Optional[tuple[int, int]]]] = None, response_start: Optional[int] = None,
    ) -> None:
        """Raise a ValueError naming what the run has when this schedule could never fire as asked.

        `n_blocks` is the run's number of denoising blocks (`DenoisingState.n_blocks`). `exact=False`:
        `n_steps` is an upper bound (an adaptive commit rule), so steps cannot count from the end.
        `windows` (`Sampler.step_windows`): per step, the canvas columns its forward computes (None
        = all); a position scope that no scheduled step computes never fires, which is an error.
        """
        problems = [_outside(self.steps, n_steps, "steps"), _outside(self.denoise_blocks, n_blocks, "denoise_blocks")]
        problems = [p for p in problems if p]
        if not exact and _negative(self.steps):
            problems.append(f"steps={self.steps!r} counts from the end, but this run's length depends on the tokens "
                            "(an adaptive commit rule: threshold= / factor=)")
        if windows is not None and response_start is not None and not problems:
            _check_computed(self, windows, n_steps, n_pos, response_start)
        try:
            check_scope_fits(self.positions, n_pos, batch)
        except (IndexError, ValueError) as error:
            problems.append(str(error).rstrip("."))
        if problems:
            blocks = "1 denoising block" if n_blocks == 1 else f"denoising blocks 0..{n_blocks - 1}"
            raise ValueError(
                f"H.at({self.name!r}, ...) does not fit this run: {'; '.join(problems)}. This run has steps "
                f"0..{n_steps - 1}, {blocks} and {n_pos} canvas positions (negative steps and denoising blocks "
                "count from the end)."
            )

    def check_passes(self, model_passes: Sequence[str]) -> None:
        """Raise when `passes` names a pass the model does not run (`cfg.layer_scalar_passes`).

        Example:
            >>> fn.schedule.check_passes(("encoder", "decoder"))   # fine for passes="decoder"
            >>> fn.schedule.check_passes(())                       # ValueError: ... runs one pass ...
        """
        if self.passes is None:
            return
        unknown = sorted(self.passes - set(model_passes))
        if unknown:
            runs = f"runs the passes {tuple(model_passes)}" if model_passes else "runs one pass (no passes= to select)"
            raise ValueError(f"H.at({self.name!r}, passes={sorted(self.passes)}): this model {runs}; "
                             f"{unknown} never run{'s' if len(unknown) == 1 else ''}.")

    def matches(self, state: DenoisingState) -> bool:
        """Whether the hook runs at this state's step and denoising block."""
        return _selected(self.steps, state.step, state.n_steps, state) and _selected(
            self.denoise_blocks, state.block, state.n_blocks, state
        )


def at(
    name: HookName,
    fn: HookFn,
    *,
    steps: Schedule = None,
    denoise_blocks: Schedule = None,
    positions: PositionScope = None,
    guidance: str = "both",
    passes: Union[None, str, Sequence[str]] = None,
    **deprecated,
) -> tuple[HookName, HookFn]:
    """Schedule hook function `fn` by denoising step, denoising block, model pass and canvas positions.

    Why: steering or patching "only the response, only in the first 8 steps" is one line, with
    the same `fn(act, hook)` you would give TransformerLens.
    `name` is a hook point name, a glob ("blocks.*.hook_resid_pre": `blocks.3` is layer 3) or a
    name filter callable. `steps` / `denoise_blocks` (the semi-autoregressive blocks of the
    response, not layers): an int, a range, a list/set of ints (negative = from the end of the
    run: `steps=-1` is the last step) or a callable of the `DenoisingState` (None = all).
    `positions`: canvas positions, see `diffusion_lens.denoising.positions`. `guidance`: which rows
    under classifier-free guidance, "both" | "conditional" | "unconditional". `passes`: a pass name
    or a list of them (`hook.pass_name`, e.g. DiffusionGemma's "encoder" / "decoder"). The old keywords
    `blocks=` / `cfg=` warn and still work for one release. The returned function carries the
    request as `.schedule` (a `HookSchedule`); `model.generate` checks it against the run before
    the first forward.

    Example:
        >>> h = H.at("blocks.1.hook_resid_post", lambda x, hook: x * 0, steps=range(0, 8), positions="response")
        >>> out = model.generate(tokens, hooks=[h], steps=16, gen_length=16, block_length=8)
        >>> last = H.at("blocks.*.hook_resid_post", fn, steps=-1)              # the last step, any run length
        >>> second = H.at("blocks.*.hook_resid_post", fn, denoise_blocks=1)    # the 2nd semi-AR block
        >>> cond = H.at("blocks.1.hook_resid_post", fn, guidance="conditional") # conditional rows only
        >>> dec = H.at("blocks.*.hook_resid_post", fn, passes="decoder")        # DiffusionGemma's denoising pass
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=[H.at("hook_embed", fn, positions=[0, 1])])
    """
    denoise_blocks = renamed_keyword(deprecated, "blocks", "denoise_blocks", denoise_blocks, where="H.at")
    guidance = renamed_keyword(deprecated, "cfg", "guidance", guidance, where="H.at", default="both")
    no_keywords_left(deprecated, "H.at")
    check_scope(positions)
    if guidance not in ("both", "conditional", "unconditional"):
        raise ValueError(f"guidance={guidance!r} must be 'both', 'conditional' or 'unconditional'.")
    schedule = HookSchedule(
        name, _normalise(steps, "steps"), _normalise(denoise_blocks, "denoise_blocks"), positions, guidance,
        _pass_set(passes),
    )
    scoped = not (positions is None or (isinstance(positions, str) and positions == "all")) or guidance != "both"
    in_passes = schedule.passes

    def scheduled_hook(act: Tensor, hook) -> Optional[Tensor]:
        if in_passes is not None and getattr(hook, "pass_name", None) not in in_passes:
            return None
        state = getattr(hook, "state", None)
        if state is not None and not schedule.matches(state):
            return None
        if not scoped:
            return fn(act, hook)
        axis = position_axis(hook, act.ndim)
        n_pos = act.shape[axis] if state is None else state.n_pos  # canvas columns (a cached forward computes fewer)
        selected = scope_mask(positions, state, n_pos, act.device)
        mask = rows_mask(selected, state, act.shape[0], n_pos, guidance, act.device)
        if mask is None:
            return fn(act, hook)
        if state is not None and state.window is not None:
            mask = mask[:, state.computed]  # the columns this forward computes, as the activation holds them
        copy = act.clone()
        changed = fn(copy, hook)
        changed = copy if changed is None else changed
        return torch.where(broadcast_mask(mask, act, axis), changed, act)

    scheduled_hook.__name__ = f"at({getattr(fn, '__name__', type(fn).__name__)})"
    scheduled_hook.schedule = schedule
    return name_filter(name), scheduled_hook


def position_mask(state: DenoisingState, positions: PositionScope) -> Bool[Tensor, "batch pos"]:
    """The [batch pos] bool mask a scope selects in this step's conditional canvas.

    Why: inside a hook, to read or write the scoped positions yourself. The mask covers the whole
    canvas; under a KV cache slice it to the columns the forward computes (`hook.state.computed`).
    Example:
        >>> def fn(act, hook):
        ...     m = hook.state.rows(H.position_mask(hook.state, "masked"))[:, hook.state.computed]  # [rows pos]
        ...     return act.masked_fill(m[..., None], 0.0)
    """
    mask = scope_mask(positions, state, state.n_pos, state.canvas.device)
    if mask is None:
        return torch.ones_like(state.canvas, dtype=torch.bool)
    return mask.expand_as(state.canvas) if mask.ndim == 1 else mask


def _pass_set(passes: Union[None, str, Sequence[str]]) -> Optional[frozenset[str]]:
    """None, or the pass names as a non-empty frozenset of strings."""
    if passes is None:
        return None
    names = [passes] if isinstance(passes, str) else list(passes)
    if not names or not all(isinstance(name, str) for name in names):
        raise TypeError(f"passes must be a pass name or a non-empty list of them (e.g. 'decoder'); got {passes!r}.")
    return frozenset(names)


def _normalise(spec: Schedule, what: str) -> Schedule:
    """None, an int, a range or a callable as given; any other iterable -> a frozenset of ints."""
    if spec is None or isinstance(spec, range) or callable(spec):
        return spec
    if isinstance(spec, bool):
        raise TypeError(f"{what} must be an int, a range, a list of ints or a callable, not a bool.")
    if isinstance(spec, int):
        return spec
    try:
        values = [int(v) for v in spec]
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be an int, a range, a list of ints or a callable; got {spec!r}.") from None
    return frozenset(values)


def _outside(spec: Schedule, n: int, what: str) -> Optional[str]:
    """What in a step / denoising block spec the run does not have (None when everything fits or it is a callable)."""
    if spec is None or callable(spec):
        return None
    if isinstance(spec, int):
        return None if -n <= spec < n else f"{what}={spec}"
    if len(spec) == 0:
        return f"{what}={spec!r} selects nothing"
    if isinstance(spec, range):
        return None if all(-n <= v < n for v in (spec[0], spec[-1])) else f"{what}={spec!r}"
    bad = sorted(v for v in spec if not -n <= v < n)
    return f"{what} {bad}" if bad else None


def _negative(spec: Schedule) -> bool:
    """Whether a step spec counts from the end of the run."""
    if spec is None or callable(spec):
        return False
    if isinstance(spec, int):
        return spec < 0
    return any(v < 0 for v in spec)


def _scope_columns(positions: PositionScope, response_start: int, n_pos: int) -> Optional[set[int]]:
    """The canvas columns a scope can select in some row, when known before the run (None: unknown or all)."""
    if positions is None or callable(positions):
        return None
    if isinstance(positions, str):
        spans = {"prompt": range(0, response_start), "last_prompt": range(response_start - 1, response_start),
                 "response": range(response_start, n_pos)}
        return set(spans[positions]) if positions in spans else None
    selected = torch.as_tensor(positions)
    if selected.dtype == torch.bool:
        return set((selected if selected.ndim == 1 else selected.any(0)).nonzero().flatten().tolist())
    return set((selected.long().flatten() % n_pos).tolist())


def _check_computed(
    schedule: HookSchedule, windows: Sequence[Optional[tuple[int, int]]], n_steps: int, n_pos: int, response_start: int
) -> None:
    """Raise when every step the schedule selects is a cached forward that computes none of its positions."""
    if not any(w is not None for w in windows) or callable(schedule.steps):
        return
    columns = _scope_columns(schedule.positions, response_start, n_pos)
    if columns is None:
        return
    steps = [s for s in range(n_steps) if _selected(schedule.steps, s, n_steps, None)]
    if any(windows[s] is None or columns & set(range(*windows[s])) for s in steps):
        return
    full = [s for s in range(n_steps) if windows[s] is None]
    raise ValueError(
        f"H.at({schedule.name!r}, positions={schedule.positions!r}, steps={schedule.steps!r}) can never fire: under "
        f"this run's KV cache those steps are cached forwards that compute only {sorted({windows[s] for s in steps})} "
        f"(canvas columns [start, stop)), none of the scoped positions. Those positions are computed at the full "
        f"forwards, steps {full}: an intervention there reaches the cached steps through the keys and values it "
        "changed. Schedule it at those steps, or run with kv_cache=None to intervene at every step."
    )


def _selected(spec: Schedule, value: int, n: int, state: Optional[DenoisingState]) -> bool:
    """`value` (0..n-1) is selected by `spec`, directly or as the negative index value - n."""
    if spec is None:
        return True
    if callable(spec):
        return bool(spec(state))
    if isinstance(spec, int):
        return value == spec or value - n == spec
    return value in spec or (value - n) in spec


__all__ = ["HookSchedule", "Schedule", "at", "position_mask"]
