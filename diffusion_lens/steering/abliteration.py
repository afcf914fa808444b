"""Abliteration as a parametrised weight edit (heretic's parameter families, re-implemented): what one
trial of an automatic search applies, measures, and undoes.

A trial is an `AbliterationEdit`: a direction per layer (one global direction repeated, or each layer's
own; `interpolate_direction` reads a float layer index), or a k-dim subspace per layer (k orthonormal
rows, e.g. a `learn_subspace` basis at every layer), and per-component ablation weights over depth
(`AblationKernel`). The writer of component c in block l (`writer_sites`: attention output, dense MLP
down, every routed expert, the shared expert) loses w = kernel_c.weights(n_layers)[l] of its output
along that layer's span: y <- y - w (y Q^T) Q, with Q = `writer_basis(writer, R_l)` (R times the
norm weights after the writer, where such norms sit, orthonormalised). The embedding rows and a
self-conditioning MLP take one scalar weight each and layer 0's direction (they write before block 0).

`norm_preserving=True` then rescales each output feature back to its old norm: y <- (y A) * s with
s_i = |W_i| / |(A W)_i| over the rows i of an nn.Linear weight [d_out d_in] (each fused expert slice
its own s), over the columns of the embedding [vocab d_model]; s_i = 1 where (A W)_i = 0. It stays
an affine edit of the writer's output, so it has an exact runtime twin wherever that output has a
hook of its own.

`apply` edits in place after snapshotting only the touched tensors (once per storage: a tensor tied
between modules is edited once), and `handle.restore()` puts them back bitwise. `hooks` is the runtime
twin: the same `SiteEdit` at each writer's hook (tested equal to the edited weights).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffusion_lens.core.components.writers import ResidualWriter, Writer
from diffusion_lens.steering._common import Hook, orthonormal_rows
from diffusion_lens.steering.edits import EditHook, SiteEdit, _check_materialised, fold_producer, fold_rows
from diffusion_lens.steering.weights import writer_basis, writer_sites

#: Components written before block 0 (one scalar weight each) and inside blocks (one kernel each).
MODEL_COMPONENTS = ("embedding", "self_conditioning")
BLOCK_COMPONENTS = ("attention", "mlp", "experts", "shared_expert")
_Row = tuple[str, str, Writer, Union[SiteEdit, list]]  # (weight name, component kind, weight, its edit)


@dataclass(frozen=True)
class AblationKernel:
    """Ablation weight over depth: `max_weight` at layer `max_weight_position` (a float), falling
    linearly to `min_weight` at `min_weight_distance` layers away, 0 beyond.

    Example:
        >>> AblationKernel(1.0, 2.0, 0.5, 2.0).weights(6)
        [0.5, 0.75, 1.0, 0.75, 0.5, 0.0]
    """

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def __post_init__(self):
        for name in ("max_weight", "max_weight_position", "min_weight", "min_weight_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"AblationKernel.{name} must be a finite number; got {value!r}.")
        if not 0 <= self.min_weight <= self.max_weight:
            raise ValueError(f"AblationKernel needs 0 <= min_weight <= max_weight; got min_weight={self.min_weight}, "
                             f"max_weight={self.max_weight}.")
        if self.min_weight_distance <= 0:
            raise ValueError(f"AblationKernel.min_weight_distance must be > 0 layers; got {self.min_weight_distance}.")

    def weights(self, n_layers: int) -> list[float]:
        """The ablation weight of each of `n_layers` layers."""
        if not 0 <= self.max_weight_position <= n_layers - 1:
            raise ValueError(f"AblationKernel.max_weight_position={self.max_weight_position} is outside the model's "
                             f"layers [0, {n_layers - 1}].")
        out = []
        for layer in range(n_layers):
            distance = abs(layer - self.max_weight_position)
            fall = distance / self.min_weight_distance
            out.append(0.0 if fall > 1 else self.max_weight + (self.min_weight - self.max_weight) * fall)
        return out


def interpolate_direction(directions: Float[Tensor, "n_layers d_model"], index: float) -> Float[Tensor, " d_model"]:
    """The unit direction at a float layer index: (1 - f) d[i] + f d[i + 1], i = floor(index), renormalised.

    Example:
        >>> interpolate_direction(dirs, 2.3)    # ~ unit(0.7 * dirs[2] + 0.3 * dirs[3])
    """
    if directions.ndim != 2:
        raise ValueError(f"directions must be [n_layers d_model]; got shape {tuple(directions.shape)}.")
    if not 0 <= index <= directions.shape[0] - 1:
        raise ValueError(f"direction index {index} is outside [0, {directions.shape[0] - 1}] (one row per layer).")
    low = min(int(math.floor(index)), directions.shape[0] - 2) if directions.shape[0] > 1 else 0
    frac = index - low
    mixed = directions[low].double() * (1 - frac) + (directions[low + 1].double() * frac if frac else 0)
    norm = mixed.norm()
    if not norm > 0:
        raise ValueError(f"The directions at layers {low} and {low + 1} cancel at index {index}; no direction.")
    return (mixed / norm).to(directions.dtype)


@dataclass
class AbliterationHandle:
    """The snapshot of an applied edit: `restore()` writes the touched tensors back bitwise.

    Example:
        >>> handle = edit.apply(model); ...; handle.restore()
    """

    snapshot: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (live tensor, clone)
    restored: bool = False

    @property
    def names(self) -> list[str]:
        """The edited parameters (a tied tensor under the first name it was found by)."""
        return list(self.snapshot)

    @torch.no_grad()
    def restore(self) -> None:
        if self.restored:
            raise RuntimeError("This abliteration was already restored; apply the edit again to get a new handle.")
        for live, saved in self.snapshot.values():
            live.copy_(saved)
        self.restored = True


@dataclass
class AbliterationEdit:
    """One abliteration: per-layer unit directions [n_layers d_model] (or per-layer subspaces
    [n_layers k d_model], each layer's rows orthonormalised) and a weight per component.

    `weights` maps a component kind to its weight: an `AblationKernel` for block components
    ("attention", "mlp", "experts", "shared_expert"), a float for "embedding" and
    "self_conditioning". A kind the model lacks is an error; a model component without an entry is
    not edited. Use `from_directions` for global (index) vs per-layer scope.

    Example:
        >>> edit = AbliterationEdit.from_directions(dirs, {"attention": k1, "experts": k2}, index=3.4)
        >>> with edit.applied(model):
        ...     logits = model(tokens)              # == model.run_with_hooks(tokens, fwd_hooks=edit.hooks(model))
    """

    directions: Union[Float[Tensor, "n_layers d_model"], Float[Tensor, "n_layers k d_model"]]
    weights: dict[str, Union[AblationKernel, float]]
    norm_preserving: bool = False

    def __post_init__(self):
        if self.directions.ndim not in (2, 3) or 0 in self.directions.shape:
            raise ValueError("directions must be [n_layers d_model] (a direction per layer) or [n_layers k d_model] "
                             f"(a k-dim subspace per layer); got shape {tuple(self.directions.shape)}.")
        for kind, weight in self.weights.items():
            if kind in BLOCK_COMPONENTS and not isinstance(weight, AblationKernel):
                raise TypeError(f"The weight of {kind!r} must be an AblationKernel; got {weight!r}.")
            if kind in MODEL_COMPONENTS and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                             or not math.isfinite(weight) or weight < 0):
                raise TypeError(f"The weight of {kind!r} must be a finite number >= 0; got {weight!r}.")
            if kind not in BLOCK_COMPONENTS + MODEL_COMPONENTS:
                raise ValueError(f"Unknown component {kind!r}; expected some of {MODEL_COMPONENTS + BLOCK_COMPONENTS}.")
        if self.directions.ndim == 3:
            self.directions = torch.stack([orthonormal_rows(rows, name=f"layer {layer}'s subspace")
                                           for layer, rows in enumerate(self.directions)]).to(self.directions.dtype)
            return
        norms = self.directions.double().norm(dim=1, keepdim=True)
        if not bool((norms > 0).all()):
            raise ValueError("Every layer's direction must be nonzero.")
        self.directions = (self.directions.double() / norms).to(self.directions.dtype)

    @classmethod
    def from_directions(cls, directions: Union[Float[Tensor, "n_layers d_model"], Float[Tensor, "n_layers k d_model"]],
                        weights: dict, *,
                        index: Optional[float] = None, norm_preserving: bool = False) -> "AbliterationEdit":
        """Global scope (`index` a float: `interpolate_direction(directions, index)` at every layer) or
        per-layer scope (`index=None`: layer l uses directions[l]). Subspaces [n_layers k d_model]
        have no interpolation: only per-layer scope.

        Example:
            >>> AbliterationEdit.from_directions(dirs, {"mlp": kernel}, index=2.5)     # global
        """
        if index is not None and directions.ndim == 3:
            raise ValueError(f"index={index} interpolates between layers' directions; subspaces [n_layers k d_model] "
                             "are used per layer: pass index=None (or the same basis at every layer).")
        if index is not None:
            directions = interpolate_direction(directions, index).expand_as(directions).clone()
        return cls(directions, dict(weights), norm_preserving)

    # ------------------------------------------------------------------ the plan: writer -> per-weight edits
    def _plan(self, model) -> list[tuple[ResidualWriter, list[_Row]]]:
        """Each edited writer with its (name, kind, weight, edit) rows; a fused tensor's edit is a list
        (one per slice). Checks the directions' shape and that every configured component exists."""
        n_layers = model.cfg.n_layers
        if self.directions.shape[0] != n_layers or self.directions.shape[-1] != model.cfg.d_model:
            raise ValueError(f"directions has shape {tuple(self.directions.shape)}; this model needs one row per "
                             f"layer: ({n_layers}, {model.cfg.d_model}) or ({n_layers}, k, {model.cfg.d_model}).")
        kernels = {kind: w.weights(n_layers) for kind, w in self.weights.items() if isinstance(w, AblationKernel)}
        plan, found = [], set()
        for writer in writer_sites(model):
            first = writer.weights[0][0].split(".")
            layer = int(first[1]) if first[0] == "blocks" else None  # None: written before block 0
            basis = self.directions[layer or 0].double()
            q = writer_basis(writer, basis[None] if basis.ndim == 1 else basis)
            rows = []
            for name, weight in writer.weights:
                kind = component_kind(name, weight)
                found.add(kind)
                if kind not in self.weights:
                    continue
                strength = float(self.weights[kind] if layer is None else kernels[kind][layer])
                if strength:
                    rows.append((name, kind, weight, self._edit(weight, q, strength)))
            if rows:
                plan.append((writer, rows))
        missing = sorted(set(self.weights) - found)
        if missing:
            raise ValueError(f"Component(s) {missing} configured, but this model has only {sorted(found)}; "
                             "remove them from the weights.")
        return plan

    def _edit(self, weight: Writer, q: Tensor, strength: float) -> Union[SiteEdit, list]:
        edit = SiteEdit.projection(q).at_strength(strength)
        if not self.norm_preserving:
            return edit
        if isinstance(weight, nn.Parameter):
            return [_norm_kept(edit, piece.detach().double(), rows=True) for piece in weight]
        if isinstance(weight, nn.Embedding):
            return _norm_kept(edit, weight.weight.detach().double(), rows=False)
        return _norm_kept(edit, weight.weight.detach().double(), rows=True)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def apply(self, model) -> AbliterationHandle:
        """Fold the edit into the model's weights in place; the handle restores them bitwise.

        Only the touched tensors are snapshotted, once per storage (a tied tensor is edited once).

        Example:
            >>> handle = edit.apply(model); refusals = judge(model.generate(prompts)); handle.restore()
        """
        plan = self._plan(model)
        handle, edits = AbliterationHandle(), []
        seen: dict[tuple, Union[SiteEdit, list]] = {}
        for _, rows in plan:
            for name, _, weight, edit in rows:
                tensors = _tensors(name, weight)
                for tensor_name, tensor in tensors:
                    _check_materialised(tensor, tensor_name)
                key = _storage_key(tensors[0][1])
                if key in seen:
                    if not _same_edit(seen[key], edit):
                        raise ValueError(f"{name} shares its storage with another writer that gets a different edit; "
                                         "give the layers and components that share it the same weight and direction.")
                    continue
                seen[key] = edit
                handle.snapshot.update((n, (t, t.detach().clone())) for n, t in tensors)
                edits.append((name, weight, edit))
        try:
            for name, weight, edit in edits:
                _fold(weight, edit, name)
        except BaseException:
            handle.restore()
            raise
        return handle

    @contextlib.contextmanager
    def applied(self, model) -> Iterator[AbliterationHandle]:
        """`apply` for the duration of a with-block; restored on exit, also after an exception.

        Example:
            >>> with edit.applied(model):
            ...     out = model.generate(prompt)
        """
        handle = self.apply(model)
        try:
            yield handle
        finally:
            handle.restore()

    # ------------------------------------------------------------------ runtime twin
    def hooks(self, model) -> list[Hook]:
        """The runtime twin of `apply`: each writer's `SiteEdit` at its hook (the embedding's at
        `blocks.0.hook_resid_pre`, or where its rows are read; transposed at a tied `hook_unembed_in`).
        A writer whose weights get different edits (norm-preserving experts, routed vs shared expert
        kernels) is hooked weight by weight at hooks carrying one weight's output; where none exists
        (a fused expert tensor) there is no exact twin and this raises. Call on the unedited model.

        Example:
            >>> model.run_with_hooks(tokens, fwd_hooks=edit.hooks(model))   # == logits with edit.applied(model)
        """
        out = []
        for writer, rows in self._plan(model):
            _, kind, _, edit = rows[0]
            shared = len(rows) == len(writer.weights) and all(_same_edit(edit, row[3]) for row in rows)
            if kind == "embedding":  # rows e -> e M; a tied LM head reads h . (e M) = (h M^T) . e
                reads = [h for h in writer.hooks if h != "hook_unembed_in"] or ["blocks.0.hook_resid_pre"]
                out += [(hook, EditHook(edit, "abliteration")) for hook in reads]
                if "hook_unembed_in" in writer.hooks:
                    transposed = SiteEdit(edit.shape, edit.omega, edit.beta, u=edit.v, v=edit.u)
                    out.append(("hook_unembed_in", EditHook(transposed, "abliteration (tied LM head)")))
            elif shared and not isinstance(edit, list):
                out += [(hook, EditHook(edit, "abliteration")) for hook in writer.hooks]
            else:
                out += [(_own_hook(model, name, kind, e), EditHook(e, "abliteration")) for name, kind, _, e in rows]
        model.check_hook_names([name for name, _ in out])
        return out


def model_components(model) -> list[str]:
    """The component kinds the model's residual writers belong to, in `writer_sites` order.

    Example:
        >>> model_components(tiny_moe)      # ['embedding', 'attention', 'experts']
    """
    kinds: list[str] = []
    for writer in writer_sites(model):
        for name, weight in writer.weights:
            kind = component_kind(name, weight)
            if kind not in kinds:
                kinds.append(kind)
    return kinds


def component_kind(name: str, weight: Writer) -> str:
    """The component a writer weight belongs to, from its module path (`writer_sites` names): the
    embedding, the self-conditioning MLP, attention, routed experts (modules under `experts`, or a
    fused expert tensor), the shared expert, else the dense MLP.

    Example:
        >>> component_kind("blocks.0.mlp.experts.3.down_proj", expert)    # 'experts'
    """
    parts = name.split(".")
    if isinstance(weight, nn.Embedding):
        return "embedding"
    if parts[0] == "self_conditioning":
        return "self_conditioning"
    if "attn" in parts:
        return "attention"
    if "shared_expert" in parts:
        return "shared_expert"
    return "experts" if "experts" in parts else "mlp"


def _norm_kept(edit: SiteEdit, w64: Tensor, *, rows: bool) -> SiteEdit:
    """The edit followed by the per-feature scale s that keeps each output feature's norm (rows of a
    producer [d_out d_in], columns of an embedding [vocab d_model]): T(y) = (y A) * s."""
    new = edit.left(w64) if rows else edit.linear(w64)
    before, after = (w64.norm(dim=1), new.norm(dim=1)) if rows else (w64.norm(dim=0), new.norm(dim=0))
    s = torch.where(after > 0, before / after.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(after))
    return SiteEdit(edit.shape, omega=s, u=edit.u * s[:, None], v=edit.v)


def _tensors(name: str, weight: Writer) -> list[tuple[str, Tensor]]:
    if isinstance(weight, nn.Parameter):
        return [(name, weight)]
    out = [(f"{name}.weight", weight.weight)]
    return out + ([(f"{name}.bias", weight.bias)] if getattr(weight, "bias", None) is not None else [])


def _storage_key(t: Tensor) -> tuple:
    """One tensor's identity by memory: its storage and its view of it (tied modules share all of it)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _same_edit(a, b) -> bool:
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_same_edit, a, b))
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in ((a.omega, b.omega), (a.u, b.u), (a.v, b.v), (a.beta, b.beta)))


@torch.no_grad()
def _fold(weight: Writer, edit: Union[SiteEdit, list], name: str) -> None:
    if isinstance(weight, nn.Embedding):
        fold_rows(weight, edit, f"{name}.weight")
    elif isinstance(weight, nn.Linear):
        fold_producer(weight, edit, name)
    elif isinstance(weight, nn.Parameter) and weight.ndim == 3:
        for piece, piece_edit in zip(weight, edit if isinstance(edit, list) else [edit] * len(weight)):
            piece_edit = piece_edit.to(weight.device, torch.float64)
            piece.copy_(piece_edit.left(piece.double()).to(weight.dtype))
    else:
        raise TypeError(f"{name}: cannot fold into a {type(weight).__name__} of shape {tuple(weight.shape)}; expected "
                        "an nn.Embedding, an nn.Linear or a fused nn.Parameter [n d_out d_in].")


def _own_hook(model, name: str, kind: str, edit) -> str:
    """The hook carrying one weight's output alone: a routed expert's `hook_out`, the shared expert's
    `hook_shared_out`; an error where the model has none (no exact runtime twin)."""
    parent = name.rpartition(".")[0]
    hook = {"experts": f"{parent}.hook_out", "shared_expert": f"{parent.rpartition('.')[0]}.hook_shared_out"}.get(kind)
    if isinstance(edit, list) or hook not in model.hook_dict:
        why = ("each slice of this fused expert tensor gets its own norm-preserving scale" if isinstance(edit, list)
               else "its edit differs from that of the other weights writing at the same hook")
        raise ValueError(f"No hook carries the output of {name} alone, and {why}: there is no exact runtime twin. "
                         "Use the weight edit (apply), or norm_preserving=False with one kernel for the weights "
                         "that share a hook.")
    return hook
