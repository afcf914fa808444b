"""Runtime interventions: functions that return TransformerLens hook lists.

Every builder returns `list[(hook_name, fn)]`, usable with `model.hooks(fwd_hooks=...)`,
`model.run_with_hooks(..., fwd_hooks=...)` and `model.generate(..., hooks=...)`. `steps=`,
`denoise_blocks=`, `positions=` and `passes=` restrict a hook to denoising steps / semi-autoregressive
blocks / canvas positions / model passes; that scheduling is done by `diffusion_lens.denoising.hooks`
(one place), these builders only forward the arguments. The hooks are those of an `AffineMap`
(`ablate`: a projection per site, `AffineMap.from_ablation(...)` on pre-norm blocks; `add` =
`AffineMap.from_addition(...).as_hooks()`), and `ablate`'s default sites and `orthogonalize_weights`
read one list (`diffusion_lens.steering.weights.writer_sites`), so they run one formula at one set
of places.

Builders take the model first (unlike the sketch in DESIGN.md) so that "all" layers resolve to
real hook names and every shape / layer mistake is reported before a long generation starts.
"""

from __future__ import annotations

from typing import Any, Optional, Union, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.core.deprecation import no_keywords_left, renamed_keyword
from diffusion_lens.steering._common import Hook, LayerSpec, check_vector, resolve_layers, unit
from diffusion_lens.steering.transport import AffineMap
from diffusion_lens.steering.weights import direction_basis, model_writers, writer_basis, writer_sites

#: The block sites of Arditi et al.'s ablation in a pre-norm block: the block input and the two
#: writers into the residual stream. `ablate`'s default sites come from the model's structure
#: (`writer_sites`): these on LLaDA, Dream, MMaDA and LLaDA-MoE; the pre-norm writer outputs on
#: Gemma-4 blocks (docs/families/diffusion_gemma.md, "Steering").
ABLATION_SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
_RESIDUAL_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@no_type_check  # checks its own input and explains a wrong one (the test suite's shape checks skip it)
def ablate(
    model,
    direction: Union[Float[Tensor, " d_model"], Float[Tensor, "k d_model"]],
    layers: LayerSpec = "all",
    *,
    steps: Any = None,
    positions: Any = None,
    denoise_blocks: Any = None,
    passes: Any = None,
    sites: Optional[tuple[str, ...]] = None,
    **deprecated: Any,
) -> list[Hook]:
    """Directional ablation hooks: x <- x - (x.u) u, with u = r = direction / |direction|, or at a
    writer followed by weighted norms r times their weights, renormalised (below).

    The default sites (Arditi et al.) are every selected block's input (`hook_resid_pre`) and the
    hooks of its residual writers (`writer_sites`): `hook_attn_out` and `hook_mlp_out` in a pre-norm
    block. Where weighted norms sit between a writer and the residual stream (Gemma-4's sandwich
    norms) the writer's hook is its pre-norm output and u is r times those norm weights, so that
    the norm's output loses r. With every layer selected the model-level sites
    join: where the embedding rows are read before the blocks (`hook_embed` and the soft embeddings
    of a self-conditioning), the self-conditioning's signal, and a tied LM head's input
    (`hook_unembed_in`). So `ablate(model, r)` equals `orthogonalize_weights(model, r)` (tested, in
    every pass). `sites=` names block sites instead (e.g. `("hook_mlp_out",)`: r at the MLP output).

    `steps` / `denoise_blocks` / `positions` / `passes` restrict the hooks
    (`diffusion_lens.denoising.hooks.at` semantics: steps and denoising blocks as int / range / list /
    callable of the state; positions as a scope such as "response", "masked", "prompt" or an index
    list; passes as "encoder" / "decoder" or a list, on two-pass models; `blocks=` is the old name of
    `denoise_blocks=`). A [k d_model] `direction` ablates the k-dimensional subspace its rows span
    (orthonormalised by QR). The hooks are an `AffineMap`'s (rank-k edits, never a [d d] matrix).

    Example:
        >>> hooks = ablate(model, refusal_dir)                       # every layer, step, position
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        >>> out = model.generate(prompt, hooks=ablate(model, refusal_dir, steps=range(8), positions="response"))
        >>> out = gemma.generate(prompt, hooks=ablate(gemma, refusal_dir, passes="decoder"))   # canvas only
    """
    denoise_blocks = renamed_keyword(deprecated, "blocks", "denoise_blocks", denoise_blocks, where="ablate")
    no_keywords_left(deprecated, "ablate")
    basis = direction_basis(model, direction)
    chosen = resolve_layers(model, layers)
    bases: dict[str, torch.Tensor] = {}
    if sites is None:
        if len(chosen) == model.cfg.n_layers:
            bases.update(_writer_bases(model_writers(model), basis))
        for layer in chosen:
            bases[f"blocks.{layer}.hook_resid_pre"] = basis
            bases.update(_writer_bases(writer_sites(model, layer, embedding=False), basis))
    else:
        for layer in chosen:
            writers = _writer_bases(writer_sites(model, layer, embedding=False), basis)
            allowed = list(dict.fromkeys([*ABLATION_SITES, *_RESIDUAL_SITES,
                                          *(name.split(".", 2)[2] for name in writers)]))
            unknown = [site for site in sites if site not in allowed]
            if unknown:
                raise ValueError(f"ablate: unknown block site(s) {unknown} for block {layer}; expected names from {allowed}.")
            for site in sites:
                name = f"blocks.{layer}.{site}"
                bases[name] = writers.get(name, basis)
    model.check_hook_names(list(bases))
    return _projection_map(bases).as_hooks(steps=steps, positions=positions, denoise_blocks=denoise_blocks,
                                           passes=passes)


def _writer_bases(writers, basis: torch.Tensor) -> dict[str, torch.Tensor]:
    """hook name -> the orthonormal rows ablated there, for each writer's hooks."""
    bases = {}
    for writer in writers:
        q = writer_basis(writer, basis)
        bases.update((hook, q) for hook in writer.hooks)
    return bases


def _projection_map(bases: dict[str, torch.Tensor]) -> AffineMap:
    """x -> x - (x Q^T) Q with each site's own orthonormal rows Q: omega = 1, beta = 0, U = -Q^T, V = Q^T."""
    ones = {site: torch.ones(q.shape[1], dtype=torch.float64, device=q.device) for site, q in bases.items()}
    zeros = {site: torch.zeros_like(one) for site, one in ones.items()}
    return AffineMap(ones, zeros, kind="ablation",
                     low_rank={site: (-q.T.contiguous(), q.T.contiguous()) for site, q in bases.items()})


def add(
    model,
    vector: Float[Tensor, " d_model"],
    alpha: float = 1.0,
    layers: LayerSpec = "all",
    *,
    steps: Any = None,
    positions: Any = None,
    denoise_blocks: Any = None,
    passes: Any = None,
    site: str = "hook_resid_pre",
    **deprecated: Any,
) -> list[Hook]:
    """Activation addition hooks: x <- x + alpha * vector at `blocks.{l}.{site}` for each layer.

    `vector` is used as given (not normalised): Arditi et al. add the raw mean difference with
    alpha = +1 to induce refusal and -1 to bypass it. Step / position / pass restriction as in
    `ablate`. The hooks are `AffineMap.from_addition(vector, alpha, names).as_hooks()`.

    Example:
        >>> diff = directions.vector(layer=6, pos=-1)                 # raw mean difference
        >>> hooks = add(model, diff, alpha=1.0, layers=6)             # induce refusal
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        >>> hooks = add(gemma, diff, layers=2, passes="encoder")      # the prompt / committed-block pass only
    """
    denoise_blocks = renamed_keyword(deprecated, "blocks", "denoise_blocks", denoise_blocks, where="add")
    no_keywords_left(deprecated, "add")
    vector = check_vector(model, vector, name="vector")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number; got {alpha!r}.")
    names = [f"blocks.{layer}.{site}" for layer in resolve_layers(model, layers)]
    model.check_hook_names(names)
    amap = AffineMap.from_addition(vector, alpha, names)
    return amap.as_hooks(steps=steps, positions=positions, denoise_blocks=denoise_blocks, passes=passes)


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
