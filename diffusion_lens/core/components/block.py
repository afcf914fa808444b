"""One pre-norm transformer block: the residual stream passes through attention, then the MLP."""

from __future__ import annotations

from typing import Optional

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from diffusion_lens.core.components.attention import Attention, AttentionMask
from diffusion_lens.core.components.gemma4 import Gemma4Block
from diffusion_lens.core.components.mlp import GatedMLP
from diffusion_lens.core.components.moe import MixtureOfExperts
from diffusion_lens.core.components.norm import RMSNorm
from diffusion_lens.core.components.rotary import Rotary
from diffusion_lens.core.components.writers import ResidualWriter
from diffusion_lens.core.config import DiffusionConfig


def build_mlp(cfg: DiffusionConfig, layer: int) -> nn.Module:
    """The block's MLP: a mixture of experts on `cfg.moe_layers`, a dense SwiGLU elsewhere."""
    if layer in cfg.moe_layers:
        return MixtureOfExperts(cfg)
    return GatedMLP(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias, act=cfg.mlp_act)


def build_block(cfg: DiffusionConfig, layer: int, rotary: Rotary) -> nn.Module:
    """Layer `layer` in `cfg.block_layout`: a pre-norm `TransformerBlock` or a `Gemma4Block`.

    Example:
        >>> build_block(cfg, 0, Rotary(cfg)).hook_resid_pre
    """
    if cfg.block_layout == "gemma4":
        return Gemma4Block(cfg, layer, rotary)
    return TransformerBlock(cfg, layer, rotary)


class TransformerBlock(nn.Module):
    """Layer `layer` of the model; its hook points are `blocks.{layer}.hook_*` (docs/architecture.md)."""

    def __init__(self, cfg: DiffusionConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.layer = layer
        self.ln1 = RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32)
        self.attn = Attention(cfg, rotary, layer)
        self.ln2 = RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32)
        self.mlp = build_mlp(cfg, layer)
        self.hook_resid_pre = HookPoint()  # [batch pos d_model]
        self.hook_attn_out = HookPoint()  # [batch pos d_model]
        self.hook_resid_mid = HookPoint()  # [batch pos d_model]
        self.hook_mlp_out = HookPoint()  # [batch pos d_model]
        self.hook_resid_post = HookPoint()  # [batch pos d_model]

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        mask: AttentionMask,
        rope: tuple[Tensor, Tensor],
        kv: Optional[tuple[Tensor, Tensor]] = None,
        window_start: int = 0,
    ) -> Float[Tensor, "batch pos d_model"]:
        """resid_post = resid_mid + mlp(ln2(resid_mid)), resid_mid = resid_pre + attn(ln1(resid_pre)).

        Example:
            >>> resid = model.blocks[0](model.embed(tokens), None, model.rotary.tables(tokens.shape[1], tokens.device))
        """
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), mask, rope, kv, window_start))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def residual_writers(self) -> list[ResidualWriter]:
        """The attention's `o_proj` at `hook_attn_out`; every `down_proj` of the MLP at `hook_mlp_out` (a
        dense MLP has one, a mixture of experts one per expert and the shared expert's). No norm follows.

        Example:
            >>> [w.weights[0][0] for w in model.blocks[0].residual_writers()]   # ['attn.o_proj', 'mlp.down_proj']
        """
        downs = tuple((f"mlp.{name}", module) for name, module in self.mlp.named_modules()
                      if name.split(".")[-1] == "down_proj" and isinstance(module, nn.Linear))
        if not downs:
            raise ValueError(f"Block {self.layer}'s MLP has no down_proj layer; cannot find the MLP's residual writer.")
        return [ResidualWriter(("hook_attn_out",), (("attn.o_proj", self.attn.o_proj),)),
                ResidualWriter(("hook_mlp_out",), downs)]
