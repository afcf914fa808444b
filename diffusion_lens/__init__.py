"""diffusion_lens: interpretability and steering for masked diffusion language models."""

from diffusion_lens.config import DiffusionConfig
from diffusion_lens.model import HookedDiffusionTransformer

__all__ = ["DiffusionConfig", "HookedDiffusionTransformer"]
__version__ = "0.1.0"
