"""Permanent weight edits: directional ablation written into the weights (Arditi et al.).

`writer_sites` is the one description of what such an edit changes and where its runtime
counterpart acts, found by structure (`ResidualWriter`, `diffusion_lens.core.components.writers`):

* every block's residual writers (`block.residual_writers()`): the attention output projection and
  every MLP down projection (in a mixture of experts each expert's, the shared expert's, and every
  slice of a fused expert tensor), W <- W - u u^T W (and a bias b <- b - (b.u) u). When norms sit
  between the writer and the residual stream (Gemma-4's sandwich norms), u is r times their weights,
  renormalised: then the norm's output, hence the residual stream, has no component along r;
* the embedding rows, W_E <- W_E - (W_E r) r^T, once: a tied LM head reads the same tensor
  (runtime counterpart `hook_unembed_in`), and so does a self-conditioning's soft embedding
  (`self_conditioning.hook_soft_embed`); with a self-conditioning the token embeddings reach the
  blocks through its norm, so their counterpart is `hook_embed` (otherwise `blocks.0.hook_resid_pre`);
* the self-conditioning MLP's down projection (`self_conditioning.hook_signal`).

`orthogonalize_weights` folds each writer's projection into its weights; `ablate` (default sites)
hooks the same projection at the writer's hooks, plus every block input. The two give the same
logits and tokens at every denoising step and in every pass (tested). The edit keeps every
parameter's name, shape and storage (a tied tensor stays tied), so `save_pretrained` writes the
original checkpoint format.
"""

from __future__ import annotations

from typing import Union, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffusion_lens.core.components.writers import ResidualWriter, Writer
from diffusion_lens.steering._common import LayerSpec, check_vector, orthonormal_rows, resolve_layers, unit
from diffusion_lens.steering.edits import SiteEdit, fold_fused_producer, fold_producer, fold_rows


def writer_sites(model, layers: LayerSpec = "all", *, embedding: bool = True) -> list[ResidualWriter]:
    """Every residual writer of the selected blocks, after the model-level ones when `embedding`:
    the embedding rows and a self-conditioning's MLP (module docstring). Names are the model's.

    Example:
        >>> [w.hooks for w in writer_sites(gemma, layers=0)]
        [('hook_embed', 'self_conditioning.hook_soft_embed', 'hook_unembed_in'), ('self_conditioning.hook_signal',),
         ('blocks.0.ln_attn_out.hook_in',), ('blocks.0.mlp.ln_dense_out.hook_in',), ('blocks.0.mlp.hook_routed_out',)]
    """
    writers = model_writers(model) if embedding else []
    for layer in resolve_layers(model, layers):
        writers += [writer.prefixed(f"blocks.{layer}.") for writer in model.blocks[layer].residual_writers()]
    return writers


def model_writers(model) -> list[ResidualWriter]:
    """The writers outside the blocks: the embedding rows (hooks: where the edited rows are read
    before `blocks.0.hook_resid_pre`), then the self-conditioning's, if the model has one.

    Example:
        >>> model_writers(llada)[0].hooks     # (): blocks.0.hook_resid_pre carries the embeddings
    """
    conditioning = getattr(model, "self_conditioning", None)
    hooks = () if conditioning is None else ("hook_embed", "self_conditioning.hook_soft_embed")
    if model.unembed.weight is model.embed.weight:  # a tied LM head reads the edited rows too
        hooks += ("hook_unembed_in",)
    writers = [ResidualWriter(hooks, (("embed", model.embed),))]
    if conditioning is not None:
        writers += [writer.prefixed("self_conditioning.") for writer in conditioning.residual_writers()]
    return writers


def residual_writers(model, layer: int) -> list[tuple[str, Union[nn.Linear, nn.Parameter]]]:
    """The layers of block `layer` whose outputs reach the residual stream (`writer_sites`' weights).

    The attention output projection and every `down_proj` of the MLP (a dense MLP has one, a mixture of
    experts one per expert plus the shared expert's, a fused expert tensor [n_experts d_model d_expert]
    is one entry) -- found by structure, not by family.

    Example:
        >>> [name for name, _ in residual_writers(model, 0)]
        ['blocks.0.attn.o_proj', 'blocks.0.mlp.down_proj']
        >>> [name for name, _ in residual_writers(gemma, 0)]
        ['blocks.0.attn.o_proj', 'blocks.0.mlp.dense.down_proj', 'blocks.0.mlp.experts.down_proj']
    """
    return [pair for writer in writer_sites(model, layer, embedding=False) for pair in writer.weights]


def writer_basis(writer: ResidualWriter, basis: Float[Tensor, "k d_model"]) -> Float[Tensor, "k d_model"]:
    """The orthonormal rows the writer's output must lose for the residual stream to lose `basis`'s
    span: `basis` times the weights of the norms after the writer, orthonormalised; `basis` itself
    (the same tensor) when no weighted norm follows.

    Example:
        >>> writer_basis(writer_sites(gemma, 0, embedding=False)[0], r[None])   # ~ unit(ln_attn_out.weight * r)
    """
    weights = [norm.weight for norm in writer.norms if getattr(norm, "weight", None) is not None]
    if not weights:
        return basis
    scale = torch.ones(basis.shape[1], dtype=torch.float64, device=basis.device)
    for weight in weights:
        scale = scale * weight.detach().to(basis.device, torch.float64)
    return orthonormal_rows(basis * scale, name=f"the direction times the norm weights after {writer.hooks[0]}")


@no_type_check  # checks its own input and explains a wrong one (the test suite's shape checks skip it)
def direction_basis(model, direction: Union[Float[Tensor, " d_model"], Float[Tensor, "k d_model"]]) -> Tensor:
    """Orthonormal rows [k d_model] (float64) of a checked direction or subspace.

    Example:
        >>> direction_basis(model, torch.randn(2, model.cfg.d_model)).shape    # [2 d_model]
    """
    vector = check_vector(model, direction, name="direction", allow_subspace=True)
    return unit(vector)[None] if vector.ndim == 1 else orthonormal_rows(vector, name="direction")


@torch.no_grad()
@no_type_check  # checks its own input and explains a wrong one (the test suite's shape checks skip it)
def orthogonalize_weights(
    model,
    direction: Union[Float[Tensor, " d_model"], Float[Tensor, "k d_model"]],
    layers: LayerSpec = "all",
    *,
    embedding: bool = True,
) -> list[str]:
    """Project `direction` (or the span of [k d_model] rows) out of every residual-stream writer, in place.

    The writers are `writer_sites(model, layers, embedding=embedding)`: each block's, and with
    `embedding` the embedding rows and a self-conditioning's MLP. With the defaults (all layers,
    embedding included) the edited model equals runtime `ablate(model, direction)` at every layer,
    step, position and pass; a tied LM head reads the edited embedding, which `ablate` mirrors at
    `hook_unembed_in`. Each tensor is edited once (tied or shared ones included); fused expert
    tensors slice by slice. Returns the edited parameter names. Computed in float64 and cast back.

    Example:
        >>> orthogonalize_weights(model, refusal_dir)
        >>> model.generate("How do I pick a lock?")             # behaves as with ablate hooks
        >>> model.save_pretrained("llada-abliterated")           # original format
        >>> orthogonalize_weights(gemma, r)[-1]                  # 'blocks.3.mlp.experts.down_proj'
    """
    basis = direction_basis(model, direction)
    edited = []
    for writer in writer_sites(model, layers, embedding=embedding):
        edit = SiteEdit.projection(writer_basis(writer, basis))
        for name, weight in writer.weights:
            edited += _fold(weight, edit, name)
    return edited


def project_out_of_writer(
    writer: Union[nn.Linear, nn.Parameter], basis: Float[Tensor, "k d"], name: str = "linear"
) -> list[str]:
    """W <- W - Q^T Q W and b <- b - Q^T Q b for a layer writing [d] outputs (orthonormal rows Q, used
    as given), or for every slice of a fused [n d d_in] tensor; returns edited names.

    Example:
        >>> q = torch.nn.functional.normalize(r, dim=0)[None]
        >>> project_out_of_writer(model.blocks[0].attn.o_proj, q, "blocks.0.attn.o_proj")
        ['blocks.0.attn.o_proj.weight']
    """
    return _fold(writer, SiteEdit.projection(basis), name)


def _fold(weight: Writer, edit: SiteEdit, name: str) -> list[str]:
    """The projection folded into one writer: embedding rows, a linear layer, or a fused tensor."""
    if isinstance(weight, nn.Embedding):
        return fold_rows(weight, edit, f"{name}.weight")
    if isinstance(weight, nn.Linear):
        return fold_producer(weight, edit, name)
    if isinstance(weight, nn.Parameter):
        return fold_fused_producer(weight, edit, name)
    raise TypeError(f"{name}: cannot fold into a {type(weight).__name__}; expected an nn.Embedding, an nn.Linear "
                    "or a fused nn.Parameter [n d_out d_in].")
