"""Step-aware caching: `StepCache` (activations per denoising step), its exact size estimate and the
memory guard. Reducers that keep a running summary instead live in `denoising/reducers.py`.

Storage of a position subset in a padded batch: prompts are left-padded, so the response starts
at the same column (`response_start`) in every row and "response" is stored as the aligned
columns [response_start, pos). "prompt" stores columns [0, response_start), pads included for
shorter prompts (`out.attention_mask` tells which are real). Index lists store the same columns in
every row. Ragged scopes ("masked", per-row masks) cannot be a tensor: use a reducer. Attention
maps [batch head q_pos k_pos] keep the selected query positions and every key position.
`positions=` takes the canvas-column scopes of `diffusion_lens.denoising.positions`, as `H.at` does.
Under classifier-free guidance only the conditional rows are stored, unless
`include_unconditional=True` (then rows are [conditional; unconditional]).

Windowed and adaptive runs (a KV cache: `kv_cache="prefix" | "dual"`, DiffusionGemma's passes; an
adaptive commit rule): a step stores the columns its forward computed within the requested
positions, and `cache[step].positions` says which canvas columns those are; a step that never ran,
or whose forward computed none of the requested columns, is absent. `passes=` keeps the forwards of
some model passes only (`hook.state.pass_name`, e.g. DiffusionGemma's "encoder" / "decoder"). Steps
counting from the end are refused when the run's length is decided as it goes, and the size guard
then assumes every requested step runs and computes every requested column (an upper bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.core.activation_cache import DiffusionActivationCache
from diffusion_lens.core.components.moe import Expert
from diffusion_lens.core.results_io import load_result, save_result
from diffusion_lens.denoising.positions import (
    PositionScope,
    check_scope,
    index_tensor,
    n_stored,
    position_axis,
    stored_positions,
)

NamesSpec = Union[None, str, Sequence[str], Callable[[str], bool]]
StepsSpec = Union[None, int, Iterable[int]]
DEFAULT_MAX_CACHE_BYTES = 2 * 2**30  # 2 GiB


class CacheTooLargeError(ValueError):
    """A cache request whose predicted size exceeds `max_cache_bytes` (raised before any forward)."""

    def __init__(self, message: str, estimated_bytes: int, limit: int):
        super().__init__(message)
        self.estimated_bytes = estimated_bytes
        self.limit = limit


# ---------------------------------------------------------------------------------- requests
def resolve_steps(steps: StepsSpec, n_steps: int, *, exact: bool = True) -> list[int]:
    """Sorted unique steps (None = all); each must be in 0..n_steps-1 (negative counts from the end).
    `exact=False`: `n_steps` is an upper bound (an adaptive run), so a negative step is an error.

    Example:
        >>> resolve_steps([5, -1, 0], 8)
        [0, 5, 7]
        >>> resolve_steps([-1], 26, exact=False)   # ValueError: ... counts from the end ...
    """
    if steps is None:
        return list(range(n_steps))
    values = [steps] if isinstance(steps, int) else list(steps)
    if not values:
        raise ValueError(f"steps={steps!r} selects no step; pass None for all steps 0..{n_steps - 1}, an int or a list.")
    if not exact and any(int(s) < 0 for s in values):
        raise ValueError(
            f"steps={steps!r} counts from the end of the run, but this run's length is decided as it goes (an adaptive "
            f"rule; {n_steps} steps at most). Name steps from the start, 0..{n_steps - 1}."
        )
    bad = [s for s in values if not -n_steps <= int(s) < n_steps]
    if bad:
        raise ValueError(f"Steps {bad} are outside this run's steps 0..{n_steps - 1}.")
    return sorted({int(s) % n_steps for s in values})


_CACHE_OPTIONS = ("names", "steps", "positions", "device", "dtype", "include_unconditional", "passes")


@dataclass
class CacheRequest:
    """What to store: `generate(cache=dict(names=, steps=, positions=, device=, dtype=, include_unconditional=,
    passes=))`. `passes`: a model pass or a list of them (`cfg.layer_scalar_passes`; None = every forward).

    Example:
        >>> request = CacheRequest.build(model, dict(names="blocks.*.hook_resid_post", steps=[0, 5]), n_steps=8)
        >>> model.generate(tokens, cache=request, steps=8, gen_length=16, block_length=8).cache.steps  # [0, 5]
        >>> gemma.generate(prompt, cache=dict(names="blocks.1.hook_resid_post", passes="decoder"))  # decoder steps
    """

    names: list[str]
    steps: list[int]
    positions: PositionScope = "all"
    device: Optional[Union[str, torch.device]] = None
    dtype: Optional[torch.dtype] = None
    include_unconditional: bool = False
    passes: Optional[frozenset[str]] = None

    @classmethod
    def build(cls, model, spec: Union[dict, "CacheRequest"], n_steps: int, *, exact: bool = True) -> "CacheRequest":
        """The request resolved against a run of `n_steps` steps (`exact=False`: an upper bound)."""
        if isinstance(spec, CacheRequest):
            return spec
        spec = dict(spec)
        unknown = sorted(set(spec) - set(_CACHE_OPTIONS))
        if unknown:
            raise TypeError(f"Unknown cache option(s) {unknown}; use {', '.join(_CACHE_OPTIONS)}.")
        positions = spec.get("positions", "all")
        check_scope(positions)
        return cls(
            names=model.hook_names(spec.get("names")),
            steps=resolve_steps(spec.get("steps"), n_steps, exact=exact),
            positions=positions,
            device=spec.get("device"),
            dtype=spec.get("dtype"),
            include_unconditional=bool(spec.get("include_unconditional", False)),
            passes=resolve_passes(spec.get("passes"), model.cfg.layer_scalar_passes, "cache"),
        )


def resolve_passes(passes: Union[None, str, Sequence[str]], model_passes: Sequence[str], what: str
                   ) -> Optional[frozenset[str]]:
    """None (every forward), or `passes` as a frozenset of the model's passes (`cfg.layer_scalar_passes`).

    Example:
        >>> resolve_passes("decoder", ("encoder", "decoder"), "cache")
        frozenset({'decoder'})
        >>> resolve_passes("decoder", (), "cache")   # ValueError: ... this model runs one pass ...
    """
    if passes is None:
        return None
    names = [passes] if isinstance(passes, str) else list(passes)
    if not names or not all(isinstance(name, str) for name in names):
        raise TypeError(f"{what} passes= must be a pass name or a non-empty list of them (e.g. 'decoder'); got {passes!r}.")
    unknown = sorted(set(names) - set(model_passes))
    if unknown:
        runs = f"runs the passes {tuple(model_passes)}" if model_passes else "runs one pass (leave passes=None)"
        raise ValueError(f"{what} passes={names}: this model {runs}; {unknown} never run.")
    return frozenset(names)


# ------------------------------------------------------------------------------- size estimate
def activation_shape(model, name: str, rows: int, n_pos: int) -> Optional[tuple[tuple[int, ...], int, torch.dtype]]:
    """(shape, position axis, dtype) of the activation at hook point `name` for a [rows n_pos]
    forward, from the config and modules alone (head counts and dims per layer from the attention
    module); None when the hook does not fire (e.g. `attn.hook_result` while `use_attn_result` is
    off). Raises for data-dependent shapes."""
    cfg = model.cfg
    dtype = model.embed.weight.dtype
    parent, _, leaf = name.rpartition(".")
    module = model.mod_dict.get(parent) if parent else model
    d_model = (rows, n_pos, cfg.d_model)
    owner, _, norm = parent.rpartition(".")
    if norm in ("q_norm", "k_norm", "v_norm") and leaf in ("hook_scale", "hook_normalized"):  # per-head norms
        attn = model.mod_dict[owner]
        heads = attn.n_heads if norm == "q_norm" else attn.n_kv_heads
        return (rows, n_pos, heads, 1 if leaf == "hook_scale" else attn.d_head), 1, (
            torch.float32 if leaf == "hook_scale" else dtype)
    if leaf == "hook_scale":
        return (rows, n_pos, 1), 1, torch.float32
    if leaf in ("hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                "hook_mlp_out", "hook_normalized", "hook_shared_out", "hook_routed_out", "hook_in", "hook_dense_out",
                "hook_moe_out", "hook_unembed_in", "hook_soft_embed", "hook_signal"):
        return d_model, 1, dtype
    if leaf in ("hook_q", "hook_rot_q", "hook_z"):
        return (rows, n_pos, module.n_heads, module.d_head), 1, dtype
    if leaf in ("hook_k", "hook_v", "hook_rot_k"):
        return (rows, n_pos, module.n_kv_heads, module.d_head), 1, dtype
    if leaf == "hook_result":
        return ((rows, n_pos, module.n_heads, cfg.d_model), 1, dtype) if module.use_attn_result else None
    if leaf in ("hook_attn_scores", "hook_pattern"):
        return (rows, module.n_heads, n_pos, n_pos), 2, dtype
    if leaf in ("hook_pre", "hook_pre_linear", "hook_post") and hasattr(module, "up_proj") and not _is_expert(module):
        return (rows, n_pos, module.up_proj.out_features), 1, dtype
    if leaf in ("hook_router_logits", "hook_expert_weights") and cfg.n_experts:
        return (rows, n_pos, cfg.n_experts), 1, torch.float32 if cfg.router_fp32 else dtype
    if leaf == "hook_router_probs" and cfg.n_experts:
        return (rows, n_pos, cfg.n_experts), 1, torch.float32
    raise ValueError(
        f"Cannot predict the size of {name!r} from shapes alone (its token count depends on the data, "
        "e.g. a mixture-of-experts expert). Leave it out of the cache, or pass max_cache_bytes=None."
    )


def _is_expert(module) -> bool:
    """A routed expert: its hooks see only the tokens routed to it ([n_routed ...], data-dependent)."""
    return isinstance(module, Expert)


@dataclass
class CacheEstimate:
    """Predicted bytes of a cache request, per name for one step; `total` for all steps."""

    per_name: dict[str, int]
    n_steps: int
    rows: int
    n_kept: int
    dtype: torch.dtype = torch.float32  # the model's activation dtype
    n_response: int = 0  # generated positions (what positions="response" would keep)

    @property
    def per_step(self) -> int:
        return sum(self.per_name.values())

    @property
    def total(self) -> int:
        return self.per_step * self.n_steps


def estimate(model, request: CacheRequest, batch: int, n_pos: int, response_start: int, n_copies: int) -> CacheEstimate:
    """Exact bytes the request will store for a batch of `batch` prompts on an `n_pos` canvas when
    every requested step runs and computes every requested column; otherwise (a KV cache's windows,
    an adaptive run's early end, hooks that do not fire in some pass) an upper bound."""
    rows = batch * (n_copies if request.include_unconditional else 1)
    n_kept = n_stored(stored_positions(request.positions, response_start, n_pos), n_pos)
    per_name = {}
    for name in request.names:
        found = activation_shape(model, name, rows, n_pos)
        if found is None:
            per_name[name] = 0
            continue
        shape, axis, dtype = found
        shape = list(shape)
        shape[axis] = n_kept
        out_dtype = request.dtype if (request.dtype is not None and dtype.is_floating_point) else dtype
        per_name[name] = math.prod(shape) * _itemsize(out_dtype)
    return CacheEstimate(per_name, len(request.steps), rows, n_kept, model.embed.weight.dtype, n_pos - response_start)


def check_budget(found: CacheEstimate, request: CacheRequest, limit: Optional[int]) -> None:
    """Raise `CacheTooLargeError` with the predicted size and filters that would fit."""
    if limit is None or found.total <= limit:
        return
    hints = []
    per_step = found.per_step
    if per_step and limit // per_step >= 1:
        k = int(limit // per_step)
        hints.append(f"steps={_short(request.steps[:k])} ({k} of {len(request.steps)} steps, {_fmt(k * per_step)})")
    fitting, used = [], 0
    for name in request.names:
        cost = found.per_name[name] * found.n_steps
        if used + cost <= limit:
            fitting.append(name)
            used += cost
    if fitting:
        hints.append(f"names={_short(fitting)} ({len(fitting)} of {len(request.names)} names, {_fmt(used)})")
    if request.positions in (None, "all") and found.n_kept:
        response = found.total * found.n_response // found.n_kept
        if response <= limit:
            hints.append(f"positions='response' ({_fmt(response)})")
    current = request.dtype or found.dtype
    if _itemsize(current) > 2 and found.total * 2 // _itemsize(current) <= limit:
        hints.append(f"dtype=torch.float16 ({_fmt(found.total * 2 // _itemsize(current))})")
    fits = "; ".join(hints) if hints else "none of one name at one step (a single activation is larger than the limit)"
    message = (
        f"This cache request needs {_fmt(found.total)} ({len(request.names)} names x {found.n_steps} steps x "
        f"{found.rows} rows x {found.n_kept} positions), over max_cache_bytes={_fmt(limit)}. Nothing was run. "
        f"Filters that fit: {fits}. Or stream a mean with a reducer (StreamingMean), or raise/disable the "
        "guard with max_cache_bytes=<bytes> or max_cache_bytes=None."
    )
    raise CacheTooLargeError(message, found.total, limit)


# ---------------------------------------------------------------------------------- StepCache
class StepActivations(DiffusionActivationCache):
    """One cached step: a TransformerLens `ActivationCache` whose position axis holds the canvas
    columns `positions` [n_held] (under a KV cache or DiffusionGemma's passes, the requested columns
    this step's forward computed).

    Example:
        >>> acts = out.cache[3]
        >>> acts.positions, acts["blocks.0.hook_resid_post"].shape   # [n_held], [batch n_held d_model]
    """

    def __init__(self, cache_dict: dict[str, Tensor], model, positions: Int[Tensor, " n_held"]):
        super().__init__(cache_dict, model, has_batch_dim=True)
        self.positions = positions


class StepCache:
    """Activations of chosen hook points at chosen denoising steps.

    Why: compare how the residual stream evolves across steps without storing every step.
    `cache[step]` is a TransformerLens `ActivationCache` (`StepActivations`; its `positions` are the
    canvas columns it holds; a negative step counts from the end of the run, as everywhere:
    `cache[-1]` is the run's last step, `n_steps - 1`); `cache.steps` are the steps stored (those
    that ran); `cache.stack(name)` is [n_cached_steps batch pos ...]; `cache.positions` are the
    canvas columns requested; `cache.n_steps` is the number of steps of the run (None when unknown,
    e.g. an adaptive run).

    Example:
        >>> out = model.generate(tokens, cache=dict(names="blocks.*.hook_resid_post", steps=[0, 5]))
        >>> out.cache.steps, out.cache[5]["blocks.0.hook_resid_post"].shape
        >>> out.cache.stack("blocks.0.hook_resid_post").shape   # [2 batch pos d_model]
    """

    def __init__(self, model, steps: Sequence[int], names: Sequence[str], positions: Int[Tensor, " n_kept"],
                 store: Optional[dict[int, dict[str, Tensor]]] = None, n_steps: Optional[int] = None,
                 columns: Optional[dict[int, Tensor]] = None):
        self.model = model
        self.names = list(names)
        self.positions = positions
        self.store: dict[int, dict[str, Tensor]] = store if store is not None else {s: {} for s in steps}
        self.columns: dict[int, Tensor] = dict(columns or {})  # per step, when it holds other columns than `positions`
        self.n_steps = n_steps

    @property
    def steps(self) -> list[int]:
        return sorted(self.store)

    def positions_at(self, step: int) -> Int[Tensor, " n_held"]:
        """The canvas columns step `step` holds (`positions` unless its forward computed fewer)."""
        return self.columns.get(self._step(step), self.positions)

    def _step(self, step: int) -> int:
        """A step of the run: negative counts from the end of the run (needs `n_steps`)."""
        if step >= 0:
            return step
        if self.n_steps is None:
            raise KeyError(f"Step {step} counts from the end of the run, whose length this cache does not know; "
                           f"use one of the cached steps {self.steps}.")
        return step + self.n_steps

    def __getitem__(self, step: int) -> StepActivations:
        resolved = self._step(step)
        if resolved not in self.store:
            which = f"Step {step}" + (f" (= step {resolved} of this {self.n_steps}-step run)" if resolved != step else "")
            raise KeyError(f"{which} was not cached; cached steps: {self.steps}.")
        return StepActivations(self.store[resolved], self.model, self.positions_at(resolved))

    def __contains__(self, step: int) -> bool:
        return (step >= 0 or self.n_steps is not None) and self._step(step) in self.store

    def __len__(self) -> int:
        return len(self.store)

    def __iter__(self):
        return iter(self.steps)

    def items(self):
        return ((step, self[step]) for step in self.steps)

    def stack(self, name: str) -> Float[Tensor, "n_steps batch pos ..."]:
        """One hook point's activation at every cached step, stacked on a new leading axis (the
        steps must hold the same canvas columns)."""
        missing = [s for s in self.steps if name not in self.store[s]]
        if missing:
            raise KeyError(f"{name!r} is not in the cache at steps {missing}; cached names: {self.names}.")
        held = {tuple(self.positions_at(s).tolist()) for s in self.steps}
        if len(held) > 1:
            raise ValueError(f"The cached steps hold different canvas columns ({len(held)} sets: their forwards computed "
                             "different windows), so they do not stack; read cache[step] and cache[step].positions.")
        return torch.stack([self.store[s][name] for s in self.steps])

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> "StepCache":
        """A copy on `device` (floating tensors also cast to `dtype` if given)."""
        moved = {
            s: {n: t.to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else t.dtype) for n, t in d.items()}
            for s, d in self.store.items()
        }
        return StepCache(self.model, self.steps, self.names, self.positions, moved, self.n_steps, self.columns)

    def save(self, path):
        """Write every cached activation to the folder `path` (safetensors + JSON, no pickle; see
        `diffusion_lens.core.results_io`), so a long run's cache outlives the session. The model is not saved.

        Example:
            >>> out.cache.save("runs/cache")
            >>> cache = StepCache.load("runs/cache", model)
        """
        tensors = {f"store.{step}.{name}": t for step, acts in self.store.items() for name, t in acts.items()}
        tensors["positions"] = torch.as_tensor(self.positions)
        tensors.update({f"columns.{step}": held for step, held in self.columns.items()})
        meta = {"steps": self.steps, "names": self.names, "n_steps": self.n_steps,
                "stored": {str(step): list(acts) for step, acts in self.store.items()}}
        return save_result(path, "StepCache", tensors, meta)

    @classmethod
    def load(cls, path, model=None) -> "StepCache":
        """Read a cache written by `StepCache.save` (tensors on the CPU; `.to(device)` moves them).
        Pass the `model` for the ActivationCache analysis methods that read its weights / config.

        Example:
            >>> cache = StepCache.load("runs/cache", model)
            >>> cache[5].accumulated_resid(apply_ln=True).shape
        """
        tensors, meta = load_result(path, "StepCache")
        store = {int(step): {name: tensors[f"store.{step}.{name}"] for name in names}
                 for step, names in meta["stored"].items()}
        columns = {int(step): tensors[f"columns.{step}"] for step in meta["stored"] if f"columns.{step}" in tensors}
        return cls(model, meta["steps"], meta["names"], tensors["positions"], store, meta["n_steps"], columns)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.store.values() for t in d.values())

    def __repr__(self) -> str:
        return f"StepCache(steps={_short(self.steps)}, {len(self.names)} names, {len(self.positions)} positions, {_fmt(self.nbytes)})"


class StepRecorder:
    """Fills a `StepCache` during a run: hooks that copy the requested rows and columns (internal).
    Steps are stored as they run; a windowed forward stores the requested columns it computed."""

    def __init__(self, model, request: CacheRequest, response_start: int, n_pos: int, batch: int, n_copies: int = 1,
                 n_steps: Optional[int] = None):
        self.request = request
        self.index = stored_positions(request.positions, response_start, n_pos)
        self.batch = batch
        # MoE expert hooks hold [n_routed ...] rows (no batch or position axis): stored whole, so
        # only when every position and every forward row is requested.
        self.routed = {n for n in request.names if _is_expert(model.mod_dict.get(n.rpartition(".")[0]))}
        if self.routed and (n_stored(self.index, n_pos) != n_pos or (n_copies > 1 and not request.include_unconditional)):
            raise ValueError(
                f"{sorted(self.routed)[0]!r} holds only the tokens routed to that expert ([n_routed ...]), so it "
                "can be cached only whole: positions='all' (and include_unconditional=True under classifier-free guidance)."
            )
        self.wanted = set(request.steps)
        requested = index_tensor(self.index, n_pos)
        self.cache = StepCache(model, (), request.names, requested, store={}, n_steps=n_steps)
        self.hook_pairs = [(name, self.save) for name in request.names]

    def wants(self, state) -> bool:
        return state.step in self.wanted and (self.request.passes is None or state.pass_name in self.request.passes)

    def check_run(self, model, n_steps: int, exact: bool = True) -> None:
        """Nothing to check: the request was resolved against the run when it was built."""

    def result(self) -> StepCache:
        """The filled cache; an error when no forward of the run stored anything (the request matched nothing)."""
        if not self.cache.store:
            request = self.request
            raise ValueError(
                f"cache= stored nothing: no forward of this run computed the requested positions "
                f"{request.positions!r} at steps {_short(request.steps)}"
                + (f" in passes {sorted(request.passes)}" if request.passes is not None else "")
                + ". Check the steps the run reaches (out.n_forwards), the passes and which columns each step "
                "computes (hook.state.computed)."
            )
        return self.cache

    def _held(self, state) -> Optional[Int[Tensor, " n_held"]]:
        """The requested canvas columns this windowed forward computed (None: a full forward, all of them)."""
        if state.window is None:
            return None
        start, stop = state.window
        requested = self.cache.positions
        return requested[(requested >= start) & (requested < stop)]

    def save(self, act: Tensor, hook) -> None:
        state = hook.state
        held = self._held(state)
        if held is not None and held.numel() == 0:
            return  # this forward computed none of the requested columns
        if hook.name in self.routed:
            pass  # [n_routed ...]: whole (see __init__)
        elif state.guidance and not self.request.include_unconditional:
            act = act[: self.batch]
        axis = position_axis(hook, act.ndim)
        if hook.name in self.routed:
            pass
        elif held is not None:
            if held.numel() != act.shape[axis]:
                act = act.index_select(axis, (held - state.window[0]).to(act.device))
        elif isinstance(self.index, slice):
            if self.index != slice(0, act.shape[axis]):
                act = act.narrow(axis, self.index.start, self.index.stop - self.index.start)
        else:
            act = act.index_select(axis, self.index.to(act.device))
        dtype = self.request.dtype if (self.request.dtype is not None and act.is_floating_point()) else act.dtype
        if held is not None and not torch.equal(held, self.cache.positions):
            self.cache.columns[state.step] = held
        self.cache.store.setdefault(state.step, {})[hook.name] = act.detach().to(
            device=self.request.device or act.device, dtype=dtype, copy=True
        )


# ---------------------------------------------------------------------------------- reducers


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _short(values: Sequence) -> str:
    values = list(values)
    if len(values) <= 6:
        return repr(values)
    return f"[{', '.join(map(repr, values[:3]))}, ..., {', '.join(map(repr, values[-2:]))}]"


__all__ = [
    "StepActivations", "StepCache", "CacheRequest", "CacheEstimate", "CacheTooLargeError",
    "DEFAULT_MAX_CACHE_BYTES", "activation_shape", "estimate", "check_budget", "resolve_passes", "resolve_steps",
]
