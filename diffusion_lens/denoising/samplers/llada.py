"""LLaDA's reference sampler: semi-autoregressive blocks, low-confidence (or random) remasking.

Reference: docs/families/llada.md, section "Sampler" (upstream `ML-GSAI/LLaDA` `generate.py`). The
loop below follows that algorithm step for step, including its quirks (listed on the class), so
that every `golden_generate` run reproduces token for token, trajectory included.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Literal, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.canvas import build_canvas
from diffusion_lens.denoising.samplers.base import Forward, KVCacheMode, Sampler, check_kv_cache_options, resolve_token_id
from diffusion_lens.denoising.samplers.transfer import quota_schedule, select_factor, select_threshold, select_top_k
from diffusion_lens.denoising.state import DenoisingState

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class LLaDASampler(Sampler):
    """Masked-diffusion sampling with low-confidence remasking (LLaDA, LLaDA-1.5, LLaDA-MoE).

    Why: the algorithm the LLaDA checkpoints were evaluated with; `steps` counts all forwards.
    The response (`gen_length` masks after the prompt) is filled block by block
    (`block_length`, default: the whole response as one block, upstream's default for its default
    gen_length=128); inside a block each step commits the scheduled number of tokens with the
    highest confidence (`remasking="low_confidence"`, softmax probability of the chosen token) or
    at random (`"random"`). `temperature > 0` samples tokens by Gumbel-max in float64;
    `cfg_scale > 0` adds classifier-free guidance against the prompt-masked canvas.

    Upstream behaviours kept on purpose (each is pinned by a fixture):
      * `confidence_eos_eot_inf`: upstream writes `noisy[..., eos] = logits[..., eot] = -inf` and
        `noisy` *is* `logits` at temperature 0, so there both EOS and EoT lose their confidence,
        while at temperature > 0 only EoT does. `eos_eot_confidence="both"` (not upstream)
        suppresses both at every temperature.
      * the model may predict the mask token; that position then stays masked;
      * mask tokens inside the prompt are candidates in every block;
      * left pads count as prompt (they are masked in the unconditional CFG batch too) and keep
        RoPE positions 0..; positions are never derived from the attention mask.
    One deliberate difference: upstream crashes for `cfg_scale > 0` without an attention mask;
    here that runs without a mask (which is what an all-ones mask does).

    `eos_id` / `eot_id` / `mask_id` default to `cfg.eos_token_id` / `eot_token_id` /
    `mask_token_id` (upstream hard-codes 126081 / 126348 / 126336, the same ids for LLaDA-8B).
    Random numbers: one float64 uniform draw of the full [batch pos vocab] logits per step
    (temperature > 0), then one [batch pos] draw for random remasking, from `generator` (or the
    global RNG), the order upstream uses, so seeded runs match it. At temperature 0 the driver
    passes a generator seeded with `DEFAULT_SEED` when none is given, so random remasking is
    deterministic too.

    Fast-dLLM (Wu et al. 2025, NVlabs/Fast-dLLM `v1/llada/generate.py`; any of these options runs
    its loop, `_run_fast`, instead of the reference one): `kv_cache="prefix"` or `"dual"` caches keys
    and values (each block opens with a full forward that rebuilds the cache; later forwards
    compute the block and everything after it, or the block only); `threshold=τ` commits every
    candidate with confidence >= τ plus the best one, `factor=f` the top ranks while rank j's
    confidence >= 1 - f/(j+1) (both adaptive: `n_steps()` becomes an upper bound, `steps` only sets
    steps per block for the dual cap); `refresh=k` rebuilds the cache every k steps of a block.
    Confidences are float64 softmax probabilities, as upstream. Intended semantics by default:
    the mask token is never proposed (upstream commits it and loops), the dual cache has no step
    cap (upstream stops a block after steps / n_blocks forwards, leaving masks), and a prefix-cached
    step draws Gumbel noise once (upstream draws twice and discards one); `upstream_quirks=True`
    restores all three, to match upstream runs. Padded prompts: pads are attended (upstream's
    model ignores the mask) only when the model's `attention_mask_mode` says so.

    Example:
        >>> sampler = LLaDASampler(steps=64, gen_length=64, block_length=32)
        >>> out = model.generate("Hi", sampler=sampler)
        >>> out = model.generate("Hi", steps=64, gen_length=64, block_length=32)  # same, via the adapter
        >>> fast = model.generate("Hi", gen_length=256, steps=256, block_length=32, kv_cache="dual", threshold=0.9)
        >>> fast.n_forwards   # usually far fewer than 256
    """

    commits_a_token_per_step: ClassVar[bool] = True

    steps: int = 128
    gen_length: int = 128
    block_length: Optional[int] = None  # None = gen_length (one block)
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eos_eot_confidence: Literal["upstream", "both"] = "upstream"
    eos_id: Optional[int] = None
    eot_id: Optional[int] = None
    mask_id: Optional[int] = None
    # dtype of the low-confidence softmax: None = the logits dtype (current upstream); MMaDA's
    # `mmu_generate` and LLaDA's generate.py before 2025-06-02 use torch.float64.
    confidence_dtype: Optional[torch.dtype] = None
    # Fast-dLLM (NVlabs/Fast-dLLM v1/llada/generate.py): a KV cache and adaptive commit rules.
    kv_cache: KVCacheMode = None
    threshold: Optional[float] = None
    factor: Optional[float] = None
    refresh: Union[str, int] = "block"
    upstream_quirks: bool = False

    def __post_init__(self):
        problems = []
        block = self.block_size()
        if self.gen_length <= 0 or block <= 0 or self.steps <= 0:
            problems.append("steps, gen_length and block_length must be positive")
        elif self.gen_length % block:
            problems.append(f"gen_length={self.gen_length} must be a multiple of block_length={block}")
        elif self.steps % (self.gen_length // block):
            problems.append(
                f"steps={self.steps} must be a multiple of the number of blocks "
                f"gen_length/block_length={self.gen_length // block}"
            )
        if self.remasking not in ("low_confidence", "random"):
            problems.append(f"remasking={self.remasking!r} must be 'low_confidence' or 'random'")
        if self.eos_eot_confidence not in ("upstream", "both"):
            problems.append(f"eos_eot_confidence={self.eos_eot_confidence!r} must be 'upstream' or 'both'")
        if self.temperature < 0 or self.cfg_scale < 0:
            problems.append("temperature and cfg_scale must be >= 0")
        problems += check_kv_cache_options(self.kv_cache, self.refresh, self.threshold, self.factor)
        if self.fast():
            reference_only = dict(cfg_scale=self.cfg_scale > 0, logits_eos_inf=self.logits_eos_inf,
                                  confidence_eos_eot_inf=self.confidence_eos_eot_inf)
            given = [name for name, on in reference_only.items() if on]
            if given:
                problems.append(f"{', '.join(given)} apply to the reference sampler only; Fast-dLLM's loop "
                                "(kv_cache= / threshold= / factor=) has no guidance and no EOS handling")
            if self.confidence_dtype not in (None, torch.float64):
                problems.append("Fast-dLLM's loop computes confidences in float64; drop confidence_dtype")
        elif self.upstream_quirks:
            problems.append("upstream_quirks=True selects Fast-dLLM's accidents, so it needs kv_cache=, threshold= or factor=")
        if problems:
            raise ValueError("Invalid LLaDASampler options: " + "; ".join(problems))

    def fast(self) -> bool:
        """True when Fast-dLLM's loop runs (a KV cache or an adaptive commit rule), else the reference loop.

        Example:
            >>> LLaDASampler(factor=1.0).fast(), LLaDASampler().fast()
            (True, False)
        """
        return self.kv_cache is not None or self.threshold is not None or self.factor is not None

    def n_steps(self) -> int:
        if self.fixed_steps():
            return self.steps
        capped = self.upstream_quirks and self.kv_cache == "dual"  # at most steps / n_blocks forwards per block
        return self.steps if capped else self.gen_length  # each forward commits >= 1 token per unfinished row

    def kv_cache_mode(self) -> KVCacheMode:
        return self.kv_cache

    def fixed_steps(self) -> bool:
        return self.threshold is None and self.factor is None

    def step_windows(self, prompt_width: int) -> Optional[list[Optional[tuple[int, int]]]]:
        if self.kv_cache is None:
            return super().step_windows(prompt_width)
        if not self.fixed_steps():
            return None
        per_block, block, n_pos = self.steps // self.n_blocks(), self.block_size(), prompt_width + self.gen_length
        return [None if self._full_forward(i) else self._window(prompt_width + b * block, n_pos)
                for b in range(self.n_blocks()) for i in range(per_block)]

    def _full_forward(self, step_in_block: int) -> bool:
        """Whether a block's step computes the whole canvas (and rebuilds the KV cache)."""
        if self.kv_cache is None or step_in_block == 0:
            return True
        return self.refresh != "block" and step_in_block % self.refresh == 0

    def _window(self, start: int, n_pos: int) -> tuple[int, int]:
        """The columns a cached forward of the block starting at `start` computes."""
        return (start, n_pos) if self.kv_cache == "prefix" else (start, start + self.block_size())

    def response_length(self) -> int:
        return self.gen_length

    def n_copies(self) -> int:
        return 2 if self.cfg_scale > 0 else 1

    def block_size(self) -> int:
        """`block_length`, or the response length when it is not given."""
        return self.gen_length if self.block_length is None else self.block_length

    def n_blocks(self) -> int:
        return self.gen_length // self.block_size()

    def stochastic(self) -> bool:
        return self.temperature > 0

    def run(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        if self.fast():
            yield from self._run_fast(cfg, prompt, attention_mask, forward, generator)
            return
        mask_id = resolve_token_id(self.mask_id, cfg.mask_token_id, "mask_id", "mask_token_id")
        suppressed = self._suppressed_ids(cfg)
        batch, prompt_width = prompt.shape
        device = prompt.device
        x, attention_mask = build_canvas(prompt, attention_mask, self.gen_length, mask_id)
        prompt_index = x != mask_id  # fixed at the start: pads included, prompt masks excluded
        guided = self.cfg_scale > 0
        model_mask = attention_mask
        if guided and attention_mask is not None:
            model_mask = torch.cat([attention_mask, attention_mask])
        n_blocks = self.n_blocks()
        per_block = self.steps // n_blocks
        previous = None

        for block in range(n_blocks):
            start = prompt_width + block * self.block_size()
            end = start + self.block_size()
            # Tokens to commit per row and step: spread the block's masks evenly, extras first.
            counts = (x[:, start:end] == mask_id).sum(dim=1).tolist()
            schedule = [[c // per_block + (s < c % per_block) for s in range(per_block)] for c in counts]
            for s in range(per_block):
                masked = x == mask_id
                model_input = torch.cat([x, x.masked_fill(prompt_index, mask_id)]) if guided else x
                state = DenoisingState(
                    step=block * per_block + s, n_steps=self.steps, block=block, n_blocks=n_blocks,
                    step_in_block=s, steps_in_block=per_block, canvas=x, response_start=prompt_width,
                    mask_id=mask_id, attention_mask=attention_mask, previous_canvas=previous,
                    model_input=model_input, model_attention_mask=model_mask,
                    n_copies=2 if guided else 1, _is_masked=masked,
                )
                logits = forward(state)
                if guided:
                    cond, uncond = logits.chunk(2, dim=0)
                    logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
                if self.logits_eos_inf:
                    logits[:, :, suppressed["logits"]] = NEG_INF
                noisy = logits if self.temperature == 0 else _gumbel_perturb(logits, self.temperature, generator)
                x0 = noisy.argmax(dim=-1)
                if self.confidence_eos_eot_inf:  # after x0: changes only the unmasking order
                    logits[:, :, suppressed["confidence"]] = NEG_INF
                if self.remasking == "low_confidence":
                    probs = F.softmax(logits, dim=-1, dtype=self.confidence_dtype)
                    confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
                else:
                    confidence = torch.rand((batch, x.shape[1]), device=device, generator=generator)
                confidence[:, end:] = NEG_INF  # nothing after the current block
                x0 = torch.where(masked, x0, x)
                confidence = confidence.masked_fill(~masked, NEG_INF)
                transfer = select_top_k(confidence, [row[s] for row in schedule])
                previous, x = x, torch.where(transfer, x0, x)
                yield state, x

    def _run_fast(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator],
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        """Fast-dLLM's loop (`generate`, `generate_with_prefix_cache`, `generate_with_dual_cache`).

        Per block: one full forward (which rebuilds the KV cache), then forwards of the window
        (prefix: the block and everything after it; dual: the block) until the block holds no mask,
        all rows together. The full forward may fill any mask left of the block end, a cached one only
        the block. Each forward commits by the quota schedule, `threshold` or `factor`
        (`diffusion_lens.denoising.samplers.transfer`).
        """
        mask_id = resolve_token_id(self.mask_id, cfg.mask_token_id, "mask_id", "mask_token_id")
        batch, prompt_width = prompt.shape
        x, attention_mask = build_canvas(prompt, attention_mask, self.gen_length, mask_id)
        n_pos, block_size, n_blocks = x.shape[1], self.block_size(), self.n_blocks()
        per_block = self.steps // n_blocks
        n_steps, bound = self.n_steps(), self.n_steps() // n_blocks if self.fixed_steps() else block_size
        step, previous = 0, None
        for block in range(n_blocks):
            start, end = prompt_width + block * block_size, prompt_width + (block + 1) * block_size
            quota = None
            if self.fixed_steps():
                quota = quota_schedule((x[:, start:end] == mask_id).sum(dim=1), per_block).tolist()
            cache_step, i = None, 0
            while i == 0 or bool((x[:, start:end] == mask_id).any()):
                if self.upstream_quirks and self.kv_cache == "dual" and i == per_block:
                    break  # Fast-dLLM's dual-cache step cap: the block may keep masks
                if quota is not None and i == per_block:
                    raise RuntimeError(
                        f"Block {block} still holds masks after its {per_block} scheduled steps: the model proposed "
                        "the mask token for a position (upstream raises IndexError here). Run without "
                        "upstream_quirks=True, where the mask token is never proposed."
                    )
                window = None if self._full_forward(i) else self._window(start, n_pos)
                if window is None and self.kv_cache is not None:
                    cache_step = step
                cols = slice(0, n_pos) if window is None else slice(*window)
                state = DenoisingState(
                    step=step, n_steps=n_steps, block=block, n_blocks=n_blocks, step_in_block=i,
                    steps_in_block=bound, canvas=x, response_start=prompt_width, mask_id=mask_id,
                    attention_mask=attention_mask, previous_canvas=previous, model_input=x[:, cols],
                    model_attention_mask=attention_mask, kv_cache=self.kv_cache, window=window,
                    cache_step=None if window is None else cache_step,
                )
                logits = forward(state)  # [batch window vocab]
                candidates = x == mask_id
                candidates[:, end:] = False
                if window is not None:
                    candidates[:, :start] = False  # a cached forward fills only its block
                if window is not None and self.kv_cache == "prefix" and self.upstream_quirks and self.temperature > 0:
                    _gumbel_perturb(logits, self.temperature, generator)  # upstream's discarded draw
                current = x[:, cols]
                chosen, confidence = self._propose(logits, candidates[:, cols], mask_id, generator)
                transfer = self._commit(confidence, candidates[:, cols], None if quota is None else [q[i] for q in quota])
                stuck = quota is None and self.temperature == 0 and not bool((transfer & (chosen != mask_id)).any())
                if self.upstream_quirks and stuck:
                    raise RuntimeError(
                        f"Step {step} commits only the mask token; at temperature 0 upstream would repeat this forward "
                        "forever. Run without upstream_quirks=True, where the mask token is never proposed."
                    )
                previous, x = x, x.clone()
                x[:, cols] = torch.where(transfer, chosen, current)
                step, i = step + 1, i + 1
                yield state, x

    def _propose(
        self,
        logits: Float[Tensor, "batch pos vocab"],
        candidates: Bool[Tensor, "batch pos"],
        mask_id: int,
        generator: Optional[torch.Generator],
    ) -> tuple[Int[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
        """(proposed token, float64 confidence) per window position as Fast-dLLM (`get_transfer_index`);
        non-candidates get confidence -inf. Unless `upstream_quirks`, a candidate whose best token is the
        mask token proposes its best other token instead (upstream would commit the mask and loop)."""
        noisy = logits if self.temperature == 0 else _gumbel_perturb(logits, self.temperature, generator)
        chosen = noisy.argmax(dim=-1)
        if not self.upstream_quirks:
            bad = candidates & (chosen == mask_id)
            if bool(bad.any()):
                chosen[bad] = noisy[bad].index_fill(-1, torch.tensor([mask_id], device=noisy.device), NEG_INF).argmax(-1)
        if self.remasking == "random":
            score = torch.rand(candidates.shape, dtype=torch.float64, device=logits.device, generator=generator)
        else:  # the untempered float64 probability of the proposal, computed at the candidates only
            score = torch.zeros(candidates.shape, dtype=torch.float64, device=logits.device)
            probs = F.softmax(logits[candidates].to(torch.float64), dim=-1)
            score[candidates] = probs.gather(-1, chosen[candidates][:, None]).squeeze(-1)
        return chosen, score.masked_fill(~candidates, NEG_INF)

    def _commit(
        self, confidence: Float[Tensor, "batch pos"], candidates: Bool[Tensor, "batch pos"], quota: Optional[list[int]]
    ) -> Bool[Tensor, "batch pos"]:
        """The positions this step fills: factor rule, else threshold rule, else the quota's top-k."""
        if self.factor is not None:
            return select_factor(confidence, candidates, self.factor)
        if self.threshold is not None:
            return select_threshold(confidence, candidates, self.threshold)
        return select_top_k(confidence, quota) & candidates

    def _suppressed_ids(self, cfg) -> dict[str, list[int]]:
        """Token ids set to -inf: in the logits (`logits_eos_inf`) and before the confidence softmax."""
        out: dict[str, list[int]] = {"logits": [], "confidence": []}
        if self.logits_eos_inf:
            out["logits"] = [resolve_token_id(self.eos_id, cfg.eos_token_id, "eos_id", "eos_token_id")]
        if self.confidence_eos_eot_inf:
            eos = resolve_token_id(self.eos_id, cfg.eos_token_id, "eos_id", "eos_token_id")
            eot = resolve_token_id(self.eot_id, cfg.eot_token_id, "eot_id", "eot_token_id")
            aliased = self.temperature == 0 or self.eos_eot_confidence == "both"
            out["confidence"] = [eos, eot] if aliased else [eot]
        return out


def _gumbel_perturb(
    logits: Float[Tensor, "batch pos vocab"], temperature: float, generator: Optional[torch.Generator]
) -> Float[Tensor, "batch pos vocab"]:
    """exp(logits) / (-log u)^temperature in float64: its argmax samples softmax(logits / temperature)."""
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(u)) ** temperature


__all__ = ["LLaDASampler"]
