"""Dream's `diffusion_generate`: one fixed canvas, a linear time grid, four unmasking orders.

Reference: docs/families/dream.md, section "Sampler" (upstream `generation_utils.py` of
Dream-org/Dream-v0-Instruct-7B). Each step is one forward over the whole canvas; the logits the
algorithm sees are already aligned to tokens (the driver applies `model.token_logits`, i.e. Dream's
one-position shift), then `logits_hook` may edit them, then masked positions are filled:

  * `alg="origin"`: every masked position is committed with probability 1 - s/t (1 at the last step),
    drawn with `torch.rand(n_masked)` at every step;
  * `alg in {"maskgit_plus", "topk_margin", "entropy"}`: the k most confident positions per row,
    k = int(n * (1 - s/t)) with n the *batch-average* mask count (int(n) at the last step), the
    confidence being the top-1 probability, top1 - top2, or the negative entropy. `alg_temp > 0`
    samples the positions from softmax(confidence / alg_temp) instead of taking the top k.

Tokens are drawn after `temperature` / `top_p` / `top_k` filtering (greedy at temperature 0).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Literal, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.canvas import build_canvas
from diffusion_lens.denoising.samplers.base import Forward, KVCacheMode, Sampler, check_kv_cache_options, resolve_token_id
from diffusion_lens.denoising.samplers.transfer import select_threshold
from diffusion_lens.denoising.state import DenoisingState

TokensHook = Callable[[Optional[int], Int[Tensor, "batch pos"], Optional[Tensor]], Int[Tensor, "batch pos"]]
LogitsHook = Callable[[int, Int[Tensor, "batch pos"], Float[Tensor, "batch pos vocab"]], Float[Tensor, "batch pos vocab"]]
ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold")


@dataclasses.dataclass(frozen=True)
class DreamSampler(Sampler):
    """Dream / DiffuCoder sampling (`diffusion_generate`), step for step as upstream.

    Why: the algorithm Dream was released with; the fixtures pin every `alg` token for token,
    including the seeded runs (same draws from the same RNG in the same order).

    Defaults are the *documented* upstream ones (README / `DreamGenerationConfig`): temperature 0,
    no top-p / top-k, `alg="origin"`, `alg_temp=None`, `eps=1e-3`, 512 steps; `max_new_tokens=512`
    as in the official demo (upstream falls back to 20 new tokens without it). Under transformers
    4.46 upstream's *effective* defaults differ (temperature 1.0, top_k 50, top_p 1.0 are copied in
    from the model config); pass those explicitly to reproduce such runs. The official demos use
    `alg="entropy", temperature=0.2, top_p=0.95, alg_temp=0.0`; DiffuCoder recommends
    `alg="entropy", temperature=0.3, top_p=0.95`.

    Upstream's two callbacks are options here, with upstream's signatures and call order
    (`tokens_hook(None, x, None)` once before the first step, then per step `logits_hook(i, x,
    logits)` after the shift and `tokens_hook(i, x, logits)` after the update):
      * `logits_hook` = `generation_logits_hook_func(step, x, logits) -> logits`;
      * `tokens_hook` = `generation_tokens_hook_func(step, x, logits) -> x` (e.g. pin tokens).
    They receive copies, so editing in place and returning is fine. Activation hooks
    (`generate(hooks=...)`) work as for every family and see `hook.state`.

    Upstream behaviours kept on purpose: the transfer count is a batch average (rows with more masks
    can end with masks left; rows with fewer can get non-masked positions re-masked); the first
    step commits one token fewer when max_new_tokens / steps is an integer (float32 schedule); the
    mask token is never suppressed; confidences are computed in the logits dtype. Not supported:
    `num_return_sequences` (repeat the prompt instead) and `max_length` (use `max_new_tokens`).
    Random numbers: at temperature 0 without `alg_temp` the run is deterministic even with
    `alg="origin"` (whose commit draws upstream takes from the global RNG): without `seed` /
    `generator` the driver seeds them with `DEFAULT_SEED`. Sampled runs (temperature > 0 or
    `alg_temp`) draw from `generator`, else the global torch RNG, as upstream.

    Fast-dLLM (NVlabs/Fast-dLLM `v1/dream`): `kv_cache="prefix"` / `"dual"` (upstream's `use_cache=True`
    and `dual_cache=True` are accepted) runs the block sampler `_run_blocks` with `block_length`
    (default 32); `alg="confidence_threshold"` commits by `threshold` (with a KV cache, or alone:
    upstream's uncached threshold loop, one prompt at a time). Intended semantics by default: the
    mask token is never proposed, and the forward upstream computes and discards at the end of a
    schedule-path block is skipped; `upstream_quirks=True` restores both.

    Example:
        >>> fast = model.generate(tokens, max_new_tokens=256, steps=256, kv_cache="prefix", alg="confidence_threshold")
        >>> out = model.generate("Write a haiku", max_new_tokens=64, steps=64, alg="entropy",
        ...                      temperature=0.2, top_p=0.95, alg_temp=0.0)
        >>> pin = lambda step, x, logits: x.index_fill_(1, torch.tensor([-1]), eos_id)  # tokens hook
        >>> out = model.generate(tokens, sampler=DreamSampler(max_new_tokens=16, steps=8, tokens_hook=pin))
    """

    commits_a_token_per_step: ClassVar[bool] = True

    steps: int = 512
    max_new_tokens: int = 512
    eps: float = 1e-3
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold"] = "origin"
    alg_temp: Optional[float] = None
    mask_id: Optional[int] = None
    tokens_hook: Optional[TokensHook] = None
    logits_hook: Optional[LogitsHook] = None
    # Fast-dLLM (NVlabs/Fast-dLLM v1/dream): the block sampler with a KV cache, threshold decoding.
    kv_cache: KVCacheMode = None
    block_length: Optional[int] = None  # None: the whole response (no KV cache) or 32 (upstream's default, KV cache)
    threshold: float = 0.9  # read only by alg="confidence_threshold"
    refresh: Union[str, int] = "block"
    upstream_quirks: bool = False

    def __post_init__(self):
        problems = []
        if self.steps <= 0 or self.max_new_tokens <= 0:
            problems.append("steps and max_new_tokens must be positive")
        if self.alg not in ALGORITHMS:
            problems.append(f"alg={self.alg!r} must be one of {ALGORITHMS}")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if self.top_k is not None and self.top_k <= 0:
            problems.append("top_k must be positive or None")
        if not 0 < self.eps < 1:
            problems.append("eps must be in (0, 1)")
        problems += check_kv_cache_options(self.kv_cache, self.refresh, self.threshold, None)
        if self.kv_cache is None:
            if self.block_length not in (None, self.max_new_tokens):
                problems.append(f"block_length={self.block_length} needs kv_cache=: Dream's sampler without a KV cache "
                                "denoises the whole response as one block (omit block_length or pass it equal to "
                                "max_new_tokens)")
            if self.upstream_quirks and self.alg != "confidence_threshold":
                problems.append("upstream_quirks=True selects Fast-dLLM's accidents, so it needs kv_cache= or "
                                "alg='confidence_threshold'")
        else:
            block = self.block_size()
            if block <= 0 or self.max_new_tokens % block:
                problems.append(f"max_new_tokens={self.max_new_tokens} must be a positive multiple of block_length={block}")
            elif self.steps % (self.max_new_tokens // block):
                problems.append(f"steps={self.steps} must be a multiple of the number of blocks {self.max_new_tokens // block}")
            if self.alg == "origin":
                problems.append("alg='origin' has no block sampler: with kv_cache= pass alg='entropy' (Fast-dLLM's "
                                "schedule path, which uses the negative entropy whatever alg says) or "
                                "'confidence_threshold'")
            if self.tokens_hook is not None or self.logits_hook is not None:
                problems.append("tokens_hook / logits_hook are not called by the block sampler (kv_cache=); use "
                                "activation hooks (generate(hooks=...)) or run without kv_cache")
        if problems:
            raise ValueError("Invalid DreamSampler options: " + "; ".join(problems))

    def n_steps(self) -> int:
        if self.alg == "confidence_threshold":
            return self.max_new_tokens  # adaptive: each forward commits >= 1 token, so at most this many
        if self.kv_cache is not None and self.upstream_quirks:
            return self.steps + self.n_blocks()  # a block may end with a forward whose result is discarded
        return self.steps

    def kv_cache_mode(self) -> KVCacheMode:
        return self.kv_cache

    def fixed_steps(self) -> bool:
        # the block sampler stops a block early when every row is done, which depends on the tokens
        return self.kv_cache is None and self.alg != "confidence_threshold"

    def block_size(self) -> int:
        """Tokens per block: `block_length`, else the whole response without a KV cache and 32 with one."""
        if self.block_length is not None:
            return self.block_length
        return self.max_new_tokens if self.kv_cache is None else 32

    def n_blocks(self) -> int:
        return self.max_new_tokens // self.block_size()

    def step_windows(self, prompt_width: int) -> Optional[list[Optional[tuple[int, int]]]]:
        return super().step_windows(prompt_width) if self.kv_cache is None else None

    def _full_forward(self, step_in_block: int) -> bool:
        if step_in_block == 0:
            return True
        return self.refresh != "block" and step_in_block % self.refresh == 0

    def _window(self, start: int, n_pos: int) -> tuple[int, int]:
        return (start, n_pos) if self.kv_cache == "prefix" else (start, start + self.block_size())

    def response_length(self) -> int:
        return self.max_new_tokens

    def stochastic(self) -> bool:
        return self.temperature > 0 or bool(self.alg_temp)

    def run(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        if self.kv_cache is not None:
            yield from self._run_blocks(cfg, prompt, attention_mask, forward, generator)
            return
        if self.alg == "confidence_threshold":
            yield from self._run_threshold(cfg, prompt, attention_mask, forward, generator)
            return
        mask_id = resolve_token_id(self.mask_id, cfg.mask_token_id, "mask_id", "mask_token_id")
        prompt_width = prompt.shape[1]
        device = prompt.device
        # Generated slots are attendable; the forward turns a padded mask into upstream's 4D mask
        # (pad queries and keys hidden) and renumbered positions (cfg of the Dream adapter).
        x, attention_mask = build_canvas(prompt, attention_mask, self.max_new_tokens, mask_id)
        if self.tokens_hook is not None:
            x = self.tokens_hook(None, x.clone(), None)
        timesteps = torch.linspace(1, self.eps, self.steps + 1, device=device)
        previous = None
        for i in range(self.steps):
            masked = x == mask_id
            state = DenoisingState(
                step=i, n_steps=self.steps, block=0, n_blocks=1, step_in_block=i, steps_in_block=self.steps,
                canvas=x, response_start=prompt_width, mask_id=mask_id, attention_mask=attention_mask,
                previous_canvas=previous, model_input=x, model_attention_mask=attention_mask, _is_masked=masked,
            )
            logits = forward(state)  # token-aligned (shifted) logits [batch pos vocab]
            if self.logits_hook is not None:
                logits = self.logits_hook(i, x.clone(), logits)
            t, s = timesteps[i], timesteps[i + 1]
            last = i == self.steps - 1
            if self.alg == "origin":
                new_x = self._origin_update(x, masked, logits, t, s, last, mask_id, generator)
            else:
                new_x = self._confidence_update(x, masked, logits, t, s, last, mask_id, generator)
            if self.tokens_hook is not None:
                new_x = self.tokens_hook(i, new_x, logits)
            previous, x = x, new_x
            yield state, x

    # ------------------------------------------------------------------ Fast-dLLM's loops
    def _run_blocks(self, cfg, prompt, attention_mask, forward, generator) -> Iterator[tuple[DenoisingState, Tensor]]:
        """Fast-dLLM's block sampler (`generation_utils_block.py`), with a prefix or dual KV cache.

        Per block [s, s + block_length): a full forward (rebuilds the KV cache) that commits column s
        only, whatever its confidence; then forwards of the window (prefix: s onwards; dual: the block),
        whose logits are shifted within the window (column s predicts itself). `alg="confidence_threshold"`
        commits every block mask with confidence >= `threshold` plus each row's best, until the block
        is done; any other `alg` follows the time grid from its second point with the negative-entropy
        confidence (Fast-dLLM ignores `alg` there) and ends the block after steps / n_blocks forwards.
        Unless `upstream_quirks`, the forward upstream computes and then discards at that end is
        skipped and the mask token is never proposed.
        """
        mask_id = resolve_token_id(self.mask_id, cfg.mask_token_id, "mask_id", "mask_token_id")
        batch, prompt_width = prompt.shape
        x, attention_mask = build_canvas(prompt, attention_mask, self.max_new_tokens, mask_id)
        n_pos, size, n_blocks = x.shape[1], self.block_size(), self.n_blocks()
        per_block = self.steps // n_blocks
        timesteps = torch.linspace(1, self.eps, per_block + 1, device=x.device)
        threshold_path = self.alg == "confidence_threshold"
        avoid = None if self.upstream_quirks else mask_id
        bound = size if threshold_path else per_block + self.upstream_quirks
        step, previous = 0, None
        for block in range(n_blocks):
            start, end = prompt_width + block * size, prompt_width + (block + 1) * size
            cache_step, i = None, 0
            while i == 0 or bool((x[:, start:end] == mask_id).any()):
                if not threshold_path and i == per_block and not self.upstream_quirks:
                    break  # the schedule is spent; upstream computes one more forward and discards it
                full = self._full_forward(i)
                window = self._window(start, n_pos)
                cols = slice(0, n_pos) if full else slice(*window)
                cache_step = step if full else cache_step
                state = DenoisingState(
                    step=step, n_steps=self.n_steps(), block=block, n_blocks=n_blocks, step_in_block=i,
                    steps_in_block=bound, canvas=x, response_start=prompt_width, mask_id=mask_id,
                    attention_mask=attention_mask, previous_canvas=previous, model_input=x[:, cols],
                    model_attention_mask=attention_mask, kv_cache=self.kv_cache,
                    window=None if full else window, cache_step=None if full else cache_step,
                )
                logits = forward(state)  # token-aligned over the computed columns
                new_x = x.clone()
                if i == 0:  # the block's first column, from all positions' samples
                    _, tokens = self._sample_tokens(logits.flatten(0, 1), generator, avoid=avoid)
                    new_x[:, start] = tokens.view(batch, n_pos)[:, start]
                elif threshold_path or i < per_block:
                    if full:
                        logits = logits[:, window[0] : window[1]]
                    part = new_x[:, window[0] : window[1]]
                    part[:, :size] = self._block_update(part, logits, i, per_block, timesteps, mask_id, avoid, generator)
                step, i, previous, x = step + 1, i + 1, x, new_x
                yield state, x
                if not threshold_path and i > per_block:
                    break  # upstream_quirks: the discarded forward has run

    def _block_update(self, window_x, logits, i, per_block, timesteps, mask_id, avoid, generator) -> Tensor:
        """The block's columns [batch block_length] after one cached step of `_run_blocks`."""
        size = self.block_size()
        block_x = window_x[:, :size]
        if self.alg != "confidence_threshold":
            masked = block_x == mask_id
            t, s = timesteps[i], timesteps[i + 1]
            return self._confidence_update(block_x, masked, logits[:, :size], t, s, i == per_block - 1, mask_id,
                                           generator, alg="entropy")
        masked = window_x == mask_id  # prefix: the suffix is sampled too (random draws), never committed
        confidence, tokens = self._sample_tokens(logits[masked], generator, alg="maskgit_plus", avoid=avoid)
        full_confidence = torch.full(window_x.shape, float("-inf"), dtype=confidence.dtype, device=window_x.device)
        full_confidence[masked] = confidence
        proposal = window_x.clone()
        proposal[masked] = tokens
        selected = select_threshold(full_confidence[:, :size], masked[:, :size], self.threshold)
        return torch.where(selected, proposal[:, :size], block_x)

    def _run_threshold(self, cfg, prompt, attention_mask, forward, generator) -> Iterator[tuple[DenoisingState, Tensor]]:
        """Fast-dLLM's uncached `alg="confidence_threshold"` (`generation_utils.py`), batch size 1.

        Every step may commit q = masks / steps tokens plus what earlier steps carried over: the top
        ones, of which those after the first need confidence >= `threshold`; each dropped one is
        carried to the next step. When the last step drops one, the run gets one more step (with
        only the carry), until a step commits all it may.
        """
        mask_id = resolve_token_id(self.mask_id, cfg.mask_token_id, "mask_id", "mask_token_id")
        if prompt.shape[0] != 1:
            raise ValueError("alg='confidence_threshold' without kv_cache runs one prompt at a time (as upstream); "
                             "generate the prompts one by one, or pass kv_cache='prefix'.")
        prompt_width = prompt.shape[1]
        x, attention_mask = build_canvas(prompt, attention_mask, self.max_new_tokens, mask_id)
        n_masked = int((x == mask_id).sum())
        if n_masked % self.steps:
            raise ValueError(f"alg='confidence_threshold' needs the canvas's {n_masked} masks to be a multiple of "
                             f"steps={self.steps}; pass steps dividing max_new_tokens.")
        if self.tokens_hook is not None:
            x = self.tokens_hook(None, x.clone(), None)
        quota, carry, steps, i, previous = n_masked // self.steps, 0, self.steps, 0, None
        while i < steps:
            masked = x == mask_id
            state = DenoisingState(
                step=i, n_steps=self.n_steps(), block=0, n_blocks=1, step_in_block=i, steps_in_block=self.n_steps(),
                canvas=x, response_start=prompt_width, mask_id=mask_id, attention_mask=attention_mask,
                previous_canvas=previous, model_input=x, model_attention_mask=attention_mask, _is_masked=masked,
            )
            logits = forward(state)
            if self.logits_hook is not None:
                logits = self.logits_hook(i, x.clone(), logits)
            avoid = None if self.upstream_quirks else mask_id
            confidence, tokens = self._sample_tokens(logits[masked], generator, alg="maskgit_plus", avoid=avoid)
            k, carry = quota + carry, 0
            full_confidence = torch.full(x.shape, float("-inf"), dtype=confidence.dtype, device=x.device)
            full_confidence[masked] = confidence
            values, picked = full_confidence[0].topk(min(k, int(masked.sum())))
            keep = torch.ones_like(values, dtype=torch.bool)
            for rank in range(1, values.numel()):
                if values[rank] < self.threshold:
                    keep[rank] = False
                    carry += 1
                    if i == steps - 1 and carry == 1:
                        quota, steps = 0, steps + 1  # the last step dropped one: run one more step
            proposal = torch.full_like(x, mask_id)
            proposal[masked] = tokens
            new_x = x.clone()
            new_x[0, picked[keep]] = proposal[0, picked[keep]]
            if self.tokens_hook is not None:
                new_x = self.tokens_hook(i, new_x, logits)
            previous, x, i = x, new_x, i + 1
            yield state, x

    # ------------------------------------------------------------------ the two update rules
    def _origin_update(self, x, masked, logits, t, s, last, mask_id, generator) -> Int[Tensor, "batch pos"]:
        """Commit each masked position with probability 1 - s/t (all of them at the last step)."""
        p_transfer = 1.0 if last else 1 - s / t
        proposal = torch.full((int(masked.sum()),), mask_id, dtype=x.dtype, device=x.device)
        chosen = torch.rand(proposal.shape, device=x.device, generator=generator) < p_transfer
        if bool(chosen.any()):
            _, tokens = self._sample_tokens(logits[masked][chosen], generator)
            proposal[chosen] = tokens
        new_x = x.clone()
        new_x[masked] = proposal
        return new_x

    def _confidence_update(self, x, masked, logits, t, s, last, mask_id, generator, alg=None) -> Int[Tensor, "batch pos"]:
        """Commit the k most confident masked positions per row, k from the batch-average mask count."""
        confidence, tokens = self._sample_tokens(logits[masked], generator, alg)
        n_masked = masked.sum() / masked.shape[0]  # float32 batch average, as upstream
        k = int(n_masked) if last else int(n_masked * (1 - s / t))
        new_x = x.clone()
        if k <= 0:
            return new_x
        full_confidence = torch.full(x.shape, float("-inf"), dtype=logits.dtype, device=x.device)
        full_confidence[masked] = confidence
        if not self.alg_temp:
            picked = full_confidence.topk(k, dim=-1).indices
        else:
            weights = torch.softmax(full_confidence / self.alg_temp, dim=-1)
            picked = torch.multinomial(weights, num_samples=k, generator=generator)
        proposal = torch.full_like(x, mask_id)
        proposal[masked] = tokens
        # Positions picked among -inf entries (rows with fewer than k masks) receive mask_id, as upstream.
        new_x.scatter_(1, picked, proposal.gather(1, picked))
        return new_x

    def _sample_tokens(
        self, logits: Float[Tensor, "n vocab"], generator: Optional[torch.Generator], alg: Optional[str] = None,
        avoid: Optional[int] = None,
    ) -> tuple[Float[Tensor, " n"], Int[Tensor, " n"]]:
        """(confidence, token) per row after temperature / top-p / top-k, per `alg` (default `self.alg`).

        `avoid` (the mask id, in Fast-dLLM's loops unless `upstream_quirks`): a row whose token is
        `avoid` takes its most probable other token instead, with that token's probability."""
        alg = self.alg if alg is None else alg
        if self.temperature > 0:
            logits = logits / self.temperature
        if self.top_p is not None and self.top_p < 1:
            logits = _top_p_filter(logits, self.top_p)
        if self.top_k is not None:
            logits = _top_k_filter(logits, self.top_k)
        probs = torch.softmax(logits, dim=-1)
        if self.temperature > 0:
            try:
                # torch.distributions.Categorical(probs).sample(), with an optional generator.
                tokens = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, True, generator=generator)[:, 0]
                confidence = probs.gather(-1, tokens[:, None])[:, 0]
            except (RuntimeError, ValueError):  # upstream falls back to argmax when sampling fails
                confidence, tokens = probs.max(dim=-1)
        else:
            confidence, tokens = probs.max(dim=-1)
        if avoid is not None:
            bad = tokens == avoid
            if bool(bad.any()):
                confidence[bad], tokens[bad] = probs[bad].index_fill(-1, tokens.new_tensor([avoid]), 0).max(dim=-1)
        if alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            confidence = top2[:, 0] - top2[:, 1]
        elif alg == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(dim=-1)
        return confidence, tokens


def _top_p_filter(logits: Float[Tensor, "n vocab"], top_p: float) -> Float[Tensor, "n vocab"]:
    """Nucleus filter: drop tokens past cumulative probability `top_p` (the top token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def _top_k_filter(logits: Float[Tensor, "n vocab"], top_k: int) -> Float[Tensor, "n vocab"]:
    """Keep logits >= the k-th largest per row (ties kept); the rest become finfo.min."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def transfer_schedule(n_masked: int, steps: int, eps: float = 1e-3, batch: int = 1) -> list[int]:
    """Tokens the confidence algorithms commit per step for `n_masked` masks per row (float32, as upstream).

    Why: the count is not N/steps: e.g. 256 masks in 256 steps commit 0 at the first step and 2 at
    the last, so a step-scheduled hook at step 0 may see nothing unmasked.

    Example:
        >>> transfer_schedule(16, 8)
        [1, 2, 2, 2, 2, 2, 2, 3]
    """
    timesteps = torch.linspace(1, eps, steps + 1)
    remaining, counts = n_masked, []
    for i in range(steps):
        n = torch.tensor(remaining * batch) / batch
        k = int(n) if i == steps - 1 else int(n * (1 - timesteps[i + 1] / timesteps[i]))
        k = min(k, remaining)
        counts.append(k)
        remaining -= k
    return counts


__all__ = ["DreamSampler", "transfer_schedule"]
