"""Vision attention blocks: channel, spatial, non-local, window, cross and token attention for images.

Every block takes ``(B, C, Hi, Wi)`` feature maps (or ``(B, N, C)`` tokens for the transformer blocks) and reports
its attention map to :mod:`attnkit.functional.observe`, so :func:`attnkit.explain.capture` can draw it.
"""

from attnkit.vision.cbam import CBAM, ChannelAttention, SpatialAttention
from attnkit.vision.eca import ECA, eca_kernel_size
from attnkit.vision.non_local import NonLocal2d
from attnkit.vision.squeeze_excite import SqueezeExcite

__all__ = [
    "CBAM",
    "ECA",
    "ChannelAttention",
    "NonLocal2d",
    "SpatialAttention",
    "SqueezeExcite",
    "eca_kernel_size",
]
