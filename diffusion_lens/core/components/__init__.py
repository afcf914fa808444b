"""Model components, one small class per concept; each names its hook points after what they carry."""

from diffusion_lens.core.components.attention import Attention, attention_mask_for, attention_masks_for, layer_kind_mask
from diffusion_lens.core.components.block import TransformerBlock
from diffusion_lens.core.components.mlp import GatedMLP
from diffusion_lens.core.components.norm import RMSNorm
from diffusion_lens.core.components.rotary import Rotary, position_ids_for

__all__ = ["Attention", "GatedMLP", "RMSNorm", "Rotary", "TransformerBlock", "attention_mask_for", "attention_masks_for",
           "layer_kind_mask", "position_ids_for"]
