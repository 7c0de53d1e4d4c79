"""DigitCanvases: split by source scan, determinism, boxes around the digit's ink, distractors from other scans."""

import numpy as np
import pytest
import torch

from attnkit.datasets import SPLITS, DigitCanvases, load_scans, split_scans


@pytest.fixture(scope="module")
def canvases():
    return {split: DigitCanvases(split, num_canvases=300, seed=3) for split in SPLITS}


def test_scans_are_the_real_sklearn_digits():
    images, labels = load_scans()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert images.min() == 0 and images.max() == 1
    assert set(np.unique(images * 16).tolist()) <= set(range(17))  # 16 grey levels (+ 0)


def test_split_is_disjoint_covering_and_stratified():
    labels = load_scans()[1]
    parts = split_scans()
    ids = [set(parts[s].tolist()) for s in SPLITS]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set().union(*ids) == set(range(len(labels)))
    assert [len(parts[s]) for s in SPLITS] == [1078, 359, 360]
    for s, share in zip(SPLITS, (0.6, 0.2, 0.2)):
        counts = np.bincount(labels[parts[s]], minlength=10)
        expected = share * np.bincount(labels, minlength=10)
        assert np.all(np.abs(counts - expected) <= 1)
    assert all(np.array_equal(split_scans()[s], parts[s]) for s in SPLITS)  # deterministic
    other = split_scans(split_seed=1)
    assert not np.array_equal(other["test"], parts["test"])


def test_canvases_use_only_their_split_scans(canvases):
    for split, data in canvases.items():
        allowed = set(split_scans()[split].tolist())
        assert set(data.scan_ids.tolist()) <= allowed
        assert set(data.distractor_ids.flatten().tolist()) <= allowed
    train_ink = set(canvases["train"].scan_ids.tolist()) | set(canvases["train"].distractor_ids.flatten().tolist())
    test_ink = set(canvases["test"].scan_ids.tolist()) | set(canvases["test"].distractor_ids.flatten().tolist())
    assert not train_ink & test_ink


def test_shapes_dtypes_and_range(canvases):
    data = canvases["val"]
    n = len(data)
    assert data.images.shape == (n, 1, 64, 64) and data.images.dtype == torch.float32
    assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
    assert data.boxes.shape == (n, 4) and data.boxes.dtype == torch.int64
    assert data.ink.shape == (n, 64, 64) and data.ink.dtype == torch.bool
    assert data.distractor_ids.shape == (n, 9)
    assert data.images.min() >= 0 and data.images.max() <= 1
    image, label, box = data[5]
    assert image.shape == (1, 64, 64) and label.ndim == 0 and box.shape == (4,)
    assert torch.equal(image, data.images[5]) and torch.equal(box, data.boxes[5])


def test_labels_match_scans(canvases):
    labels = load_scans()[1]
    for data in canvases.values():
        assert np.array_equal(data.labels.numpy(), labels[data.scan_ids.numpy()])


def test_each_split_scan_is_used_evenly():
    data = DigitCanvases("test", num_canvases=720, seed=0)
    counts = np.bincount(data.scan_ids.numpy(), minlength=1797)[split_scans()["test"]]
    assert counts.min() == counts.max() == 2


def test_box_is_tight_around_the_digit_ink_and_holds_only_it(canvases):
    scans = load_scans()[0]
    for data in canvases.values():
        for i in range(len(data)):
            x0, y0, x1, y1 = data.boxes[i].tolist()
            ink = data.ink[i]
            inside = torch.zeros_like(ink)
            inside[y0:y1, x0:x1] = True
            assert ink.any() and not (ink & ~inside).any()  # all ink in the box
            assert ink[y0].any() and ink[y1 - 1].any() and ink[:, x0].any() and ink[:, x1 - 1].any()  # tight
            image = data.images[i, 0]
            assert ((image > 0) & inside).eq(ink).all()  # inside the box: only the digit's ink
            # The ink is the upscaled scan itself (nearest neighbour, scale 2).
            tile = torch.from_numpy(np.kron(scans[data.scan_ids[i]], np.ones((2, 2), np.float32)))
            assert torch.equal(image[ink], tile[tile > 0])


def test_distractors_are_other_scans_of_other_classes(canvases):
    labels = torch.as_tensor(load_scans()[1].copy())
    for data in canvases.values():
        ids = data.distractor_ids
        assert (ids >= 0).all()  # every fragment found room on 64x64 canvases
        assert not (ids == data.scan_ids[:, None]).any()
        assert not (labels[ids] == data.labels[:, None]).any()
        decoys = ids.reshape(len(data), 3, 3)
        assert all(len(set(d.tolist())) == 3 for d in decoys.reshape(-1, 3))  # different scans within a decoy
        outside = (data.images[:, 0] > 0) & ~data.ink
        assert outside.flatten(1).any(1).all()  # the clutter is there


def test_decoys_carry_as_much_ink_as_the_digit(canvases):
    """The most ink is not where the digit is: a digit-sized box filter rarely points at it."""
    from attnkit.explain.metrics import pointing_game
    from attnkit.explain.saliency import ink_maps

    data = canvases["test"]
    assert pointing_game(ink_maps(data.images), data.boxes).float().mean() < 0.3


def test_fragments_are_partial():
    """No fragment's connected extent is as large as a whole digit: each covers at most 5x5 source pixels."""
    data = DigitCanvases("train", num_canvases=50, seed=1, num_decoys=1, decoy_fragments=1)
    for i in range(len(data)):
        clutter = (data.images[i, 0] > 0) & ~data.ink[i]
        if clutter.any():
            ys, xs = clutter.nonzero(as_tuple=True)
            assert ys.max() - ys.min() < 10 and xs.max() - xs.min() < 10


def test_deterministic_for_a_seed():
    a = DigitCanvases("train", num_canvases=64, seed=(7, 1))
    b = DigitCanvases("train", num_canvases=64, seed=(7, 1))
    c = DigitCanvases("train", num_canvases=64, seed=(7, 2))
    for name in ("images", "labels", "boxes", "ink", "scan_ids", "distractor_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.images, c.images)


def test_options():
    data = DigitCanvases("val", num_canvases=10, canvas_size=48, scale=3, num_decoys=0)
    assert data.distractor_ids.shape == (10, 0)
    assert data.images.shape == (10, 1, 48, 48)
    assert torch.equal(data.images[:, 0] > 0, data.ink)
    assert ((data.boxes[:, 2:] - data.boxes[:, :2]) <= 24).all()
    assert len(DigitCanvases("test")) == 360
    assert "split='test'" in repr(DigitCanvases("test", num_canvases=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "dev"}, "split must be one of"),
        ({"num_canvases": 0}, "num_canvases"),
        ({"scale": 0}, "scale"),
        ({"num_decoys": -1}, "num_decoys"),
        ({"decoy_fragments": 1.5}, "decoy_fragments"),
        ({"canvas_size": 16}, "canvas_size"),
        ({"fractions": (0.5, 0.5)}, "three positive fractions"),
    ],
)
def test_errors(kwargs, match):
    kwargs = {"split": "train", **kwargs}
    with pytest.raises(ValueError, match=match):
        DigitCanvases(kwargs.pop("split"), **kwargs)
