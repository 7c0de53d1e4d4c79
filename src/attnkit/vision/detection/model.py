"""A compact RT-DETR-style detector: conv backbone, hybrid encoder, top-k query selection, DETR decoder.

``model(images)`` returns one :class:`Detections` per image (boxes in input pixels, scores, labels), like the
detectors users know (``results[0].boxes``); :meth:`RTDETR.forward_raw` returns the per-layer predictions the
training losses need.

References:
    Zhao et al. 2024, "DETRs Beat YOLOs on Real-time Object Detection" (RT-DETR), Sec. 4 (hybrid encoder,
    uncertainty-minimal query selection simplified to top-k class scores, decoder with box refinement);
    Zhu et al. 2021, "Deformable DETR" (deformable cross-attention, two-stage anchors, box refinement);
    Carion et al. 2020, "End-to-End Object Detection with Transformers" (DETR: set prediction, auxiliary losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.vision.detection.boxes import cxcywh_to_xyxy, inverse_sigmoid
from attnkit.vision.detection.decoder import MLP, DetrDecoder
from attnkit.vision.detection.encoder import ConvBackbone, HybridEncoder, sincos_2d

__all__ = ["RTDETR", "Detections", "DetrOutput", "check_images", "postprocess"]

CROSS_ATTENTION = ("deformable", "dense")


@dataclass
class Detections:
    """Detections of one image, best first.

    Attributes:
        boxes: ``(N, 4)`` float32 ``(x0, y0, x1, y1)`` in the input image's pixels.
        scores: ``(N,)`` float32 confidences in ``[0, 1]``.
        labels: ``(N,)`` int64 classes.
        queries: ``(N,)`` int64 index of the decoder query (or heat-map cell) each detection came from.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    queries: Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


class DetrOutput(NamedTuple):
    """Raw predictions of :meth:`RTDETR.forward_raw`.

    Attributes:
        logits: ``(layers, B, Q, classes)`` class logits of every decoder layer (sigmoid, not softmax).
        boxes: ``(layers, B, Q, 4)`` normalised ``(cx, cy, w, h)`` (by the padded image size).
        enc_logits: ``(B, Q, classes)`` encoder predictions of the selected queries.
        enc_boxes: ``(B, Q, 4)`` their boxes.
        image_size: ``(Hp, Wp)`` padded size the boxes are normalised by.
        spatial_shapes: ``(h_l, w_l)`` of every feature level.
    """

    logits: Tensor
    boxes: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor
    image_size: tuple[int, int]
    spatial_shapes: list[tuple[int, int]]


def check_images(images, in_chans: int, owner: str) -> Tensor:
    """Validate a ``(B, in_chans, Hi, Wi)`` floating batch (a single ``(in_chans, Hi, Wi)`` image is batched)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{owner}: expected images as a torch.Tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != in_chans or not images.dtype.is_floating_point:
        raise ValueError(
            f"{owner}: expected floating images (B, {in_chans}, Hi, Wi), got {images.dtype} {tuple(images.shape)}"
        )
    if min(images.shape[-2:]) < 16:
        raise ValueError(f"{owner}: expected images of at least 16x16 pixels, got {tuple(images.shape[-2:])}")
    return images


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad right and bottom so both sides are multiples of ``multiple`` (coordinates are unchanged)."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, -w % multiple, 0, -h % multiple))


def postprocess(
    logits: Tensor, boxes: Tensor, image_size, sizes, *, max_detections: int = 30, score_threshold: float = 0.0
) -> list[Detections]:
    """Top-``max_detections`` (query, class) pairs per image by sigmoid score (RT-DETR's post-processing).

    Args:
        logits: ``(B, Q, classes)``; boxes: ``(B, Q, 4)`` normalised cxcywh; image_size: ``(Hp, Wp)``
        normalising size; sizes: ``(Hi, Wi)`` of the unpadded input (boxes are clipped to it).
    """
    b, q, c = logits.shape
    scores = logits.sigmoid().flatten(1)
    k = min(max_detections, q * c)
    top, idx = scores.topk(k, dim=1)
    hp, wp = image_size
    scale = torch.tensor([wp, hp, wp, hp], dtype=boxes.dtype, device=boxes.device)
    xyxy = cxcywh_to_xyxy(boxes) * scale
    out = []
    for i in range(b):
        queries, labels = idx[i] // c, idx[i] % c
        bx = xyxy[i, queries]
        bx[:, 0::2] = bx[:, 0::2].clamp(0, sizes[1])
        bx[:, 1::2] = bx[:, 1::2].clamp(0, sizes[0])
        keep = top[i] >= score_threshold
        out.append(Detections(bx[keep].float(), top[i][keep].float(), labels[keep], queries[keep]))
    return out


class RTDETR(nn.Module):
    """Compact RT-DETR-style detector for small grey-scale images (Zhao et al. 2024).

    Pipeline: :class:`ConvBackbone` (strides 4, 8, 16) -> :class:`HybridEncoder` (self-attention on the stride-16
    level, conv fusion) -> encoder heads on every position, whose ``num_queries`` best class scores select the
    decoder's initial queries and reference boxes (two-stage, anchors of ``4 * stride`` pixels) ->
    :class:`DetrDecoder` (``num_layers`` layers; query self-attention; deformable or dense cross-attention; box
    refinement) -> class and box heads. No NMS: one query per object is learned through Hungarian matching.

    Args:
        num_classes: object classes (sigmoid per class; no background class); default 10 (digits).
        in_chans: image channels; default 1.
        embed_dim: transformer width; default 64.
        num_heads: attention heads; default 4.
        num_queries: decoder queries; default 20.
        num_layers: decoder layers; default 3.
        num_points: deformable sampling points per head and level; default 4.
        ffn_dim: feed-forward width; default 128.
        widths: backbone stage widths (three or four, see :class:`ConvBackbone`); default ``(16, 32, 64, 128)``.
        backbone_attention: attention block in every backbone block (e.g. ``"cbam"``); default none.
        backbone_attention_kwargs: its constructor arguments.
        cross_attention: ``"deformable"`` (default) or ``"dense"``.
        max_detections: detections kept per image by :meth:`forward`; default 30.

    Shape:
        ``images``: ``(B, in_chans, Hi, Wi)`` float, any size >= 16 (padded to a multiple of 16 internally);
        digit models expect ``[0, 1]`` grey levels, dark background.

    Raises:
        ValueError: an unknown ``cross_attention``; images of the wrong shape or dtype.

    Example:
        >>> import torch
        >>> model = RTDETR(num_queries=5).eval()
        >>> result = model(torch.rand(2, 1, 64, 80))
        >>> len(result), result[0].boxes.shape[1]
        (2, 4)
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_chans: int = 1,
        embed_dim: int = 64,
        num_heads: int = 4,
        num_queries: int = 20,
        num_layers: int = 3,
        num_points: int = 4,
        ffn_dim: int = 128,
        widths=(16, 32, 64, 128),
        cross_attention: str = "deformable",
        max_detections: int = 30,
        backbone_attention: str | None = None,
        backbone_attention_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if cross_attention not in CROSS_ATTENTION:
            raise ValueError(f"RTDETR: cross_attention must be one of {CROSS_ATTENTION}, got {cross_attention!r}")
        self.num_classes, self.in_chans, self.num_queries = num_classes, in_chans, num_queries
        self.cross_attention, self.max_detections = cross_attention, max_detections
        self.backbone = ConvBackbone(
            in_chans=in_chans, widths=widths, attention=backbone_attention, attention_kwargs=backbone_attention_kwargs
        )
        self.encoder = HybridEncoder(self.backbone.channels, embed_dim=embed_dim, num_heads=num_heads, ffn_dim=ffn_dim)
        num_levels = len(self.backbone.strides)
        self.level_embed = nn.Parameter(torch.zeros(num_levels, embed_dim))
        nn.init.normal_(self.level_embed, std=0.02)
        self.enc_output = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.LayerNorm(embed_dim))
        self.enc_score_head = nn.Linear(embed_dim, num_classes)
        self.enc_bbox_head = MLP(embed_dim, embed_dim, 4, 3)
        self.decoder = DetrDecoder(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            num_classes=num_classes,
            cross_attention=cross_attention,
        )
        prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior: every class starts at p = 0.01
        for head in [self.enc_score_head, *self.decoder.class_heads]:
            nn.init.constant_(head.bias, prior)
        nn.init.zeros_(self.enc_bbox_head.layers[-1].weight)
        nn.init.zeros_(self.enc_bbox_head.layers[-1].bias)

    def _anchors(self, shapes, image_size, device, dtype) -> Tensor:
        """``(S, 4)`` anchor boxes in logit space: cell centres, sides of ``4 * stride`` pixels."""
        hp, wp = image_size
        out = []
        for (h, w), stride in zip(shapes, self.backbone.strides):
            ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            cx, cy = (xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h
            bw = torch.full_like(cx, min(4 * stride / wp, 0.9))
            bh = torch.full_like(cy, min(4 * stride / hp, 0.9))
            out.append(torch.stack([cx, cy, bw, bh], -1))
        return inverse_sigmoid(torch.cat(out).to(dtype))

    def forward_raw(self, images: Tensor) -> DetrOutput:
        """Per-layer predictions for training and analysis (see :class:`DetrOutput`)."""
        images = pad_to_multiple(check_images(images, self.in_chans, "RTDETR"), 16)
        feats = self.encoder(self.backbone(images))
        shapes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feats]
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)  # (B, S, E)
        memory_pos = None
        if self.cross_attention == "dense":
            e = memory.shape[-1]
            memory_pos = torch.cat(
                [
                    sincos_2d(h, w, e, device=memory.device, dtype=memory.dtype) + self.level_embed[lvl]
                    for lvl, (h, w) in enumerate(shapes)
                ]
            )
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        anchors = self._anchors(shapes, image_size, memory.device, memory.dtype)
        enc = self.enc_output(memory)
        enc_logits = self.enc_score_head(enc)  # (B, S, C)
        enc_boxes_logit = self.enc_bbox_head(enc) + anchors
        k = min(self.num_queries, enc.shape[1])
        idx = enc_logits.max(-1).values.topk(k, dim=1).indices  # (B, Q)
        take = lambda t: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        sel_logits, sel_boxes = take(enc_logits), take(enc_boxes_logit).sigmoid()
        target = take(enc).detach()
        logits, boxes = self.decoder(target, sel_boxes.detach(), memory, memory_pos, shapes)
        return DetrOutput(logits, boxes, sel_logits, sel_boxes, image_size, shapes)

    def forward(self, images: Tensor, *, score_threshold: float = 0.0) -> list[Detections]:
        """Detect objects: one :class:`Detections` per image (boxes in input pixels), best first.

        Args:
            images: ``(B, in_chans, Hi, Wi)`` or one ``(in_chans, Hi, Wi)`` image.
            score_threshold: drop detections scoring below it; default 0 (keep ``max_detections``).
        """
        images = check_images(images, self.in_chans, "RTDETR")
        raw = self.forward_raw(images)
        return postprocess(
            raw.logits[-1],
            raw.boxes[-1],
            raw.image_size,
            tuple(images.shape[-2:]),
            max_detections=self.max_detections,
            score_threshold=score_threshold,
        )
