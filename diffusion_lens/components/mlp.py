"""SwiGLU MLP: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class GatedMLP(nn.Module):
    """`hook_pre` is the gate pre-activation, `hook_pre_linear` the up branch, `hook_post` their
    product after the activation [batch pos d_mlp] (TransformerLens' gated-MLP names)."""

    def __init__(self, d_model: int, d_mlp: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        gate = self.hook_pre(self.gate_proj(x))
        up = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(F.silu(gate) * up))
