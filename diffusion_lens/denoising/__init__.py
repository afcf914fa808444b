"""Denoising: samplers, the step-0 canvas, the per-step `DenoisingState`, `generate`, and step-aware caches/reducers.

`generate` is the one entry point for per-step work (observe with hooks / caches / reducers,
`stop_after=`, `capture_logits=`, `record=True`, `replay=`); `model.generate` *is* it,
`model.run_with_cache(..., step=k)` and `model.estimate_cache_bytes(...)` are built on it.
`build_canvas` makes the canvas every run starts from; scheduled hooks live in
`diffusion_lens.denoising.hooks`.
"""

from diffusion_lens.denoising.cache import (
    DEFAULT_MAX_CACHE_BYTES,
    CacheRequest,
    CacheTooLargeError,
    StepCache,
)
from diffusion_lens.denoising.canvas import build_canvas
from diffusion_lens.denoising.reducers import StreamingMean
from diffusion_lens.denoising.generate import (
    DRIVER_OPTIONS,
    GenerationOutput,
    estimate_cache_bytes,
    generate,
    run_with_step_cache,
    split_generate_kwargs,
)
from diffusion_lens.denoising.replay import with_prompt
from diffusion_lens.denoising.samplers import (
    CanvasProbe, DreamSampler, EntropyBoundSampler, LLaDA2Sampler, LLaDASampler, MMaDASampler, Sampler,
)
from diffusion_lens.denoising.samplers.base import DEFAULT_SEED
from diffusion_lens.denoising.state import DenoisingState

__all__ = [
    "DEFAULT_MAX_CACHE_BYTES", "DEFAULT_SEED", "DRIVER_OPTIONS", "CacheRequest", "CacheTooLargeError", "CanvasProbe",
    "DenoisingState", "DreamSampler", "EntropyBoundSampler", "GenerationOutput", "LLaDA2Sampler", "LLaDASampler",
    "MMaDASampler", "Sampler", "StepCache",
    "StreamingMean", "build_canvas", "estimate_cache_bytes", "generate", "run_with_step_cache",
    "split_generate_kwargs", "with_prompt",
]
