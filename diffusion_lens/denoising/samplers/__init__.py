"""Denoising algorithms, named by algorithm (a family's adapter picks one in `sampler(model)`)."""

from diffusion_lens.denoising.samplers.base import Forward, Sampler
from diffusion_lens.denoising.samplers.llada import LLaDASampler

__all__ = ["Forward", "LLaDASampler", "Sampler"]
