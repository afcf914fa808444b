"""LLaDA2.x's samplers: block-diffusion threshold decoding (LLaDA2.0) and its token-editing variant (LLaDA2.1).

Reference: ../shared/reference/llada2.md §7 (upstream `LLaDA2MoeModelLM.generate`, HF remote code, and
the LLaDA2.1 editing sampler). The canvas is `[prompt | masks]` rounded up to whole blocks of
`block_length` columns counted from canvas column 0, prompt included; the model sees block-causal
attention (bidirectional inside a block, causal across blocks: `state.attention_block_size`), and each
forward reads the canvas up to the end of the current block, as upstream: `state.window` is (0, block
end), `state.computed` those columns (hooks' activations hold them; the columns after are not read). Blocks
entirely inside the prompt are skipped; the last block may run past `gen_length` (those columns are
generated and cut from `upstream_outputs`).

Each algorithm is one loop below, following upstream step for step (strict `>` thresholds, the
schedule computed from `block_length`, one `torch.multinomial` per forward on the [block_length V]
proposal matrix), so that recorded runs replay token for token, per-step canvases included. Rows of
a batch run in lockstep, block by block: a row whose block is done (or whose generation has stopped)
sits out the remaining forwards of that block unchanged.

Example:
    >>> out = model.generate(ids, gen_length=64, block_length=32, steps=32, threshold=0.95)   # the adapter's algorithm
    >>> out = model.generate(ids, algorithm="llada2.1", threshold=0.7, editing_threshold=0.5)
    >>> LLaDA2Sampler.upstream_outputs(out.sequences, out.response_start, 64, eos_id)   # upstream's return value
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.canvas import build_canvas
from diffusion_lens.denoising.samplers.base import Forward, Sampler, resolve_token_id
from diffusion_lens.denoising.state import DenoisingState

ALGORITHMS = ("llada2.0", "llada2.1")

#: `threshold` when none is given: LLaDA2.0's card (0.95) and LLaDA2.1's "quality" mode (0.7), reference §7.4.
DEFAULT_THRESHOLD = {"llada2.0": 0.95, "llada2.1": 0.7}


def threshold_schedule(block_length: int, steps: int) -> list[int]:
    """Minimum tokens committed at each of a block's `steps` steps (LLaDA2.0): `block_length` spread
    evenly, the remainder on the first steps. Computed from `block_length`, not from the masks the
    block actually holds (a first block holding prompt tokens gets the same schedule).

    Example:
        >>> threshold_schedule(5, 4)
        [2, 1, 1, 1]
    """
    return [block_length // steps + (s < block_length % steps) for s in range(steps)]


def threshold_commit(confidence: Float[Tensor, " block"], minimum: int, threshold: float) -> Bool[Tensor, " block"]:
    """The positions one row commits: every position with confidence > `threshold` (strict) when there
    are at least `minimum` of them, else the `minimum` most confident (fewer if fewer are candidates).
    Non-candidates carry confidence -inf.

    Example:
        >>> threshold_commit(torch.tensor([0.99, 0.4, float("-inf")]), 2, 0.95)
        tensor([ True,  True, False])
    """
    high = confidence > threshold
    if int(high.sum()) >= minimum:
        return high
    k = min(minimum, int((confidence > float("-inf")).sum()))
    out = torch.zeros_like(high)
    out[torch.topk(confidence, k).indices] = True
    return out


def propose(
    logits: Float[Tensor, "rows vocab"],
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    greedy: bool,
    generator: Optional[torch.Generator],
) -> tuple[Int[Tensor, " rows"], Float[Tensor, " rows"]]:
    """(token, confidence) per row, as upstream's `_sample_with_temperature_topk_topp` (reference §7.1).

    `greedy`: argmax, confidence its softmax probability, no random draw. Otherwise: logits divided by
    `temperature` (when > 0 and != 1; 0 samples at temperature 1, as upstream LLaDA2.0), top-k (ties
    kept), top-p (the first token always kept), then one `torch.multinomial` over all rows.

    Example:
        >>> tokens, conf = propose(logits[0, -32:], 0.8, 40, 0.9, greedy=False, generator=None)
    """
    if greedy:
        probs = F.softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, order, remove), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator)
    return tokens.squeeze(-1), probs.gather(-1, tokens).squeeze(-1)


@dataclasses.dataclass(frozen=True)
class LLaDA2Sampler(Sampler):
    """LLaDA2.x block-diffusion sampling: threshold decoding (`algorithm="llada2.0"`) or threshold
    decoding with token editing (`"llada2.1"`).

    Why: the algorithms LLaDA2.0-mini/flash and LLaDA2.1-mini/flash were released with, batched (upstream
    runs one prompt at a time) and observable step by step (`hook.state`). Upstream's keyword names are
    the options, so a recorded call's kwargs replay unchanged; `algorithm` picks the loop (named so
    because `generate(sampler=...)` takes a Sampler object; the adapter picks the checkpoint's).

    LLaDA2.0 (§7.2): per block, up to `steps` forwards (capped at `gen_length // minimal_topk`); each
    commits every masked position whose confidence is > `threshold`, or at least the schedule's count
    (`threshold_schedule`) of the most confident. Generation stops after the block holding the first
    `eos_id` (even with `eos_early_stop=False`, as upstream); `eos_early_stop=True` also stops as soon
    as an EOS is committed with no mask before it.
    LLaDA2.1 (§7.3): `steps` is accepted and unused, as upstream; each block loops: fill (> `threshold`,
    at least `num_to_transfer`), and edit committed response tokens whose new proposal differs with
    probability > `editing_threshold` (None: no editing); a block ends once it holds no mask and an
    iteration edits nothing, or after `max_post_steps` mask-free iterations. Without `eos_early_stop`
    it never stops early. Where upstream loops forever (the model proposes the mask token itself, so a
    mask never goes away), a block here ends after `max_block_steps` forwards with a warning.

    Deliberate differences from upstream (docs/families/llada2.md "Samplers"): `temperature=0` is greedy
    (the hub's greedy-decoding PR; LLaDA2.1 always is) unless `greedy=False`, which restores upstream
    LLaDA2.0's sampling at temperature 1; the generate output is the whole canvas (upstream's return
    value, cut after the first EOS, is `upstream_outputs`; upstream's `eos_early_stop` return that
    includes the prompt is not copied); batches and left padding work (blocks are counted from canvas
    column 0 of the padded canvas, so a padded row equals its single-prompt run when its padding is a
    whole number of blocks).

    Random numbers: none when greedy; otherwise one `torch.multinomial` on the [batch * block_length
    vocab] proposal matrix per forward, from `generator` (or the global RNG, as upstream).

    Example:
        >>> sampler = LLaDA2Sampler(gen_length=64, block_length=32, steps=32, mask_id=156895, eos_id=156892)
        >>> out = model.generate(ids, sampler=sampler)
        >>> out = model.generate(ids, sampler=sampler.with_options(algorithm="llada2.1", editing_threshold=0.5))
    """

    algorithm: Literal["llada2.0", "llada2.1"] = "llada2.0"
    gen_length: int = 512
    block_length: int = 32
    steps: int = 32  # per block (LLaDA2.0); accepted and unused by LLaDA2.1, as upstream
    threshold: Optional[float] = None  # None = DEFAULT_THRESHOLD[algorithm]
    minimal_topk: int = 1
    eos_early_stop: bool = True
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    greedy: bool = True  # temperature 0 is argmax; False: upstream LLaDA2.0 samples at temperature 1 there
    editing_threshold: Optional[float] = 0.5  # LLaDA2.1 only; None = no editing
    max_post_steps: int = 16  # LLaDA2.1 only: mask-free iterations per block
    num_to_transfer: int = 1  # LLaDA2.1 only: masks filled per iteration at least
    max_block_steps: Optional[int] = None  # LLaDA2.1 only: forwards per block at most; None = block_length + max_post_steps
    mask_id: Optional[int] = None
    eos_id: Optional[int] = None

    def __post_init__(self):
        problems = []
        if self.algorithm not in ALGORITHMS:
            problems.append(f"algorithm={self.algorithm!r} must be one of {ALGORITHMS}")
        for name in ("gen_length", "block_length", "steps", "minimal_topk", "num_to_transfer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive int")
        if isinstance(self.max_post_steps, bool) or not isinstance(self.max_post_steps, int) or self.max_post_steps < 0:
            problems.append(f"max_post_steps={self.max_post_steps!r} must be an int >= 0")
        if self.max_block_steps is not None and (not isinstance(self.max_block_steps, int) or self.max_block_steps <= 0):
            problems.append(f"max_block_steps={self.max_block_steps!r} must be a positive int (or None)")
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature!r} must be >= 0")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            problems.append(f"top_k={self.top_k!r} must be an int >= 0 (or None)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1] (or None)")
        if problems:
            raise ValueError("Invalid LLaDA2Sampler options: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------ the run's shape
    def commit_threshold(self) -> float:
        """`threshold`, or the algorithm's recommended one (`DEFAULT_THRESHOLD`)."""
        return DEFAULT_THRESHOLD[self.algorithm] if self.threshold is None else self.threshold

    def steps_per_block(self) -> int:
        """Forwards per block at most: LLaDA2.0's `min(steps, gen_length // minimal_topk)` (at least 1),
        LLaDA2.1's `max_block_steps` (default block_length + max_post_steps: enough whenever the model
        never proposes the mask token)."""
        if self.algorithm == "llada2.0":
            return max(1, min(self.steps, self.gen_length // self.minimal_topk))
        return self.block_length + self.max_post_steps if self.max_block_steps is None else self.max_block_steps

    def block_range(self, prompt_width: int) -> range:
        """The canvas blocks a run over a `prompt_width`-column prompt denoises (blocks inside the prompt are skipped).

        Example:
            >>> LLaDA2Sampler(gen_length=16, block_length=4).block_range(6)
            range(1, 6)
        """
        return range(prompt_width // self.block_length, math.ceil((prompt_width + self.gen_length) / self.block_length))

    def n_blocks(self) -> int:
        # the most blocks any prompt width gives (`block_range`): a prompt ending just after a block start
        return math.ceil((self.gen_length + self.block_length - 1) / self.block_length)

    def n_steps(self) -> int:
        return self.n_blocks() * self.steps_per_block()

    def response_length(self) -> int:
        return self.gen_length

    def fixed_steps(self) -> bool:
        return False  # blocks end early once filled, and generation stops after an EOS

    def step_windows(self, prompt_width: int) -> None:
        return None  # each forward reads the canvas up to its block's end; blocks end when their masks do

    def greedy_proposal(self) -> bool:
        """Whether proposals are argmax: temperature 0 (LLaDA2.0 also needs no top_k / top_p, as the hub's
        greedy PR, and `greedy=True`)."""
        if self.temperature != 0:
            return False
        if self.algorithm == "llada2.1":
            return True
        return self.greedy and not self.top_k and (self.top_p is None or self.top_p >= 1)

    def stochastic(self) -> bool:
        return not self.greedy_proposal()

    @staticmethod
    def upstream_outputs(
        sequences: Int[Tensor, "batch pos"], response_start: int, gen_length: int, eos_id: int
    ) -> list[Int[Tensor, " gen"]]:
        """What upstream's `generate` returns, per row: the response cut to `gen_length`, then after its
        first `eos_id` (EOS included).

        Example:
            >>> out = model.generate(ids, gen_length=16, block_length=4, steps=4)
            >>> LLaDA2Sampler.upstream_outputs(out.sequences, out.response_start, 16, eos_id=156892)[0]
        """
        outputs = []
        for row in sequences[:, response_start : response_start + gen_length]:
            eos = (row == eos_id).nonzero()
            outputs.append(row if len(eos) == 0 else row[: int(eos[0]) + 1])
        return outputs

    # ------------------------------------------------------------------ the loops
    def run(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        loop = self._run_llada20 if self.algorithm == "llada2.0" else self._run_llada21
        yield from loop(cfg, prompt, attention_mask, forward, generator)

    def _canvas(self, cfg, prompt, attention_mask):
        """(canvas [batch N], its attention mask or None, mask_id, eos_id): N = whole blocks covering prompt + gen_length."""
        mask_id = resolve_token_id(self.mask_id, cfg.mask_token_id, "mask_id", "mask_token_id")
        eos_id = resolve_token_id(self.eos_id, cfg.eos_token_id, "eos_id", "eos_token_id")
        if attention_mask is not None:
            pads = (attention_mask == 0).sum(1)
            shifted = (pads % self.block_length != 0).nonzero().flatten().tolist()
            if shifted:
                warnings.warn(
                    f"Rows {shifted} have {pads[shifted].tolist()} left pads, not a multiple of block_length="
                    f"{self.block_length}: blocks are counted from column 0 of the padded canvas, so these rows are "
                    "cut into blocks differently from their single-prompt runs (upstream counts from the prompt's "
                    "first token) and their tokens may differ. Batch prompts whose lengths differ by multiples of "
                    "block_length, or generate them one at a time.",
                    UserWarning, stacklevel=4,
                )
        n_pos = self.block_range(prompt.shape[1]).stop * self.block_length
        n_ctx = cfg.n_ctx
        if n_ctx is not None and n_pos > n_ctx:
            raise ValueError(
                f"The canvas is {n_pos} positions (prompt {prompt.shape[1]} + gen_length {self.gen_length}, rounded up "
                f"to whole blocks of {self.block_length}), more than this model's context n_ctx={n_ctx}. Shorten the "
                "prompt or gen_length."
            )
        x, mask = build_canvas(prompt, attention_mask, n_pos - prompt.shape[1], mask_id)
        return x, mask, mask_id, eos_id

    def _state(self, x, mask, previous, *, step, block, step_in_block, end, mask_id, response_start,
               newly_edited=None) -> DenoisingState:
        """The state of a forward over canvas columns [0, end) (the current block's end): `window` (0, end),
        so hooks, `cache=` and `state.computed` line up with the columns the forward computes; the columns
        after it are not read at all (block-causal attention), so no KV cache is involved."""
        return DenoisingState(
            step=step, n_steps=self.n_steps(), block=block, n_blocks=self.n_blocks(), step_in_block=step_in_block,
            steps_in_block=self.steps_per_block(), canvas=x, response_start=response_start, mask_id=mask_id,
            attention_mask=mask, previous_canvas=previous, model_input=x[:, :end], model_attention_mask=mask,
            window=(0, end), attention_block_size=self.block_length, newly_edited=newly_edited,
            _is_masked=x == mask_id,
        )

    def _run_llada20(self, cfg, prompt, attention_mask, forward, generator):
        """LLaDA2.0 threshold decoding (reference §7.2), all rows in lockstep."""
        x, mask, mask_id, eos_id = self._canvas(cfg, prompt, attention_mask)
        batch, width = prompt.shape
        bl, threshold, greedy = self.block_length, self.commit_threshold(), self.greedy_proposal()
        real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        schedule = threshold_schedule(bl, self.steps_per_block())
        stopped = torch.zeros(batch, dtype=torch.bool, device=x.device)
        blocks, step, previous = self.block_range(width), 0, None
        for b in blocks:
            start, end = b * bl, (b + 1) * bl
            for s, minimum in enumerate(schedule):
                active = (x[:, start:end] == mask_id) & ~stopped[:, None]
                if not bool(active.any()):
                    break
                state = self._state(x, mask, previous, step=step, block=b - blocks.start, step_in_block=s, end=end,
                                    mask_id=mask_id, response_start=width)
                logits = forward(state)[:, -bl:]
                tokens, p = propose(logits.reshape(batch * bl, -1), self.temperature, self.top_k, self.top_p, greedy,
                                    generator)
                confidence = p.view(batch, bl).masked_fill(~active, float("-inf"))
                commit = torch.stack([threshold_commit(row, minimum, threshold) if bool(on.any()) else on
                                      for row, on in zip(confidence, active)])
                previous, x = x, x.clone()
                x[:, start:end] = torch.where(commit, tokens.view(batch, bl), x[:, start:end])
                if self.eos_early_stop:  # stop a row once an EOS is committed with no mask before it
                    for r in (commit & (x[:, start:end] == eos_id)).any(1).nonzero().flatten().tolist():
                        first = int(((x[r, :end] == eos_id) & real[r, :end]).nonzero()[0])
                        stopped[r] |= not bool((x[r, width:first] == mask_id).any())
                step += 1
                yield state, x
            stopped |= (x[:, width:end] == eos_id).any(1)  # upstream stops after the EOS's block in any case
            if bool(stopped.all()):
                return

    def _run_llada21(self, cfg, prompt, attention_mask, forward, generator):
        """LLaDA2.1 threshold decoding with token editing (reference §7.3), all rows in lockstep."""
        x, mask, mask_id, eos_id = self._canvas(cfg, prompt, attention_mask)
        batch, width = prompt.shape
        bl, threshold, greedy = self.block_length, self.commit_threshold(), self.greedy_proposal()
        editing = self.editing_threshold
        stopped = torch.zeros(batch, dtype=torch.bool, device=x.device)
        blocks, step, previous, edited = self.block_range(width), 0, None, None
        for b in blocks:
            start, end = b * bl, (b + 1) * bl
            in_prompt = torch.arange(start, end, device=x.device) < width
            done, post, i = stopped.clone(), torch.zeros(batch, dtype=torch.long, device=x.device), 0
            while True:
                old = x[:, start:end]
                active = old == mask_id
                mask_free = ~active.any(1) & ~done
                post += mask_free.long()
                done |= mask_free & (post > self.max_post_steps)
                if bool(done.all()):
                    break
                if i == self.steps_per_block():
                    left = (~done).nonzero().flatten().tolist()
                    warnings.warn(
                        f"LLaDA2.1 block {b - blocks.start} (canvas columns {start}..{end - 1}) of rows {left} still "
                        f"holds masks after max_block_steps={i} forwards: the model keeps proposing the mask token "
                        f"(id {mask_id}), which upstream's loop would retry forever. Leaving the block with those masks; "
                        "pass max_block_steps= to allow more forwards, or temperature > 0 to draw other tokens.",
                        RuntimeWarning, stacklevel=2,
                    )
                    break
                state = self._state(x, mask, previous, step=step, block=b - blocks.start, step_in_block=i, end=end,
                                    mask_id=mask_id, response_start=width, newly_edited=edited)
                logits = forward(state)[:, -bl:]
                tokens, p = propose(logits.reshape(batch * bl, -1), self.temperature, self.top_k, self.top_p, greedy,
                                    generator)
                tokens, p = tokens.view(batch, bl), p.view(batch, bl)
                live = active & ~done[:, None]
                confidence = p.masked_fill(~live, float("-inf"))
                fill = torch.stack([threshold_commit(row, self.num_to_transfer, threshold) if bool(on.any()) else on
                                    for row, on in zip(confidence, live)])
                edit = ~active & ~in_prompt & ~done[:, None] & (tokens != old)
                edit &= p > editing if editing is not None else torch.zeros_like(edit)
                previous, x = x, x.clone()
                x[:, start:end] = torch.where(fill | edit, tokens, old)
                edited = torch.zeros_like(x, dtype=torch.bool)
                edited[:, start:end] = edit
                done |= mask_free & ~edit.any(1)
                step, i = step + 1, i + 1
                yield state, x
            if self.eos_early_stop:
                response = x[:, width:end]
                stopped |= ~(response == mask_id).any(1) & (response == eos_id).any(1)
            if bool(stopped.all()):
                return


__all__ = ["ALGORITHMS", "DEFAULT_THRESHOLD", "LLaDA2Sampler", "propose", "threshold_commit", "threshold_schedule"]
