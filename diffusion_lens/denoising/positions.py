"""The position vocabulary of the denoising layer: which canvas columns a hook, cache or mask touches.

Positions are always columns of the canvas `[left pads | prompt | response]` (`hook.state.canvas`,
[batch pos]); the same scopes work in `H.at(positions=...)`, `generate(cache=dict(positions=...))`,
`StreamingMean(positions=...)` and `H.position_mask(state, ...)`:
  * `None` / "all": every position;
  * "prompt": real prompt tokens (left pads excluded); "last_prompt": the last prompt token (column
    `state.response_start - 1` in every row, because prompts are left-padded); "response": the
    generated positions, `state.response_start` onwards; "masked" / "unmasked" /
    "newly_unmasked": from the canvas entering the step;
  * an int, a list of ints or an index tensor: the same canvas columns in every row (negative =
    from the end of the canvas, not from the prompt / response boundary); a bool tensor [pos] or
    [batch pos];
  * a callable `f(state)` returning any of the tensors above.

Steering readers add selectors that need more than the canvas ("pre_instruction" /
"post_instruction" need the chat template, "mean_prompt" pools): they live in
`diffusion_lens.steering.positions` and use the same names for the same columns.

The position axis of an activation is dim 1 ([batch pos ...]); for attention scores / patterns
[batch head q_pos k_pos] it is the query axis, and a HookPoint's own `pos_dim` (TransformerLens)
overrides both. Under classifier-free guidance a [batch pos] scope is computed on the conditional
canvas and repeated over the forward's copies (`DenoisingState.rows`); `guidance=` picks the rows.

Example:
    >>> H.at("blocks.3.hook_resid_post", fn, positions="last_prompt")    # layer 3, one column per row
    >>> model.generate(tokens, cache=dict(names="hook_embed", positions="response"))
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from diffusion_lens.denoising.state import DenoisingState

PositionScope = Union[None, str, Tensor, Sequence[int], Callable[[DenoisingState], Any]]
GuidanceRows = str  # "both" | "conditional" | "unconditional": rows under classifier-free guidance

_STATE_SCOPES = {
    "prompt": "is_prompt",
    "last_prompt": "is_last_prompt",
    "response": "is_response",
    "masked": "is_masked",
    "unmasked": "is_unmasked",
    "newly_unmasked": "newly_unmasked",
}
SCOPE_NAMES = ("all", *_STATE_SCOPES)
_QUERY_AXIS_HOOKS = ("hook_attn_scores", "hook_pattern")


def check_scope(positions: PositionScope) -> None:
    """Raise early (when a hook or cache is built) for a misspelled named scope."""
    if isinstance(positions, str) and positions not in SCOPE_NAMES:
        raise ValueError(f"Unknown position scope {positions!r}; use one of {SCOPE_NAMES}, an index tensor or a callable.")


def check_scope_fits(positions: PositionScope, n_pos: int, batch: int) -> None:
    """Raise before a run when an index list falls outside a canvas of `n_pos` positions or a bool
    mask is not [n_pos] / [batch n_pos]; named and callable scopes are checked elsewhere.

    Example:
        >>> check_scope_fits([0, 30], n_pos=22, batch=2)   # IndexError: ... outside a canvas of 22 positions.
    """
    if positions is None or isinstance(positions, str) or callable(positions):
        return
    selected = torch.as_tensor(positions)
    if selected.dtype == torch.bool:
        if tuple(selected.shape) not in ((n_pos,), (batch, n_pos)):
            raise ValueError(
                f"A bool position mask of shape {tuple(selected.shape)} does not fit a canvas of {batch} rows x "
                f"{n_pos} positions (expected [{n_pos}] or [{batch}, {n_pos}])."
            )
        return
    if selected.is_floating_point():
        raise TypeError(f"Position indices must be integers or bools, got {selected.dtype}.")
    _normalise_index(selected, n_pos)


def scope_mask(
    positions: PositionScope, state: Optional[DenoisingState], n_pos: int, device: torch.device
) -> Optional[Union[Bool[Tensor, "batch pos"], Bool[Tensor, " pos"]]]:
    """The positions a scope selects as a bool mask ([pos] or [batch pos]); None means all.

    Example:
        >>> scope_mask("response", hook.state, n_pos, act.device)   # [batch pos]
        >>> scope_mask([0, -1], None, 10, "cpu")                      # [pos]: first and last
    """
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None
    if isinstance(positions, str) or callable(positions):
        if state is None:
            what = repr(positions) if isinstance(positions, str) else "a callable of the state"
            raise ValueError(
                f"positions={what} needs a DenoisingState, which exists only during model.generate / "
                "run_with_cache(step=...); in a plain forward use an index tensor or a [batch pos] bool mask."
            )
        if isinstance(positions, str):
            check_scope(positions)
            return getattr(state, _STATE_SCOPES[positions])
        return scope_mask(positions(state), state, n_pos, device)
    selected = torch.as_tensor(positions, device=device)
    if selected.dtype == torch.bool:
        return selected
    if selected.is_floating_point():
        raise TypeError(f"Position indices must be integers or bools, got {selected.dtype}.")
    index = _normalise_index(selected, n_pos)
    mask = torch.zeros(n_pos, dtype=torch.bool, device=device)
    mask[index] = True
    return mask


def position_axis(hook, ndim: int) -> int:
    """The dim of an activation that indexes canvas positions (the query axis for attention maps).

    Example:
        >>> position_axis(model.blocks[0].attn.hook_pattern, 4), position_axis(model.blocks[0].hook_resid_post, 3)
        (2, 1)
    """
    pos_dim = getattr(hook, "pos_dim", None)
    if pos_dim is not None:
        return pos_dim % ndim
    name = hook.name or ""
    return ndim - 2 if name.endswith(_QUERY_AXIS_HOOKS) else 1


def rows_mask(
    mask: Optional[Tensor], state: Optional[DenoisingState], n_rows: int, n_pos: int, guidance: GuidanceRows = "both",
    device: Optional[torch.device] = None,
) -> Optional[Bool[Tensor, "rows pos"]]:
    """A scope mask expanded to the rows of the forward batch (and restricted to guidance rows); None = all.

    Example:
        >>> rows_mask(state.is_response, state, n_rows=2 * state.batch, n_pos=state.n_pos, guidance="conditional")
        >>> # under classifier-free guidance: response columns of the conditional rows only
    """
    if mask is not None:
        if mask.ndim == 1:
            mask = mask[None].expand(n_rows, n_pos)
        elif state is not None and mask.shape[0] * state.n_copies == n_rows:
            mask = state.rows(mask)
        elif mask.shape[0] != n_rows:
            raise ValueError(f"A [batch pos] position mask has {mask.shape[0]} rows; the activation has {n_rows}.")
    if guidance == "both" or state is None or not state.guidance:
        if guidance == "unconditional" and (state is None or not state.guidance):
            return torch.zeros(n_rows, n_pos, dtype=torch.bool, device=device)
        return mask
    keep = torch.zeros(n_rows, 1, dtype=torch.bool, device=device if mask is None else mask.device)
    if guidance == "conditional":
        keep[: state.batch] = True
    elif guidance == "unconditional":
        keep[state.batch :] = True
    else:
        raise ValueError(f"guidance={guidance!r} must be 'both', 'conditional' or 'unconditional'.")
    return keep.expand(n_rows, n_pos) if mask is None else mask & keep


def broadcast_mask(mask: Bool[Tensor, "rows pos"], act: Tensor, axis: int) -> Tensor:
    """View a [rows pos] mask so it broadcasts against `act` (rows on dim 0, positions on `axis`).

    Example:
        >>> broadcast_mask(mask, pattern, axis=2).shape   # [rows 1 q_pos 1] for [rows head q_pos k_pos]
    """
    if act.ndim < 2 or act.shape[0] != mask.shape[0] or act.shape[axis] != mask.shape[1]:
        raise ValueError(
            f"Cannot scope positions of an activation of shape {tuple(act.shape)} (position axis {axis}) "
            f"with a [rows pos] mask of shape {tuple(mask.shape)}; position scopes need [batch pos ...] "
            "activations (or attention maps [batch head q_pos k_pos], scoped on query positions)."
        )
    shape = [1] * act.ndim
    shape[0], shape[axis] = mask.shape
    return mask.view(shape)


def stored_positions(
    positions: PositionScope, response_start: int, n_pos: int
) -> Union[slice, Int[Tensor, " n_kept"]]:
    """The canvas columns a cache keeps for an *aligned* scope (the same columns in every row).

    "all", "prompt" (columns before `response_start`, pads included for shorter prompts),
    "last_prompt" and "response" are slices; index lists / tensors and [pos] bool masks become index tensors.
    Ragged scopes ("masked", a [batch pos] mask, a callable) have no common columns: use a
    streaming reducer, or cache "response" and select with the trajectory.

    Example:
        >>> stored_positions("response", 6, 22), stored_positions([0, -1], 6, 22)
        (slice(6, 22, None), tensor([ 0, 21]))
    """
    if positions is None or positions == "all":
        return slice(0, n_pos)
    if isinstance(positions, str):
        check_scope(positions)
        if positions == "response":
            return slice(response_start, n_pos)
        if positions == "prompt":
            return slice(0, response_start)
        if positions == "last_prompt":
            if response_start == 0:
                raise ValueError("positions='last_prompt' needs a prompt; this canvas has none (response_start 0).")
            return slice(response_start - 1, response_start)
        raise ValueError(
            f"positions={positions!r} selects different positions in each row and step, so it cannot be "
            "stored as a tensor; cache positions='response' and index it with out.trajectory, or use a "
            "streaming reducer (diffusion_lens.denoising.StreamingMean), which accepts any scope."
        )
    if callable(positions):
        raise ValueError("A callable position scope is per step and row; caches need fixed columns (use a reducer).")
    selected = torch.as_tensor(positions)
    if selected.dtype == torch.bool:
        if selected.ndim != 1:
            raise ValueError("A cache needs the same columns in every row: pass a [pos] bool mask or an index list.")
        return selected.nonzero().flatten()
    return _normalise_index(selected, n_pos)


def n_stored(index: Union[slice, Tensor], n_pos: int) -> int:
    return len(range(*index.indices(n_pos))) if isinstance(index, slice) else int(index.numel())


def index_tensor(index: Union[slice, Tensor], n_pos: int) -> Int[Tensor, " n_kept"]:
    return torch.arange(n_pos)[index] if isinstance(index, slice) else index.cpu()


def _normalise_index(index: Tensor, n_pos: int) -> Int[Tensor, " n"]:
    index = index.long().flatten()
    if index.numel() and (int(index.min()) < -n_pos or int(index.max()) >= n_pos):
        raise IndexError(f"Position indices {index.tolist()} are outside a canvas of {n_pos} positions.")
    return index % n_pos


__all__ = [
    "PositionScope", "SCOPE_NAMES", "check_scope", "check_scope_fits", "scope_mask", "position_axis", "rows_mask",
    "broadcast_mask", "stored_positions",
]
