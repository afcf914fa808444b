"""Denoising-aware scheduling of TransformerLens hook functions (`from diffusion_lens import hooks as H`).

`H.at(name, fn, steps=..., blocks=..., positions=...)` wraps an ordinary hook function
`fn(act, hook)` so that it runs only at some denoising steps / blocks and changes only some
positions. It returns a `(name, hook_fn)` pair for `model.generate(hooks=[...])`,
`model.run_with_hooks(fwd_hooks=[...])` or `model.hooks(...)`.

Design (position scopes on padded batches): `fn` always sees the full activation (all rows, all
positions) and `hook.state`; what it returns is merged back only at the scoped positions of each
row (`torch.where(mask, fn(act), act)`), so a scoped hook can never touch another position. `fn`
may also modify its argument in place and return None: it is given a copy when a scope is set.
Scopes are listed in `diffusion_lens.denoising.positions`; per-row scopes ("masked", "prompt"
with left padding, ...) are evaluated per row. Attention maps [batch head q_pos k_pos] are scoped
on their query positions. Under classifier-free guidance (`hook.state.cfg`) the forward has
[conditional; unconditional] rows; scopes are computed on the conditional canvas and applied to
both halves unless `cfg="conditional"` or `"unconditional"`.

Outside generation (a plain forward: `hook.state is None`) there is no step: `steps` / `blocks`
filters do not apply (the hook runs), and scopes that need the state ("response", "masked", a
callable) raise; index tensors and bool masks work everywhere.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from diffusion_lens.denoising.positions import (
    PositionScope,
    broadcast_mask,
    check_scope,
    position_axis,
    rows_mask,
    scope_mask,
)
from diffusion_lens.denoising.state import DenoisingState

Schedule = Union[None, int, range, Sequence[int], Callable[[DenoisingState], bool]]
HookName = Union[str, Callable[[str], bool]]
HookFn = Callable[[Tensor, object], Optional[Tensor]]


def at(
    name: HookName,
    fn: HookFn,
    *,
    steps: Schedule = None,
    blocks: Schedule = None,
    positions: PositionScope = None,
    cfg: str = "both",
) -> tuple[HookName, HookFn]:
    """Schedule hook function `fn` by denoising step, block and position scope.

    Why: steering or patching "only the response, only in the first 8 steps" is one line, with
    the same `fn(act, hook)` you would give TransformerLens.
    `name` is a hook point name, a glob ("blocks.*.hook_resid_pre") or a name filter callable.
    `steps` / `blocks`: an int, a range, a list/set of ints, or a callable of the `DenoisingState`
    (None = all). `positions`: see the module docstring. `cfg`: "both" | "conditional" | "unconditional".

    Example:
        >>> h = H.at("blocks.1.hook_resid_post", lambda x, hook: x * 0, steps=range(0, 8), positions="response")
        >>> out = model.generate(tokens, hooks=[h], steps=16, gen_length=16, block_length=8)
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=[H.at("hook_embed", fn, positions=[0, 1])])
    """
    step_ok = _schedule(steps, "steps")
    block_ok = _schedule(blocks, "blocks")
    check_scope(positions)
    if cfg not in ("both", "conditional", "unconditional"):
        raise ValueError(f"cfg={cfg!r} must be 'both', 'conditional' or 'unconditional'.")
    scoped = not (positions is None or (isinstance(positions, str) and positions == "all")) or cfg != "both"

    def scheduled_hook(act: Tensor, hook) -> Optional[Tensor]:
        state = getattr(hook, "state", None)
        if state is not None:
            if step_ok is not None and not step_ok(state.step, state):
                return None
            if block_ok is not None and not block_ok(state.block, state):
                return None
        if not scoped:
            return fn(act, hook)
        axis = position_axis(hook, act.ndim)
        n_pos = act.shape[axis]
        mask = rows_mask(scope_mask(positions, state, n_pos, act.device), state, act.shape[0], n_pos, cfg, act.device)
        if mask is None:
            return fn(act, hook)
        copy = act.clone()
        changed = fn(copy, hook)
        changed = copy if changed is None else changed
        return torch.where(broadcast_mask(mask, act, axis), changed, act)

    scheduled_hook.__name__ = f"at({getattr(fn, '__name__', type(fn).__name__)})"
    return _name_filter(name), scheduled_hook


def position_mask(state: DenoisingState, positions: PositionScope) -> Bool[Tensor, "batch pos"]:
    """The [batch pos] bool mask a scope selects in this step's conditional canvas.

    Why: inside a hook, to read or write the scoped positions yourself.
    Example:
        >>> def fn(act, hook):
        ...     m = hook.state.rows(H.position_mask(hook.state, "masked"))   # [rows pos]
        ...     return act.masked_fill(m[..., None], 0.0)
    """
    mask = scope_mask(positions, state, state.n_pos, state.canvas.device)
    if mask is None:
        return torch.ones_like(state.canvas, dtype=torch.bool)
    return mask.expand_as(state.canvas) if mask.ndim == 1 else mask


def _schedule(spec: Schedule, what: str) -> Optional[Callable[[int, DenoisingState], bool]]:
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise TypeError(f"{what} must be an int, a range, a list of ints or a callable, not a bool.")
    if isinstance(spec, int):
        return lambda value, state: value == spec
    if isinstance(spec, range):
        return lambda value, state: value in spec
    if callable(spec):
        return lambda value, state: bool(spec(state))
    allowed = frozenset(int(v) for v in spec)
    return lambda value, state: value in allowed


def _name_filter(name: HookName) -> HookName:
    if isinstance(name, str) and any(c in name for c in "*?["):
        pattern = name
        return lambda hook_name: fnmatch.fnmatchcase(hook_name, pattern)
    return name


__all__ = ["at", "position_mask", "Schedule"]
