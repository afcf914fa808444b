"""`DenoisingState`: what a hook needs to know about the denoising step it is running in.

During `model.generate(...)` every HookPoint carries `hook.state`, the state of the step whose
forward is running (None in a plain forward). The sampler builds one state per step; the
generate driver publishes it to all hook points just before that step's forward.

Rows under classifier-free guidance: the forward batch is `[conditional; unconditional]`
(`n_copies == 2`), so an activation has `n_copies * batch` rows while `canvas` and every
[batch pos] mask below describe the `batch` conditional rows. `state.rows(mask)` repeats a
[batch pos] mask over the copies so that it lines up with the activation's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from diffusion_lens.core.deprecation import renamed_attribute


@dataclass(eq=False)
class DenoisingState:
    """The denoising step a forward belongs to (published as `hook.state` during generation).

    Why: a hook that steers or records "the response positions still masked at steps 0-7" needs
    the step, the denoising block and the canvas; this object carries them, computed lazily.
    Position masks are [batch pos] over canvas columns (`diffusion_lens.denoising.positions`).
    Under a KV cache (`generate(kv_cache="prefix" | "dual")`) a forward may compute only `window`;
    `computed`, `is_cached_forward`, `builds_cache` and `cache_age` say what it computes and how old
    the cached keys / values it reads are (docs: "Caching and what hooks see").

    Example:
        >>> def fn(act, hook):
        ...     s = hook.state  # None outside generate
        ...     print(s.step, s.block, s.is_masked.sum().item())
    """

    step: int  # global step, 0-based
    n_steps: int  # total steps of the run; an upper bound when the commit rule is adaptive (threshold=, factor=)
    block: int  # denoising (semi-autoregressive) block of the response, 0-based; not a layer
    n_blocks: int  # denoising blocks of the run
    step_in_block: int
    steps_in_block: int  # forwards of this block (an upper bound under an adaptive commit rule)
    canvas: Int[Tensor, "batch pos"]  # conditional canvas entering this step
    response_start: int  # width of the (left-padded) prompt: the response starts here in every row
    mask_id: Optional[int]  # None on a noise canvas (DiffusionGemma): no mask token, see `is_masked`
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None  # 1 = real token; None = no padding
    previous_canvas: Optional[Int[Tensor, "batch pos"]] = None  # canvas entering the previous step
    # what the forward gets: canvas, or [canvas; uncond]; only the `window` columns in a KV-cached forward
    model_input: Optional[Int[Tensor, "rows computed_pos"]] = None
    model_attention_mask: Optional[Int[Tensor, "rows pos"]] = None
    n_copies: int = 1  # 2 under classifier-free guidance (`guidance`; conditional rows first)
    # the run's KV cache: "prefix" | "dual" | "passes" (one cache the encoder and decoder passes share,
    # allocated at the run's first forward; every forward computes its `window`) | None (every forward full).
    # LLaDA2's "prefix" is exact (block-causal): every forward computes its `window`, the first from column 0
    kv_cache: Optional[str] = None
    # canvas columns [start, stop) this forward computes; None = all. Without a KV cache, a prefix (0, stop) whose
    # later columns the model does not read (block diffusion, LLaDA2: the canvas up to the current block's end)
    window: Optional[tuple[int, int]] = None
    cache_step: Optional[int] = None  # step whose full forward computed the cached keys / values read here
    pass_name: Optional[str] = None  # the model pass this forward runs (`cfg.layer_scalar_passes`); None = default
    # the previous step's logits fed back to the decoder (`cfg.self_conditioning_pass`); None = none
    self_conditioning_logits: Optional[Float[Tensor, "rows computed_pos vocab"]] = None
    needs_logits: bool = True  # False: the sampler ignores this forward's logits (the model skips its LM head)
    # block-causal attention for this forward: bidirectional inside blocks of this many canvas columns, causal
    # across them, counted from column 0 (LLaDA2's block diffusion; the model's `attention_block_size=`); None = the model's own
    attention_block_size: Optional[int] = None
    # per row, the column its blocks are counted from (its first real token under left padding, so each row is cut
    # into blocks as its single-prompt run; the model's `attention_block_offsets=`); None = column 0 for every row
    attention_block_offsets: Optional[Int[Tensor, " batch"]] = None
    # per row, the first canvas column of its current block (`block` counts each row's blocks from its first
    # generated one; the block is [block_start, block_start + attention_block_size)); -1 for a row that sits this
    # forward out (its block is done, it stopped, or it has fewer blocks). None = a sampler without blocks
    block_start: Optional[Int[Tensor, " batch"]] = None
    # positions whose committed token the previous step's token editing replaced (LLaDA2.1); None = a sampler that never edits
    newly_edited: Optional[Bool[Tensor, "batch pos"]] = None
    # "masked" = undecided: the mask token's positions, or on a noise canvas the positions holding noise
    _is_masked: Optional[Bool[Tensor, "batch pos"]] = field(default=None, repr=False)

    # ------------------------------------------------------------------ shapes
    @property
    def batch(self) -> int:
        return self.canvas.shape[0]

    @property
    def n_pos(self) -> int:
        return self.canvas.shape[1]

    @property
    def guidance(self) -> bool:
        """True under classifier-free guidance: this step's forward runs the conditional and
        unconditional rows together (`n_copies == 2`)."""
        return self.n_copies > 1

    cfg = renamed_attribute("cfg", "guidance", "DenoisingState")

    # ------------------------------------------------------------------ what this forward computes (KV caches)
    @property
    def is_cached_forward(self) -> bool:
        """True when this forward computes only `window` and reads every other column's keys / values
        from the KV cache (those columns get no fresh activations: hooks never see them).

        Example:
            >>> H.at("blocks.*.hook_resid_post", fn, steps=lambda s: not s.is_cached_forward)  # full forwards only
        """
        return self.window is not None and self.kv_cache is not None

    @property
    def builds_cache(self) -> bool:
        """True for a full forward of a KV-cached run: it computes every column and (re)fills the cache.

        Example:
            >>> out = model.generate(tokens, kv_cache="prefix", record=True, steps=8, gen_length=16, block_length=8)
            >>> [s.step for s in out.states if s.builds_cache]   # [0, 4]: one per denoising block
        """
        return self.kv_cache is not None and self.window is None

    @property
    def computed(self) -> slice:
        """The canvas columns this forward computes, as a slice: every hook point's position axis
        holds exactly these columns, in order (all of them in a full forward).

        Example:
            >>> def fn(act, hook):
            ...     cols = hook.state.computed          # e.g. slice(8, 16) in a dual-cached forward
            ...     steer = hook.state.is_response[:, cols]   # a [batch pos] mask lined up with act
        """
        return slice(0, self.n_pos) if self.window is None else slice(*self.window)

    @cached_property
    def is_computed(self) -> Bool[Tensor, "batch pos"]:
        """Canvas positions computed this forward (all in a full forward)."""
        out = torch.zeros_like(self.canvas, dtype=torch.bool)
        out[:, self.computed] = True
        return out

    @property
    def cache_age(self) -> Optional[int]:
        """Steps since the cached keys / values this forward reads were computed (None in a full forward).

        Example:
            >>> H.at("blocks.*.hook_resid_post", fn, steps=lambda s: s.cache_age in (None, 0, 1))
        """
        return None if self.cache_step is None else self.step - self.cache_step

    @property
    def prompt_width(self) -> int:
        """Alias of `response_start`: the padded prompt width P (canvas = [prompt P | response])."""
        return self.response_start

    # ------------------------------------------------------------------ position masks [batch pos]
    @cached_property
    def is_masked(self) -> Bool[Tensor, "batch pos"]:
        """Undecided positions of the canvas entering this step: those holding the mask token (prompt
        included) or, on a noise canvas (`mask_id` None), those holding noise (the sampler's `_is_masked`)."""
        if self._is_masked is not None:
            return self._is_masked
        if self.mask_id is None:
            raise ValueError("This state has no mask token and its sampler gave no undecided positions.")
        return self.canvas == self.mask_id

    @cached_property
    def is_pad(self) -> Bool[Tensor, "batch pos"]:
        """Left-padding positions (attention mask 0)."""
        if self.attention_mask is None:
            return torch.zeros_like(self.canvas, dtype=torch.bool)
        return self.attention_mask == 0

    @cached_property
    def is_response(self) -> Bool[Tensor, "batch pos"]:
        """Generated positions: `response_start` onwards, the same columns in every row."""
        out = torch.zeros_like(self.canvas, dtype=torch.bool)
        out[:, self.response_start :] = True
        return out

    @cached_property
    def is_prompt(self) -> Bool[Tensor, "batch pos"]:
        """Real prompt tokens (before `response_start`, pads excluded)."""
        return ~self.is_response & ~self.is_pad

    @cached_property
    def is_last_prompt(self) -> Bool[Tensor, "batch pos"]:
        """The last prompt token: column `response_start - 1` in every row (prompts are left-padded)."""
        if self.response_start == 0:
            raise ValueError("positions='last_prompt' needs a prompt; this canvas has none (response_start 0).")
        out = torch.zeros_like(self.canvas, dtype=torch.bool)
        out[:, self.response_start - 1] = True
        return out

    @cached_property
    def is_unmasked(self) -> Bool[Tensor, "batch pos"]:
        """Real positions (prompt or response) that do not hold the mask token."""
        return ~self.is_masked & ~self.is_pad

    @cached_property
    def newly_unmasked(self) -> Bool[Tensor, "batch pos"]:
        """Positions the previous step unmasked (all False at step 0 and on a noise canvas)."""
        if self.previous_canvas is None or self.mask_id is None:
            return torch.zeros_like(self.canvas, dtype=torch.bool)
        return (self.previous_canvas == self.mask_id) & ~self.is_masked

    @cached_property
    def prompt_len(self) -> Int[Tensor, " batch"]:
        """Number of real prompt tokens per row."""
        return self.is_prompt.sum(dim=1)

    @cached_property
    def mask_ratio(self) -> float:
        """Fraction of response positions still masked, over the whole batch (1.0 at step 0)."""
        response = self.is_masked[:, self.response_start :]
        return float(response.float().mean()) if response.numel() else 0.0

    # ------------------------------------------------------------------ rows of the forward batch
    def rows(self, mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "rows pos"]:
        """A [batch pos] mask repeated over the guidance copies, to line up with the forward's rows.

        Example:
            >>> m = hook.state.rows(hook.state.is_masked)   # [2*batch pos] under guidance
            >>> act[m]                                       # the masked positions' activations
        """
        return mask if self.n_copies == 1 else mask.repeat(self.n_copies, 1)

    def __repr__(self) -> str:
        guidance = ", guidance" if self.guidance else ""
        cached = ""
        if self.kv_cache is not None:
            what = "builds the cache" if self.window is None else f"computes {self.window}, cache age {self.cache_age}"
            cached = f", {self.kv_cache} KV cache: {what}"
        return (
            f"DenoisingState(step {self.step}/{self.n_steps}, block {self.block}/{self.n_blocks}, "
            f"step_in_block {self.step_in_block}/{self.steps_in_block}, canvas {tuple(self.canvas.shape)}, "
            f"response_start {self.response_start}{guidance}{cached})"
        )


__all__ = ["DenoisingState"]
