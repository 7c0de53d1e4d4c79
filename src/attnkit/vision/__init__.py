"""Vision attention blocks: channel, spatial, non-local, window, cross and token attention for images.

Every block takes ``(B, C, Hi, Wi)`` feature maps (or ``(B, N, C)`` tokens for the transformer blocks) and reports
its attention map to :mod:`attnkit.functional.observe`, so :func:`attnkit.explain.capture` can draw it.
"""

from attnkit.vision.cbam import CBAM, ChannelAttention, SpatialAttention
from attnkit.vision.conv_patch_embed import ConvPatchEmbed
from attnkit.vision.cross import CrossAttentionBlock
from attnkit.vision.deformable import (
    DeformableAttentionOutput,
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
)
from attnkit.vision.eca import ECA, eca_kernel_size
from attnkit.vision.hybrid import BasicBlock, HybridResNet
from attnkit.vision.insert import INSERT_KINDS, Insertion, InsertionSummary, insert_attention
from attnkit.vision.mhsa import MHSA2d
from attnkit.vision.non_local import NonLocal2d
from attnkit.vision.patch_embed import PatchEmbed
from attnkit.vision.registry import available_attention, create_attention, register_attention
from attnkit.vision.squeeze_excite import SqueezeExcite
from attnkit.vision.vit import VisionTransformer, interpolate_pos_embed
from attnkit.vision.window import WindowAttention

__all__ = [
    "CBAM",
    "ECA",
    "INSERT_KINDS",
    "BasicBlock",
    "ChannelAttention",
    "ConvPatchEmbed",
    "CrossAttentionBlock",
    "DeformableAttentionOutput",
    "HybridResNet",
    "Insertion",
    "InsertionSummary",
    "MHSA2d",
    "MultiScaleDeformableAttention",
    "NonLocal2d",
    "PatchEmbed",
    "SpatialAttention",
    "SqueezeExcite",
    "VisionTransformer",
    "WindowAttention",
    "available_attention",
    "create_attention",
    "eca_kernel_size",
    "insert_attention",
    "interpolate_pos_embed",
    "multi_scale_deformable_attention",
    "register_attention",
]
