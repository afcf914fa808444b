"""Denoising algorithms, named by algorithm (a family's adapter picks one in `sampler(model)`)."""

from diffusion_lens.denoising.samplers.base import Forward, Sampler
from diffusion_lens.denoising.samplers.dream import DreamSampler
from diffusion_lens.denoising.samplers.llada import LLaDASampler
from diffusion_lens.denoising.samplers.mmada import MMaDASampler

__all__ = ["DreamSampler", "Forward", "LLaDASampler", "MMaDASampler", "Sampler"]
