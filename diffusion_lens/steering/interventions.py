"""Runtime interventions: functions that return TransformerLens hook lists.

Every builder returns `list[(hook_name, fn)]`, usable with `model.hooks(fwd_hooks=...)`,
`model.run_with_hooks(..., fwd_hooks=...)` and `model.generate(..., hooks=...)`. `steps=` and
`positions=` restrict a hook to denoising steps / canvas positions; that scheduling is done by
`diffusion_lens.denoising.hooks` (one place), these builders only forward the arguments.

Builders take the model first (unlike the sketch in DESIGN.md) so that "all" layers resolve to
real hook names and every shape / layer mistake is reported before a long generation starts.
"""

from __future__ import annotations

from typing import Any, Union, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.steering._common import (
    Hook,
    LayerSpec,
    check_vector,
    orthonormal_rows,
    resolve_layers,
    schedule,
    unit,
)

#: The sites `ablate` edits in each selected block (Arditi et al.): the block input and the two
#: writers into the residual stream.
ABLATION_SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")


class _CastCache:
    """A float64 tensor cast lazily to each (device, dtype) it meets, so hooks do no repeated copies."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self._cast: dict[tuple, Tensor] = {}

    def get(self, like: Tensor) -> Tensor:
        dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        key = (like.device, dtype)
        if key not in self._cast:
            self._cast[key] = self.tensor.to(device=like.device, dtype=dtype)
        return self._cast[key]


class ProjectOut:
    """Hook function x <- x - (x Q^T) Q for an orthonormal basis Q [k d] (k = 1: x - (x.r) r).

    Computed in float32 for half-precision activations and cast back; hooks of this class can be
    recognised (e.g. by `orthogonalize_weights` tests) through `.basis`.
    """

    def __init__(self, basis: Float[Tensor, "k d"]):
        self.basis = basis
        self._cast = _CastCache(basis)

    def __call__(self, act: Tensor, hook=None) -> Tensor:
        if act.shape[-1] != self.basis.shape[-1]:
            raise ValueError(
                f"ablate: activation at {getattr(hook, 'name', '?')} has last dimension {act.shape[-1]}, "
                f"the direction has {self.basis.shape[-1]}."
            )
        q = self._cast.get(act)
        x = act.to(q.dtype)
        return (x - (x @ q.T) @ q).to(act.dtype)

    def __repr__(self) -> str:
        return f"ProjectOut(k={self.basis.shape[0]}, d={self.basis.shape[1]})"


class AddVector:
    """Hook function x <- x + alpha * v."""

    def __init__(self, vector: Float[Tensor, " d"], alpha: float):
        self.vector = vector
        self.alpha = float(alpha)
        self._cast = _CastCache(vector * self.alpha)

    def __call__(self, act: Tensor, hook=None) -> Tensor:
        if act.shape[-1] != self.vector.shape[-1]:
            raise ValueError(
                f"add: activation at {getattr(hook, 'name', '?')} has last dimension {act.shape[-1]}, "
                f"the vector has {self.vector.shape[-1]}."
            )
        delta = self._cast.get(act)
        return (act.to(delta.dtype) + delta).to(act.dtype)

    def __repr__(self) -> str:
        return f"AddVector(alpha={self.alpha}, d={self.vector.shape[-1]})"


@no_type_check  # checks its own input and explains a wrong one (the test suite's shape checks skip it)
def ablate(
    model,
    direction: Union[Float[Tensor, " d_model"], Float[Tensor, "k d_model"]],
    layers: LayerSpec = "all",
    *,
    steps: Any = None,
    positions: Any = None,
    blocks: Any = None,
    sites: tuple[str, ...] = ABLATION_SITES,
) -> list[Hook]:
    """Directional ablation hooks: x <- x - (x.r) r with r = direction / |direction|.

    Applied (Arditi et al.) at every selected block's input (`hook_resid_pre`) and to every
    attention and MLP output (`hook_attn_out`, `hook_mlp_out`), at every position and denoising
    step unless `steps` / `blocks` / `positions` restrict it (`diffusion_lens.denoising.hooks.at` semantics:
    steps and blocks as int / range / list / callable of the state; positions as a scope such as
    "response", "masked", "prompt" or an index list). A [k d_model]
    `direction` ablates the k-dimensional subspace its rows span (orthonormalised by QR).
    With layers="all" this equals `orthogonalize_weights(model, direction)` (tested).

    Example:
        >>> hooks = ablate(model, refusal_dir)                       # every layer, step, position
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        >>> out = model.generate(prompt, hooks=ablate(model, refusal_dir, steps=range(8), positions="response"))
    """
    vector = check_vector(model, direction, name="direction", allow_subspace=True)
    basis = unit(vector)[None] if vector.ndim == 1 else orthonormal_rows(vector, name="direction")
    fn = ProjectOut(basis)
    unknown = [site for site in sites if site not in ABLATION_SITES + ("hook_resid_mid", "hook_resid_post")]
    if unknown:
        raise ValueError(
            f"ablate: unknown block site(s) {unknown}; expected names from "
            f"{ABLATION_SITES + ('hook_resid_mid', 'hook_resid_post')}."
        )
    hooks = [(f"blocks.{layer}.{site}", fn) for layer in resolve_layers(model, layers) for site in sites]
    return schedule(hooks, steps, positions, blocks)


def add(
    model,
    vector: Float[Tensor, " d_model"],
    alpha: float = 1.0,
    layers: LayerSpec = "all",
    *,
    steps: Any = None,
    positions: Any = None,
    blocks: Any = None,
    site: str = "hook_resid_pre",
) -> list[Hook]:
    """Activation addition hooks: x <- x + alpha * vector at `blocks.{l}.{site}` for each layer.

    `vector` is used as given (not normalised): Arditi et al. add the raw mean difference with
    alpha = +1 to induce refusal and -1 to bypass it. Step / position restriction as in `ablate`.

    Example:
        >>> diff = directions.vector(layer=6, pos=-1)                 # raw mean difference
        >>> hooks = add(model, diff, alpha=1.0, layers=6)             # induce refusal
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    """
    vector = check_vector(model, vector, name="vector")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number; got {alpha!r}.")
    names = [f"blocks.{layer}.{site}" for layer in resolve_layers(model, layers)]
    model.check_hook_names(names)
    fn = AddVector(vector.detach().double(), alpha)
    return schedule([(name, fn) for name in names], steps, positions, blocks)


def project_coefficient(
    act: Float[Tensor, "... d"], direction: Float[Tensor, " d"]
) -> Float[Tensor, "..."]:
    """The component of `act` along the unit vector of `direction`: act . r / |r| (float64).

    Example:
        >>> _, cache = model.run_with_cache(tokens)
        >>> project_coefficient(cache["blocks.2.hook_resid_pre"], r).abs().max()
        >>> # ~0 after ablate(model, r)
    """
    r = unit(direction)
    return act.detach().double() @ r.to(act.device)
