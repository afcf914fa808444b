"""RMSNorm with TransformerLens hook points."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) in fp32, cast back, *then* times the weight (LLaDA, Qwen2, OLMoE).

    `hook_scale` carries the divisor sqrt(mean(x^2) + eps) [batch pos 1] and `hook_normalized`
    the unweighted normalised vector, as in TransformerLens, so `ActivationCache.apply_ln_to_stack`
    can reuse the cached scale.
    """

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.hook_scale = HookPoint()  # [... 1] the RMS of each vector, fp32
        self.hook_normalized = HookPoint()  # [... d] before the learned scale

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized((x32 / scale).to(x.dtype))
        return normalized * self.weight
