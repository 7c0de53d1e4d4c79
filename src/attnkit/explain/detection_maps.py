"""What each detection looked at: the decoder query's cross-attention drawn over the image.

A DETR-family detection comes from one decoder query; its cross-attention in the last decoder layer is where the
model read the image to classify and place the box. Two forms:

* deformable attention (Deformable DETR, RT-DETR): a few sampling points per head and level with softmax weights.
  :func:`deformable_point_map` splats every point's weight at its pixel position (bilinear splatting, so the map
  integrates to the total weight, 1 per query) and smooths with a small Gaussian;
* dense attention (DETR): probabilities over the flattened feature levels. :func:`dense_query_map` spreads each
  level's probabilities over the pixels of their cells (each cell's probability divided by its area in pixels, so
  the map is a density that integrates to 1 across levels).

:func:`box_masks` and :func:`box_pointing_game` score a map against the detected box with
:func:`attnkit.explain.metrics.pointing_game` (Zhang et al. 2016).

Shape legend: ``Q`` queries (or detections), ``H`` heads, ``NL`` levels, ``P`` points, ``(Hi, Wi)`` image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.explain.metrics import pointing_game

__all__ = [
    "DetectionMaps",
    "box_masks",
    "box_pointing_game",
    "deformable_point_map",
    "dense_query_map",
    "detection_maps",
    "query_maps",
    "splat_points",
]


def _gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
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
    return _gaussian_blur(maps.view(q, hi, wi), sigma)


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


def box_masks(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(N, Hi, Wi)`` bool masks of the pixels whose centres lie inside xyxy pixel ``boxes`` ``(N, 4)`` (at least
    the pixel holding the box centre, so tiny boxes are never empty)."""
    hi, wi = int(image_size[0]), int(image_size[1])
    ys = torch.arange(hi, dtype=torch.float32, device=boxes.device).view(1, -1, 1) + 0.5
    xs = torch.arange(wi, dtype=torch.float32, device=boxes.device).view(1, 1, -1) + 0.5
    b = boxes.float().view(-1, 4, 1, 1)
    inside = (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])
    cx = ((b[:, 0] + b[:, 2]) / 2).floor().clamp(0, wi - 1).long().view(-1)
    cy = ((b[:, 1] + b[:, 3]) / 2).floor().clamp(0, hi - 1).long().view(-1)
    inside[torch.arange(len(cx)), cy, cx] = True
    return inside


def box_pointing_game(maps: Tensor, boxes: Tensor, *, tolerance: float = 0.0) -> Tensor:
    """``(N,)`` bool: does the peak of each ``(N, Hi, Wi)`` map fall inside its xyxy pixel box ``(N, 4)``?
    (:func:`attnkit.explain.metrics.pointing_game` with :func:`box_masks` as targets)."""
    if len(maps) == 0:
        return torch.zeros(0, dtype=torch.bool)
    return pointing_game(maps, box_masks(boxes, tuple(maps.shape[-2:])), tolerance=tolerance)


def query_maps(record, rows: Tensor, image_size: tuple[int, int], *, spatial_shapes=None, sigma: float = 1.0):
    """Maps ``(len(rows), Hi, Wi)`` of the given query rows of one image from a captured cross-attention record.

    Args:
        record: an :class:`attnkit.explain.AttentionRecord` of kind ``"deformable"`` (weights ``(1, H, Q, NL, P)``,
            ``layout.extra["sampling_locations"]``) or ``"cross"`` (weights ``(1, H, Q, S)``), batch of one.
        rows: ``(N,)`` query indices (``Detections.queries``).
        image_size: ``(Hi, Wi)`` the normalised coordinates / feature levels span (the padded input).
        spatial_shapes: level shapes of a dense record (default: the record's layout ``spatial_shapes`` or grid).
        sigma: smoothing of deformable point maps, pixels.

    Raises:
        ValueError: a record of another kind, without weights, or a dense record whose level shapes are unknown.
    """
    if record.weights is None:
        raise ValueError(f"query_maps: record {record.name!r} holds no weights (captured with store=False)")
    rows = torch.as_tensor(rows, dtype=torch.long)
    if record.kind == "deformable":
        loc = record.layout.extra["sampling_locations"][0].transpose(0, 1)  # (Q, H, NL, P, 2)
        w = record.weights[0].transpose(0, 1)  # (Q, H, NL, P)
        return deformable_point_map(loc[rows], w[rows], image_size, sigma=sigma)
    if record.kind == "cross":
        if spatial_shapes is None and record.layout is not None:
            spatial_shapes = record.layout.extra.get("spatial_shapes") or (
                [record.layout.grid] if record.layout.grid else None
            )
        if spatial_shapes is None:
            raise ValueError(f"query_maps: dense record {record.name!r} has no known grid; pass spatial_shapes")
        return dense_query_map(record.weights[0].mean(0)[rows], spatial_shapes, image_size)
    raise ValueError(f"query_maps: expected a 'deformable' or 'cross' record, got kind {record.kind!r}")


@dataclass
class DetectionMaps:
    """Detections of one image with the map of each.

    Attributes:
        detections: the :class:`attnkit.vision.detection.Detections` (boxes in input pixels).
        maps: ``(N, Hi, Wi)`` float32, one map per detection, over the input pixels.
        hits: ``(N,)`` bool pointing-game hits of the maps against the detected boxes.
    """

    detections: object
    maps: Tensor
    hits: Tensor


METHODS = ("attention", "relevance")


def _attention_maps(model, image: Tensor, padded, shapes, score_threshold: float, sigma: float):
    from attnkit.explain.capture import capture

    name = f"decoder.layers.{len(model.decoder.layers) - 1}.cross_attn"
    with torch.no_grad(), capture(model) as rec:
        (det,) = model(image[None], score_threshold=score_threshold)
    record = next(r for r in reversed(rec.maps) if r.name == name)
    return det, query_maps(record, det.queries, padded, spatial_shapes=shapes, sigma=sigma)


def _relevance_maps(model, image: Tensor, padded, shapes, score_threshold: float, sigma: float):
    from attnkit.explain.detection_relevance import query_relevance, relevance_maps
    from attnkit.vision.detection.model import postprocess

    found = []

    def targets(raw):
        (det,) = postprocess(
            raw.logits[-1].detach(),
            raw.boxes[-1].detach(),
            raw.image_size,
            tuple(image.shape[-2:]),
            max_detections=model.max_detections,
            score_threshold=score_threshold,
        )
        found.append(det)
        return torch.stack([det.queries, det.labels], -1)

    result = query_relevance(model, lambda: model.forward_raw(image[None]), targets)
    return found[0], relevance_maps(result, padded, spatial_shapes=shapes, sigma=sigma)


_MAKERS = {"attention": _attention_maps, "relevance": _relevance_maps}


def detection_maps(
    model, images: Tensor, *, score_threshold: float = 0.5, sigma: float = 1.0, method: str = "attention"
) -> list[DetectionMaps]:
    """Detect with an attnkit :class:`~attnkit.vision.detection.RTDETR` and draw what each detection looked at.

    Two methods, each run once per image:

    * ``"attention"``: the last decoder layer's cross-attention of the detection's query (deformable sampling
      points weighted by attention, heads averaged, or dense maps with ``cross_attention="dense"``), under
      :func:`attnkit.explain.capture`;
    * ``"relevance"``: Chefer et al. 2021's relevance of the image tokens for the query (``R^{qi}``, through every
      decoder layer's self- and cross-attention, gradient-weighted by the detection's class logit;
      :func:`attnkit.explain.detection_relevance.query_relevance`). The detections are those of that run
      (attention computed through explicit probabilities: equal to the plain run up to rounding).

    Args:
        model: an RTDETR (eval mode).
        images: ``(B, C, Hi, Wi)`` (or one ``(C, Hi, Wi)``).
        score_threshold: detections below it are dropped; default 0.5.
        sigma: Gaussian smoothing of the maps in pixels; default 1.
        method: ``"attention"`` (default) or ``"relevance"``.

    Returns:
        one :class:`DetectionMaps` per image.

    Raises:
        ValueError: a model without a DETR decoder; an unknown ``method``.
    """
    decoder = getattr(model, "decoder", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"detection_maps: expected an attnkit RTDETR, got {type(model).__name__}")
    if method not in _MAKERS:
        raise ValueError(f"detection_maps: method must be one of {METHODS}, got {method!r}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    out = []
    hi, wi = images.shape[-2:]
    padded = (-(-hi // 16) * 16, -(-wi // 16) * 16)  # the model pads to a multiple of 16
    shapes = [(padded[0] // s, padded[1] // s) for s in model.backbone.strides]
    for image in images:
        det, maps = _MAKERS[method](model, image, padded, shapes, score_threshold, sigma)
        maps = maps[:, :hi, :wi]
        out.append(DetectionMaps(det, maps, box_pointing_game(maps, det.boxes)))
    return out
