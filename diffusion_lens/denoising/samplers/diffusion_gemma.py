"""DiffusionGemma's block sampler: uniform-noise canvases, entropy-bound acceptance, adaptive stopping.

Upstream's `DiffusionGemmaGenerationMixin.generate` (reference ../shared/reference/diffusion_gemma.md
§6), as one loop. Per block of `C = cfg.extra["canvas_length"]` positions: an encoder forward appends
the prompt (block 0) or the previous committed block to the KV cache, then up to
`max_denoising_steps` decoder forwards denoise a canvas of random ids. Each decoder step samples
every position at a temperature falling from `t_max`, accepts the lowest-entropy samples whose
entropies (all but the first) sum to at most `entropy_bound`, re-noises the others, and feeds the
step's logits back as self-conditioning. Nothing is ever frozen: the block's output is the argmax
of its last step. A row stops when its argmax is stable and its mean entropy is below
`confidence_threshold`; a block ends when every row has stopped. EOS and padding finalize each
committed block (§6.6). RNG draws follow §6.8 exactly, so a run seeded like upstream's is token-exact.

On this noise canvas "masked" means "undecided": `state.is_masked` marks the canvas positions that
hold noise (not accepted at the previous step; every position at a block's first step).

Upstream's `generate()` keywords are accepted as they are (`sampler_config=`, `logits_processor=`,
`stopping_criteria=`), so a recorded call replays unchanged; the keywords upstream swallows without
effect (`temperature`, `top_k`, `top_p`, `do_sample`) and `streamer=` raise here, saying what to use instead.

Example:
    >>> torch.manual_seed(0)
    >>> out = model.generate(prompt_ids, max_new_tokens=32, max_denoising_steps=12)   # sampler from the adapter
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.samplers.base import Forward, Sampler
from diffusion_lens.denoising.state import DenoisingState

#: upstream's `max_new_tokens` default: `max_length` replaces it only while it is exactly this (§6.2, Q7).
DEFAULT_MAX_NEW_TOKENS = 256

#: `generate()` keywords upstream accepts and then ignores or that this sampler does not support (§6.1):
#: each raises a TypeError with what to use instead, never a silent no-op.
NOT_OPTIONS = {
    "temperature": "its temperature falls linearly from t_max towards t_min over a block's steps: pass t_min= / "
                   "t_max= (upstream's generate() ignores temperature=)",
    "do_sample": "it always samples every position at the scheduled temperature (t_min= / t_max=) and commits "
                 "each block's argmax (upstream's generate() ignores do_sample=)",
    "top_k": "it samples from the whole distribution; to filter the logits first pass "
             "logits_processor=[transformers.TopKLogitsWarper(top_k)] (upstream's generate() ignores top_k=)",
    "top_p": "it samples from the whole distribution; to filter the logits first pass "
             "logits_processor=[transformers.TopPLogitsWarper(top_p)] (upstream's generate() ignores top_p=)",
    "streamer": "streamers are not supported: record=True gives every step's state and canvas "
                "(out.states, out.trajectory), and a hook sees each step as it runs",
    "pixel_values": "only the text path runs here: the vision tower's weights are carried through loading and "
                    "save_pretrained but not run, so images cannot be encoded; pass text prompts only",
}

#: A custom logits processor, upstream's signature: `proc(input_ids, scores)` or `proc(input_ids, scores, cur_step=)`.
LogitsProcessor = Callable[..., Tensor]
#: A custom stopping criterion, called as upstream after each block: `crit(input_ids, None, new_token_length=C)`
#: -> [batch] bool (transformers' `StoppingCriteria`).
StoppingCriterion = Callable[..., Tensor]


def temperature(cur_step: int, n_steps: int, t_min: float, t_max: float) -> Tensor:
    """The fp32 temperature of the step counting down `cur_step` = N..1 (never reaches t_min, Q5).

    Example:
        >>> temperature(12, 12, 0.4, 0.8), temperature(1, 12, 0.4, 0.8)
        (tensor(0.8000), tensor(0.4333))
    """
    return t_min + (t_max - t_min) * (torch.tensor(cur_step, dtype=torch.int32) / n_steps)


def entropy_bound_of(sampler_config: Any) -> float:
    """The `entropy_bound` of upstream's `sampler_config=`: transformers' `EntropyBoundSamplerConfig` (any
    object with `.entropy_bound`) or its serialized dict `{"entropy_bound": x}` (`_cls_name` allowed).

    Example:
        >>> entropy_bound_of({"entropy_bound": 0.2, "_cls_name": "EntropyBoundSamplerConfig"})
        0.2
    """
    if isinstance(sampler_config, dict):
        keys = set(sampler_config) - {"_cls_name"}
        if keys == {"entropy_bound"} and sampler_config.get("_cls_name", "EntropyBoundSamplerConfig") == \
                "EntropyBoundSamplerConfig":
            return sampler_config["entropy_bound"]
    elif hasattr(sampler_config, "entropy_bound"):
        return sampler_config.entropy_bound
    raise ValueError(
        f"sampler_config={sampler_config!r} is not an entropy-bound sampler config; pass "
        "transformers' EntropyBoundSamplerConfig(entropy_bound=0.1), a dict {'entropy_bound': 0.1}, "
        "or entropy_bound=0.1 directly."
    )


def apply_logits_processors(
    processors: Sequence[LogitsProcessor],
    input_ids: Int[Tensor, "batch pos"],
    logits: Float[Tensor, "batch canvas vocab"],
    cur_step: Int[Tensor, ""],
) -> Float[Tensor, "batch canvas vocab"]:
    """`logits` through `processors` in order, called as transformers' `LogitsProcessorList` calls them:
    `proc(input_ids, logits, cur_step=cur_step)` when `proc` takes more than two arguments, else
    `proc(input_ids, logits)`. Upstream runs them before the temperature division (§6.4).

    Example:
        >>> ban_3 = lambda ids, scores: scores.index_fill(-1, torch.tensor([3]), -float("inf"))
        >>> apply_logits_processors([ban_3], prompt, logits, torch.tensor(12, dtype=torch.int32))
    """
    for proc in processors:
        takes_step = len(inspect.signature(proc).parameters) > 2
        logits = proc(input_ids, logits, cur_step=cur_step) if takes_step else proc(input_ids, logits)
    return logits


def categorical_entropy(logits: Float[Tensor, "*rows vocab"]) -> Float[Tensor, " *rows"]:
    """`torch.distributions.Categorical(logits=logits).entropy()`, computed the same way (token-exact acceptance).

    Example:
        >>> categorical_entropy(torch.zeros(2, 4))   # log 4 per row
        tensor([1.3863, 1.3863])
    """
    normalized = logits - logits.logsumexp(-1, keepdim=True)
    probs = torch.softmax(normalized, -1)
    return -(normalized.clamp(min=torch.finfo(normalized.dtype).min) * probs).sum(-1)


def entropy_bound_accept(entropy: Float[Tensor, "batch pos"], bound: float) -> Bool[Tensor, "batch pos"]:
    """Accept the lowest-entropy positions while the entropies before them sum to <= `bound`
    (arXiv 2505.24857); each row's lowest-entropy position is always accepted.

    Example:
        >>> entropy_bound_accept(torch.tensor([[0.3, 0.05, 0.2]]), 0.1).tolist()
        [[False, True, True]]
    """
    ordered, order = torch.sort(entropy, dim=-1)
    keep = (ordered.cumsum(-1) - ordered) <= bound
    return torch.zeros_like(keep).scatter(-1, order, keep)


def stable_and_confident(
    argmax: Int[Tensor, "batch pos"],
    logits: Float[Tensor, "batch pos vocab"],
    history: Optional[Int[Tensor, "thr batch pos"]],
    stability_threshold: int,
    confidence_threshold: float,
) -> tuple[Bool[Tensor, " batch"], Optional[Int[Tensor, "thr batch pos"]]]:
    """Upstream's `StableAndConfidentStoppingCriteria`: (rows whose argmax equals the last
    `stability_threshold` argmaxes and whose mean entropy is below the threshold, the updated history).
    `history` None starts a block (filled with -1, so its first step is never stable).

    Example:
        >>> stop, history = stable_and_confident(argmax, logits, None, 1, 0.005)   # stop all False
    """
    if stability_threshold == 0:
        stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
    else:
        if history is None:
            history = torch.full((stability_threshold, *argmax.shape), -1, dtype=argmax.dtype, device=argmax.device)
        stable = (history == argmax).all(0).all(-1)
        history = history.roll(-1, 0)
        history[-1] = argmax
    confident = categorical_entropy(logits).mean(-1) < confidence_threshold
    return stable & confident, history


def finalize_block(
    sequences: Int[Tensor, "batch pos"],
    finished: Bool[Tensor, " batch"],
    canvas_length: int,
    eos_token_id: Optional[list[int]],
    pad_token_id: Optional[int],
    max_length: Optional[int],
    stopped: Optional[Bool[Tensor, " batch"]] = None,
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, " batch"]]:
    """(sequences with the last block padded, rows finished) after a block is committed (§6.6): rows
    finished earlier get a pad block; when a row just hit EOS (or `max_length`, or a custom stopping
    criterion: `stopped`), every row's block is padded after its first EOS.

    Example:
        >>> seq, done = finalize_block(seq, torch.zeros(2, dtype=torch.bool), 16, [1], 0, None)
    """
    block = sequences[:, -canvas_length:]
    done_now = torch.zeros_like(finished) if stopped is None else stopped.to(finished.device)
    if max_length is not None:
        done_now = done_now | (sequences.shape[1] >= max_length)
    if eos_token_id is not None:
        is_eos = torch.isin(block, torch.tensor(eos_token_id, device=block.device))
        done_now = done_now | is_eos.any(-1)
    now = finished | done_now
    if pad_token_id is not None and bool(now.any()):
        sequences = sequences.clone()
        block = sequences[:, -canvas_length:]
        block[finished] = pad_token_id
        if eos_token_id is not None and bool(done_now.any()):
            is_eos = torch.isin(block, torch.tensor(eos_token_id, device=block.device))
            seen = is_eos.cumsum(-1)
            block[(seen > 0) & ~((seen == 1) & is_eos)] = pad_token_id
    return sequences, now


@dataclasses.dataclass(frozen=True)
class EntropyBoundSampler(Sampler):
    """DiffusionGemma's `generate()` (upstream's option names; defaults: upstream's globals, §6.1).

    Why: the model's own sampler, token-exact under upstream's seed, with every decoder step a step
    of `generate` that hooks see (`hook.state`: block, step, the undecided positions). Encoder
    forwards are steps too (`state.pass_name == "encoder"`). `n_steps()` is an upper bound (rows
    stop adaptively). EOS and pad come only from `generation_config.json` (Q8), which the adapter reads.

    `logits_processor`: upstream's custom processors (a list, or transformers' `LogitsProcessorList`),
    run on each decoder step's fp32 logits before the temperature division, called as
    `proc(input_ids, logits, cur_step=...)` (input_ids: the prompt and the committed blocks; cur_step:
    the int32 count of steps left, N..1) or `proc(input_ids, logits)`. `stopping_criteria`: upstream's
    custom criteria (a list, or a `StoppingCriteriaList`), checked with EOS and `max_length` after
    each block as `crit(input_ids, None, new_token_length=C)` -> [batch] bool. `sampler_config=`
    (upstream's `EntropyBoundSamplerConfig` or its dict) sets `entropy_bound` through `with_options`.

    Example:
        >>> EntropyBoundSampler(max_new_tokens=32, max_denoising_steps=12).n_steps()   # with C = 16
        ... # 26 = 2 blocks x (1 encoder + 12 decoder forwards)
        >>> model.generate(ids, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.3),
        ...                logits_processor=[transformers.TopKLogitsWarper(20)])
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: Optional[int] = 1
    confidence_threshold: Optional[float] = 0.005
    eos_token_id: Optional[list[int]] = None
    pad_token_id: Optional[int] = None
    max_length: Optional[int] = None
    decoder_input_ids: Optional[Int[Tensor, "rows canvas"]] = None  # block 0's starting canvas instead of noise
    canvas_length: int = 256  # C: the adapter sets the checkpoint's (config.json `canvas_length`)
    logits_processor: Sequence[LogitsProcessor] = ()  # stored as a tuple
    stopping_criteria: Sequence[StoppingCriterion] = ()  # stored as a tuple

    def __post_init__(self):
        problems = []
        if not self.t_min >= 0 or not self.t_max > self.t_min:
            problems.append(f"t_min={self.t_min}, t_max={self.t_max} need 0 <= t_min < t_max")
        for name in ("max_denoising_steps", "max_new_tokens", "canvas_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive int")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length <= 0):
            problems.append(f"max_length={self.max_length!r} must be a positive int (or None)")
        if not isinstance(self.entropy_bound, float) or not self.entropy_bound > 0:  # upstream refuses an int too
            problems.append(f"entropy_bound={self.entropy_bound!r} must be a float > 0 (as upstream: 1.0, not 1)")
        if self.stability_threshold is not None and (not isinstance(self.stability_threshold, int)
                                                     or self.stability_threshold < 0):
            problems.append(f"stability_threshold={self.stability_threshold!r} must be an int >= 0 (or None)")
        if self.confidence_threshold is not None and (not isinstance(self.confidence_threshold, float)
                                                      or not self.confidence_threshold > 0):
            problems.append(f"confidence_threshold={self.confidence_threshold!r} must be a float > 0 "
                            "(as upstream: 1.0, not 1), or None")
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", [self.eos_token_id])
        for name, signature in (("logits_processor", "proc(input_ids, scores[, cur_step=]) -> scores"),
                                ("stopping_criteria", "crit(input_ids, scores, **kwargs) -> [batch] bool")):
            given = () if getattr(self, name) is None else getattr(self, name)
            if callable(given) and not isinstance(given, (list, tuple)):
                problems.append(f"{name}={given!r} must be a list (or transformers' "
                                f"{'LogitsProcessorList' if name == 'logits_processor' else 'StoppingCriteriaList'}): "
                                "wrap it in [ ]")
            elif not isinstance(given, (list, tuple)) or not all(callable(item) for item in given):
                problems.append(f"{name}={given!r} must be a list of callables {signature}")
            else:
                object.__setattr__(self, name, tuple(given))
        if problems:
            raise ValueError("EntropyBoundSampler: " + "; ".join(problems) + ".")

    def with_options(self, **options) -> "EntropyBoundSampler":
        """`Sampler.with_options`, plus upstream's `sampler_config=` (sets `entropy_bound`; giving both
        with different values is an error); the keywords in `NOT_OPTIONS` raise with what to use instead.

        Example:
            >>> EntropyBoundSampler().with_options(sampler_config={"entropy_bound": 0.3}).entropy_bound
            0.3
        """
        refused = [name for name in options if name in NOT_OPTIONS]
        if refused:
            raise TypeError(f"{type(self).__name__} has no option {refused[0]!r}: {NOT_OPTIONS[refused[0]]}.")
        if "sampler_config" in options:
            options = dict(options)
            bound = entropy_bound_of(options.pop("sampler_config"))
            if "entropy_bound" in options and options["entropy_bound"] != bound:
                raise ValueError(f"entropy_bound={options['entropy_bound']} and sampler_config's entropy_bound={bound} "
                                 "disagree; pass one of them.")
            options["entropy_bound"] = bound
        return super().with_options(**options)

    def new_tokens(self, prompt_width: int = 0) -> int:
        """Tokens asked for: `max_length - prompt_width` when `max_length` is set and `max_new_tokens`
        is still upstream's 256 (Q7), else `max_new_tokens`; rounded up to whole blocks by `n_blocks`."""
        if self.max_length is not None and self.max_new_tokens == DEFAULT_MAX_NEW_TOKENS:
            return self.max_length - prompt_width
        return self.max_new_tokens

    def n_blocks(self, prompt_width: int = 0) -> int:
        """Blocks planned (a bound: the run ends early when every row has finished)."""
        return math.ceil(self.new_tokens(prompt_width) / self.canvas_length)

    def response_length(self) -> int:
        return self.n_blocks() * self.canvas_length

    def n_steps(self) -> int:
        return self.n_blocks() * (self.max_denoising_steps + 1)

    def fixed_steps(self) -> bool:
        return False

    def step_windows(self, prompt_width: int) -> None:
        return None  # which forward is an encoder or decoder step depends on when rows stop

    def stochastic(self) -> bool:
        return True

    def run(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        batch, width = prompt.shape
        C, N, device = self.canvas_length, self.max_denoising_steps, prompt.device
        n_blocks = self.n_blocks(width)
        if n_blocks <= 0:
            raise ValueError(f"max_length={self.max_length} leaves no room after the {width}-position prompt.")
        pad = 0 if self.pad_token_id is None else self.pad_token_id
        sequences = torch.cat([prompt, prompt.new_full((batch, n_blocks * C), pad)], 1)
        mask = torch.ones_like(sequences) if attention_mask is None else \
            torch.cat([attention_mask, attention_mask.new_ones(batch, n_blocks * C)], 1)
        stopping = self.stability_threshold is not None and self.confidence_threshold is not None
        finished_seq = torch.zeros(batch, dtype=torch.bool, device=device)
        step, undecided = 0, torch.zeros_like(sequences, dtype=torch.bool)
        common = dict(n_steps=self.n_steps(), n_blocks=n_blocks, response_start=width, mask_id=None,
                      attention_mask=None if attention_mask is None else mask,
                      model_attention_mask=mask, kv_cache="passes")

        for block in range(n_blocks):
            start = width + block * C
            window = (0, width) if block == 0 else (start - C, start)
            state = DenoisingState(step=step, block=block, step_in_block=0, steps_in_block=N + 1, canvas=sequences,
                                   model_input=sequences[:, window[0]:window[1]], window=window, pass_name="encoder",
                                   needs_logits=False, _is_masked=undecided, **common)
            forward(state)
            yield state, sequences
            step += 1

            canvas = torch.randint(0, cfg.d_vocab, (batch, C), generator=generator, device=device)  # always drawn (Q6)
            if block == 0 and self.decoder_input_ids is not None:
                canvas = self.decoder_input_ids.to(device).expand(batch, C).clone()
            sc, argmax, history = None, canvas, None
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            accepted = torch.zeros(batch, C, dtype=torch.bool, device=device)
            for i, cur_step in enumerate(range(N, 0, -1)):
                entering = sequences.clone()
                entering[:, start:start + C] = canvas
                undecided = torch.zeros_like(entering, dtype=torch.bool)
                undecided[:, start:start + C] = ~accepted
                state = DenoisingState(step=step, block=block, step_in_block=i + 1, steps_in_block=N + 1,
                                       canvas=entering, model_input=canvas, window=(start, start + C),
                                       pass_name="decoder", self_conditioning_logits=sc, _is_masked=undecided, **common)
                logits = forward(state).float()
                if self.logits_processor:  # upstream's custom processors, before the temperature (§6.4)
                    steps_left = torch.tensor(cur_step, dtype=torch.int32, device=device)
                    logits = apply_logits_processors(self.logits_processor, sequences[:, :start], logits, steps_left)
                scaled = logits / temperature(cur_step, N, self.t_min, self.t_max)
                probs = torch.softmax(scaled, -1, dtype=torch.float32)
                sampled = torch.multinomial(probs.view(batch * C, -1), 1, generator=generator).view(batch, C)
                new_argmax = scaled.argmax(-1)
                accepted = entropy_bound_accept(categorical_entropy(scaled), self.entropy_bound)
                noise = torch.randint(0, cfg.d_vocab, (batch, C), generator=generator, device=device)
                new_canvas = torch.where(accepted, sampled, noise)
                if stopping:
                    if bool(finished.any()):  # rows stopped at an earlier step are frozen
                        new_argmax = torch.where(finished[:, None], argmax, new_argmax)
                        new_canvas = torch.where(finished[:, None], canvas, new_canvas)
                        scaled = torch.where(finished[:, None, None], sc, scaled)
                    stop, history = stable_and_confident(new_argmax, scaled, history, self.stability_threshold,
                                                         self.confidence_threshold)
                    finished = finished | stop
                sc, canvas, argmax = scaled.to(cfg.dtype), new_canvas, new_argmax
                step += 1
                if cur_step > 1 and not bool(finished.all()):
                    after = sequences.clone()
                    after[:, start:start + C] = canvas
                    yield state, after
                    continue
                committed = sequences.clone()
                committed[:, start:start + C] = argmax
                committed = committed[:, :start + C]
                stopped = None
                for criterion in self.stopping_criteria:  # upstream's custom criteria, OR-ed with EOS / max_length
                    done = criterion(committed, None, new_token_length=C)
                    stopped = done if stopped is None else stopped | done
                committed, finished_seq = finalize_block(committed, finished_seq, C, self.eos_token_id,
                                                         self.pad_token_id, self.max_length, stopped)
                last = block == n_blocks - 1 or bool(finished_seq.all())
                sequences = committed if last else torch.cat([committed, sequences[:, start + C:]], 1)
                undecided = torch.zeros_like(sequences, dtype=torch.bool)
                yield state, sequences
                if last:
                    return
                break


__all__ = ["EntropyBoundSampler", "NOT_OPTIONS", "apply_logits_processors", "categorical_entropy",
           "entropy_bound_accept", "entropy_bound_of", "finalize_block", "stable_and_confident", "temperature"]
