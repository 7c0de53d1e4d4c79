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

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.explain.metrics import pointing_game
from attnkit.explain.point_maps import deformable_point_map, dense_query_map, splat_points

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
