"""Cluttered handwritten digits: real scans from scikit-learn's ``load_digits`` placed on larger canvases.

``load_digits`` holds 1,797 real 8x8 scans of handwritten digits (UCI "Optical Recognition of Handwritten
Digits", 16 grey levels 0..16), shipped inside scikit-learn, so nothing is downloaded. Each canvas shows one
scan, upscaled ``scale`` times (nearest neighbour: 8x8 -> 16x16 by default), at a uniformly random position on
an empty ``canvas_size x canvas_size`` canvas (64x64 by default), among ``num_decoys`` decoys: clumps of
``decoy_fragments`` fragments of *other* scans of *other* classes, each fragment a partial crop of at most
``5 x 5`` of the 8x8 source pixels (under 40% of a scan, so a fragment never shows a whole digit), scaled the same
way and placed at random inside a digit-sized window. A decoy carries about as much ink as a digit, so "where is
the most ink" does not find the digit (a box filter of the canvas points at it on about 15% of canvases, chance
about 5%); its shape does. Decoys never touch the digit's box. The task is to name the whole digit; its bounding
box is known, for localisation metrics (pointing game).

Splits are by **source scan**: :func:`split_scans` assigns every scan to exactly one of ``"train"``, ``"val"``
or ``"test"`` (stratified by class, from ``split_seed``), and a canvas of a split uses only that split's scans —
for the digit and for the distractors — so test canvases never show ink of a training scan.

Conventions:
    * images are float32 in ``[0, 1]`` (grey level / 16; background 0), ``(1, S, S)`` per canvas;
    * boxes are ``(x0, y0, x1, y1)`` int64 pixel coordinates, half-open like Python slices: the digit's ink is
      ``image[0, y0:y1, x0:x1]`` and the box is tight (ink touches all four sides);
    * the canvas composite is the pixel-wise maximum of the digit and the fragments (fragments never enter the
      box, so every non-zero pixel inside the box belongs to the digit).

Reproducible: the same arguments give bit-identical canvases (numpy's PCG64 seeded with ``seed`` and the split).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["SPLITS", "DigitCanvases", "load_scans", "split_scans"]

SPLITS = ("train", "val", "test")
_SPLIT_CODES = {name: i for i, name in enumerate(SPLITS)}
_FRAGMENT_SIDES = (3, 4, 5)  # source pixels per side of a fragment (out of 8)
_MIN_FRAGMENT_INK = 4  # source pixels >= 4/16 a fragment must hold
_BOX_MARGIN = 2  # pixels kept free of fragments around the digit's box
_MAX_TRIES = 200


@functools.lru_cache(maxsize=1)
def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scans of scikit-learn's ``load_digits``: ``(images (1797, 8, 8) float32 in [0, 1], labels int64)``.

    Arrays are read-only (cached and shared).

    Raises:
        ImportError: scikit-learn is missing (``pip install attnkit[demo]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("attnkit.datasets.digits needs scikit-learn: pip install 'attnkit[demo]'") from err
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def split_scans(
    labels: np.ndarray | None = None,
    *,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    split_seed: int = 0,
) -> dict[str, np.ndarray]:
    """Assign every scan to one split: ``{"train": idx, "val": idx, "test": idx}`` (sorted int64 indices).

    Stratified: within each class the scans are shuffled with ``split_seed`` and cut by ``fractions`` (rounded;
    the test split takes the rest), so each split has about the same class balance. The three index sets are
    disjoint and cover all scans.

    Args:
        labels: ``(N,)`` class of each scan; default the labels of :func:`load_scans`.
        fractions: ``(train, val, test)`` shares, each > 0, summing to 1; default ``(0.6, 0.2, 0.2)``.
        split_seed: seed of the shuffle; default 0.

    Raises:
        ValueError: fractions that are not three positive numbers summing to 1.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split_scans: expected three positive fractions summing to 1, got {fractions}")
    if labels is None:
        labels = load_scans()[1]
    labels = np.asarray(labels)
    rng = np.random.default_rng(split_seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = round(fractions[0] * len(idx))
        n_val = round(fractions[1] * len(idx))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}


def _upscale(scan: np.ndarray, scale: int) -> np.ndarray:
    return np.kron(scan, np.ones((scale, scale), dtype=scan.dtype))


def _ink_box(tile: np.ndarray) -> tuple[int, int, int, int]:
    """Tight ``(x0, y0, x1, y1)`` half-open box of the non-zero pixels of ``tile``."""
    ys, xs = np.nonzero(tile)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


class DigitCanvases(Dataset):
    """Canvases of one split, generated at construction (``num_canvases`` of them, reproducibly).

    The digits are the split's scans in random order, cycled (each scan is used ``num_canvases / len(split)``
    times, rounded up or down). Item ``i`` is ``(image (1, S, S) float32, label int64 scalar, box (4,) int64)``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_canvases: canvases to generate; default one per scan of the split.
        seed: seed (an int or a sequence of ints, e.g. ``(seed, epoch)``) of positions, fragments and order;
            default 0. The split itself depends only on ``split_seed``.
        canvas_size: ``S``; default 64.
        scale: integer upscaling of the 8x8 scans (nearest neighbour); default 2 (16x16 digits).
        num_decoys: clumps of fragments per canvas; default 3.
        decoy_fragments: fragments per decoy (each from a different scan); default 3.
        fractions: split shares, see :func:`split_scans`.
        split_seed: see :func:`split_scans`; default 0.

    Attributes:
        images: ``(N, 1, S, S)`` float32 in ``[0, 1]``.
        labels: ``(N,)`` int64 class of the digit.
        boxes: ``(N, 4)`` int64 ``(x0, y0, x1, y1)``, half-open, tight around the digit's ink.
        ink: ``(N, S, S)`` bool, the digit's own ink (non-zero pixels of the upscaled scan).
        scan_ids: ``(N,)`` int64 index of the digit's scan in :func:`load_scans`.
        distractor_ids: ``(N, num_decoys * decoy_fragments)`` int64 scans the fragments were cut from (decoy
            by decoy); -1 for a fragment that found no room (only on canvases too small for the decoys).
        split_ids: the split's scan indices (``split_scans(...)[split]``).

    Raises:
        ValueError: an unknown split, sizes below 1 (decoy counts below 0), a canvas smaller than a digit.

    Example:
        >>> data = DigitCanvases("test", num_canvases=8, seed=1)
        >>> image, label, box = data[0]
        >>> image.shape, image.dtype, box.tolist() == data.boxes[0].tolist()
        (torch.Size([1, 64, 64]), torch.float32, True)
    """

    def __init__(
        self,
        split: str,
        *,
        num_canvases: int | None = None,
        seed: int | Sequence[int] = 0,
        canvas_size: int = 64,
        scale: int = 2,
        num_decoys: int = 3,
        decoy_fragments: int = 3,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        split_seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"DigitCanvases: split must be one of {SPLITS}, got {split!r}")
        for name, value, minimum in (
            ("canvas_size", canvas_size, 1),
            ("scale", scale, 1),
            ("num_decoys", num_decoys, 0),
            ("decoy_fragments", decoy_fragments, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"DigitCanvases: expected {name} to be an int >= {minimum}, got {value!r}")
        if 8 * scale + 2 * _BOX_MARGIN > canvas_size:
            raise ValueError(
                f"DigitCanvases: a {8 * scale}x{8 * scale} digit (scale={scale}) needs canvas_size >= "
                f"{8 * scale + 2 * _BOX_MARGIN}, got {canvas_size}"
            )
        scans, scan_labels = load_scans()
        self.split_ids = split_scans(scan_labels, fractions=fractions, split_seed=split_seed)[split]
        if num_canvases is None:
            num_canvases = len(self.split_ids)
        if isinstance(num_canvases, bool) or not isinstance(num_canvases, int) or num_canvases < 1:
            raise ValueError(f"DigitCanvases: expected num_canvases to be an int >= 1, got {num_canvases!r}")
        self.split, self.canvas_size, self.scale = split, canvas_size, scale
        self.num_decoys, self.decoy_fragments = num_decoys, decoy_fragments
        seed_seq = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        rng = np.random.default_rng([*seed_seq, _SPLIT_CODES[split]])

        reps = -(-num_canvases // len(self.split_ids))
        order = np.concatenate([rng.permutation(self.split_ids) for _ in range(reps)])[:num_canvases]
        size = canvas_size
        images = np.zeros((num_canvases, 1, size, size), np.float32)
        ink = np.zeros((num_canvases, size, size), bool)
        boxes = np.zeros((num_canvases, 4), np.int64)
        distractors = np.full((num_canvases, num_decoys * decoy_fragments), -1, np.int64)
        split_labels = scan_labels[self.split_ids]
        for n, sid in enumerate(order):
            tile = _upscale(scans[sid], scale)
            t = tile.shape[0]
            oy, ox = rng.integers(0, size - t + 1, size=2)
            bx0, by0, bx1, by1 = _ink_box(tile)
            box = (ox + bx0, oy + by0, ox + bx1, oy + by1)
            boxes[n] = box
            canvas = images[n, 0]
            others = self.split_ids[split_labels != scan_labels[sid]]
            for d in range(num_decoys):
                window = self._window(t, box, rng)
                if window is None:
                    continue
                picked = rng.choice(others, size=decoy_fragments, replace=False)
                distractors[n, d * decoy_fragments : (d + 1) * decoy_fragments] = picked
                for did in picked:
                    self._paste_fragment(canvas, scans[did], window, t, rng)
            # The digit last: decoys never enter its box (+ margin), so the box holds only the digit's ink.
            canvas[oy : oy + t, ox : ox + t] = np.maximum(canvas[oy : oy + t, ox : ox + t], tile)
            ink[n, oy : oy + t, ox : ox + t] = tile > 0

        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(scan_labels[order].copy())
        self.boxes = torch.from_numpy(boxes)
        self.ink = torch.from_numpy(ink)
        self.scan_ids = torch.from_numpy(order.astype(np.int64))
        self.distractor_ids = torch.from_numpy(distractors)

    def _window(self, t: int, box: tuple[int, int, int, int], rng: np.random.Generator) -> tuple[int, int] | None:
        """Top-left ``(y, x)`` of a random ``t x t`` decoy window disjoint from ``box`` + margin (None: no room)."""
        x0, y0, x1, y1 = box[0] - _BOX_MARGIN, box[1] - _BOX_MARGIN, box[2] + _BOX_MARGIN, box[3] + _BOX_MARGIN
        for _ in range(_MAX_TRIES):
            wy, wx = (int(v) for v in rng.integers(0, self.canvas_size - t + 1, size=2))
            if wx + t <= x0 or wx >= x1 or wy + t <= y0 or wy >= y1:
                return wy, wx
        return None

    def _paste_fragment(
        self, canvas: np.ndarray, scan: np.ndarray, window: tuple[int, int], t: int, rng: np.random.Generator
    ) -> None:
        """Max-composite one upscaled partial crop of ``scan`` at a random place inside the ``t x t`` window."""
        for _ in range(_MAX_TRIES):
            h, w = rng.choice(_FRAGMENT_SIDES, size=2)
            cy, cx = rng.integers(0, 8 - h + 1), rng.integers(0, 8 - w + 1)
            crop = scan[cy : cy + h, cx : cx + w]
            if (crop >= 0.25).sum() >= _MIN_FRAGMENT_INK:
                break
        piece = _upscale(crop, self.scale)
        ph, pw = piece.shape
        py = window[0] + int(rng.integers(0, t - ph + 1))
        px = window[1] + int(rng.integers(0, t - pw + 1))
        canvas[py : py + ph, px : px + pw] = np.maximum(canvas[py : py + ph, px : px + pw], piece)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.images[i], self.labels[i], self.boxes[i]

    def __repr__(self) -> str:
        return (
            f"DigitCanvases(split={self.split!r}, num_canvases={len(self)}, canvas_size={self.canvas_size}, "
            f"scale={self.scale}, num_decoys={self.num_decoys}, decoy_fragments={self.decoy_fragments}, "
            f"scans={len(self.split_ids)})"
        )
