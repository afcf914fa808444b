"""One affine edit of one hook site, and the one implementation of applying it and folding it.

Every steering edit in this package is, at one site, T(x) = omega * x + (x V) U^T + beta:

* ``omega``  None (identity), a per-dimension scale with the activation's feature shape
  (Mean-ACT, Gaussian OT, Linear-ACT), or a [d d] matrix acting as x @ omega^T;
* ``u, v``   None or [d k] low-rank factors: projecting out the span of orthonormal rows Q [k d]
  (directional ablation) is u = -Q^T, v = Q^T, so a direction costs O(d k) numbers and O(d k)
  flops per vector, never a [d d] matrix;
* ``beta``   None (zero) or a bias with the feature shape (activation addition).

`ablate`, `add` and `AffineMap.as_hooks` run `EditHook`; `fold` and `orthogonalize_weights` write
the same edit into a linear layer with `fold_producer` / `fold_consumer` / `fold_rows` (and into fused
expert tensors with `fold_fused_producer`). So runtime hooks, transport maps and weight edits
cannot drift apart: there is one formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn


@dataclass(frozen=True)
class SiteEdit:
    """T(x) = omega * x (x @ omega^T for a [d d] omega) + (x v) u^T + beta, float64; None = absent.

    `shape` is the activation's feature shape (the trailing dimensions the edit acts on).

    Example:
        >>> q = torch.nn.functional.normalize(r.double(), dim=0)[None]      # [1 d]
        >>> SiteEdit.projection(q).apply(x)                                  # x - (x . r) r
        >>> SiteEdit((d,), beta=2.0 * v.double()).apply(x)                   # x + 2 v
    """

    shape: tuple[int, ...]
    omega: Optional[Tensor] = None
    beta: Optional[Tensor] = None
    u: Optional[Tensor] = None
    v: Optional[Tensor] = None

    @classmethod
    def projection(cls, basis: Float[Tensor, "k d"]) -> "SiteEdit":
        """x -> x - (x Q^T) Q for orthonormal rows Q (the caller orthonormalises).

        Example:
            >>> SiteEdit.projection(q).rank    # q [k d] -> k
        """
        q = basis.detach().double()
        return cls((q.shape[1],), u=-q.T.contiguous(), v=q.T.contiguous())

    @property
    def full(self) -> bool:
        """Whether omega is a [d d] matrix (not a per-dimension scale)."""
        return self.omega is not None and self.omega.ndim == 2 and len(self.shape) == 1

    @property
    def rank(self) -> int:
        return 0 if self.u is None else self.u.shape[1]

    def at_strength(self, strength: float) -> "SiteEdit":
        """(1 - l) x + l T(x): omega_l = l omega + (1 - l) I, u_l = l u, beta_l = l beta.

        Example:
            >>> edit.at_strength(0.5).apply(x)    # == 0.5 * x + 0.5 * edit.apply(x)
        """
        if strength == 1.0:
            return self
        omega = self.omega
        if omega is not None:
            identity = torch.eye(omega.shape[0], dtype=omega.dtype, device=omega.device) if self.full else 1.0
            omega = strength * omega + (1.0 - strength) * identity
        return SiteEdit(
            self.shape, omega, None if self.beta is None else strength * self.beta,
            None if self.u is None else strength * self.u, self.v,
        )

    def flat(self) -> "SiteEdit":
        """The same edit on the flattened features (a [head d_head] site folds into a [n_heads*d_head] layer)."""
        if len(self.shape) == 1:
            return self
        n = 1
        for size in self.shape:
            n *= size
        return SiteEdit(
            (n,), None if self.omega is None else self.omega.reshape(n), None if self.beta is None else self.beta.reshape(n),
            self.u, self.v,
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> "SiteEdit":
        def cast(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device=device, dtype=dtype)

        return SiteEdit(self.shape, cast(self.omega), cast(self.beta), cast(self.u), cast(self.v))

    def linear(self, x: Tensor, *, transpose: bool = False) -> Tensor:
        """The linear part A x of T for rows x [..., *shape] (A^T x with `transpose`), in x's dtype.

        Every row-wise application goes through here: hooks (rows = activations), consumer folds
        (rows of W, with the transpose), embedding rows; `left` is the same A for producer folds.

        Example:
            >>> edit.linear(w64, transpose=True)          # W diag(omega) + (W u) v^T
        """
        if self.omega is None:
            y = x
        elif self.full:
            y = x @ (self.omega if transpose else self.omega.T)
        else:
            y = x * self.omega
        if self.u is not None:
            a, b = (self.u, self.v) if transpose else (self.v, self.u)
            y = y + (x @ a) @ b.T
        return y

    def left(self, w: Tensor) -> Tensor:
        """A @ w for a weight whose rows are the site's features (a producer [d_out d_in]).

        Equal to `linear(w.T).T`, computed in w's layout: no transposed copy of a large weight
        (that copy made a rank-1 fold of an MLP's down projection ~2x slower).

        Example:
            >>> edit.left(w64)                             # diag(omega) W + u (v^T W)
        """
        if self.omega is None:
            y = w
        elif self.full:
            y = self.omega @ w
        else:
            y = self.omega[:, None] * w
        if self.u is not None:
            y = y + self.u @ (self.v.T @ w)
        return y

    def apply(self, x: Tensor) -> Tensor:
        """T(x) in x's dtype (float32 for half precision inside), exactly as the hooks compute it.

        Example:
            >>> SiteEdit.projection(q).apply(x) @ q.T     # ~0
        """
        return EditHook(self, "SiteEdit")(x)


class EditHook:
    """Hook function applying a `SiteEdit` (and an optional per-dimension support gate).

    Computed in float32 for half-precision activations and in the activation's dtype otherwise;
    the coefficients are cast once per (device, dtype). With a gate (lo, hi) a coordinate is
    mapped only where lo <= x <= hi and passes through unchanged elsewhere.

    Example:
        >>> fn = EditHook(SiteEdit.projection(q), "ablate")
        >>> model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", fn)])
    """

    def __init__(self, edit: SiteEdit, label: str, support: Optional[tuple[Tensor, Tensor]] = None):
        self.edit = edit
        self.label = label
        self.support = support
        self._cast: dict[tuple, tuple] = {}

    def _get(self, act: Tensor, dtype: torch.dtype) -> tuple:
        key = (act.device, dtype)
        if key not in self._cast:
            support = None if self.support is None else tuple(t.to(act.device, dtype) for t in self.support)
            self._cast[key] = (self.edit.to(act.device, dtype), support)
        return self._cast[key]

    def __call__(self, act: Tensor, hook=None) -> Tensor:
        shape = self.edit.shape
        if tuple(act.shape[act.ndim - len(shape):]) != shape:
            raise ValueError(
                f"{self.label} at {getattr(hook, 'name', '?')}: the activation has shape {tuple(act.shape)}, "
                f"expected trailing dimensions {shape}."
            )
        dtype = torch.float32 if act.dtype in (torch.float16, torch.bfloat16) else act.dtype
        edit, support = self._get(act, dtype)
        x = act.to(dtype)
        mapped = edit.linear(x)
        if edit.beta is not None:
            mapped = mapped + edit.beta
        if support is not None:
            mapped = torch.where((x >= support[0]) & (x <= support[1]), mapped, x)
        return mapped.to(act.dtype)

    def __repr__(self) -> str:
        e = self.edit
        parts = [f"d={e.shape}"] + (["rank=%d" % e.rank] if e.u is not None else [])
        parts += (["omega=" + ("full" if e.full else "diag")] if e.omega is not None else [])
        parts += (["beta"] if e.beta is not None else []) + (["gated"] if self.support is not None else [])
        return f"EditHook({self.label}: {', '.join(parts)})"


# ----------------------------------------------------------------------------- folding into weights
def _check_materialised(weight: Tensor, name: str) -> None:
    """A weight that device_map offloads ("disk", or "cpu" beside a GPU) is a meta placeholder outside the
    forward (accelerate loads it per call): writing it would change nothing, so refuse."""
    if weight.device.type == "meta":
        raise ValueError(
            f"Cannot fold into {name}: device_map offloads its weights (a meta placeholder here; accelerate loads the "
            "stored copy only during the forward). Load the model with that module on an execution device to edit "
            "its weights, or steer with hooks (ablate, add, AffineMap.as_hooks), which work on offloaded modules."
        )


def _check_features(size: int, n: int, side: str, name: str) -> None:
    if size != n:
        raise ValueError(f"Cannot fold into {name}: the edit has {n} features, the layer's {side} has {size}.")


@torch.no_grad()
def fold_producer(linear: nn.Linear, edit: SiteEdit, name: str) -> list[str]:
    """y = W x + b  ->  T(y) = (A W) x + T(b): the edit folded into the layer that writes the site.

    A rank-k edit costs O(k d_in d_out) (u (v^T W)); a bias is created only when T(b) != 0.

    Example:
        >>> fold_producer(model.blocks[0].attn.o_proj, SiteEdit.projection(q), "blocks.0.attn.o_proj")
        ['blocks.0.attn.o_proj.weight']
    """
    edit = edit.flat()
    _check_materialised(linear.weight, name)
    _check_features(linear.out_features, edit.shape[0], "output", name)
    w64 = linear.weight.double()
    edit = edit.to(w64.device, torch.float64)
    linear.weight.copy_(edit.left(w64).to(linear.weight.dtype))
    if linear.bias is None and edit.beta is None:
        return [f"{name}.weight"]
    new_b = torch.zeros(edit.shape[0], dtype=torch.float64, device=w64.device) if linear.bias is None else edit.linear(linear.bias.double())
    if edit.beta is not None:
        new_b = new_b + edit.beta
    return [f"{name}.weight"] + _set_bias(linear, new_b, name)


@torch.no_grad()
def fold_fused_producer(weight: nn.Parameter, edit: SiteEdit, name: str) -> list[str]:
    """W_e <- A W_e for every slice e of a fused [n d_out d_in] tensor (fused experts: each slice is a
    producer of the site, with no bias), one slice at a time in float64.

    A shift beta cannot fold here: the routing weights scale each slice's output.

    Example:
        >>> fold_fused_producer(model.blocks[0].mlp.experts.down_proj, edit, "blocks.0.mlp.experts.down_proj")
        ['blocks.0.mlp.experts.down_proj']
    """
    edit = edit.flat()
    _check_materialised(weight, name)
    if weight.ndim != 3:
        raise ValueError(f"Cannot fold into {name}: a fused tensor is [n d_out d_in]; got shape {tuple(weight.shape)}.")
    if edit.beta is not None:
        raise ValueError(f"Cannot fold a shift (beta != 0) into the fused tensor {name}: the routing weights scale "
                         "each slice's output. Fold an edit without beta, or use hooks.")
    _check_features(weight.shape[1], edit.shape[0], "output", name)
    edit = edit.to(weight.device, torch.float64)
    for piece in weight:
        piece.copy_(edit.left(piece.double()).to(weight.dtype))
    return [name]


@torch.no_grad()
def fold_consumer(linear: nn.Linear, edit: SiteEdit, name: str) -> list[str]:
    """y = W T(x) + b  =  (W A) x + (W beta + b): the edit folded into the one layer that reads the site.

    Example:
        >>> fold_consumer(model.blocks[0].mlp.down_proj, edit, "blocks.0.mlp.down_proj")   # site mlp.hook_post
    """
    edit = edit.flat()
    _check_materialised(linear.weight, name)
    _check_features(linear.in_features, edit.shape[0], "input", name)
    w64 = linear.weight.double()
    edit = edit.to(w64.device, torch.float64)
    linear.weight.copy_(edit.linear(w64, transpose=True).to(linear.weight.dtype))
    if edit.beta is None:
        return [f"{name}.weight"]
    bias = torch.zeros(linear.out_features, dtype=torch.float64, device=w64.device) if linear.bias is None else linear.bias.double()
    return [f"{name}.weight"] + _set_bias(linear, bias + w64 @ edit.beta, name)


@torch.no_grad()
def fold_rows(embed: nn.Embedding, edit: SiteEdit, name: str) -> list[str]:
    """E' = T(E) row by row: the edit folded into an embedding table (hook_embed).

    Example:
        >>> fold_rows(model.embed, SiteEdit.projection(q), "embed.weight")
        ['embed.weight']
    """
    edit = edit.flat()
    _check_materialised(embed.weight, name)
    _check_features(embed.weight.shape[1], edit.shape[0], "embedding width", name)
    e64 = embed.weight.double()
    edit = edit.to(e64.device, torch.float64)
    new = edit.linear(e64)
    if edit.beta is not None:
        new = new + edit.beta
    embed.weight.copy_(new.to(embed.weight.dtype))
    return [name]


def _set_bias(linear: nn.Linear, new_b: Tensor, name: str) -> list[str]:
    if linear.bias is None:
        if not bool(new_b.abs().max() > 0):
            return []
        linear.bias = nn.Parameter(new_b.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
    else:
        linear.bias.copy_(new_b.to(linear.bias.dtype))
    return [f"{name}.bias"]
