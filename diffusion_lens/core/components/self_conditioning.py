"""Self-conditioning at a pass's input (`DiffusionConfig.self_conditioning_pass`; DiffusionGemma's
decoder): the previous denoising step's logits steer the next step through a small MLP.

    soft   = softmax(logits, fp32) (cast to the embedding dtype) @ W_E * embed_scale
    signal = mlp(pre_norm(soft))                       gated, width d_mlp, cfg.mlp_act
    x0     = post_norm(token_embed + signal)           weightless RMSNorm: unit RMS at every step

Without logits (a block's first step) `signal` is exactly 0, and x0 is still normalised.

Hook points (module `self_conditioning`):

    hook_soft_embed   [batch pos d_model]   the soft embeddings (zeros without logits)
    hook_signal       [batch pos d_model]   the MLP output added to the token embeddings
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from diffusion_lens.core.components.mlp import GatedMLP
from diffusion_lens.core.components.norm import RMSNorm
from diffusion_lens.core.components.writers import ResidualWriter
from diffusion_lens.core.config import DiffusionConfig


class SelfConditioning(nn.Module):
    """`pre_norm` -> gated `mlp` -> add to the token embeddings -> weightless `post_norm` (module docstring).

    Example:
        >>> x0 = model.self_conditioning(token_embed, logits, model.W_E)   # [batch pos d_model]
    """

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_norm = RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32)
        self.mlp = GatedMLP(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias, act=cfg.mlp_act)
        self.post_norm = RMSNorm(cfg.d_model, cfg.norm_eps, weight_in_fp32=cfg.norm_weight_in_fp32, weight=False)
        self.hook_soft_embed = HookPoint()  # [batch pos d_model]
        self.hook_signal = HookPoint()  # [batch pos d_model]

    def forward(
        self,
        token_embed: Float[Tensor, "batch pos d_model"],
        logits: Optional[Float[Tensor, "batch pos d_vocab"]],
        embedding: Float[Tensor, "d_vocab d_model"],
    ) -> Float[Tensor, "batch pos d_model"]:
        """x0 from the (scaled) token embeddings and the previous step's logits (None = no signal).

        Example:
            >>> model.self_conditioning(token_embed, None, model.W_E).pow(2).mean(-1)   # ones
        """
        if logits is None:  # soft = 0: pre_norm(0) = 0 and the bias-free MLP maps 0 to exactly 0
            soft = token_embed.new_zeros(token_embed.shape)
        else:
            soft = torch.softmax(logits.float(), dim=-1).to(embedding.dtype) @ embedding
            if self.cfg.embed_scale is not None:
                soft = soft * soft.new_tensor(self.cfg.embed_scale)
        signal = self.hook_signal(self.mlp(self.pre_norm(self.hook_soft_embed(soft))))
        return self.post_norm(token_embed + signal)

    def residual_writers(self) -> list[ResidualWriter]:
        """The MLP's `down_proj` writes the signal (`hook_signal`), added to the token embeddings
        before the weightless `post_norm`. (The soft embeddings read the embedding matrix: an edit
        of its rows reaches them at `hook_soft_embed`.)

        Example:
            >>> model.self_conditioning.residual_writers()[0].hooks    # ('hook_signal',)
        """
        return [ResidualWriter(("hook_signal",), (("mlp.down_proj", self.mlp.down_proj),), (self.post_norm,))]
