"""DigitScenes: reproducible scenes of real digits with tight boxes, split by source scan."""

import numpy as np
import pytest
import torch

from attnkit.datasets import DigitScenes, collate_scenes, load_scans, split_scans


def test_reproducible_and_seed_dependent():
    a, b = DigitScenes("val", num_canvases=6, seed=3), DigitScenes("val", num_canvases=6, seed=3)
    c = DigitScenes("val", num_canvases=6, seed=4)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    for ta, tb in zip(a.targets, b.targets):
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def test_boxes_are_tight_labels_real_and_split_by_scan():
    data = DigitScenes("test", num_canvases=40, seed=0)
    _, labels = load_scans()
    test_ids = set(split_scans(labels)["test"].tolist())
    counts = []
    for (image, target), used in zip(data, data.scan_ids):
        n = len(target["labels"])
        counts.append(n)
        assert set(used.tolist()) <= test_ids
        assert torch.equal(target["labels"], torch.from_numpy(labels[used.numpy()]))
        for box in target["boxes"].long().tolist():
            x0, y0, x1, y1 = box
            crop = image[0, y0:y1, x0:x1]
            assert 4 <= y1 - y0 <= 28 and crop.shape[0] > 0
            # ink touches the box on all four sides (tight), digits may overlap but their boxes stay on canvas
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
    assert min(counts) >= 2 and max(counts) <= 5 and len(set(counts)) > 1
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0


def test_collate_and_bad_arguments():
    data = DigitScenes("train", num_canvases=3, canvas_size=64, digit_size=(10, 20))
    images, targets = collate_scenes([data[0], data[1]])
    assert images.shape == (2, 1, 64, 64) and len(targets) == 2
    with pytest.raises(ValueError, match="split"):
        DigitScenes("dev")
    with pytest.raises(ValueError, match="digit_size"):
        DigitScenes("train", digit_size=(20, 10))
    with pytest.raises(ValueError, match="canvas_size"):
        DigitScenes("train", canvas_size=24)
    assert np.isfinite(data.images.numpy()).all()
