"""`KVCache`: the keys and values of every canvas position, per layer, for windowed forwards.

A diffusion sampler re-reads the whole canvas at every step; most of it (the prompt, committed
blocks, sometimes the masked suffix) changes little between steps. A windowed forward
(`model(window_tokens, kv_cache=cache, window_start=s)`) computes only the window's positions and
takes every other position's keys and values from the cache; it writes the window's own keys and
values back, so the cache always holds the newest values of every position (Fast-dLLM's prefix
and dual caches are both this, with different windows). A full forward with `kv_cache=` and
`window_start=0` builds it.

Keys are stored after RoPE, rotated at their absolute canvas column (or at the canvas's
`position_ids`), so a cached key is exactly the key a full forward would compute for that column
from the same activations. A padded canvas passes its whole [batch n_pos] `attention_mask` (and
`position_ids`, if any) to every forward, windowed ones included: the window's queries are masked
and positioned as in the full forward, per layer (`DiffusionConfig.layer_attention`).

A model with passes (`DiffusionConfig.layer_scalar_passes`, DiffusionGemma) shares one cache
between them: its canvas is the prompt and every block (P + n_blocks * C columns); the encoder
pass writes the prompt's and each committed block's columns, the decoder pass reads every column
before its window (window-relative attention kinds) and the columns after a window are masked
in both, so never-written zeros there are never read.

Example:
    >>> cache = KVCache.empty(model.cfg, batch=1, n_pos=canvas.shape[1], like=model.W_E)
    >>> logits = model(canvas, kv_cache=cache)                      # full forward, fills the cache
    >>> logits = model(canvas[:, 8:16], kv_cache=cache, window_start=8)   # [1 8 vocab]
    >>> logits = model(canvas[:, 8:16], canvas_mask, kv_cache=cache, window_start=8)  # padded canvas
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig


@dataclass
class KVCache:
    """Per layer, keys (rotated) and values of every canvas position: [batch kv_head n_pos d_head]
    (each layer's own kv_head / d_head where `cfg.layer_kv_heads` / `cfg.layer_head_dims` differ).

    Example:
        >>> cache = KVCache.empty(model.cfg, batch=2, n_pos=22, like=model.W_E)
        >>> cache.keys[0].shape    # [2 n_kv_heads 22 d_head]
    """

    keys: list[Float[Tensor, "batch _kv_head n_pos _d_head"]]  # per layer: its own kv_head / d_head
    values: list[Float[Tensor, "batch _kv_head n_pos _d_head"]]

    @classmethod
    def empty(cls, cfg: DiffusionConfig, batch: int, n_pos: int, like: Tensor,
              devices: Optional[Sequence[torch.device]] = None) -> "KVCache":
        """A cache of zeros for a [batch n_pos] canvas, in `like`'s dtype, on `like`'s device or layer
        l on `devices[l]` (a model spread over several GPUs: `model.block_devices()`, because a block
        writes its keys and values in place and a copy moved to its device would lose them); fill it
        with a full forward (`window_start=0`) before any windowed one reads it.

        Example:
            >>> cache = KVCache.empty(model.cfg, batch=1, n_pos=canvas.shape[1], like=model.W_E)
            >>> _ = model(canvas, kv_cache=cache)    # fills every layer
        """
        if devices is not None and len(devices) != cfg.n_layers:
            raise ValueError(f"devices has {len(devices)} entries; the model has {cfg.n_layers} layers.")
        where = [like.device] * cfg.n_layers if devices is None else list(devices)
        shapes = [(batch, cfg.kv_heads(layer), n_pos, cfg.head_dim(layer)) for layer in range(cfg.n_layers)]
        keys, values = ([torch.zeros(shape, dtype=like.dtype, device=device) for shape, device in zip(shapes, where)]
                        for _ in range(2))
        return cls(keys, values)

    @property
    def n_pos(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """(keys, values) of one layer, the tensors its attention writes the window into.

        Example:
            >>> keys, values = cache.layer(0)
        """
        return self.keys[index], self.values[index]
