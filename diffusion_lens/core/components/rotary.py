"""Rotary position embedding in the half-split ("rotate_half", NeoX / HF-Llama) layout."""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig


def position_ids_for(
    cfg: DiffusionConfig, padding_mask: Optional[Int[Tensor, "batch pos"]]
) -> Optional[Int[Tensor, "batch pos"]]:
    """RoPE positions implied by a [batch pos] padding mask (1 = real token) under
    `cfg.position_ids_mode`; None means the default 0..pos-1 for every row.

    Why: Dream's sampler renumbers left-padded rows so each prompt starts at position 0, and gives
    pads position 1; exact parity needs the same numbers (RoPE is relative, so real tokens differ
    only by ~1e-6 otherwise). Families with `"absolute"` positions ignore the mask here.

    Example:
        >>> position_ids_for(cfg, torch.tensor([[0, 0, 1, 1, 1]]))  # renumber_padded
        tensor([[1, 1, 0, 1, 2]])
    """
    if padding_mask is None or cfg.position_ids_mode == "absolute":
        return None
    valid = padding_mask.bool()
    if bool(valid.all()):
        return None
    positions = valid.long().cumsum(dim=-1) - 1
    return positions.masked_fill(~valid, 1)


class Rotary:
    """Computes cos/sin tables once per (length, device) and rotates the first `rotary_dim` dims.

    Not an `nn.Module` and holds no buffers: tables are rebuilt on the device of the input, so a
    model initialised on the meta device and loaded shard by shard needs no fix-up. `spec` (one
    entry of `cfg.layer_rope`) with the layer's `head_dim` overrides `cfg.rope_theta` /
    `cfg.rotary_dim`: the whole head rotates, and a "proportional" spec zeroes the frequencies
    from int(partial_rotary_factor * head_dim // 2) on.

    Example:
        >>> rotary = Rotary(cfg, {"kind": "proportional", "theta": 1e6, "partial_rotary_factor": 0.25}, 32)
        >>> cos, sin = rotary.tables(10, torch.device("cpu"))   # [10 1 32]
    """

    def __init__(self, cfg: DiffusionConfig, spec: Optional[dict] = None, head_dim: Optional[int] = None):
        self.rotary_dim = cfg.rotary_dim if spec is None else head_dim
        self.theta = cfg.rope_theta if spec is None else float(spec["theta"])
        # frequencies that rotate; the rest are 0 (cos 1, sin 0): a "proportional" spec's partial RoPE
        self.n_freqs = self.rotary_dim // 2
        if spec is not None and spec["kind"] == "proportional":
            self.n_freqs = int(spec["partial_rotary_factor"] * head_dim // 2)
        self.in_fp32 = cfg.rope_in_fp32
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def tables(
        self, n_pos: int, device: torch.device, position_ids: Optional[Int[Tensor, "batch pos"]] = None
    ) -> tuple[Float[Tensor, "*batch pos 1 rot"], Float[Tensor, "*batch pos 1 rot"]]:
        """cos and sin shaped to broadcast over [batch pos head rot]."""
        if position_ids is None:
            key = (n_pos, device)
            if key not in self._tables:
                self._tables[key] = self._compute(torch.arange(n_pos, device=device))
            return self._tables[key]
        return self._compute(position_ids)

    def _compute(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        half = torch.arange(0, self.rotary_dim, 2, device=positions.device, dtype=torch.int64).float()
        inv_freq = 1.0 / (self.theta ** (half / self.rotary_dim))
        if self.n_freqs < len(inv_freq):
            inv_freq[self.n_freqs :] = 0.0
        angles = positions.float()[..., None] * inv_freq
        emb = torch.cat([angles, angles], dim=-1)[..., None, :]  # [... pos 1 rot]
        return emb.cos(), emb.sin()

    def __call__(
        self, x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor
    ) -> Float[Tensor, "batch pos head d_head"]:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.in_fp32:
            r = rot.float()
            rotated = (r * cos + _rotate_half(r) * sin).to(x.dtype)
        else:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            rotated = rot * cos + _rotate_half(rot) * sin
        return rotated if rest.shape[-1] == 0 else torch.cat([rotated, rest], dim=-1)


def layer_rotaries(cfg: DiffusionConfig) -> list[Rotary]:
    """One `Rotary` per layer, shared by the layers with the same spec and head dim (`cfg.layer_rope`).

    Example:
        >>> len({id(r) for r in layer_rotaries(cfg)})   # 2 distinct tables on DiffusionGemma
    """
    if cfg.layer_rope is None:
        return [Rotary(cfg)] * cfg.n_layers
    shared: dict[tuple, Rotary] = {}
    out = []
    for layer, spec in enumerate(cfg.layer_rope):
        key = (tuple(sorted(spec.items())), cfg.head_dim(layer))
        if key not in shared:
            shared[key] = Rotary(cfg, spec, cfg.head_dim(layer))
        out.append(shared[key])
    return out


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)
