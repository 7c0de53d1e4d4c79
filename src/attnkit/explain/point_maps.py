"""Attention over the image as pixel maps: deformable sampling points splatted where they sample, dense rows
spread over the cells of their feature levels.

Coordinates: normalised ``(x, y)`` with ``(0, 0)`` at the top-left corner and ``(1, 1)`` at the bottom-right corner
of a map, as ``grid_sample(..., align_corners=False)`` reads them. Used by :mod:`attnkit.explain.detection_maps`
(what each detection looked at) and :mod:`attnkit.explain.detection_relevance` (deformable attention as a dense
map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["deformable_point_map", "dense_query_map", "gaussian_blur", "splat_points"]


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, Hi, Wi)`` maps (zero padding), radius ``3 * sigma``."""
    if sigma <= 0:
        return maps
    r = max(1, round(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    m = maps.unsqueeze(1)
    m = F.conv2d(m, k.view(1, 1, 1, -1), padding=(0, r))
    m = F.conv2d(m, k.view(1, 1, -1, 1), padding=(r, 0))
    return m.squeeze(1)


def splat_points(points: Tensor, weights: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear splatting: each point's weight shared among the 4 cells around it, as
    ``grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`` reads them.

    The transpose of bilinear sampling: ``splat_points(p, w, size)[n] @ values.flatten()`` equals
    ``sum_k w[n, k] * bilinear(values, p[n, k])``, so a splatted deformable query row is the dense attention row
    that gives the same output. Shares of cells outside the map are dropped (zero padding).

    Args:
        points: ``(N, K, 2)`` normalised ``(x, y)`` (``(0, 0)`` top-left corner, ``(1, 1)`` bottom-right corner).
        weights: ``(N, K)`` the points' weights.
        size: ``(h, w)`` cells of the map.

    Returns:
        ``(N, h * w)`` row-major, in the dtype of ``weights``.
    """
    hi, wi = int(size[0]), int(size[1])
    px = points[..., 0] * wi - 0.5  # cell-centre coordinates
    py = points[..., 1] * hi - 0.5
    x0, y0 = px.floor(), py.floor()
    out = weights.new_zeros(weights.shape[0], hi * wi)
    for dx in (0, 1):
        for dy in (0, 1):
            xx, yy = x0 + dx, y0 + dy
            share = (1 - (px - xx).abs()) * (1 - (py - yy).abs()) * weights
            inside = (xx >= 0) & (xx < wi) & (yy >= 0) & (yy < hi)
            idx = (yy.clamp(0, hi - 1) * wi + xx.clamp(0, wi - 1)).long()
            out.scatter_add_(1, idx, torch.where(inside, share, torch.zeros_like(share)))
    return out


def deformable_point_map(
    sampling_locations: Tensor, attention_weights: Tensor, image_size: tuple[int, int], *, sigma: float = 1.0
) -> Tensor:
    """Weighted sampling points of deformable attention drawn as a map over the image.

    Args:
        sampling_locations: ``(Q, H, NL, P, 2)`` normalised ``(x, y)`` (``(0, 0)`` top-left corner, ``(1, 1)``
            bottom-right corner of the map the model saw), e.g. one query's slice of a ``"deformable"`` record.
        attention_weights: ``(Q, H, NL, P)`` the points' weights (heads are averaged).
        image_size: ``(Hi, Wi)`` pixels the normalised coordinates span.
        sigma: Gaussian smoothing in pixels (0: none); default 1.

    Returns:
        ``(Q, Hi, Wi)`` float32 maps; with softmax weights per head each sums to 1 less the weight of points
        outside the image (before smoothing).

    Raises:
        ValueError: shapes that do not agree.
    """
    if sampling_locations.shape[:-1] != attention_weights.shape or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"deformable_point_map: expected sampling_locations (..., 2) matching attention_weights "
            f"{tuple(attention_weights.shape)}, got {tuple(sampling_locations.shape)}"
        )
    hi, wi = int(image_size[0]), int(image_size[1])
    q = sampling_locations.shape[0]
    if q == 0 or attention_weights.numel() == 0:
        return torch.zeros(q, hi, wi, dtype=torch.float32, device=sampling_locations.device)
    w = attention_weights.reshape(q, -1).float() / attention_weights.shape[1]  # mean over heads
    maps = splat_points(sampling_locations.reshape(q, -1, 2).float(), w, (hi, wi))
    return gaussian_blur(maps.view(q, hi, wi), sigma)


def dense_query_map(weights: Tensor, spatial_shapes: Sequence[Sequence[int]], image_size: tuple[int, int]) -> Tensor:
    """Dense cross-attention rows over flattened feature levels as a density over the image.

    Args:
        weights: ``(Q, S)`` probabilities (average heads first), ``S = sum(h_l * w_l)``, level by level, row-major.
        spatial_shapes: ``(h_l, w_l)`` of each level; each level covers the whole image.
        image_size: ``(Hi, Wi)``.

    Returns:
        ``(Q, Hi, Wi)`` float32; a cell's probability is spread evenly over its pixels (nearest-neighbour).

    Raises:
        ValueError: ``spatial_shapes`` that do not add up to ``S``.
    """
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if sum(h * w for h, w in shapes) != weights.shape[-1]:
        raise ValueError(
            f"dense_query_map: spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, the "
            f"weights have {weights.shape[-1]}"
        )
    hi, wi = int(image_size[0]), int(image_size[1])
    out = torch.zeros(weights.shape[0], hi, wi, dtype=torch.float32, device=weights.device)
    for level, (h, w) in zip(weights.float().split([h * w for h, w in shapes], -1), shapes):
        up = F.interpolate(level.view(-1, 1, h, w), size=(hi, wi), mode="nearest")[:, 0]
        out += up * (h * w) / (hi * wi)
    return out
