"""Model components, one small class per concept; each names its hook points after what they carry."""

from diffusion_lens.core.components.attention import Attention, attention_mask_for, attention_masks_for, layer_kind_mask
from diffusion_lens.core.components.block import TransformerBlock, build_block
from diffusion_lens.core.components.gemma4 import FusedExperts, Gemma4Block, Gemma4FeedForward
from diffusion_lens.core.components.mlp import GatedMLP
from diffusion_lens.core.components.norm import RMSNorm
from diffusion_lens.core.components.rotary import Rotary, layer_rotaries, position_ids_for
from diffusion_lens.core.components.self_conditioning import SelfConditioning

__all__ = ["Attention", "FusedExperts", "GatedMLP", "Gemma4Block", "Gemma4FeedForward", "RMSNorm", "Rotary",
           "SelfConditioning", "TransformerBlock", "attention_mask_for", "attention_masks_for", "build_block", "layer_kind_mask",
           "layer_rotaries", "position_ids_for"]
