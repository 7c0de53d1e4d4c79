"""Image to patch tokens (Dosovitskiy et al. 2021, https://arxiv.org/abs/2010.11929, Eq. 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.vision._common import check_feature_map, check_int

__all__ = ["PatchEmbed", "to_pair"]


def to_pair(value: int | tuple[int, int], name: str, owner: str) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of positive ints (an int ``v`` means ``(v, v)``)."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{owner}: expected {name} to be an int or an (h, w) pair, got {value!r}")
    return check_int(pair[0], name, owner), check_int(pair[1], name, owner)


class PatchEmbed(nn.Module):
    r"""Split an image into non-overlapping ``P x P`` patches and project each to ``embed_dim``.

    Implements the patch embedding of Dosovitskiy et al. 2021, Eq. 1 (``x_p^i E``, flattening each patch and
    applying a shared linear map ``E``), as a convolution with kernel and stride ``P`` (the same map, and the
    layout of the reference implementation, timm and transformers: ``proj`` weight ``(E, C, P, P)``). Pixels
    past the last whole patch are dropped (``Gh = Hi // P``, ``Gw = Wi // P``); any image size works.

    Args:
        patch_size: ``P`` or ``(Ph, Pw)``; default 16.
        in_chans: image channels ``C``; default 3.
        embed_dim: ``E``; default 768.
        bias: bias of the projection; default ``True``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, C, Hi, Wi)`` with ``Hi >= Ph`` and ``Wi >= Pw`` -> tokens ``(B, Gh·Gw, E)`` in row-major
        patch order.

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: sizes below 1; an input of rank != 4, with the wrong ``C``, or smaller than one patch.

    References:
        Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Eq. 1.
    """

    def __init__(
        self,
        *,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = to_pair(patch_size, "patch_size", "PatchEmbed")
        self.in_chans = check_int(in_chans, "in_chans", "PatchEmbed")
        self.embed_dim = check_int(embed_dim, "embed_dim", "PatchEmbed")
        self.proj = nn.Conv2d(
            in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias, device=device, dtype=dtype
        )

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(Gh, Gw)`` of an ``(Hi, Wi)`` image."""
        return image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, Hi, Wi)`` -> ``(B, Gh·Gw, E)``."""
        check_feature_map(x, self.in_chans, "PatchEmbed")
        if x.shape[2] < self.patch_size[0] or x.shape[3] < self.patch_size[1]:
            raise ValueError(f"PatchEmbed: image {tuple(x.shape[2:])} is smaller than one patch {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)
