"""LLaDA's reference sampler: semi-autoregressive blocks, low-confidence (or random) remasking.

Reference: docs/families/llada.md, section "Sampler" (upstream `ML-GSAI/LLaDA` `generate.py`). The
loop below follows that algorithm step for step, including its quirks (listed on the class), so
that every `golden_generate` run reproduces token for token, trajectory included.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.canvas import build_canvas
from diffusion_lens.denoising.samplers.base import Forward, Sampler, resolve_token_id
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

    Example:
        >>> sampler = LLaDASampler(steps=64, gen_length=64, block_length=32)
        >>> out = model.generate("Hi", sampler=sampler)
        >>> out = model.generate("Hi", steps=64, gen_length=64, block_length=32)  # same, via the adapter
    """

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
        if problems:
            raise ValueError("Invalid LLaDASampler options: " + "; ".join(problems))

    def n_steps(self) -> int:
        return self.steps

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
                transfer = _top_k_per_row(confidence, [row[s] for row in schedule])
                previous, x = x, torch.where(transfer, x0, x)
                yield state, x

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


def _top_k_per_row(confidence: Float[Tensor, "batch pos"], ks: list[int]) -> Bool[Tensor, "batch pos"]:
    """Mark the `ks[j]` most confident positions of each row j (one batched top-k when all k agree)."""
    transfer = torch.zeros_like(confidence, dtype=torch.bool)
    if len(set(ks)) == 1:
        if ks[0]:
            transfer.scatter_(1, confidence.topk(ks[0], dim=1).indices, True)
        return transfer
    for row, k in enumerate(ks):
        if k:
            transfer[row, confidence[row].topk(k).indices] = True
    return transfer


__all__ = ["LLaDASampler"]
