"""`DiffusionLensLM`: a (steered) `HookedDiffusionTransformer` as an lm-evaluation-harness model,
registered as "diffusion-lens".

Why: researchers evaluate LLaDA / Dream with lm-eval-harness; this lets them evaluate the same
model with a steering intervention, through the family's own sampler, with the task's own scoring.

* `generate_until`: requests batched (`batch_size` prompts per `model.generate` call, grouped by
  their generation options), decoded without special tokens and cut at the first `until` stop
  sequence. The response length: `gen_length` from --model_args if given (it overrides each
  task's `max_gen_toks`: a diffusion model pays for every canvas position at every step; a
  smaller canvas than the task asks for is logged once), else the task's `max_gen_toks`
  (default 256), rounded **up** to a multiple of the sampler's `block_length` when one is set;
  the decoded response keeps at most `max_gen_toks` tokens. Sampler `steps` default to the
  response length (one token per step, LLaDA's evaluation setting). `do_sample` / `temperature`
  map to the sampler's `temperature` (greedy = 0; do_sample=True needs temperature > 0); any other
  gen_kwarg goes to the sampler as an option, and one it does not have is an error, except
  `top_p=1.0` / `top_k=0` / `None`, which ask for nothing.
* `loglikelihood`: the Monte-Carlo masked ELBO of LLaDA (`diffusion_lens.harness.likelihood`),
  `mc_samples` samples seeded by `seed`; an estimate with standard error ~ 1/sqrt(mc_samples).
  `is_greedy`: whether the family's sampler at temperature 0, one token per step, decodes exactly
  the continuation.
* steering: `steer=PATH` (Directions / AffineMap / abliterated model; `diffusion_lens.harness.steer`),
  `steer_mode`, `strength`, `layers`, `steer_steps` (the denoising steps where the hooks act; named
  apart from the sampler's `steps`, the number of denoising steps). Recorded in the results'
  `config` (`get_model_info`).

Example:
    >>> import lm_eval, diffusion_lens.harness
    >>> lm_eval.simple_evaluate(model="diffusion-lens", model_args="pretrained=tiny-refusal,gen_length=32",
    ...                         tasks=["ifeval_local"], task_manager=diffusion_lens.harness.task_manager())
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from diffusion_lens.harness.likelihood import mc_loglikelihood
from diffusion_lens.harness.steer import Steering, abliterated_folder, abliteration_record, resolve_steering
from diffusion_lens.model import HookedDiffusionTransformer

logger = logging.getLogger(__name__)

#: lm-eval's default response length when a task sets no `max_gen_toks` (as its HF model).
DEFAULT_MAX_GEN_TOKS = 256
#: Sampler options that --model_args may not set, and where they belong instead.
NOT_MODEL_ARGS = {
    "temperature": "set it per run with --gen_kwargs temperature=T,do_sample=True (tasks set it per request)",
    "do_sample": "set it with --gen_kwargs",
    "max_new_tokens": "use gen_length",
    "hooks": "use steer=PATH",
}
#: gen_kwargs values that request nothing from a sampler without that option.
NEUTRAL_GEN_KWARGS = {"top_p": (None, 1.0), "top_k": (None, 0)}


def _as_int(name: str, value: Any, minimum: Optional[int] = None) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be an int{f' >= {minimum}' if minimum is not None else ''}; got {value!r}.")
    return value


def _as_float(name: str, value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}.") from None


@register_model("diffusion-lens")
class DiffusionLensLM(LM):
    """A masked diffusion LM (any family `HookedDiffusionTransformer` loads), optionally steered, for lm-eval.

    --model_args (strings from the command line are parsed; an unknown one is an error naming these):
    `pretrained` (embedded name, local folder or hub id), `device`, `dtype`, `batch_size`,
    `steer` (path), `steer_mode` ("ablate" | "add", for a Directions), `strength`, `layers`
    ('all', int, 'a:b' or 'i;j'), `steer_steps` (int, 'a:b' or 'i;j'), `direction_layer` /
    `direction_position` (pick one direction of a Directions), `gen_length`, `mc_samples`, `seed`,
    and the family sampler's own options (`steps`, `block_length`, `remasking`, `cfg_scale`, ...).

    Example:
        >>> lm = DiffusionLensLM(pretrained="tiny-refusal", gen_length=32, steer="runs/dirs")
        >>> lm.get_model_info()["steering"]["kind"]
        'Directions'
    """

    def __init__(
        self,
        pretrained: Optional[str] = None,
        device: Optional[str] = "cpu",
        dtype: Optional[str] = None,
        batch_size: Any = 8,
        max_batch_size: Optional[int] = None,
        steer: Optional[str] = None,
        steer_mode: str = "ablate",
        strength: Any = 1.0,
        layers: Any = None,
        steer_steps: Any = None,
        direction_layer: Any = None,
        direction_position: Optional[str] = None,
        gen_length: Any = None,
        mc_samples: Any = 128,
        seed: Any = 0,
        **sampler_options: Any,
    ) -> None:
        super().__init__()
        if max_batch_size is not None:
            raise ValueError("max_batch_size applies to batch_size=auto, which diffusion-lens does not support; "
                             "give an int batch_size.")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            raise ValueError("batch_size=auto is not supported by diffusion-lens; give an int (prompts per generate call).")
        self.batch_size = _as_int("batch_size", batch_size, 1)
        self.mc_samples = _as_int("mc_samples", mc_samples, 1)
        self.seed = _as_int("seed", seed)
        self.gen_length = None if gen_length is None else _as_int("gen_length", gen_length, 1)
        strength = _as_float("strength", strength)
        if direction_layer is not None:
            direction_layer = _as_int("direction_layer", direction_layer)
        device = "cpu" if device is None else str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; pass --device cpu.")

        abliterated = None if steer is None else abliterated_folder(steer)
        if abliterated is not None:
            if pretrained is not None and Path(str(pretrained)).resolve() != abliterated.resolve():
                raise ValueError(f"steer={steer} is an abliterated model (its weights are the edit), so it is the model: "
                                 f"pass pretrained={abliterated} alone, or steer= with that folder and no pretrained "
                                 f"(got pretrained={pretrained}).")
            changed = {k: v for k, v in dict(strength=(strength, 1.0), layers=(layers, None),
                                             steer_steps=(steer_steps, None), steer_mode=(steer_mode, "ablate"),
                                             direction_layer=(direction_layer, None),
                                             direction_position=(direction_position, None)).items() if v[0] != v[1]}
            if changed:
                raise ValueError(f"{sorted(changed)} cannot apply to an abliterated model: its edit is in the weights.")
            pretrained = str(abliterated)
        if pretrained is None:
            raise ValueError("Give pretrained=NAME_OR_FOLDER (e.g. pretrained=tiny-refusal) in --model_args.")
        self.pretrained = str(pretrained)
        self.model = HookedDiffusionTransformer.from_pretrained(self.pretrained, dtype=dtype, device=device)
        self.model.eval()
        self._device = torch.device(device)

        self.sampler_options = self._check_sampler_options(sampler_options)
        self.steer_steps = steer_steps
        if abliterated is not None or (steer is None and abliterated_folder(self.pretrained) is not None):
            self.steering = Steering([], abliteration_record(Path(self.pretrained)))
        elif steer is not None:
            self.steering = resolve_steering(self.model, steer, mode=steer_mode, strength=strength, layers=layers,
                                             steps=steer_steps, direction_layer=direction_layer,
                                             direction_position=direction_position)
        else:
            unused = {k: v for k, v in dict(strength=(strength, 1.0), layers=(layers, None), steer_steps=(steer_steps, None),
                                            steer_mode=(steer_mode, "ablate"), direction_layer=(direction_layer, None),
                                            direction_position=(direction_position, None)).items() if v[0] != v[1]}
            if unused:
                raise ValueError(f"{sorted(unused)} configure steering, but no steer=PATH was given.")
            self.steering = Steering([], {"kind": None})
        self._warned_cap = False

    # ------------------------------------------------------------------ configuration
    def _check_sampler_options(self, options: dict) -> dict:
        """Reject what --model_args must not set and any name that is neither ours nor the sampler's."""
        for name in options:
            if name in NOT_MODEL_ARGS:
                raise ValueError(f"{name} is not a diffusion-lens model argument: {NOT_MODEL_ARGS[name]}.")
        known = set(self.model.adapter.sampler(self.model.cfg).options())
        unknown = sorted(set(options) - known - {"block_length"})
        if unknown:
            ours = ["pretrained", "device", "dtype", "batch_size", "steer", "steer_mode", "strength", "layers",
                    "steer_steps", "direction_layer", "direction_position", "gen_length", "mc_samples", "seed"]
            raise ValueError(f"Unknown model argument(s) {unknown}. diffusion-lens accepts {ours} and the options of "
                             f"this model's sampler {sorted(known - set(NOT_MODEL_ARGS) - {'gen_length'})}.")
        return dict(options)

    def get_model_info(self) -> dict:
        """What lm-eval adds to the results' `config`: the model, its sampler options and the steering.

        Example:
            >>> lm.get_model_info()["steering"]
            {'kind': None}
        """
        return {"model_name": self.pretrained, "family": self.model.adapter.name,
                "sampler_options": {k: str(v) for k, v in self.sampler_options.items()},
                "gen_length": self.gen_length, "mc_samples": self.mc_samples, "seed": self.seed,
                "steering": self.steering.record}

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: Any = False) -> Optional[str]:
        return self.model.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template rendered as text (lm-eval's --apply_chat_template).

        Example:
            >>> lm.apply_chat_template([{"role": "user", "content": "Hi"}])   # '<|startoftext|><|start_header_id|>user...'
        """
        return self.model.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ generation
    def _generation_plan(self, gen_kwargs: dict) -> tuple[dict, list[str], int]:
        """(sampler options, stop sequences, tokens kept) for one request's gen_kwargs."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(s, str) for s in until):
            raise ValueError(f"until must be a string or a list of strings; got {until!r}.")
        max_gen_toks = kwargs.pop("max_gen_toks", None)
        max_gen_toks = DEFAULT_MAX_GEN_TOKS if max_gen_toks is None else _as_int("max_gen_toks", max_gen_toks, 1)
        options = dict(self.sampler_options)
        sampler_fields = set(self.model.adapter.sampler(self.model.cfg).options())
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = kwargs.pop("temperature", None)
        temperature = None if temperature is None else _as_float("temperature", temperature)
        if do_sample and not temperature:
            raise ValueError("do_sample=True needs temperature > 0 (e.g. --gen_kwargs do_sample=True,temperature=0.7).")
        if not do_sample and temperature:
            raise ValueError(f"temperature={temperature} with do_sample=False: pass do_sample=True to sample, or "
                             "temperature=0 for greedy decoding.")
        if "temperature" in sampler_fields:
            options["temperature"] = temperature if do_sample else 0.0
        elif do_sample:
            raise ValueError("This model's sampler has no temperature option, so do_sample=True cannot be honoured.")
        for name, neutral in NEUTRAL_GEN_KWARGS.items():
            if name in kwargs and name not in sampler_fields and kwargs[name] in neutral:
                kwargs.pop(name)
        options.update(kwargs)
        canvas = self.gen_length
        if canvas is None:
            canvas = max_gen_toks
            block = options.get("block_length")
            if block is not None:
                canvas = -(-canvas // _as_int("block_length", block, 1)) * block
        elif canvas < max_gen_toks and not self._warned_cap:
            logger.warning("gen_length=%d from --model_args caps the task's max_gen_toks=%d.", canvas, max_gen_toks)
            self._warned_cap = True
        options["gen_length"] = canvas
        options.setdefault("steps", canvas)
        return options, until, min(max_gen_toks, canvas)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation with the family's sampler and the steering hooks; text cut at `until`.

        Example:
            >>> lm.generate_until([Instance("generate_until", doc, ("Hi", {"until": ["\\n"]}), 0)])
        """
        plans = [self._generation_plan(req.args[1]) for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (options, _, _) in enumerate(plans):
            groups.setdefault(repr(sorted(options.items())), []).append(i)
        results: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="diffusion-lens generate", disable=disable_tqdm or self.rank != 0)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            options = plans[indices[0]][0]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start: start + self.batch_size]
                prompts = [requests[i].args[0] for i in chunk]
                try:
                    out = self.model.generate(prompts, chat=False, hooks=self.steering.hooks, seed=self.seed,
                                              progress=False, return_trajectory=False, **options)
                except TypeError as err:
                    raise ValueError(f"The generation options {options} (--model_args and the task's gen_kwargs) do not "
                                     f"fit this model's sampler: {err}") from err
                response = out.sequences[:, out.response_start:]
                for row, i in enumerate(chunk):
                    _, until, keep = plans[i]
                    text = self.model.to_string(response[row, :keep], skip_special_tokens=True)
                    cuts = [text.find(stop) for stop in until if stop and stop in text]
                    text = text[: min(cuts)] if cuts else text
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    # ------------------------------------------------------------------ likelihood
    def _encode_pair(self, context: str, continuation: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of context and continuation, split from one encoding of their concatenation
        (trailing context spaces moved to the continuation, so word-initial tokens stay whole)."""
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        tokenizer = self.model.tokenizer
        whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
        head = tokenizer(stripped, add_special_tokens=False)["input_ids"] if stripped else []
        return torch.tensor(head, dtype=torch.long), torch.tensor(whole[len(head):], dtype=torch.long)

    def _is_greedy(self, context: torch.Tensor, continuation: torch.Tensor) -> bool:
        n = continuation.shape[0]
        options = {"gen_length": n, "steps": n}
        if "temperature" in self.model.adapter.sampler(self.model.cfg).options():
            options["temperature"] = 0.0
        out = self.model.generate(context[None].to(self._device), chat=False, hooks=self.steering.hooks, seed=self.seed,
                                  progress=False, return_trajectory=False, **options)
        return bool(torch.equal(out.sequences[0, out.response_start:].cpu(), continuation))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(Monte-Carlo masked ELBO estimate of log p(continuation | context), is_greedy) per request.

        Example:
            >>> lm.loglikelihood([Instance("loglikelihood", doc, ("The capital of France is", " Paris"), 0)])
        """
        if self.steer_steps is not None:
            raise ValueError("steer_steps schedules hooks by denoising step, but loglikelihood scores single masked "
                             "forwards outside any denoising run; drop steer_steps for loglikelihood tasks.")
        results = []
        for req in tqdm(requests, desc="diffusion-lens loglikelihood", disable=disable_tqdm or self.rank != 0):
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if ctx.numel() == 0:  # as lm-eval's HF model: condition on the BOS token
                bos = self.model.tokenizer.bos_token_id
                if bos is None:
                    raise ValueError(f"The context of {continuation!r} is empty and this tokenizer has no BOS token "
                                     "to condition on; give the task a non-empty context.")
                ctx = torch.tensor([bos], dtype=torch.long)
            estimate = mc_loglikelihood(self.model, ctx, cont, mc_samples=self.mc_samples, batch_size=self.batch_size,
                                        seed=self.seed, hooks=self.steering.hooks)
            answer = (estimate.value, self._is_greedy(ctx, cont))
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Not available: raises NotImplementedError saying why (perplexity tasks need it)."""
        raise NotImplementedError(
            "diffusion-lens has no rolling (perplexity) log-likelihood: a masked diffusion LM has no left-to-right "
            "factorisation to chunk a document with; its Monte-Carlo ELBO needs a context and a continuation "
            "(loglikelihood, used by multiple-choice tasks). Use generate_until or loglikelihood tasks.")
