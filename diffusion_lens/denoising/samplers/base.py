"""The sampler contract: one denoising algorithm, written as one loop, that calls back for forwards.

A sampler owns the algorithm (canvas, schedule, token choice). The generate driver owns
everything around it (input handling, hooks, state publishing, caches, progress, trajectory).
They meet at `run(...)`: the sampler builds a `DenoisingState` for each step, hands it to the
driver's `forward(state)` (which publishes the state to the hook points and runs the model on
`state.model_input`), and yields `(state, canvas_after_step)`.

A family's adapter returns its sampler, with upstream defaults, from `ModelAdapter.sampler(cfg)`.
Samplers see the model only through `cfg` (special token ids) and `forward`, so the algorithm
needs nothing but the config; every sampler starts from `canvas.build_canvas`.
To add a family with a new algorithm: subclass `Sampler` as a frozen dataclass of its options,
implement `n_steps`, `response_length`, `n_copies`, `n_blocks` (semi-autoregressive samplers),
`stochastic` and `run`, and return it from the adapter.

One vocabulary across families (`with_options`, the one place for it): the response length is
accepted as `gen_length` (LLaDA's name) and as `max_new_tokens` (Dream's / transformers'),
whichever the sampler calls its field; `block_length` is accepted by samplers without blocks
when it equals the response length (one block). So `model.generate(p, steps=32, gen_length=32)`
runs unchanged on every family.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Iterator, Literal, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.denoising.state import DenoisingState

#: The names of the response length: a sampler has one as a field, `with_options` maps the other onto it.
RESPONSE_LENGTH_NAMES = ("gen_length", "max_new_tokens")

#: A sampler's KV cache (`kv_cache=` option): None (every forward computes the whole canvas), "prefix"
#: (cached forwards compute the current block and everything after it) or "dual" (the current block only).
#: Named `kv_cache`, not `cache`: `generate(cache=...)` records activations.
KVCacheMode = Optional[Literal["prefix", "dual"]]
KV_CACHE_MODES = (None, "prefix", "dual")

# forward(state) runs the model on state.model_input / state.model_attention_mask and returns
# per-token logits [rows pos vocab] (the family's logit shift already applied by the driver), or
# None when `state.needs_logits` is False (the forward runs for its KV cache: no LM head).
Forward = Callable[[DenoisingState], Optional[Float[Tensor, "rows pos vocab"]]]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base class of samplers: a frozen dataclass of the algorithm's options.

    Why: options are plain fields, so `generate(..., steps=64)` overrides them through
    `with_options`, and the same object describes the run to the cache-size estimator.

    Example:
        >>> sampler = model.adapter.sampler(model.cfg).with_options(steps=64, gen_length=64)
        >>> sampler.n_steps(), sampler.response_length()
        (64, 64)
    """

    #: Every step commits at least one response token (masked diffusion): more steps than response
    #: positions would only waste forwards, and `generate` refuses them.
    commits_a_token_per_step: ClassVar[bool] = False

    def with_options(self, **options) -> "Sampler":
        """A copy with some options replaced; unknown option names raise a TypeError listing the valid ones.

        `gen_length` and `max_new_tokens` both set the response length (giving both with different
        values is an error); `block_length` on a sampler without blocks must equal the response length.

        Example:
            >>> DreamSampler().with_options(gen_length=32, steps=32, block_length=32).max_new_tokens
            32
        """
        known = {f.name for f in dataclasses.fields(self)}
        options = dict(options)
        if "kv_cache" in known:
            _upstream_cache_flags(options)
        lengths = {name: options.pop(name) for name in RESPONSE_LENGTH_NAMES if name in options}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"{' and '.join(f'{k}={v}' for k, v in lengths.items())} disagree; both name the response "
                "length, so pass one of them."
            )
        field = next((name for name in RESPONSE_LENGTH_NAMES if name in known), None)
        if lengths:
            options[field or next(iter(lengths))] = next(iter(lengths.values()))
        block_length = options.pop("block_length") if "block_length" in options and "block_length" not in known else None
        unknown = sorted(set(options) - known)
        if unknown:
            aliases = f" (the response length is also accepted as {' or '.join(RESPONSE_LENGTH_NAMES)})" if field else ""
            raise TypeError(
                f"{type(self).__name__} has no option {', '.join(map(repr, unknown))}; "
                f"its options are {sorted(known)}{aliases}."
            )
        sampler = dataclasses.replace(self, **options)
        if block_length is not None and block_length != sampler.response_length():
            raise ValueError(
                f"{type(self).__name__} denoises the whole response as one block, so block_length={block_length} "
                f"cannot apply; omit it or pass block_length={sampler.response_length()} (the response length)."
            )
        return sampler

    def options(self) -> dict:
        """The options as a dict (what `with_options` accepts)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def n_steps(self) -> int:
        """Total number of denoising steps (= forwards, each of `n_copies` x batch rows)."""
        raise NotImplementedError

    def response_length(self) -> int:
        """Number of positions generated after the prompt."""
        raise NotImplementedError

    def n_copies(self) -> int:
        """Rows of the forward batch per prompt: 2 under classifier-free guidance, else 1."""
        return 1

    def n_blocks(self) -> int:
        """Number of semi-autoregressive blocks (`DenoisingState.block` runs 0..n_blocks-1); 1 for
        samplers that denoise the whole response at once."""
        return 1

    def kv_cache_mode(self) -> KVCacheMode:
        """The KV cache the run uses (`kv_cache=` option): None, "prefix" or "dual".

        Example:
            >>> LLaDASampler(kv_cache="dual").kv_cache_mode()
            'dual'
        """
        return None

    def fixed_steps(self) -> bool:
        """True when `n_steps()` is the exact number of forwards; False when the commit rule is adaptive
        (threshold=, factor=) and `n_steps()` is an upper bound: the run may end earlier.

        Example:
            >>> LLaDASampler(steps=16, gen_length=32, threshold=0.9).fixed_steps()   # n_steps() == 32, a bound
            False
        """
        return True

    def step_windows(self, prompt_width: int) -> Optional[list[Optional[tuple[int, int]]]]:
        """Per step, the canvas columns its forward computes (None = every column), when that is known
        before the run; None when it depends on the tokens (an adaptive rule under a KV cache).

        Why: `generate` refuses, before the first forward, a position-scoped hook that no scheduled
        step computes (e.g. prompt positions at cached steps only).

        Example:
            >>> LLaDASampler(steps=4, gen_length=8, block_length=4, kv_cache="dual").step_windows(6)
            [None, (6, 10), None, (10, 14)]
        """
        return [None] * self.n_steps()

    def stochastic(self) -> bool:
        """True when the options ask for sampling (e.g. temperature > 0). Then a run without `seed` /
        `generator` draws from the global torch RNG, as upstream; otherwise the run is deterministic:
        draws the algorithm still makes (e.g. random remasking) come from a generator seeded with
        `DEFAULT_SEED`."""
        return False

    def run(
        self,
        cfg: DiffusionConfig,
        prompt: Int[Tensor, "batch prompt_pos"],
        attention_mask: Optional[Int[Tensor, "batch prompt_pos"]],
        forward: Forward,
        generator: Optional[torch.Generator] = None,
    ) -> Iterator[tuple[DenoisingState, Int[Tensor, "batch pos"]]]:
        """Denoise `prompt` + `response_length()` masks (`build_canvas`); yield (state of the step,
        canvas after it). `cfg` supplies the default special token ids; `forward` runs the model.

        The canvas yielded must be a new tensor each step (never modified in place afterwards),
        so that `state.canvas` and recorded trajectories stay valid.
        """
        raise NotImplementedError


def _upstream_cache_flags(options: dict) -> None:
    """Map upstream's cache switches onto `kv_cache` in place: Dream's `dual_cache=True` -> "dual",
    Fast-dLLM's `use_cache=True` -> "prefix" (or "dual" with `dual_cache=True`), `use_cache=False` -> None."""
    use, dual = options.pop("use_cache", None), options.pop("dual_cache", None)
    if use is None and dual is None:
        return
    if use is False and dual:
        raise ValueError("use_cache=False and dual_cache=True contradict each other; pass kv_cache='dual' or None.")
    mode = None if use is False else ("dual" if dual else "prefix")
    if "kv_cache" in options and options["kv_cache"] != mode:
        raise ValueError(f"kv_cache={options['kv_cache']!r} disagrees with use_cache={use} / dual_cache={dual}; pass one.")
    options["kv_cache"] = mode


def check_kv_cache_options(
    kv_cache: KVCacheMode, refresh: Union[str, int], threshold: Optional[float], factor: Optional[float]
) -> list[str]:
    """What is wrong with the Fast-dLLM options a sampler was given (empty when they are fine).

    Example:
        >>> check_kv_cache_options("full", "block", None, None)
        ["kv_cache='full' must be one of (None, 'prefix', 'dual')"]
    """
    problems = []
    if kv_cache not in KV_CACHE_MODES:
        problems.append(f"kv_cache={kv_cache!r} must be one of {KV_CACHE_MODES}")
    if not (refresh == "block" or (isinstance(refresh, int) and not isinstance(refresh, bool) and refresh > 0)):
        problems.append(f"refresh={refresh!r} must be 'block' (rebuild the KV cache once per block) or a positive int k "
                        "(rebuild it every k steps of a block)")
    elif refresh != "block" and kv_cache is None:
        problems.append(f"refresh={refresh!r} needs kv_cache='prefix' or 'dual': without a KV cache every forward is fresh")
    if threshold is not None and not 0 < threshold <= 1:
        problems.append(f"threshold={threshold!r} must be in (0, 1]")
    if factor is not None and not factor > 0:
        problems.append(f"factor={factor!r} must be > 0")
    return problems


def resolve_token_id(given: Optional[int], default: Optional[int], option: str, cfg_field: str) -> int:
    """A sampler's special-token id: the option if given, else the model config's, else a clear error.

    Example:
        >>> mask_id = resolve_token_id(self.mask_id, cfg.mask_token_id, "mask_id", "mask_token_id")
    """
    if given is not None:
        return given
    if default is None:
        raise ValueError(
            f"The sampler needs `{option}`, and the model config's {cfg_field} is None; pass {option}=... to generate."
        )
    return default


#: Seed of the generator a non-stochastic run uses when no `seed` / `generator` is given.
DEFAULT_SEED = 0

__all__ = ["DEFAULT_SEED", "KV_CACHE_MODES", "RESPONSE_LENGTH_NAMES", "Forward", "KVCacheMode", "Sampler", "check_kv_cache_options"]
