"""Scenes of several real handwritten digits for object detection, built from scikit-learn's ``load_digits``.

Each canvas shows ``2..5`` real 8x8 scans (UCI "Optical Recognition of Handwritten Digits", shipped with
scikit-learn, nothing downloaded), each resized bilinearly to its own height in ``digit_size`` pixels (width
jittered by up to +-15%), at random positions where digits may overlap (intersection over union up to
``max_overlap``, and no digit hides more than ``max_covered`` of another's box), among clutter: partial crops
(at most 5x5 of the 8x8 source pixels, under 40% of a scan) of other scans, resized like digits and placed
outside every digit's box. Every digit's label and tight box are known.

Splits are by **source scan** (:func:`attnkit.datasets.split_scans`): a canvas of a split uses only that split's
scans, for digits and clutter, so test canvases never show ink of a training scan.

Conventions:
    * images are float32 in ``[0, 1]`` (grey level / 16; background 0, dark background with light digits),
      ``(1, S, S)`` per canvas; the composite is the pixel-wise maximum of all pieces;
    * boxes are float32 ``(x0, y0, x1, y1)`` pixel coordinates of the tight box around the digit's ink
      (resampled pixels ``>= ink_threshold``; pixel ``(y, x)`` covers ``[x, x + 1) x [y, y + 1)``);
    * labels are the digit classes ``0..9``.

Reproducible: the same arguments give bit-identical scenes (numpy's PCG64 seeded with ``seed`` and the split).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from attnkit.datasets.digits import _SPLIT_CODES, SPLITS, load_scans, split_scans

__all__ = ["DigitScenes", "collate_scenes"]

_MAX_TRIES = 100


def _resize(scan: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    """Bilinear resize of an 8x8 scan (values below ``threshold`` set to 0, so the ink box is tight)."""
    t = torch.from_numpy(np.array(scan, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    return np.where(out >= threshold, out, 0.0).astype(np.float32)


def _box_iou(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """IoU of two xyxy boxes and the share of the smaller box they have in common."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


class DigitScenes(Dataset):
    """Detection scenes of one split, generated at construction (``num_canvases`` of them, reproducibly).

    Item ``i`` is ``(image (1, S, S) float32, {"boxes": (N_i, 4) float32 xyxy pixels, "labels": (N_i,) int64})``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_canvases: scenes to generate; default 512.
        seed: an int or a sequence of ints (e.g. ``(seed, epoch)``); default 0.
        canvas_size: ``S`` in pixels; default 96.
        num_digits: ``(min, max)`` digits per scene, inclusive; default ``(2, 5)``.
        digit_size: ``(min, max)`` digit height in pixels, inclusive; default ``(12, 28)``.
        max_overlap: largest IoU between two digits' boxes; default 0.2.
        max_covered: largest share of the smaller of two boxes covered by the other; default 0.35.
        num_fragments: ``(min, max)`` clutter fragments per scene; default ``(2, 6)``.
        ink_threshold: resampled grey levels below it are background; default 0.1.
        fractions: split shares, see :func:`attnkit.datasets.split_scans`.
        split_seed: see :func:`attnkit.datasets.split_scans`; default 0.

    Attributes:
        images: ``(N, 1, S, S)`` float32 in ``[0, 1]``.
        targets: list of ``{"boxes", "labels"}`` dicts, one per scene.
        scan_ids: list of ``(N_i,)`` int64 source scans of each scene's digits.

    Raises:
        ValueError: an unknown split; sizes or ranges out of order or below their minimum; digits that cannot fit.

    Example:
        >>> data = DigitScenes("test", num_canvases=4, seed=1)
        >>> image, target = data[0]
        >>> image.shape, 2 <= len(target["labels"]) <= 5, target["boxes"].shape[1]
        (torch.Size([1, 96, 96]), True, 4)
    """

    def __init__(
        self,
        split: str,
        *,
        num_canvases: int = 512,
        seed: int | Sequence[int] = 0,
        canvas_size: int = 96,
        num_digits: tuple[int, int] = (2, 5),
        digit_size: tuple[int, int] = (12, 28),
        max_overlap: float = 0.2,
        max_covered: float = 0.35,
        num_fragments: tuple[int, int] = (2, 6),
        ink_threshold: float = 0.1,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        split_seed: int = 0,
    ) -> None:
        owner = "DigitScenes"
        if split not in SPLITS:
            raise ValueError(f"{owner}: split must be one of {SPLITS}, got {split!r}")
        for name, value, minimum in (("num_canvases", num_canvases, 1), ("canvas_size", canvas_size, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{owner}: expected {name} to be an int >= {minimum}, got {value!r}")
        for name, pair, minimum in (
            ("num_digits", num_digits, 1),
            ("digit_size", digit_size, 4),
            ("num_fragments", num_fragments, 0),
        ):
            if len(pair) != 2 or int(pair[0]) < minimum or int(pair[1]) < int(pair[0]):
                raise ValueError(f"{owner}: expected {name} as (min, max) with {minimum} <= min <= max, got {pair!r}")
        if int(digit_size[1] * 1.15) + 1 > canvas_size:
            raise ValueError(f"{owner}: digits up to {digit_size[1]} px need canvas_size > {digit_size[1] * 1.15:.0f}")
        self.split, self.canvas_size = split, canvas_size
        self.num_digits, self.digit_size = tuple(num_digits), tuple(digit_size)
        self.max_overlap, self.max_covered, self.ink_threshold = float(max_overlap), float(max_covered), ink_threshold
        scans, scan_labels = load_scans()
        ids = split_scans(scan_labels, fractions=fractions, split_seed=split_seed)[split]
        seed_seq = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        rng = np.random.default_rng([*seed_seq, _SPLIT_CODES[split]])
        images = np.zeros((num_canvases, 1, canvas_size, canvas_size), np.float32)
        self.targets: list[dict[str, Tensor]] = []
        self.scan_ids: list[Tensor] = []
        for n in range(num_canvases):
            boxes, labels, used = self._scene(
                images[n, 0], scans, scan_labels, ids, int(num_fragments[0]), int(num_fragments[1]), rng
            )
            self.targets.append(
                {
                    "boxes": torch.tensor(np.array(boxes), dtype=torch.float32).view(-1, 4),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                }
            )
            self.scan_ids.append(torch.tensor(used, dtype=torch.int64))
        self.images = torch.from_numpy(images)

    def _piece_size(self, rng: np.random.Generator) -> tuple[int, int]:
        h = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
        w = max(4, round(h * float(rng.uniform(0.85, 1.15))))
        return h, w

    def _scene(self, canvas, scans, scan_labels, ids, fmin, fmax, rng):
        size = self.canvas_size
        want = int(rng.integers(self.num_digits[0], self.num_digits[1] + 1))
        boxes: list[np.ndarray] = []
        labels: list[int] = []
        used: list[int] = []
        for _ in range(want):
            sid = int(rng.choice(ids))
            h, w = self._piece_size(rng)
            tile = _resize(scans[sid], h, w, self.ink_threshold)
            ys, xs = np.nonzero(tile)
            if len(ys) == 0:
                continue
            for _ in range(_MAX_TRIES):
                oy, ox = (int(v) for v in rng.integers(0, [size - h + 1, size - w + 1]))
                box = np.array([ox + xs.min(), oy + ys.min(), ox + xs.max() + 1, oy + ys.max() + 1], np.float32)
                stats = [_box_iou(box, b) for b in boxes]
                if all(iou <= self.max_overlap and cov <= self.max_covered for iou, cov in stats):
                    region = canvas[oy : oy + h, ox : ox + w]
                    np.maximum(region, tile, out=region)
                    boxes.append(box)
                    labels.append(int(scan_labels[sid]))
                    used.append(sid)
                    break
        for _ in range(int(rng.integers(fmin, fmax + 1))):
            self._fragment(canvas, scans, ids, boxes, rng)
        return boxes, labels, used

    def _fragment(self, canvas, scans, ids, boxes, rng) -> None:
        """Max-composite one resized partial crop of a random scan somewhere outside every digit box."""
        size = self.canvas_size
        for _ in range(_MAX_TRIES):
            fh, fw = (int(v) for v in rng.integers(3, 6, size=2))
            cy, cx = int(rng.integers(0, 9 - fh)), int(rng.integers(0, 9 - fw))
            crop = scans[int(rng.choice(ids))][cy : cy + fh, cx : cx + fw]
            if (crop >= 0.25).sum() >= 4:
                break
        h, w = self._piece_size(rng)
        ph, pw = max(2, round(h * fh / 8)), max(2, round(w * fw / 8))
        piece = _resize(crop, ph, pw, self.ink_threshold)
        for _ in range(_MAX_TRIES):
            py, px = (int(v) for v in rng.integers(0, [size - ph + 1, size - pw + 1]))
            if all(px + pw <= b[0] - 1 or px >= b[2] + 1 or py + ph <= b[1] - 1 or py >= b[3] + 1 for b in boxes):
                region = canvas[py : py + ph, px : px + pw]
                np.maximum(region, piece, out=region)
                return

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[i], self.targets[i]


def collate_scenes(batch: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """``DataLoader`` collate: stacked images ``(B, 1, S, S)`` and the list of target dicts."""
    return torch.stack([img for img, _ in batch]), [t for _, t in batch]
