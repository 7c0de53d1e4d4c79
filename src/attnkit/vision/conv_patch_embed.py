"""A convolutional patch embedding for Vision Transformers whose token grid stays aligned with the image."""

from __future__ import annotations

from torch import Tensor, nn

from attnkit.vision._common import check_feature_map, check_int

__all__ = ["ConvPatchEmbed"]


class ConvPatchEmbed(nn.Module):
    """A convolutional stem in place of the linear patch embedding: ``log2(P)`` stride-2 ``4x4`` convolutions
    (padding 1, BatchNorm, ReLU; widths doubling up to ``embed_dim``) and a ``1x1`` projection to ``embed_dim``.

    Same interface as :class:`attnkit.vision.patch_embed.PatchEmbed` (``patch_size``, ``grid_size``, ``(B, C, Hi,
    Wi) -> (B, Gh·Gw, E)``, one token per ``P x P`` cell in row-major order), so it drops into
    :class:`VisionTransformer` as ``model.patch_embed``. Token ``(i, j)`` sees a ``(3P - 2)``-pixel square
    centred on its cell (22 px for ``P = 8``): even kernels with padding 1 keep every stride-2 window centred on
    its output cell, so the token grid lines up with the image and an attention map over the tokens can be
    upsampled onto the image. (The usual ``3x3`` / padding 1 stem shifts each token's receptive field ``P/2``
    pixels up and to the left of its cell, which misplaces attention maps by half a patch.)

    References:
        Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021 (convolutional stems for
        ViTs; theirs uses ``3x3`` kernels).
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        check_int(in_chans, "in_chans", "ConvPatchEmbed")
        check_int(embed_dim, "embed_dim", "ConvPatchEmbed")
        power_of_two = isinstance(patch_size, int) and patch_size >= 2 and not patch_size & (patch_size - 1)
        if isinstance(patch_size, bool) or not power_of_two:
            raise ValueError(f"ConvPatchEmbed: expected a power-of-two patch_size >= 2, got {patch_size}")
        self.patch_size, self.in_chans = (patch_size, patch_size), in_chans
        layers, cin, width = [], in_chans, max(8, embed_dim // (patch_size // 2))
        for _ in range(patch_size.bit_length() - 1):
            layers += [nn.Conv2d(cin, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            cin, width = width, min(2 * width, embed_dim)
        layers.append(nn.Conv2d(cin, embed_dim, 1))
        self.stem = nn.Sequential(*layers)

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(Gh, Gw)`` of an ``(Hi, Wi)`` image (``Hi // P``, ``Wi // P``)."""
        return image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, Hi, Wi)`` -> ``(B, Gh·Gw, E)``; ``Hi`` and ``Wi`` must be multiples of ``P``."""
        check_feature_map(x, self.in_chans, "ConvPatchEmbed")
        if x.shape[2] % self.patch_size[0] or x.shape[3] % self.patch_size[1]:
            raise ValueError(f"ConvPatchEmbed: image {tuple(x.shape[2:])} is not a multiple of {self.patch_size}")
        return self.stem(x).flatten(2).transpose(1, 2)
