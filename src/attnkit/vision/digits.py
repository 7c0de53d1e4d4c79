"""The two small digit classifiers trained by ``scripts/train_digits.py``, and the loader of the shipped weights.

``attnkit/data/digits.json`` records, per model, the constructor arguments (``config``), the weights file
(safetensors, weights only), the training seed, split sizes, training time and held-out measurements;
:func:`load_model` rebuilds the model from that config and loads the weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.data import DATA_DIR
from attnkit.io.checkpoint import CheckpointError, file_in, layer_count, load_from_header, read_header, read_json
from attnkit.vision.conv_patch_embed import ConvPatchEmbed
from attnkit.vision.hybrid import HybridResNet
from attnkit.vision.vit import VisionTransformer

__all__ = [
    "DATA_DIR",
    "DEFAULT_CONFIGS",
    "METADATA_NAME",
    "MODEL_NAMES",
    "build_model",
    "load_metadata",
    "load_model",
]

METADATA_NAME = "digits.json"
MODEL_NAMES = ("vit", "cnn")

#: Constructor arguments of the shipped models (what ``scripts/train_digits.py`` trains by default).
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    # 64x64 canvases, 8x8 patches: an 8x8 grid of 64 patch tokens + the class token; convolutional stem.
    "vit": {
        "image_size": 64,
        "patch_size": 8,
        "in_chans": 1,
        "num_classes": 10,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 4,
        "mlp_ratio": 2.0,
        "patch_embed": "conv",
    },
    # Stride-2 stem, three stages (32, 16, 8 pixels on 64x64 canvases), CBAM in every block.
    "cnn": {
        "in_chans": 1,
        "num_classes": 10,
        "widths": [16, 32, 64],
        "depths": [1, 1, 1],
        "stem_stride": 2,
        "attention": "cbam",
        "attention_kwargs": {"reduction": 4},
    },
}

_CLASSES = {"vit": VisionTransformer, "cnn": HybridResNet}
_PATCH_EMBEDS = ("linear", "conv")


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"digits model: unknown name {name!r}; valid: {', '.join(MODEL_NAMES)}")


def build_model(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A freshly initialised ``"vit"`` (:class:`VisionTransformer`) or ``"cnn"`` (:class:`HybridResNet`).

    Args:
        name: ``"vit"`` or ``"cnn"``.
        config: constructor keyword arguments; default :data:`DEFAULT_CONFIGS` ``[name]``. For the ViT, the
            extra key ``"patch_embed"``: ``"linear"`` (the ViT's own patch embedding, the default) or ``"conv"``
            (:class:`ConvPatchEmbed`).

    Raises:
        ValueError: an unknown name or ``patch_embed`` (or constructor errors for a bad config).
    """
    _check_name(name)
    config = copy.deepcopy(DEFAULT_CONFIGS[name] if config is None else config)
    patch_embed = config.pop("patch_embed", "linear") if name == "vit" else "linear"
    if patch_embed not in _PATCH_EMBEDS:
        raise ValueError(f"digits model: unknown patch_embed {patch_embed!r}; valid: {', '.join(_PATCH_EMBEDS)}")
    model = _CLASSES[name](**config)
    if patch_embed == "conv":
        model.patch_embed = ConvPatchEmbed(
            patch_size=config["patch_size"], in_chans=config["in_chans"], embed_dim=config["embed_dim"]
        )
    return model


def load_metadata(directory: str | Path | None = None) -> dict[str, Any]:
    """The training metadata JSON (``digits.json``) in ``directory`` (default: the shipped one).

    Raises:
        FileNotFoundError: no metadata file there (run ``scripts/train_digits.py``).
        CheckpointError: not a regular file, or not a small JSON object.
    """
    path = Path(DATA_DIR if directory is None else directory) / METADATA_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"digits model: no {METADATA_NAME} in {str(path.parent)!r}; train with scripts/train_digits.py"
        )
    return read_json(path, what="digits model")


def _check_depth(name: str, config: dict[str, Any], header: dict, source: str) -> None:
    """The number of blocks the config asks for must be the number in the weights (checked before building)."""
    if name == "vit":
        want, have = config.get("depth"), layer_count(header, "blocks.")
    else:
        depths = config.get("depths")
        want = sum(depths) if isinstance(depths, list) and all(type(d) is int for d in depths) else depths
        have = len({tuple(n.split(".")[1:3]) for n in header if n.startswith("stages.")})
    if want != have:
        raise CheckpointError(f"{source}: the config asks for {want!r:.40} blocks, the weights hold {have}")


def load_model(name: str, *, directory: str | Path | None = None, nonfinite: str = "warn") -> nn.Module:
    """Rebuild the trained ``"vit"`` or ``"cnn"`` from its recorded config and load its weights, in eval mode.

    The recorded config is checked against the safetensors header and the model built on the ``meta`` device
    before anything is allocated; the weights file must be a regular file inside ``directory``.

    Args:
        name: ``"vit"`` or ``"cnn"``.
        directory: where ``digits.json`` and the weights are; default the package's shipped ``attnkit/data``.
        nonfinite: weights holding NaN or inf: ``"warn"`` (default), ``"error"`` or ``"ignore"``.

    Returns:
        the model (float32, CPU, ``eval()``); it takes ``(B, 1, 64, 64)`` canvases of
        :class:`attnkit.datasets.DigitCanvases` and returns ``(B, 10)`` logits.

    Raises:
        ValueError: an unknown name; FileNotFoundError: missing metadata or weights; CheckpointError (a
        ``ValueError``): malformed metadata, a bad config, or weights that do not fit it (all listed).

    Example:
        >>> model = load_model("vit")
        >>> type(model).__name__, model.training
        ('VisionTransformer', False)
    """
    _check_name(name)
    directory = Path(DATA_DIR if directory is None else directory)
    meta = load_metadata(directory)
    source = f"digits model {name!r} in {str(directory)!r}"
    models = meta.get("models")
    if not isinstance(models, dict) or name not in models:
        raise FileNotFoundError(f"digits model: {METADATA_NAME} in {str(directory)!r} has no {name!r} model")
    entry = models[name]
    config = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: {METADATA_NAME} needs a 'config' object for the model")
    weights = file_in(directory, entry.get("weights"), f"{source}: weights file")
    header = read_header(directory, [weights])
    _check_depth(name, config, header, source)
    try:
        with torch.device("meta"):
            model = build_model(name, config)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{source}: {METADATA_NAME} describes an invalid model: {err}") from None
    load_from_header(
        model, directory, header, lambda n: n, nonfinite=nonfinite, source=f"{source}, weights", files=[weights]
    )
    return model.eval()
