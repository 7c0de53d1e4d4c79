"""Detector building blocks: boxes and GIoU against transformers, Hungarian matching against brute force, the
losses, COCO scoring, and the two detectors' outputs and input checks."""

import itertools

import pytest
import torch

from attnkit.vision.detection import RTDETR, box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from attnkit.vision.detection.centernet import CenterNet, CenterNetLoss
from attnkit.vision.detection.evaluate import coco_map
from attnkit.vision.detection.losses import HungarianMatcher, SetCriterion
from attnkit.vision.detection.model import Detections


def _rand_boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 50
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 30 + 1
    return torch.cat([xy, xy + wh], -1)


def test_box_ops_match_transformers():
    hf = pytest.importorskip("transformers.loss.loss_for_object_detection")
    a, b = _rand_boxes(7, 0), _rand_boxes(5, 1)
    torch.testing.assert_close(generalized_box_iou(a, b), hf.generalized_box_iou(a, b))
    torch.testing.assert_close(box_iou(a, b)[0], hf.box_iou(a, b)[0])
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(a)), a)
    with pytest.raises(ValueError, match="x1 >= x0"):
        generalized_box_iou(a.flip(-1), b)


def test_matcher_finds_the_minimum_cost_assignment():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 4, generator=g)
    boxes = xyxy_to_cxcywh(_rand_boxes(5, 2).float() / 100)
    target = {"boxes": xyxy_to_cxcywh(_rand_boxes(3, 3).float() / 100), "labels": torch.tensor([0, 3, 1])}
    m = HungarianMatcher()
    ((rows, cols),) = m(logits, boxes[None], [target])

    def cost(q, t):
        p = logits[0, q].sigmoid()[target["labels"][t]]
        c_cls = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
        l1 = (boxes[q] - target["boxes"][t]).abs().sum()
        giou = generalized_box_iou(cxcywh_to_xyxy(boxes[q : q + 1]), cxcywh_to_xyxy(target["boxes"][t : t + 1]))
        return float(2 * c_cls + 5 * l1 - 2 * giou[0, 0])

    best = min(itertools.permutations(range(5), 3), key=lambda qs: sum(cost(q, t) for t, q in enumerate(qs)))
    got = dict(zip(cols.tolist(), rows.tolist()))
    assert tuple(got[t] for t in range(3)) == best


def test_coco_map_perfect_shifted_and_missing():
    boxes = torch.tensor([[10.0, 10, 30, 34], [40, 5, 60, 25]])
    target = [{"boxes": boxes, "labels": torch.tensor([3, 7])}]
    perfect = Detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([3, 7]), torch.arange(2))
    assert coco_map([perfect], target)["map"] == pytest.approx(1.0)
    shifted = Detections(boxes + 4, torch.tensor([0.9, 0.8]), torch.tensor([3, 7]), torch.arange(2))
    s = coco_map([shifted], target)
    assert 0 < s["map"] < s["map_50"] <= 1.0
    wrong = Detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 2]), torch.arange(2))
    assert coco_map([wrong], target)["map"] == 0.0
    with pytest.raises(ValueError, match="targets"):
        coco_map([perfect, perfect], target)


def _targets():
    return [
        {"boxes": torch.tensor([[4.0, 6, 20, 26], [30, 30, 50, 56]]), "labels": torch.tensor([1, 4])},
        {"boxes": torch.tensor([[10.0, 12, 40, 40]]), "labels": torch.tensor([9])},
    ]


@pytest.mark.parametrize("cross_attention", ["deformable", "dense"])
def test_rtdetr_outputs_and_a_training_step(cross_attention):
    torch.manual_seed(0)
    model = RTDETR(
        num_queries=6, num_layers=2, embed_dim=32, ffn_dim=32, widths=(8, 16, 16, 32), cross_attention=cross_attention
    )
    images = torch.rand(2, 1, 64, 70)  # padded to 64 x 80 inside
    raw = model.forward_raw(images)
    assert raw.logits.shape == (2, 2, 6, 10) and raw.boxes.shape == (2, 2, 6, 4)
    assert raw.image_size == (64, 80) and raw.spatial_shapes == [(16, 20), (8, 10), (4, 5)]
    losses = SetCriterion(10)(raw, _targets())
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.enc_score_head.weight.grad.abs().sum() > 0
    model.eval()
    dets = model(images, score_threshold=0.0)
    assert len(dets) == 2 and len(dets[0]) == model.max_detections
    assert (dets[0].boxes[:, 2] <= 70).all() and (dets[0].boxes >= 0).all()
    assert (dets[0].scores[:-1] >= dets[0].scores[1:]).all()


def test_centernet_outputs_and_loss():
    torch.manual_seed(0)
    model = CenterNet(widths=(8, 16, 16, 32), embed_dim=16)
    raw = model.forward_raw(torch.rand(2, 1, 64, 64))
    assert raw.heatmap.shape == (2, 10, 16, 16) and raw.stride == 4
    losses = CenterNetLoss()(raw, _targets())
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    dets = model.eval()(torch.rand(1, 1, 64, 64))
    assert dets[0].boxes.shape == (30, 4)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(2, 3, 64, 64), r"\(B, 1, Hi, Wi\)"),
        (torch.zeros(1, 1, 64, 64, dtype=torch.long), "floating"),
        (torch.rand(1, 1, 8, 64), "at least 16x16"),
    ],
)
def test_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        RTDETR(num_queries=4)(images)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        RTDETR()([1, 2])
    with pytest.raises(ValueError, match="cross_attention"):
        RTDETR(cross_attention="sparse")
