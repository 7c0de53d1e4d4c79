"""Per-detection maps: point splatting and dense maps against direct computations, box pointing game, and capture
of Hugging Face DETR / Deformable DETR / RT-DETR decoder cross-attention (tiny random configs, offline)."""

import pytest
import torch

from attnkit.explain import capture
from attnkit.explain.detection_maps import (
    box_masks,
    box_pointing_game,
    deformable_point_map,
    dense_query_map,
    detection_maps,
    query_maps,
)
from attnkit.vision.detection import RTDETR
from hf_detectors import hf_detectors


def test_point_map_puts_each_weight_at_its_pixel():
    # one query, 2 heads, 1 level, 2 points at pixel centres (x=3, y=5) and (x=10, y=1) of a 12 x 16 image
    loc = torch.tensor([[[[[3.5 / 16, 5.5 / 12], [10.5 / 16, 1.5 / 12]]], [[[3.5 / 16, 5.5 / 12], [0.5, 0.5]]]]])
    w = torch.tensor([[[[0.75, 0.25]], [[1.0, 0.0]]]])
    m = deformable_point_map(loc, w, (12, 16), sigma=0)
    assert m.shape == (1, 12, 16)
    assert m[0, 5, 3] == pytest.approx(0.875) and m[0, 1, 10] == pytest.approx(0.125)
    assert m.sum() == pytest.approx(1.0)
    # between pixel centres the weight is shared bilinearly; outside the image it is dropped
    half = deformable_point_map(
        torch.tensor([[[[[4.0 / 16, 5.5 / 12], [2.0, 2.0]]]]]), torch.tensor([[[[0.5, 0.5]]]]), (12, 16), sigma=0
    )
    assert half[0, 5, 3] == pytest.approx(0.25) and half[0, 5, 4] == pytest.approx(0.25) and half.sum() == 0.5
    assert deformable_point_map(loc[:0], w[:0], (12, 16)).shape == (0, 12, 16)  # no detections, no maps
    blurred = deformable_point_map(loc, w, (12, 16), sigma=1.0)
    assert blurred.argmax() == m.argmax() and blurred.sum() == pytest.approx(1.0, abs=0.05)


def test_dense_map_is_a_density_over_levels():
    shapes = [(4, 4), (2, 2)]
    w = torch.zeros(1, 20)
    w[0, 5] = 0.6  # level 0 cell (1, 1): pixels 4..7 of a 16 x 16 image
    w[0, 16 + 3] = 0.4  # level 1 cell (1, 1): pixels 8..15
    m = dense_query_map(w, shapes, (16, 16))
    assert m.sum() == pytest.approx(1.0)
    assert m[0, 5, 5] == pytest.approx(0.6 / 16 + 0.0) and m[0, 12, 12] == pytest.approx(0.4 / 64)
    with pytest.raises(ValueError, match="cover 20"):
        dense_query_map(torch.zeros(1, 21), shapes, (16, 16))


def test_box_masks_and_pointing_game():
    boxes = torch.tensor([[2.0, 3.0, 6.0, 5.0], [10.2, 10.2, 10.4, 10.4]])
    masks = box_masks(boxes, (16, 16))
    assert masks[0].sum() == 8 and masks[0, 3:5, 2:6].all() and masks[1].sum() == 1  # tiny box: its centre pixel
    maps = torch.zeros(2, 16, 16)
    maps[0, 4, 4] = 1
    maps[1, 0, 0] = 1
    assert box_pointing_game(maps, boxes).tolist() == [True, False]


def test_detection_maps_on_attnkit_rtdetr():
    torch.manual_seed(0)
    model = RTDETR(num_queries=5, num_layers=2, embed_dim=32, ffn_dim=32, widths=(8, 16, 16)).eval()
    (res,) = detection_maps(model, torch.rand(1, 1, 40, 56), score_threshold=0.0)
    n = len(res.detections)
    assert n == model.max_detections and res.maps.shape == (n, 40, 56) and res.hits.shape == (n,)
    assert (res.maps.sum((1, 2)) <= 1.0 + 1e-4).all()
    with capture(model) as rec:
        raw = model.forward_raw(torch.rand(1, 1, 48, 48))
    kinds = {r.name: r.kind for r in rec.maps}
    assert kinds["decoder.layers.1.cross_attn"] == "deformable"
    assert kinds["encoder.aifi.self_attn"] == "self" and raw.logits.shape[0] == 2


@pytest.mark.parametrize("arch", ["detr", "deformable_detr", "rt_detr"])
def test_hf_detectors_cross_attention_is_captured_and_mapped(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = hf_detectors(transformers)[arch].eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(pixel_values=x).logits
        with capture(model) as rec:
            out = model(pixel_values=x)
    torch.testing.assert_close(out.logits, plain)  # capture leaves the outputs alone
    kind = "cross" if arch == "detr" else "deformable"
    cross = [r for r in rec.maps if r.kind == kind and "decoder" in r.name]
    assert len(cross) == 2, [(r.name, r.kind) for r in rec.maps]
    last = cross[-1]
    rows = torch.tensor([0, 3])
    if arch == "detr":  # one stride-32 level: a 2 x 2 grid for a 64 x 64 input
        assert last.weights.shape == (1, 2, 5, 4)
        maps = query_maps(last, rows, (64, 64), spatial_shapes=[(2, 2)])
        torch.testing.assert_close(maps.sum((1, 2)), torch.ones(2))
    else:
        assert last.weights.shape == (1, 2, 5, 3, 2)
        assert last.layout.extra["sampling_locations"].shape == (1, 2, 5, 3, 2, 2)
        assert last.layout.extra["spatial_shapes"] == [(8, 8), (4, 4), (2, 2)]  # strides 8, 16, 32
        torch.testing.assert_close(last.weights.sum((-2, -1)), torch.ones(1, 2, 5))
        maps = query_maps(last, rows, (64, 64), sigma=0)
        assert maps.shape == (2, 64, 64) and (maps.sum((1, 2)) <= 1 + 1e-5).all() and maps.sum() > 0
