"""Reducers: observers of a `generate` run that keep a running summary instead of every activation.

`StreamingMean` holds float64 sums whose memory does not grow with the number of prompts, so a
difference of means over thousands of prompts costs one [d_model] vector per site. Pass reducers
to `generate(..., reducers=[...])`; like the step cache, each installs its hooks only at the
steps (and model passes) it asks for. A windowed forward (a KV cache, DiffusionGemma's passes)
adds the scoped columns it computed; an adaptive run adds the steps it runs.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.core.hook_lists import name_filter
from diffusion_lens.denoising.cache import StepsSpec, resolve_passes, resolve_steps
from diffusion_lens.denoising.positions import PositionScope, check_scope, position_axis, scope_mask, stored_positions


class StreamingMean:
    """Running float64 means of activations over prompts, positions and (chosen) steps.

    Why: difference-of-means directions over thousands of prompts need memory independent of
    the number of prompts: only a sum and a count per (name, step) are kept.
    `positions`: any scope (see `diffusion_lens.denoising.positions`), pads always excluded.
    `per_position=False` pools every selected (row, position) into one mean [*features];
    `per_position=True` keeps the stored columns (aligned scopes only) -> [n_kept *features].
    `steps`: None (every step), an int or a list (negative = from the end of the run); `by_step=True`
    keeps one mean per step. `passes`: a model pass or a list of them (`hook.pass_name`, e.g.
    DiffusionGemma's "decoder"; None = every forward). Names (globs allowed), steps and passes are
    checked against each run before its first forward (steps counting from the end are refused in
    an adaptive run). A forward that computes only a window of the canvas adds the scoped columns
    it computed (`count` says how many vectors each mean has).
    Use it as `model.generate(..., reducers=[r])`, or in a plain forward via
    `model.run_with_hooks(tokens, fwd_hooks=r.hooks(mask=valid))`.

    Example:
        >>> r = StreamingMean("blocks.*.hook_resid_post", positions="response", steps=0)
        >>> for batch in prompts: model.generate(batch, reducers=[r], steps=..., progress=False)
        >>> r.mean("blocks.3.hook_resid_post").shape, r.count("blocks.3.hook_resid_post")  # [d_model] float64
        >>> dec = StreamingMean("blocks.1.hook_resid_post", positions="response", passes="decoder")
        >>> gemma.generate(prompt, reducers=[dec], max_new_tokens=32)   # every decoder step's canvas
    """

    def __init__(self, names: Union[str, Sequence[str]], *, positions: PositionScope = "response",
                 steps: StepsSpec = None, per_position: bool = False, by_step: bool = False,
                 include_unconditional: bool = False, passes: Union[None, str, Sequence[str]] = None):
        check_scope(positions)
        self.names = [names] if isinstance(names, str) else list(names)
        self.positions = positions
        self.steps = None if steps is None else frozenset([steps] if isinstance(steps, int) else steps)
        self.passes = None if passes is None else frozenset([passes] if isinstance(passes, str) else passes)
        self.per_position = per_position
        self.by_step = by_step
        self.include_unconditional = include_unconditional
        self._sums: dict[tuple[str, Optional[int]], Tensor] = {}
        self._counts: dict[tuple[str, Optional[int]], Union[int, Tensor]] = {}
        self._mask: Optional[Tensor] = None
        self._device = None
        self.hook_pairs = [(name_filter(n), self._update) for n in self.names]

    # -- partial means (another process's share of the prompts)
    def running_sums(self, name: str, step: Optional[int] = None) -> tuple[Optional[Tensor], Union[int, Tensor, None]]:
        """The float64 running sum and the count of `name` (of `step` when `by_step`), None before any
        update: what merging means accumulated over different prompts needs (sum the sums and counts).

        Example:
            >>> total, count = reducer.running_sums("blocks.0.hook_resid_post")
        """
        return self._sums.get((name, step)), self._counts.get((name, step))

    def set_running_sums(self, name: str, total: Tensor, count: Union[int, Tensor], step: Optional[int] = None) -> None:
        """Replace the running sum and count of `name`, e.g. by their sums over processes.

        Example:
            >>> reducer.set_running_sums(name, all_reduce_float64(total), int(all_reduce_float64(count)))
        """
        self._sums[(name, step)], self._counts[(name, step)] = total, count

    # -- hooks
    def wants(self, state) -> bool:
        if self.passes is not None and state.pass_name not in self.passes:
            return False
        return self.steps is None or state.step in self.steps or state.step - state.n_steps in self.steps

    def check_run(self, model, n_steps: int, exact: bool = True) -> None:
        """Raise before the run for a name that selects no hook point, a step outside 0..n_steps-1
        (`exact=False`: `n_steps` is an upper bound, and negative steps are refused) or a pass the
        model does not run."""
        model.hook_names(self.names)
        resolve_passes(self.passes, model.cfg.layer_scalar_passes, "StreamingMean")
        if self.steps is not None:
            resolve_steps(self.steps, n_steps, exact=exact)

    def hooks(self, mask: Optional[Tensor] = None) -> list[tuple]:
        """(name, fn) pairs for `run_with_hooks` / `model.hooks`; `mask` [batch pos] marks the real
        tokens of a plain forward (pads 0), which no state describes there."""
        self._mask = mask
        return list(self.hook_pairs)

    def _update(self, act: Tensor, hook) -> None:
        state = getattr(hook, "state", None)
        if state is not None and not self.wants(state):
            return
        if state is None and self.passes is not None and getattr(hook, "pass_name", None) not in self.passes:
            return
        if state is not None and state.guidance and not self.include_unconditional:
            act = act[: state.batch]
        axis = position_axis(hook, act.ndim)
        n_rows = act.shape[0]
        n_pos = act.shape[axis] if state is None else state.n_pos  # canvas columns; a windowed forward computes fewer
        computed = slice(0, n_pos) if state is None else state.computed
        valid = self._valid(state, n_rows, n_pos, act.device)[:, computed]
        acts = act.movedim(axis, 1)  # [rows computed_pos *features]
        key = (hook.name, state.step if (self.by_step and state is not None) else None)
        if self.per_position:
            columns = self._columns(state, n_pos)  # [n_kept] canvas columns
            inside = (columns >= computed.start) & (columns < computed.stop)
            local = columns[inside] - computed.start
            picked, valid = acts[:, local], valid[:, local]
            total = acts.new_zeros((columns.numel(), *acts.shape[2:]), dtype=torch.float64)
            total[inside] = (picked.double() * valid.view(*valid.shape, *[1] * (picked.ndim - 2))).sum(0)
            count: Union[int, Tensor] = torch.zeros(columns.numel(), dtype=torch.long)
            count[inside.cpu()] = valid.sum(0).cpu()
        else:
            selected = acts[valid]
            total = selected.double().sum(0)
            count = int(selected.shape[0])
        if key in self._sums:
            self._sums[key] += total
            self._counts[key] = self._counts[key] + count
        else:
            self._sums[key], self._counts[key] = total, count

    def _columns(self, state, n_pos: int) -> Int[Tensor, " n_kept"]:
        """The canvas columns a per-position mean keeps (on the activations' device)."""
        if state is None and self.positions in ("prompt", "response"):
            raise ValueError(
                f"positions={self.positions!r} needs a DenoisingState; in a plain forward pass an index list."
            )
        index = stored_positions(self.positions, state.response_start if state is not None else 0, n_pos)
        return torch.arange(n_pos, device=self._device)[index] if isinstance(index, slice) else index.to(self._device)

    def _valid(self, state, n_rows: int, n_pos: int, device) -> Tensor:
        """[rows pos] bool: in the scope (pooled mode) and not a pad."""
        self._device = device
        valid = torch.ones(n_rows, n_pos, dtype=torch.bool, device=device)
        if not self.per_position:  # per_position selects its columns afterwards
            scope = scope_mask(self.positions, state, n_pos, device)
            if scope is not None:
                valid &= scope if scope.ndim == 1 else _tile(scope, n_rows)
        real = self._mask if state is None else state.attention_mask
        if real is not None:
            valid &= _tile(real.to(device).bool(), n_rows)
        return valid

    # -- results
    def _key(self, name: str, step: Optional[int]) -> tuple[str, Optional[int]]:
        key = (name, step if self.by_step else None)
        if key not in self._sums:
            seen = sorted({n for n, _ in self._sums})
            raise KeyError(f"Nothing accumulated for {key}; names seen: {seen}, steps: {self.steps_seen}.")
        return key

    def sum(self, name: str, step: Optional[int] = None) -> Float[Tensor, "*features"]:
        """The float64 running sum (by_step=True: pass the step)."""
        return self._sums[self._key(name, step)]

    def count(self, name: str, step: Optional[int] = None) -> Union[int, Int[Tensor, " n_kept"]]:
        """Vectors summed: an int (pooled) or per stored column (per_position=True)."""
        return self._counts[self._key(name, step)]

    def mean(self, name: str, step: Optional[int] = None) -> Float[Tensor, "*features"]:
        """Sum / count in float64: [*features], or [n_kept *features] with per_position=True."""
        key = self._key(name, step)
        count = self._counts[key]
        if isinstance(count, Tensor):
            count = count.to(self._sums[key].device).double().view(-1, *[1] * (self._sums[key].ndim - 1))
        return self._sums[key] / count

    @property
    def steps_seen(self) -> list[Optional[int]]:
        return sorted({s for _, s in self._sums}, key=lambda s: -1 if s is None else s)

    @property
    def accumulated_names(self) -> list[str]:
        return list(dict.fromkeys(n for n, _ in self._sums))

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()


# ---------------------------------------------------------------------------------- helpers


def _tile(mask: Tensor, n_rows: int) -> Tensor:
    """Repeat a [batch pos] mask over the classifier-free guidance copies to `n_rows` rows."""
    return mask if mask.shape[0] == n_rows else mask.repeat(n_rows // mask.shape[0], 1)
