"""The two small digit classifiers trained by ``scripts/train_digits.py``, and the loader of the shipped weights.

``attnkit/data/digits.json`` records, per model, the constructor arguments (``config``), the weights file
(safetensors, weights only), the training seed, split sizes, training time and held-out measurements;
:func:`load_model` rebuilds the model from that config and loads the weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from attnkit.vision.hybrid import HybridResNet
from attnkit.vision.vit import VisionTransformer

__all__ = ["DATA_DIR", "DEFAULT_CONFIGS", "METADATA_NAME", "MODEL_NAMES", "build_model", "load_metadata", "load_model"]

#: Where the shipped weights and their metadata live (package data).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
METADATA_NAME = "digits.json"
MODEL_NAMES = ("vit", "cnn")

#: Constructor arguments of the shipped models (what ``scripts/train_digits.py`` trains by default).
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    # 64x64 canvases, 8x8 patches: an 8x8 grid of 64 patch tokens + the class token.
    "vit": {
        "image_size": 64,
        "patch_size": 8,
        "in_chans": 1,
        "num_classes": 10,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 4,
        "mlp_ratio": 2.0,
    },
    # Stride-2 stem, three stages (32, 16, 8 pixels on 64x64 canvases), CBAM in every block.
    "cnn": {
        "in_chans": 1,
        "num_classes": 10,
        "widths": [24, 48, 96],
        "depths": [1, 1, 1],
        "stem_stride": 2,
        "attention": "cbam",
        "attention_kwargs": {"reduction": 4},
    },
}

_CLASSES = {"vit": VisionTransformer, "cnn": HybridResNet}


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"digits model: unknown name {name!r}; valid: {', '.join(MODEL_NAMES)}")


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised ``"vit"`` (:class:`VisionTransformer`) or ``"cnn"`` (:class:`HybridResNet`).

    Args:
        name: ``"vit"`` or ``"cnn"``.
        config: constructor keyword arguments; default :data:`DEFAULT_CONFIGS` ``[name]``.

    Raises:
        ValueError: an unknown name (or constructor errors for a bad config).
    """
    _check_name(name)
    config = copy.deepcopy(DEFAULT_CONFIGS[name] if config is None else config)
    return _CLASSES[name](**config)


def load_metadata(directory: str | Path | None = None) -> dict[str, Any]:
    """The training metadata JSON (``digits.json``) in ``directory`` (default: the shipped one).

    Raises:
        FileNotFoundError: no metadata file there (run ``scripts/train_digits.py``).
    """
    path = Path(DATA_DIR if directory is None else directory) / METADATA_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"digits model: no {METADATA_NAME} in {str(path.parent)!r}; train with scripts/train_digits.py"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_model(name: str, *, directory: str | Path | None = None) -> nn.Module:
    """Rebuild the trained ``"vit"`` or ``"cnn"`` from its recorded config and load its weights, in eval mode.

    Args:
        name: ``"vit"`` or ``"cnn"``.
        directory: where ``digits.json`` and the weights are; default the package's shipped ``attnkit/data``.

    Returns:
        the model (float32, CPU, ``eval()``); it takes ``(B, 1, 64, 64)`` canvases of
        :class:`attnkit.datasets.DigitCanvases` and returns ``(B, 10)`` logits.

    Raises:
        ValueError: an unknown name; FileNotFoundError: missing metadata or weights; RuntimeError: weights that
        do not fit the config (missing or unexpected tensors).

    Example:
        >>> model = load_model("vit")
        >>> type(model).__name__, model.training
        ('VisionTransformer', False)
    """
    _check_name(name)
    from safetensors.torch import load_file

    directory = Path(DATA_DIR if directory is None else directory)
    meta = load_metadata(directory)
    if name not in meta.get("models", {}):
        raise FileNotFoundError(f"digits model: {METADATA_NAME} in {str(directory)!r} has no {name!r} model")
    entry = meta["models"][name]
    weights = directory / entry["weights"]
    if not weights.is_file():
        raise FileNotFoundError(f"digits model: weights file {str(weights)!r} is missing")
    model = build_model(name, entry["config"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()
