"""Permanent weight edits: directional ablation written into the weights (Arditi et al.).

Embedding rows: W_E <- W_E - (W_E r) r^T. Every matrix that writes into the residual stream
(attention output projection, MLP down projection; in a mixture of experts every expert's down
projection and the shared expert's) W <- W - r r^T W, and any bias on those layers b <- b - (b.r) r.
Then no residual-stream vector has a component along r, which is exactly what runtime `ablate`
enforces at every block input and attention / MLP output, so the two give the same logits and
the same tokens at every denoising step (tested). The edit keeps every parameter's name and
shape, so `save_pretrained` writes the original checkpoint format.

This is `fold` of the rank-k projection `SiteEdit` (`diffusion_lens.steering.edits`) into every
residual writer and the embedding rows: the same formula as the runtime hooks, O(k d_in d_out)
per layer, never a [d d] matrix.
"""

from __future__ import annotations

import warnings
from typing import Union, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffusion_lens.steering._common import LayerSpec, check_vector, orthonormal_rows, resolve_layers, unit
from diffusion_lens.steering.edits import SiteEdit, fold_producer, fold_rows


def residual_writers(model, layer: int) -> list[tuple[str, nn.Linear]]:
    """The linear layers of block `layer` whose outputs are added to the residual stream.

    The attention output projection and every `down_proj` inside the MLP (a dense MLP has one;
    a mixture of experts has one per expert plus the shared expert's) -- found by structure, not
    by family.

    Example:
        >>> [name for name, _ in residual_writers(model, 0)]
        ['blocks.0.attn.o_proj', 'blocks.0.mlp.down_proj']
    """
    block = model.blocks[layer]
    writers = [(f"blocks.{layer}.attn.o_proj", block.attn.o_proj)]
    for name, module in block.mlp.named_modules():
        if name.split(".")[-1] == "down_proj" and isinstance(module, nn.Linear):
            writers.append((f"blocks.{layer}.mlp.{name}", module))
    if len(writers) == 1:
        raise ValueError(f"Block {layer}'s MLP has no down_proj layer; cannot find the MLP's residual writer.")
    return writers


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

    With the defaults (all layers, embedding included) the edited model equals runtime
    `ablate(model, direction)` at every layer, step and position. Returns the edited parameter
    names. Computed in float64 and cast back to each weight's dtype.

    A model with tied embeddings shares W_E with the unembedding, so editing W_E also changes
    the logits' read-out; a warning says so (no shipped family ties them).

    Example:
        >>> orthogonalize_weights(model, refusal_dir)
        >>> model.generate("How do I pick a lock?")             # behaves as with ablate hooks
        >>> model.save_pretrained("llada-abliterated")           # original format
    """
    vector = check_vector(model, direction, name="direction", allow_subspace=True)
    edit = SiteEdit.projection(unit(vector)[None] if vector.ndim == 1 else orthonormal_rows(vector, name="direction"))
    edited = []
    if embedding:
        if model.cfg.tie_word_embeddings:
            warnings.warn(
                "This model ties its embedding and unembedding: orthogonalizing W_E also removes the direction "
                "from the unembedding, so the result differs from runtime ablation.",
                stacklevel=2,
            )
        edited += fold_rows(model.embed, edit, "embed.weight")
    for layer in resolve_layers(model, layers):
        for name, linear in residual_writers(model, layer):
            edited += fold_producer(linear, edit, name)
    return edited


def project_out_of_writer(linear: nn.Linear, basis: Float[Tensor, "k d"], name: str = "linear") -> list[str]:
    """W <- W - Q^T Q W and b <- b - Q^T Q b for a layer writing [d] outputs (orthonormal rows Q, used
    as given); returns edited names. `fold_producer` of the projection edit.

    Example:
        >>> q = torch.nn.functional.normalize(r, dim=0)[None]
        >>> project_out_of_writer(model.blocks[0].attn.o_proj, q, "blocks.0.attn.o_proj")
        ['blocks.0.attn.o_proj.weight']
    """
    return fold_producer(linear, SiteEdit.projection(basis), name)
