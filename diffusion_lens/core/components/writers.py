"""Residual writers: the weights whose outputs reach the residual stream, and the hook points that
carry those outputs. Blocks list theirs (`residual_writers()`), so that steering removes a direction
from the residual stream in the weights (`orthogonalize_weights`) or at run time (`ablate`) from one
description, found by structure:

* `hooks`   the hook points holding the writer's output before any norm: runtime ablation acts there;
* `weights` (name, layer) pairs producing that output: an `nn.Linear` (output features = rows), a
            fused expert tensor [n_experts d_model d_in] (every slice writes), or an `nn.Embedding`;
* `norms`   the RMSNorms between those hooks and the residual stream, innermost first. A norm
            y = w * x / rms(x) has y . r = x . (w * r) / rms(x): y is orthogonal to r exactly when x
            is orthogonal to w * r. So the writer loses the direction r times every norm weight (a
            weightless norm only rescales), and a hook there removes that same direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from torch import nn

Writer = Union[nn.Linear, nn.Embedding, nn.Parameter]


@dataclass(frozen=True)
class ResidualWriter:
    """Weights writing into the residual stream, the hooks carrying their output, the norms after it.

    Example:
        >>> model.blocks[0].residual_writers()[0].hooks    # ('hook_attn_out',) on LLaDA
        >>> model.blocks[0].residual_writers()[0].norms    # (ln_attn_out,) on DiffusionGemma
    """

    hooks: tuple[str, ...]
    weights: tuple[tuple[str, Writer], ...]
    norms: tuple[nn.Module, ...] = ()

    def prefixed(self, prefix: str) -> "ResidualWriter":
        """The same writer with hook and weight names under `prefix` (e.g. "blocks.3.").

        Example:
            >>> writer.prefixed("blocks.3.").hooks     # ('blocks.3.hook_attn_out',)
        """
        return ResidualWriter(tuple(prefix + hook for hook in self.hooks),
                              tuple((prefix + name, weight) for name, weight in self.weights), self.norms)
