"""Denoising: samplers, the per-step `DenoisingState`, `generate`, and step-aware caches/reducers.

`model.generate(...)`, `model.run_with_cache(..., step=k)` and `model.estimate_cache_bytes(...)`
are thin entry points into this package; scheduled hooks live in `diffusion_lens.denoising.hooks`.
"""

from diffusion_lens.denoising.cache import (
    DEFAULT_MAX_CACHE_BYTES,
    CacheRequest,
    CacheTooLargeError,
    StepCache,
    StreamingMean,
)
from diffusion_lens.denoising.generate import GenerationOutput, estimate_cache_bytes, generate, run_with_step_cache
from diffusion_lens.denoising.samplers import DreamSampler, LLaDASampler, MMaDASampler, Sampler
from diffusion_lens.denoising.samplers.base import DEFAULT_SEED
from diffusion_lens.denoising.state import DenoisingState

__all__ = [
    "DEFAULT_MAX_CACHE_BYTES", "DEFAULT_SEED", "CacheRequest", "CacheTooLargeError", "DenoisingState", "DreamSampler",
    "GenerationOutput", "LLaDASampler", "MMaDASampler", "Sampler", "StepCache", "StreamingMean",
    "estimate_cache_bytes", "generate", "run_with_step_cache",
]
