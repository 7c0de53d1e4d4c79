"""Image classification data for the vision ablation: an ImageFolder-style directory, an ``.npz`` file, or the
built-in cluttered digits (:mod:`attnkit.datasets.digits`).

Every loader returns an :class:`ImageData` (float32 images in ``[0, 1]``, int64 labels, class names) and raises
:class:`DataError`, a ``ValueError`` with a one-line message that names the file and the fix, for bad input.

* Directory (torchvision's ``ImageFolder`` layout): ``root/<class>/<image>.png|.jpg|.jpeg``; classes are the
  sub-folder names in sorted order; all images must have one size. Images are read with Pillow; if every image
  has a single band (grey) the data has 1 channel, otherwise every image is converted to RGB (3 channels).
* ``.npz`` (``numpy.savez``): ``x`` ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` (channels-last is
  recognised when the last dimension is 1 or 3 and the second is not), ``uint8`` (divided by 255) or floating
  point; ``y`` ``(N,)`` labels of any type (their sorted distinct values become the classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "ImageData",
    "load_digits",
    "load_image_data",
    "load_image_folder",
    "load_npz",
    "stratified_split",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """Unusable input data; the message is one line naming the file or folder and the fix."""


@dataclass
class ImageData:
    """Images and labels.

    Attributes:
        images: ``(N, C, H, W)`` float32 in ``[0, 1]``.
        labels: ``(N,)`` int64 in ``[0, len(classes))``.
        classes: class names, index = label.
        source: where the data came from (for reports).
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    source: str

    def subset(self, idx: Tensor) -> ImageData:
        """The rows ``idx`` (same classes)."""
        return ImageData(self.images[idx], self.labels[idx], self.classes, self.source)


def _pillow():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading PNG/JPEG folders needs Pillow: pip install pillow") from err
    return Image


def load_image_folder(root: str | Path) -> ImageData:
    """Read ``root/<class>/<image>.{png,jpg,jpeg}`` (suffixes case-insensitive; other files are ignored).

    Raises:
        DataError: ``root`` is not a directory, has no class sub-folders, holds no image or a class folder holds
            none, an image cannot be read, or the images differ in size.
        ImportError: Pillow is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected <root>/<class>/<image>.png)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: empty folder: no class sub-folders (expected {root}/<class>/<image>.png)")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(class_dirs):
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{folder}: class folder holds no PNG/JPEG image; add images or remove the folder")
        files.extend((p, label) for p in found)
    image_lib = _pillow()
    pictures = []
    for path, _ in files:
        try:
            with image_lib.open(path) as im:
                im.load()
                pictures.append(im.copy())
        except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise DataError(f"{path}: cannot read the image ({type(err).__name__}: {err})") from None
    sizes = {im.size for im in pictures}
    if len(sizes) > 1:
        first = pictures[0].size
        odd = next(i for i, im in enumerate(pictures) if im.size != first)
        raise DataError(
            f"{root}: mixed image sizes: {files[0][0].relative_to(root)} is {first[0]}x{first[1]} but "
            f"{files[odd][0].relative_to(root)} is {pictures[odd].size[0]}x{pictures[odd].size[1]} (W x H); "
            f"resize them to one size"
        )
    grey = all(len(im.getbands()) == 1 and im.mode != "P" for im in pictures)
    arrays = [np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0 for im in pictures]
    images = torch.from_numpy(np.stack(arrays))
    images = images[:, None] if grey else images.permute(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageData(images.contiguous(), labels, [p.name for p in class_dirs], str(root))


def load_npz(path: str | Path) -> ImageData:
    """Read ``x`` (images) and ``y`` (labels) from a ``numpy.savez`` file.

    Raises:
        DataError: a missing or unreadable file, ``x`` or ``y`` missing, ``x`` not 3-D or 4-D, ``y`` not 1-D or
            of another length than ``x``, or fewer than two classes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:
        raise DataError(f"{path}: cannot read it as .npz ({type(err).__name__}: {err})") from None
    for key, what in (("x", "images"), ("y", "labels")):
        if key not in arrays:
            found = ", ".join(sorted(arrays)) or "nothing"
            raise DataError(
                f"{path}: {what} missing: no {key!r} array (found: {found}); "
                f"save with np.savez(path, x=images, y=labels)"
            )
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DataError(f"{path}: expected x of shape (N, H, W), (N, C, H, W) or (N, H, W, C), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: expected y of shape ({len(x)},) (one label per image), got {y.shape}")
    if x.dtype == np.uint8:
        images = torch.from_numpy(x.astype(np.float32) / 255.0)
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        images = torch.from_numpy(x.astype(np.float32))
    else:
        raise DataError(f"{path}: expected numeric x, got dtype {x.dtype}")
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{path}: expected at least two classes in y, got {len(classes)}")
    return ImageData(
        images.contiguous(), torch.from_numpy(labels.astype(np.int64)), [str(c) for c in classes], str(path)
    )


def load_image_data(spec: str | Path) -> ImageData:
    """:func:`load_npz` for a path ending in ``.npz``, else :func:`load_image_folder`."""
    path = Path(spec)
    return load_npz(path) if path.suffix.lower() == ".npz" else load_image_folder(path)


def stratified_split(labels: Tensor, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Train and test indices, ``test_fraction`` of every class in the test part (at least one, when a class has
    two or more images). Reproducible for a given ``seed``.

    Raises:
        DataError: fewer than two images overall end up in either part.
    """
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx)))) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values
    if len(train_idx) < 2 or len(test_idx) < 1:
        raise DataError(f"too few images to split: {len(labels)} (need at least two per class)")
    return train_idx, test_idx


def load_digits(
    *,
    train_canvases: int | None = None,
    test_canvases: int | None = None,
    val_canvases: int | None = None,
    splits: tuple[str, ...] = ("train", "test"),
) -> tuple[ImageData, ...]:
    """The built-in task: :class:`attnkit.datasets.DigitCanvases` splits (split by source scan, 64x64 canvases
    with distractor fragments), canvases drawn with seed 0, in the order of ``splits`` (``"train"``, ``"val"``,
    ``"test"``). Default sizes: one canvas per scan.

    Raises:
        ImportError: scikit-learn is missing.
    """
    from attnkit.datasets import DigitCanvases

    classes = [str(i) for i in range(10)]
    sizes = {"train": train_canvases, "val": val_canvases, "test": test_canvases}
    out = []
    for split in splits:
        data = DigitCanvases(split, num_canvases=sizes[split], seed=0)
        out.append(ImageData(data.images, data.labels, classes, "attnkit digits (64x64 cluttered canvases)"))
    return tuple(out)
