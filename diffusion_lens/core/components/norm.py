"""RMSNorm with TransformerLens hook points."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) in fp32, cast back, *then* times the weight (LLaDA, Qwen2, OLMoE).

    `weight_in_fp32=True` multiplies the weight in fp32 before the cast back (Gemma-4), and then
    `hook_normalized` carries the fp32 vector; `weight=False` builds a weightless norm (Gemma-4's
    v-norm, router norm). `hook_scale` carries the divisor sqrt(mean(x^2) + eps) [batch pos 1] and
    `hook_normalized` the unweighted normalised vector, as in TransformerLens, so
    `ActivationCache.apply_ln_to_stack` can reuse the cached scale. `input_hook=True` adds `hook_in`,
    the norm's input: the output of the layer before it where that layer writes into the residual
    stream only through this norm (Gemma-4's post-norms), the site where runtime ablation equals a
    weight edit of that layer.

    Example:
        >>> RMSNorm(8, 1e-6, weight_in_fp32=True)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, d: int, eps: float, *, weight_in_fp32: bool = False, weight: bool = True,
                 input_hook: bool = False):
        super().__init__()
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32
        self.weight = nn.Parameter(torch.ones(d)) if weight else None
        self.hook_scale = HookPoint()  # [... 1] the RMS of each vector, fp32
        self.hook_normalized = HookPoint()  # [... d] before the learned scale (fp32 when weight_in_fp32)
        self.hook_in = HookPoint() if input_hook else None  # [... d] the input, before normalising

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if self.hook_in is not None:
            x = self.hook_in(x)
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        if self.weight_in_fp32:
            normalized = self.hook_normalized(x32 / scale)
            return (normalized if self.weight is None else normalized * self.weight.float()).to(x.dtype)
        normalized = self.hook_normalized((x32 / scale).to(x.dtype))
        return normalized if self.weight is None else normalized * self.weight
