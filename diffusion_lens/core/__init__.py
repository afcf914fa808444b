"""The core: `DiffusionConfig`, the components, and `HookedDiffusionCore`, the hookable forward.

Nothing here knows about samplers, checkpoints or steering; every other layer builds on it.
"""

from diffusion_lens.core.config import DiffusionConfig
from diffusion_lens.core.kv_cache import KVCache
from diffusion_lens.core.model import HookedDiffusionCore

__all__ = ["DiffusionConfig", "HookedDiffusionCore", "KVCache"]
