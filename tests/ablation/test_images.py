"""Image loaders of the vision ablation: ImageFolder directories and .npz files, and their one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnkit.ablation.images import (
    DataError,
    load_image_data,
    load_image_folder,
    load_npz,
    stratified_split,
)


def _save(path, array, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode=mode).save(path)


def _folder(tmp_path, *, rgb=False, size=(12, 10)):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        for i in range(3):
            shape = (size[1], size[0], 3) if rgb else (size[1], size[0])
            _save(root / cls / f"{i}.png", rng.integers(0, 256, shape), "RGB" if rgb else "L")
    return root


def test_folder_grey_png(tmp_path):
    root = _folder(tmp_path)
    data = load_image_folder(root)
    assert data.images.shape == (6, 1, 10, 12)  # (N, C, H, W) from W x H = 12 x 10 images
    assert data.images.dtype == torch.float32 and data.images.min() >= 0 and data.images.max() <= 1
    assert data.classes == ["cat", "dog"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    expected = np.asarray(Image.open(root / "dog" / "1.png"), dtype=np.float32) / 255
    torch.testing.assert_close(data.images[4, 0], torch.from_numpy(expected))


def test_folder_rgb_and_jpeg_mixed_with_grey(tmp_path):
    root = _folder(tmp_path, rgb=True)
    _save(root / "cat" / "grey.JPEG", np.full((10, 12), 200), "L")  # upper-case suffix, single band
    (root / "dog" / "notes.txt").write_text("ignored")
    data = load_image_folder(root)
    assert data.images.shape == (7, 3, 10, 12)  # any colour image makes the whole set RGB
    grey = data.images[data.labels == 0][-1]  # sorted: 0.png 1.png 2.png grey.JPEG
    torch.testing.assert_close(grey[0], grey[1])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root.mkdir(), "empty folder: no class sub-folders"),
        (lambda root: (root / "a").mkdir(parents=True), "class folder holds no PNG/JPEG image"),
        (lambda root: None, "not a directory"),
    ],
)
def test_folder_errors(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=message) as info:
        load_image_folder(root)
    assert "\n" not in str(info.value)


def test_folder_mixed_sizes(tmp_path):
    root = _folder(tmp_path)
    _save(root / "dog" / "big.png", np.zeros((20, 16)))
    with pytest.raises(DataError, match=r"mixed image sizes: .* is 12x10 but dog/big.png is 16x20") as info:
        load_image_folder(root)
    assert "\n" not in str(info.value)


def test_folder_unreadable_image(tmp_path):
    root = _folder(tmp_path)
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken.png: cannot read the image"):
        load_image_folder(root)


@pytest.mark.parametrize(
    ("x", "shape"),
    [
        (np.zeros((4, 6, 5), np.uint8), (4, 1, 6, 5)),
        (np.zeros((4, 3, 6, 5), np.float32), (4, 3, 6, 5)),
        (np.zeros((4, 6, 5, 3), np.float32), (4, 3, 6, 5)),  # channels-last recognised
    ],
)
def test_npz_layouts(tmp_path, x, shape):
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.array(["b", "a", "b", "a"]))
    data = load_npz(path)
    assert data.images.shape == shape and data.images.dtype == torch.float32
    assert data.classes == ["a", "b"] and data.labels.tolist() == [1, 0, 1, 0]


def test_npz_uint8_scaled(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((2, 3, 3), 255, np.uint8), y=np.array([3, 7]))
    data = load_image_data(path)
    assert float(data.images.max()) == 1.0 and data.classes == ["3", "7"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 4, 4))}, r"labels missing: no 'y' array \(found: x\)"),
        ({"images": np.zeros((3, 4, 4)), "y": np.arange(3)}, r"images missing: no 'x' array"),
        ({"x": np.zeros((3, 4, 4)), "y": np.arange(2)}, r"expected y of shape \(3,\)"),
        ({"x": np.zeros((3, 4)), "y": np.arange(3)}, r"expected x of shape"),
        ({"x": np.zeros((3, 4, 4)), "y": np.zeros(3)}, r"at least two classes"),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_npz(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_npz_missing_or_corrupt_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_image_data(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read it as \.npz"):
        load_npz(tmp_path / "bad.npz")


def test_stratified_split_disjoint_and_reproducible():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    train, test = stratified_split(labels, test_fraction=0.2, seed=3)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(17))
    assert [int((labels[test] == c).sum()) for c in range(3)] == [2, 1, 1]
    again = stratified_split(labels, test_fraction=0.2, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    with pytest.raises(DataError, match="too few images"):
        stratified_split(torch.tensor([0, 1]))


def test_builtin_digits():
    from attnkit.ablation.images import load_digits

    train, test = load_digits(train_canvases=20, test_canvases=10)
    assert train.images.shape == (20, 1, 64, 64) and test.images.shape == (10, 1, 64, 64)
    assert train.classes == [str(i) for i in range(10)] and train.labels.dtype == torch.int64
    assert train.source == test.source == "attnkit digits (64x64 cluttered canvases)"
