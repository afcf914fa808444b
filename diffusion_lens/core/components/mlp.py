"""Gated MLP: down(act(gate(x)) * up(x)), act = silu (SwiGLU) or tanh-approximated gelu (GeGLU, Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}  # `DiffusionConfig.mlp_act`


class GatedMLP(nn.Module):
    """`hook_pre` is the gate pre-activation, `hook_pre_linear` the up branch, `hook_post` their
    product after the activation [batch pos d_mlp] (TransformerLens' gated-MLP names).

    Example:
        >>> GatedMLP(64, 96, act="gelu_tanh")(torch.randn(2, 3, 64)).shape
        torch.Size([2, 3, 64])
    """

    def __init__(self, d_model: int, d_mlp: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.hook_pre = HookPoint()  # [*batch d_mlp] gate branch, before silu
        self.hook_pre_linear = HookPoint()  # [*batch d_mlp] linear ("up") branch
        self.hook_post = HookPoint()  # [*batch d_mlp] silu(gate) * up, the down projection's input

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        gate = self.hook_pre(self.gate_proj(x))
        up = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(self.act(gate) * up))

    # TransformerLens weight views (TransformerLens' gated-MLP names and shapes); biases are zeros
    # where the family has none, so `hook_post @ W_out + b_out` is always the MLP output.
    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        """Linear ("up") branch."""
        return self.up_proj.weight.T

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        """Gate branch (the one the activation is applied to)."""
        return self.gate_proj.weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.weight.T

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        return bias_or_zeros(self.up_proj)

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        return bias_or_zeros(self.down_proj)


def bias_or_zeros(linear: nn.Linear) -> Tensor:
    """The layer's bias, or zeros of its output size where it has none."""
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
