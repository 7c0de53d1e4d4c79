"""The digit detectors trained by ``scripts/train_detector.py`` and the loader of the shipped weights.

``attnkit/data/digit_detectors.json`` records, per detector, its constructor arguments (``config``), weights file
(safetensors, weights only), training time and held-out scores; :func:`load_detector` rebuilds the model from
that config and loads the weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from attnkit.data import DATA_DIR
from attnkit.vision.detection.centernet import CenterNet
from attnkit.vision.detection.model import RTDETR

__all__ = [
    "DATA_DIR",
    "DEFAULT_CONFIGS",
    "DETECTOR_NAMES",
    "METADATA_NAME",
    "build_detector",
    "load_detector",
    "load_detector_metadata",
]

METADATA_NAME = "digit_detectors.json"
_CLASSES: dict[str, type[nn.Module]] = {"rtdetr": RTDETR, "centernet": CenterNet}
DETECTOR_NAMES = tuple(_CLASSES)

#: Constructor arguments of the shipped detectors (what ``scripts/train_detector.py`` trains by default).
_BACKBONE: dict[str, Any] = {
    "widths": [16, 32, 64],
    "backbone_attention": "cbam",
    "backbone_attention_kwargs": {"reduction": 4},
}
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "rtdetr": {
        "num_classes": 10,
        "in_chans": 1,
        "embed_dim": 64,
        "num_heads": 4,
        "num_queries": 20,
        "num_layers": 3,
        "num_points": 4,
        "ffn_dim": 128,
        "cross_attention": "deformable",
        **_BACKBONE,
    },
    "centernet": {"num_classes": 10, "in_chans": 1, "embed_dim": 64, **_BACKBONE},
}


def _check_name(name: str) -> None:
    if name not in _CLASSES:
        raise ValueError(f"digit detector: unknown name {name!r}; valid: {', '.join(DETECTOR_NAMES)}")


def build_detector(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A fresh (untrained) ``"rtdetr"`` or ``"centernet"`` with ``config`` (default :data:`DEFAULT_CONFIGS`)."""
    _check_name(name)
    cfg = copy.deepcopy(DEFAULT_CONFIGS[name] if config is None else config)
    if "widths" in cfg:
        cfg["widths"] = tuple(cfg["widths"])
    return _CLASSES[name](**cfg)


def load_detector_metadata(directory: str | Path | None = None) -> dict[str, Any]:
    """The parsed ``digit_detectors.json`` of ``directory`` (default: the shipped one).

    Raises:
        FileNotFoundError: no metadata in ``directory``.
    """
    path = Path(DATA_DIR if directory is None else directory) / METADATA_NAME
    if not path.is_file():
        raise FileNotFoundError(f"digit detector: {str(path)!r} is missing (train with scripts/train_detector.py)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_detector(name: str = "rtdetr", *, directory: str | Path | None = None) -> nn.Module:
    """Rebuild a trained digit detector from its recorded config and load its weights, in eval mode.

    The detectors take ``(B, 1, Hi, Wi)`` float canvases in ``[0, 1]`` (dark background, light digits, like
    ``load_digits``; digits about 12-28 pixels tall) of any size from 64 to 256 pixels and return one
    :class:`attnkit.vision.detection.Detections` per image.

    Args:
        name: ``"rtdetr"`` (the transformer detector) or ``"centernet"`` (the convolutional baseline).
        directory: where ``digit_detectors.json`` and the weights are; default the package's ``attnkit/data``.

    Raises:
        ValueError: an unknown name; FileNotFoundError: missing metadata or weights; RuntimeError: weights that
        do not fit the config.

    Example:
        >>> model = load_detector()
        >>> type(model).__name__, model.training
        ('RTDETR', False)
    """
    _check_name(name)
    from safetensors.torch import load_file

    directory = Path(DATA_DIR if directory is None else directory)
    meta = load_detector_metadata(directory)
    entry = meta.get("models", {}).get(name)
    if entry is None:
        raise FileNotFoundError(f"digit detector: {METADATA_NAME} in {str(directory)!r} has no {name!r} model")
    weights = directory / entry["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"digit detector: weights file {str(weights)!r} is missing")
    model = build_detector(name, entry["config"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()
