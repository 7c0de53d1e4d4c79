"""Set-prediction training of DETR-family detectors: Hungarian matching and the matched losses.

* :class:`HungarianMatcher` (Carion et al. 2020, Sec. 3.1): a one-to-one assignment of predictions to ground-truth
  objects minimising ``cost_class * focal class cost + cost_bbox * L1 + cost_giou * (-GIoU)`` (the focal-style class
  cost of Deformable DETR), solved by :func:`scipy.optimize.linear_sum_assignment`.
* :class:`SetCriterion`: varifocal classification loss with the matched boxes' IoU as the target score (RT-DETR,
  Zhao et al. 2024, Sec. 4.3; Zhang et al. 2021, VarifocalNet), L1 and GIoU box losses (Rezatofighi et al. 2019),
  applied to every decoder layer (auxiliary losses, DETR Sec. 3.2) and to the encoder's selected queries.

Targets are dicts with ``"boxes"`` ``(N_i, 4)`` xyxy pixels and ``"labels"`` ``(N_i,)`` int64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.vision.detection.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from attnkit.vision.detection.model import DetrOutput

__all__ = ["HungarianMatcher", "SetCriterion", "normalize_targets"]


def normalize_targets(targets, image_size: tuple[int, int]) -> list[dict[str, Tensor]]:
    """Pixel xyxy targets -> ``{"boxes": normalised cxcywh, "labels"}`` by the (padded) ``(Hp, Wp)``."""
    hp, wp = image_size
    out = []
    for t in targets:
        boxes = t["boxes"].float()
        scale = torch.tensor([wp, hp, wp, hp], dtype=boxes.dtype, device=boxes.device)
        out.append({"boxes": xyxy_to_cxcywh(boxes / scale), "labels": t["labels"].long()})
    return out


class HungarianMatcher(nn.Module):
    """Optimal one-to-one matching of predictions to targets (per image).

    Args:
        cost_class: weight of the focal class cost; default 2.
        cost_bbox: weight of the L1 distance of normalised cxcywh boxes; default 5.
        cost_giou: weight of ``-GIoU``; default 2.
        alpha, gamma: focal parameters of the class cost (0.25, 2).
    """

    def __init__(self, *, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, targets) -> list[tuple[Tensor, Tensor]]:
        """``logits (B, Q, C)``, ``boxes (B, Q, 4)`` normalised cxcywh, normalised targets -> per image
        ``(prediction indices, target indices)`` int64 of equal length ``min(Q, N_i)``."""
        from scipy.optimize import linear_sum_assignment

        prob = logits.sigmoid()
        out = []
        for i, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            p = prob[i][:, t["labels"]]  # (Q, N)
            neg = (1 - self.alpha) * p**self.gamma * -(1 - p + 1e-8).log()
            pos = self.alpha * (1 - p) ** self.gamma * -(p + 1e-8).log()
            c_cls = pos - neg
            c_l1 = torch.cdist(boxes[i], t["boxes"], p=1)
            c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes[i]), cxcywh_to_xyxy(t["boxes"]))
            cost = self.cost_class * c_cls + self.cost_bbox * c_l1 + self.cost_giou * c_giou
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out


class SetCriterion(nn.Module):
    """Matched losses of every decoder layer and of the encoder's selected queries.

    Args:
        num_classes: classes of the sigmoid classifier.
        matcher: a :class:`HungarianMatcher` (default weights when ``None``).
        weight_vfl, weight_bbox, weight_giou: loss weights; default 1, 5, 2 (RT-DETR).
        alpha, gamma: varifocal parameters; default 0.75, 2 (RT-DETR).

    Returns (``forward``):
        dict with ``"loss"`` (the weighted sum, a scalar to back-propagate) and the unweighted parts of the last
        decoder layer ``"vfl"``, ``"l1"``, ``"giou"`` (detached floats).
    """

    def __init__(
        self, num_classes: int, *, matcher=None, weight_vfl=1.0, weight_bbox=5.0, weight_giou=2.0, alpha=0.75, gamma=2.0
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = (weight_vfl, weight_bbox, weight_giou)
        self.alpha, self.gamma = alpha, gamma

    def _losses(self, logits: Tensor, boxes: Tensor, targets, num_boxes: float) -> tuple[Tensor, Tensor, Tensor]:
        matches = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)])
        src_idx = torch.cat([src for src, _ in matches])
        pred = boxes[batch_idx, src_idx]  # (M, 4)
        gt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, matches)])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches)])
        l1 = F.l1_loss(pred, gt, reduction="sum") / num_boxes
        pred_xyxy, gt_xyxy = cxcywh_to_xyxy(pred), cxcywh_to_xyxy(gt)
        giou = (1 - torch.diag(generalized_box_iou(pred_xyxy, gt_xyxy))).sum() / num_boxes
        iou = torch.diag(box_iou(pred_xyxy.detach(), gt_xyxy)[0]) if len(gt) else pred.new_zeros(0)
        target_score = torch.zeros_like(logits)
        target_score[batch_idx, src_idx, labels] = iou.to(logits.dtype)
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, labels] = 1.0
        p = logits.sigmoid().detach()
        weight = self.alpha * p.pow(self.gamma) * (1 - onehot) + target_score
        vfl = F.binary_cross_entropy_with_logits(logits, target_score, weight=weight, reduction="none")
        vfl = vfl.mean(1).sum() * logits.shape[1] / num_boxes
        return vfl, l1, giou

    def forward(self, output: DetrOutput, targets) -> dict[str, Tensor]:
        targets = normalize_targets(targets, output.image_size)
        num_boxes = max(1.0, float(sum(len(t["labels"]) for t in targets)))
        total = output.logits.new_zeros(())
        stages = [(output.logits[i], output.boxes[i]) for i in range(output.logits.shape[0])]
        stages.append((output.enc_logits, output.enc_boxes))
        parts = None
        for k, (logits, boxes) in enumerate(stages):
            vfl, l1, giou = self._losses(logits, boxes, targets, num_boxes)
            total = total + self.weights[0] * vfl + self.weights[1] * l1 + self.weights[2] * giou
            if k == len(stages) - 2:  # the last decoder layer
                parts = (vfl, l1, giou)
        last = parts
        return {"loss": total, "vfl": last[0].detach(), "l1": last[1].detach(), "giou": last[2].detach()}
