"""Checkpoints: the adapter contract a family implements (`ModelAdapter`, `KeyRule`,
`register_adapter`) and the safetensors I/O that loads and saves through it.

Example:
    >>> from diffusion_lens.checkpoints import KeyRule, ModelAdapter, register_adapter
"""

from diffusion_lens.checkpoints.adapters import (
    KeyRule,
    ModelAdapter,
    detect_adapter,
    get_adapter,
    register_adapter,
    registered_adapters,
    unsupported,
)

__all__ = ["KeyRule", "ModelAdapter", "detect_adapter", "get_adapter", "register_adapter", "registered_adapters", "unsupported"]
