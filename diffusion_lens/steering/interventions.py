"""Runtime interventions: functions that return TransformerLens hook lists.

Every builder returns `list[(hook_name, fn)]`, usable with `model.hooks(fwd_hooks=...)`,
`model.run_with_hooks(..., fwd_hooks=...)` and `model.generate(..., hooks=...)`. `steps=`,
`denoise_blocks=` and `positions=` restrict a hook to denoising steps / semi-autoregressive blocks /
canvas positions; that scheduling is done by `diffusion_lens.denoising.hooks` (one place), these
builders only forward the arguments. The hooks are those of an `AffineMap` (`ablate` =
`AffineMap.from_ablation(...).as_hooks()`, `add` = `AffineMap.from_addition(...).as_hooks()`), so a
runtime ablation, its map and `orthogonalize_weights` run one formula.

Builders take the model first (unlike the sketch in DESIGN.md) so that "all" layers resolve to
real hook names and every shape / layer mistake is reported before a long generation starts.
"""

from __future__ import annotations

from typing import Any, Union, no_type_check

from jaxtyping import Float
from torch import Tensor

from diffusion_lens.core.deprecation import no_keywords_left, renamed_keyword
from diffusion_lens.steering._common import Hook, LayerSpec, check_vector, resolve_layers, unit
from diffusion_lens.steering.transport import AffineMap

#: The sites `ablate` edits in each selected block (Arditi et al.): the block input and the two
#: writers into the residual stream.
ABLATION_SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")


@no_type_check  # checks its own input and explains a wrong one (the test suite's shape checks skip it)
def ablate(
    model,
    direction: Union[Float[Tensor, " d_model"], Float[Tensor, "k d_model"]],
    layers: LayerSpec = "all",
    *,
    steps: Any = None,
    positions: Any = None,
    denoise_blocks: Any = None,
    sites: tuple[str, ...] = ABLATION_SITES,
    **deprecated: Any,
) -> list[Hook]:
    """Directional ablation hooks: x <- x - (x.r) r with r = direction / |direction|.

    Applied (Arditi et al.) at every selected block's input (`hook_resid_pre`) and to every
    attention and MLP output (`hook_attn_out`, `hook_mlp_out`), at every position and denoising
    step unless `steps` / `denoise_blocks` / `positions` restrict it (`diffusion_lens.denoising.hooks.at`
    semantics: steps and denoising blocks as int / range / list / callable of the state; positions
    as a scope such as "response", "masked", "prompt" or an index list; `blocks=` is the old name of
    `denoise_blocks=`). A [k d_model] `direction` ablates the k-dimensional subspace its rows span
    (orthonormalised by QR). The hooks are `AffineMap.from_ablation(direction, names).as_hooks()`:
    rank-k edits, never a [d d] matrix. With layers="all" this equals
    `orthogonalize_weights(model, direction)` (tested).

    Example:
        >>> hooks = ablate(model, refusal_dir)                       # every layer, step, position
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        >>> out = model.generate(prompt, hooks=ablate(model, refusal_dir, steps=range(8), positions="response"))
    """
    denoise_blocks = renamed_keyword(deprecated, "blocks", "denoise_blocks", denoise_blocks, where="ablate")
    no_keywords_left(deprecated, "ablate")
    vector = check_vector(model, direction, name="direction", allow_subspace=True)
    unknown = [site for site in sites if site not in ABLATION_SITES + ("hook_resid_mid", "hook_resid_post")]
    if unknown:
        raise ValueError(
            f"ablate: unknown block site(s) {unknown}; expected names from "
            f"{ABLATION_SITES + ('hook_resid_mid', 'hook_resid_post')}."
        )
    names = [f"blocks.{layer}.{site}" for layer in resolve_layers(model, layers) for site in sites]
    amap = AffineMap.from_ablation(vector, names) if vector.ndim == 1 else AffineMap.from_subspace_ablation(vector, names)
    return amap.as_hooks(steps=steps, positions=positions, denoise_blocks=denoise_blocks)


def add(
    model,
    vector: Float[Tensor, " d_model"],
    alpha: float = 1.0,
    layers: LayerSpec = "all",
    *,
    steps: Any = None,
    positions: Any = None,
    denoise_blocks: Any = None,
    site: str = "hook_resid_pre",
    **deprecated: Any,
) -> list[Hook]:
    """Activation addition hooks: x <- x + alpha * vector at `blocks.{l}.{site}` for each layer.

    `vector` is used as given (not normalised): Arditi et al. add the raw mean difference with
    alpha = +1 to induce refusal and -1 to bypass it. Step / position restriction as in `ablate`.
    The hooks are `AffineMap.from_addition(vector, alpha, names).as_hooks()`.

    Example:
        >>> diff = directions.vector(layer=6, pos=-1)                 # raw mean difference
        >>> hooks = add(model, diff, alpha=1.0, layers=6)             # induce refusal
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    """
    denoise_blocks = renamed_keyword(deprecated, "blocks", "denoise_blocks", denoise_blocks, where="add")
    no_keywords_left(deprecated, "add")
    vector = check_vector(model, vector, name="vector")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number; got {alpha!r}.")
    names = [f"blocks.{layer}.{site}" for layer in resolve_layers(model, layers)]
    model.check_hook_names(names)
    amap = AffineMap.from_addition(vector, alpha, names)
    return amap.as_hooks(steps=steps, positions=positions, denoise_blocks=denoise_blocks)


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
