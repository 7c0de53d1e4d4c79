"""COCO-style evaluation of detections with ``pycocotools`` (the reference implementation of COCO's metrics)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch

from attnkit.vision.detection.model import Detections

__all__ = ["coco_map"]


def coco_map(detections: Sequence[Detections], targets: Sequence[dict], *, num_classes: int = 10) -> dict[str, float]:
    """COCO mAP@[.5:.95], mAP@.5 and mAP@.75 of ``detections`` against ``targets`` (one per image).

    Args:
        detections: per image, boxes ``(N, 4)`` xyxy pixels, scores and labels.
        targets: per image, ``{"boxes": (M, 4) xyxy pixels, "labels": (M,)}``.
        num_classes: classes ``0..num_classes-1`` (COCO category ids are these + 1).

    Returns:
        ``{"map": ..., "map_50": ..., "map_75": ..., "num_images": ..., "num_objects": ...}`` (floats in
        ``[0, 1]``; -1 where pycocotools has nothing to average).

    Raises:
        ImportError: pycocotools is missing (``pip install 'attnkit[explain]'``).
        ValueError: ``detections`` and ``targets`` of different lengths.

    References:
        Lin et al. 2014, "Microsoft COCO: Common Objects in Context"; ``pycocotools.cocoeval.COCOeval``.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("coco_map needs pycocotools: pip install 'attnkit[explain]'") from err
    if len(detections) != len(targets):
        raise ValueError(f"coco_map: got {len(detections)} detections for {len(targets)} targets")

    def xywh(b):
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    images, annotations, results = [], [], []
    for i, (det, tgt) in enumerate(zip(detections, targets)):
        images.append({"id": i + 1})
        for box, label in zip(tgt["boxes"].tolist(), tgt["labels"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": xywh(box),
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
            results.append({"image_id": i + 1, "category_id": int(label) + 1, "bbox": xywh(box), "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
        }
        gt.createIndex()
        if not results:
            return {
                "map": 0.0,
                "map_50": 0.0,
                "map_75": 0.0,
                "num_images": len(images),
                "num_objects": len(annotations),
            }
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = torch.as_tensor(ev.stats).tolist()
    return {
        "map": stats[0],
        "map_50": stats[1],
        "map_75": stats[2],
        "num_images": len(images),
        "num_objects": len(annotations),
    }
