"""Object detection with attention: a compact RT-DETR-style detector, its set-prediction losses, a CenterNet-style
convolutional baseline, COCO evaluation and per-detection attention maps."""

from attnkit.vision.detection.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from attnkit.vision.detection.model import RTDETR, Detections, DetrOutput

__all__ = [
    "RTDETR",
    "Detections",
    "DetrOutput",
    "box_iou",
    "cxcywh_to_xyxy",
    "generalized_box_iou",
    "xyxy_to_cxcywh",
]
