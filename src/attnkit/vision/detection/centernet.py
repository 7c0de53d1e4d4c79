"""The convolutional baseline: a CenterNet-style anchor-free detector on the same backbone (Zhou et al. 2019).

Objects are peaks of a per-class heat map at stride 4; each peak regresses the box size and the sub-cell offset
of its centre. Trained with the penalty-reduced focal loss on Gaussian-splatted centres (Eq. 1; the Gaussian's
spread follows the box sides, as in TTFNet, Liu et al. 2020) and L1 on size and offset (Eq. 2-3, weights 0.1 and 1).
Decoding keeps 3x3 local maxima (the paper's max-pooling in place of NMS).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.vision.detection.encoder import ConvBackbone, HybridEncoder
from attnkit.vision.detection.model import Detections, check_images, pad_to_multiple

__all__ = ["CenterNet", "CenterNetLoss", "CenterNetOutput"]


class CenterNetOutput(NamedTuple):
    """Raw maps at stride ``stride``: ``heatmap`` logits ``(B, C, h, w)``, ``size`` ``(B, 2, h, w)`` box
    ``(w, h)`` in cells, ``offset`` ``(B, 2, h, w)`` centre offset in cells."""

    heatmap: Tensor
    size: Tensor
    offset: Tensor
    stride: int


def _head(cin: int, cout: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.ReLU(), nn.Conv2d(cin, cout, 1))
    nn.init.constant_(head[-1].bias, bias)
    return head


class CenterNet(nn.Module):
    """CenterNet-style detector: :class:`ConvBackbone` + a convolutional :class:`HybridEncoder` neck (no
    attention) + heat-map, size and offset heads on the stride-4 level.

    Args:
        num_classes: classes; default 10.
        in_chans: image channels; default 1.
        embed_dim: neck width; default 64.
        widths: backbone stage widths (three or four, see :class:`ConvBackbone`); default ``(16, 32, 64, 128)``.
        backbone_attention: attention block in every backbone block (e.g. ``"cbam"``); default none.
        backbone_attention_kwargs: its constructor arguments.
        max_detections: peaks kept per image; default 30.

    Example:
        >>> import torch
        >>> model = CenterNet().eval()
        >>> model(torch.rand(1, 1, 64, 64))[0].boxes.shape[1]
        4
    """

    def __init__(
        self,
        *,
        num_classes=10,
        in_chans=1,
        embed_dim=64,
        widths=(16, 32, 64, 128),
        max_detections=30,
        backbone_attention=None,
        backbone_attention_kwargs=None,
    ):
        super().__init__()
        self.num_classes, self.in_chans, self.max_detections = num_classes, in_chans, max_detections
        self.backbone = ConvBackbone(
            in_chans=in_chans, widths=widths, attention=backbone_attention, attention_kwargs=backbone_attention_kwargs
        )
        self.encoder = HybridEncoder(self.backbone.channels, embed_dim=embed_dim, use_attention=False)
        self.heatmap_head = _head(embed_dim, num_classes, bias=-math.log((1 - 0.01) / 0.01))
        self.size_head = _head(embed_dim, 2)
        self.offset_head = _head(embed_dim, 2)

    def forward_raw(self, images: Tensor) -> CenterNetOutput:
        images = pad_to_multiple(check_images(images, self.in_chans, "CenterNet"), 16)
        feat = self.encoder(self.backbone(images))[0]
        return CenterNetOutput(self.heatmap_head(feat), self.size_head(feat), self.offset_head(feat), 4)

    def forward(self, images: Tensor, *, score_threshold: float = 0.0) -> list[Detections]:
        """Detect objects: one :class:`Detections` per image (``queries`` are flat heat-map indices)."""
        images = check_images(images, self.in_chans, "CenterNet")
        out = self.forward_raw(images)
        heat = out.heatmap.sigmoid()
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
        b, c, h, w = heat.shape
        k = min(self.max_detections, c * h * w)
        scores, idx = peaks.flatten(1).topk(k, dim=1)
        labels, cell = idx // (h * w), idx % (h * w)
        ys, xs = (cell // w).float(), (cell % w).float()
        res = []
        for i in range(b):
            off = out.offset[i].flatten(1)[:, cell[i]]
            size = out.size[i].flatten(1)[:, cell[i]].clamp(min=0)
            cx, cy = (xs[i] + off[0]) * out.stride, (ys[i] + off[1]) * out.stride
            bw, bh = size[0] * out.stride, size[1] * out.stride
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, images.shape[-1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, images.shape[-2])
            keep = scores[i] >= score_threshold
            res.append(Detections(boxes[keep], scores[i][keep], labels[i][keep], cell[i][keep]))
        return res


class CenterNetLoss(nn.Module):
    """CenterNet's training loss (Zhou et al. 2019, Eq. 1-3): penalty-reduced focal loss on the heat map
    (``alpha=2``, ``beta=4``) + ``0.1 * L1(size)`` + ``L1(offset)`` at the object centres, per object.

    Returns (``forward``): ``{"loss", "heatmap", "size", "offset"}``.
    """

    def __init__(self, *, weight_size: float = 0.1, weight_offset: float = 1.0, gaussian_alpha: float = 0.54):
        super().__init__()
        self.weight_size, self.weight_offset, self.gaussian_alpha = weight_size, weight_offset, gaussian_alpha

    def forward(self, output: CenterNetOutput, targets) -> dict[str, Tensor]:
        b, c, h, w = output.heatmap.shape
        s = output.stride
        gt = torch.zeros(b, c, h, w)
        ys_grid = torch.arange(h, dtype=torch.float32)[:, None]
        xs_grid = torch.arange(w, dtype=torch.float32)[None, :]
        idx_b, idx_y, idx_x, sizes, offsets = [], [], [], [], []
        for i, t in enumerate(targets):
            for box, label in zip(t["boxes"].float(), t["labels"]):
                cx, cy = float(box[0] + box[2]) / 2 / s, float(box[1] + box[3]) / 2 / s
                bw, bh = float(box[2] - box[0]) / s, float(box[3] - box[1]) / s
                ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
                sx, sy = max(self.gaussian_alpha * bw / 6, 0.3), max(self.gaussian_alpha * bh / 6, 0.3)
                g = torch.exp(-((xs_grid - ix) ** 2) / (2 * sx * sx) - ((ys_grid - iy) ** 2) / (2 * sy * sy))
                gt[i, int(label)] = torch.maximum(gt[i, int(label)], g)
                idx_b.append(i)
                idx_y.append(iy)
                idx_x.append(ix)
                sizes.append([bw, bh])
                offsets.append([cx - ix, cy - iy])
        num = max(1, len(idx_b))
        logits = output.heatmap
        p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
        pos = gt.eq(1).float()
        pos_loss = -(torch.log(p) * (1 - p) ** 2 * pos).sum()
        neg_loss = -(torch.log(1 - p) * p**2 * (1 - gt) ** 4 * (1 - pos)).sum()
        heat_loss = (pos_loss + neg_loss) / num
        if idx_b:
            bi, yi, xi = torch.tensor(idx_b), torch.tensor(idx_y), torch.tensor(idx_x)
            pred_size = output.size[bi, :, yi, xi]
            pred_off = output.offset[bi, :, yi, xi]
            size_loss = F.l1_loss(pred_size, torch.tensor(sizes), reduction="sum") / num
            off_loss = F.l1_loss(pred_off, torch.tensor(offsets), reduction="sum") / num
        else:
            size_loss = off_loss = logits.new_zeros(())
        total = heat_loss + self.weight_size * size_loss + self.weight_offset * off_loss
        return {"loss": total, "heatmap": heat_loss.detach(), "size": size_loss.detach(), "offset": off_loss.detach()}
