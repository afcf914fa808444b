"""Denoising algorithms, named by algorithm (a family's adapter picks one in `sampler(cfg)`)."""

from diffusion_lens.denoising.samplers.base import Forward, Sampler
from diffusion_lens.denoising.samplers.diffusion_gemma import EntropyBoundSampler
from diffusion_lens.denoising.samplers.dream import DreamSampler
from diffusion_lens.denoising.samplers.llada import LLaDASampler
from diffusion_lens.denoising.samplers.llada2 import LLaDA2Sampler
from diffusion_lens.denoising.samplers.mmada import MMaDASampler
from diffusion_lens.denoising.samplers.probe import CanvasProbe

__all__ = ["CanvasProbe", "DreamSampler", "EntropyBoundSampler", "Forward", "LLaDA2Sampler", "LLaDASampler", "MMaDASampler", "Sampler"]
