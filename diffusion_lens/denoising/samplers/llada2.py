"""LLaDA2.x's samplers: block-diffusion threshold decoding (LLaDA2.0) and its token-editing variant (LLaDA2.1).

Reference: ../shared/reference/llada2.md §7 (upstream `LLaDA2MoeModelLM.generate`, HF remote code, and
the LLaDA2.1 editing sampler). The canvas is `[prompt | masks]` rounded up to whole blocks of
`block_length` columns counted from the prompt's first token, prompt included (per row: a left-padded
row's blocks start after its pads, `state.attention_block_offsets`); the model sees block-causal
attention (bidirectional inside a block, causal across blocks: `state.attention_block_size`), and each
forward reads the canvas up to the end of the current block, as upstream: `state.window` is (0, block
end) (in a batch the furthest running row's), `state.computed` those columns (hooks' activations hold
them; the columns after are not read). Blocks entirely inside the prompt are skipped; the last block may
run past `gen_length` (those columns are generated and cut from `upstream_outputs`).

`kv_cache="prefix"` caches committed blocks exactly: under block-causal attention a committed block's keys
and values never change, so the first forward of block k computes blocks k-1 (now final) and k, reading
every earlier column from the run's KV cache, and its later forwards compute block k only (`state.window`;
in a batch, the union over running rows). Same tokens as without the cache, a fraction of the work.

Each algorithm is one loop below, following upstream step for step (strict `>` thresholds, the
schedule computed from `block_length`, one `torch.multinomial` per forward on the [block_length V]
proposal matrix), so that recorded runs replay token for token, per-step canvases included. Rows of
a batch run in lockstep, block by block, each on its own block grid (`state.block_start`): a row whose
block is done, whose generation has stopped or whose blocks are used up sits out unchanged, so each row
follows its single-prompt run forward for forward (greedy; a seeded batch shares its draws).

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
from diffusion_lens.denoising.samplers.base import Forward, KVCacheMode, Sampler, resolve_token_id
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
    includes the prompt is not copied); batches and any left padding work (each row's blocks are
    counted from its first real token, so a greedy row equals its single-prompt run).

    KV cache (`kv_cache="prefix"`, reference §5): exact, not an approximation as Fast-dLLM's: block k's first
    forward computes blocks k-1 and k (columns `state.window`), its later forwards block k only, every earlier
    column's keys / values coming from the cache (hooks see only the window's columns, `state.computed`).

    Random numbers: none when greedy; otherwise one `torch.multinomial` on the [batch * block_length
    vocab] proposal matrix per forward, from `generator` (or the global RNG, as upstream): a seeded
    single run draws as upstream, a seeded batch's rows draw differently from their single runs.

    Example:
        >>> sampler = LLaDA2Sampler(gen_length=64, block_length=32, steps=32, mask_id=156895, eos_id=156892)
        >>> out = model.generate(ids, sampler=sampler)
        >>> out = model.generate(ids, sampler=sampler.with_options(algorithm="llada2.1", editing_threshold=0.5))
        >>> out = model.generate(ids, sampler=sampler.with_options(kv_cache="prefix"))   # same tokens, faster
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
    kv_cache: KVCacheMode = None  # "prefix": committed blocks' keys / values cached (exact); None: prefix forwards

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
        if self.kv_cache not in (None, "prefix"):
            problems.append(f"kv_cache={self.kv_cache!r} must be None or 'prefix' (block-causal forwards never read "
                            "the columns after the current block, so 'prefix' already computes the current block only)")
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

    def kv_cache_mode(self) -> KVCacheMode:
        return self.kv_cache

    def fixed_steps(self) -> bool:
        return False  # blocks end early once filled, and generation stops after an EOS

    def step_windows(self, prompt_width: int) -> None:
        return None  # each forward computes up to its block's end; blocks end when their masks do

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
        """The run's layout: (canvas [batch N], its attention mask or None, each row's pads [batch] or None,
        first block [batch], blocks [batch], mask_id, eos_id). Row r's blocks are counted from its first real
        token (column pads_r), as its single-prompt run's from column 0: it denoises blocks first_r .. and its
        canvas ends at pads_r + ceil((prompt_r + gen_length) / block_length) * block_length; N is the widest."""
        mask_id = resolve_token_id(self.mask_id, cfg.mask_token_id, "mask_id", "mask_token_id")
        eos_id = resolve_token_id(self.eos_id, cfg.eos_token_id, "eos_id", "eos_token_id")
        batch, width = prompt.shape
        pads = None if attention_mask is None else (attention_mask == 0).sum(1).to(prompt.device)
        lengths = width - (torch.zeros(batch, dtype=torch.long, device=prompt.device) if pads is None else pads)
        first = lengths // self.block_length
        stop = (lengths + self.gen_length + self.block_length - 1) // self.block_length
        n_pos = int(((width - lengths) + stop * self.block_length).max())
        n_ctx = cfg.n_ctx
        if n_ctx is not None and n_pos > n_ctx:
            raise ValueError(
                f"The canvas is {n_pos} positions (prompt {width} + gen_length {self.gen_length}, each row's "
                f"rounded up to whole blocks of {self.block_length}), more than this model's context n_ctx={n_ctx}. Shorten the "
                "prompt or gen_length."
            )
        x, mask = build_canvas(prompt, attention_mask, n_pos - width, mask_id)
        return x, mask, pads, first, stop - first, mask_id, eos_id

    def _state(self, x, mask, previous, *, step, block, step_in_block, window, cache_step, mask_id, response_start,
               pads, block_start, newly_edited=None) -> DenoisingState:
        """The state of a forward over canvas columns `window` = [begin, end): (0, the furthest running row's
        block end) without a KV cache (the columns after it are not read at all: block-causal attention), the
        `_window` of running rows under `kv_cache="prefix"`; hooks, `cache=` and `state.computed` line up with it."""
        begin, end = window
        return DenoisingState(
            step=step, n_steps=self.n_steps(), block=block, n_blocks=self.n_blocks(), step_in_block=step_in_block,
            steps_in_block=self.steps_per_block(), canvas=x, response_start=response_start, mask_id=mask_id,
            attention_mask=mask, previous_canvas=previous, model_input=x[:, begin:end], model_attention_mask=mask,
            window=window, kv_cache=self.kv_cache, cache_step=cache_step, attention_block_size=self.block_length,
            attention_block_offsets=pads,
            block_start=block_start, newly_edited=newly_edited, _is_masked=x == mask_id,
        )

    def _block(self, pads, first, k, n_pos):
        """Each row's k-th denoised block: its first canvas column [batch] (on the row's own grid) and its
        column indices [batch block_length] (clamped to the canvas for rows with fewer blocks, which sit out)."""
        start = (first + k) * self.block_length + (0 if pads is None else pads)
        return start, (start[:, None] + torch.arange(self.block_length, device=start.device)).clamp(max=n_pos - 1)

    def _window(self, start, running, first_of_block, k) -> tuple[int, int]:
        """The canvas columns [begin, end) a forward computes: up to the furthest running row's block end, from
        column 0 without a KV cache (and at the run's first forward, which fills the cache); under
        `kv_cache="prefix"` from the earliest running row's previous block start at a block's first forward
        (that block is now final: its cached keys / values, computed while it was denoised, are refreshed) and
        from its block start at later forwards. Columns of a row past its own block end are not read by its
        block (block-causal), and are recomputed before they are: each row's cache stays exact."""
        end = int((start + self.block_length)[running].max())
        if self.kv_cache is None or (k == 0 and first_of_block):
            return 0, end
        begin = int(start[running].min()) - (self.block_length if first_of_block else 0)
        return max(begin, 0), end

    def _forward_block(self, forward, state, columns, running, generator):
        """(tokens, confidence) [batch block_length] of each running row's block (others: their column 0's)."""
        batch, bl = columns.shape
        logits = forward(state)
        columns = columns - state.window[0]  # the logits cover the window's columns
        index = torch.where(running[:, None], columns, torch.zeros_like(columns))
        logits = logits[torch.arange(batch, device=logits.device)[:, None], index]
        tokens, p = propose(logits.reshape(batch * bl, -1), self.temperature, self.top_k, self.top_p,
                            self.greedy_proposal(), generator)
        return tokens.view(batch, bl), p.view(batch, bl)

    def _run_llada20(self, cfg, prompt, attention_mask, forward, generator):
        """LLaDA2.0 threshold decoding (reference §7.2), all rows in lockstep, each on its own block grid."""
        x, mask, pads, first, count, mask_id, eos_id = self._canvas(cfg, prompt, attention_mask)
        batch, width = prompt.shape
        bl, threshold = self.block_length, self.commit_threshold()
        real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        schedule = threshold_schedule(bl, self.steps_per_block())
        rows = torch.arange(batch, device=x.device)
        stopped = count <= 0
        step, previous, cache_step = 0, None, None
        for k in range(int(count.max())):
            start, columns = self._block(pads, first, k, x.shape[1])
            stopped |= count <= k
            for s, minimum in enumerate(schedule):
                block = x.gather(1, columns)
                active = (block == mask_id) & ~stopped[:, None]
                running = active.any(1)
                if not bool(running.any()):
                    break
                state = self._state(x, mask, previous, step=step, block=k, step_in_block=s,
                                    window=self._window(start, running, s == 0, k), cache_step=cache_step,
                                    mask_id=mask_id, response_start=width, pads=pads,
                                    block_start=start.masked_fill(~running, -1))
                if s == 0 and self.kv_cache is not None:
                    cache_step = step  # this forward computes the final previous block (the later forwards read it)
                tokens, p = self._forward_block(forward, state, columns, running, generator)
                confidence = p.masked_fill(~active, float("-inf"))
                commit = torch.stack([threshold_commit(row, minimum, threshold) if bool(on.any()) else on
                                      for row, on in zip(confidence, active)])
                previous, x = x, x.clone()
                x[rows[:, None], columns] = torch.where(commit, tokens, block)
                if self.eos_early_stop:  # stop a row once an EOS is committed with no mask before it
                    for r in (commit & (tokens == eos_id)).any(1).nonzero().flatten().tolist():
                        e = int(start[r]) + bl
                        f = int(((x[r, :e] == eos_id) & real[r, :e]).nonzero()[0])
                        stopped[r] |= not bool((x[r, width:f] == mask_id).any())
                step += 1
                yield state, x
            for r in (~stopped).nonzero().flatten().tolist():  # upstream stops after the EOS's block in any case
                stopped[r] |= bool((x[r, width : int(start[r]) + bl] == eos_id).any())
            if bool(stopped.all()):
                return

    def _run_llada21(self, cfg, prompt, attention_mask, forward, generator):
        """LLaDA2.1 threshold decoding with token editing (reference §7.3), all rows in lockstep, each on its
        own block grid."""
        x, mask, pads, first, count, mask_id, eos_id = self._canvas(cfg, prompt, attention_mask)
        batch, width = prompt.shape
        bl, threshold, editing = self.block_length, self.commit_threshold(), self.editing_threshold
        rows = torch.arange(batch, device=x.device)
        stopped = count <= 0
        step, previous, edited, cache_step = 0, None, None, None
        for k in range(int(count.max())):
            start, columns = self._block(pads, first, k, x.shape[1])
            stopped |= count <= k
            in_prompt = columns < width
            done, post, i = stopped.clone(), torch.zeros(batch, dtype=torch.long, device=x.device), 0
            while True:
                old = x.gather(1, columns)
                active = old == mask_id
                mask_free = ~active.any(1) & ~done
                post += mask_free.long()
                done |= mask_free & (post > self.max_post_steps)
                if bool(done.all()):
                    break
                if i == self.steps_per_block():
                    left = (~done).nonzero().flatten().tolist()
                    warnings.warn(
                        f"LLaDA2.1 block {k} (canvas columns {start[left].tolist()} + 0..{bl - 1}) of rows {left} "
                        f"still holds masks after max_block_steps={i} forwards: the model keeps proposing the mask "
                        f"token (id {mask_id}), which upstream's loop would retry forever. Leaving the block with those "
                        "masks; pass max_block_steps= to allow more forwards, or temperature > 0 to draw other tokens.",
                        RuntimeWarning, stacklevel=2,
                    )
                    break
                running = ~done
                state = self._state(x, mask, previous, step=step, block=k, step_in_block=i,
                                    window=self._window(start, running, i == 0, k), cache_step=cache_step,
                                    mask_id=mask_id, response_start=width, pads=pads,
                                    block_start=start.masked_fill(done, -1), newly_edited=edited)
                if i == 0 and self.kv_cache is not None:
                    cache_step = step  # this forward computes the final previous block (the later forwards read it)
                tokens, p = self._forward_block(forward, state, columns, running, generator)
                live = active & running[:, None]
                confidence = p.masked_fill(~live, float("-inf"))
                fill = torch.stack([threshold_commit(row, self.num_to_transfer, threshold) if bool(on.any()) else on
                                    for row, on in zip(confidence, live)])
                edit = ~active & ~in_prompt & running[:, None] & (tokens != old)
                edit &= p > editing if editing is not None else torch.zeros_like(edit)
                previous, x = x, x.clone()
                x[rows[:, None], columns] = torch.where(fill | edit, tokens, old)
                edited = torch.zeros_like(x, dtype=torch.bool)
                edited[rows[:, None], columns] = edit
                done |= mask_free & ~edit.any(1)
                step, i = step + 1, i + 1
                yield state, x
            if self.eos_early_stop:
                for r in (~stopped).nonzero().flatten().tolist():
                    response = x[r, width : int(start[r]) + bl]
                    stopped[r] |= not bool((response == mask_id).any()) and bool((response == eos_id).any())
            if bool(stopped.all()):
                return


__all__ = ["ALGORITHMS", "DEFAULT_THRESHOLD", "LLaDA2Sampler", "propose", "threshold_commit", "threshold_schedule"]
