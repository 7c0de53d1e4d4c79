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

from torch import Tensor, nn

from attnkit.vision._common import check_feature_map
from attnkit.vision.hybrid import HybridResNet
from attnkit.vision.vit import VisionTransformer

__all__ = [
    "DATA_DIR",
    "DEFAULT_CONFIGS",
    "METADATA_NAME",
    "MODEL_NAMES",
    "ConvPatchEmbed",
    "build_model",
    "load_metadata",
    "load_model",
]

#: Where the shipped weights and their metadata live (package data).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
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


class ConvPatchEmbed(nn.Module):
    """A convolutional stem in place of the linear patch embedding: ``log2(P)`` stride-2 ``4x4`` convolutions
    (padding 1, BatchNorm, ReLU; widths doubling up to ``embed_dim``) and a ``1x1`` projection to ``embed_dim``.

    Same interface as :class:`attnkit.vision.patch_embed.PatchEmbed` (``patch_size``, ``grid_size``, ``(B, C, Hi,
    Wi) -> (B, Gh·Gw, E)``, one token per ``P x P`` cell in row-major order), so it drops into
    :class:`VisionTransformer` as ``model.patch_embed``. Token ``(i, j)`` sees a ``(3P - 2)``-pixel square
    centred on its cell (22 px for ``P = 8``): even kernels with padding 1 keep every stride-2 window centred on
    its output cell, so the token grid lines up with the image and an attention map over the tokens can be
    upsampled onto the image. (The usual ``3x3`` / padding 1 stem shifts each token's receptive field ``P/2``
    pixels up and to the left of its cell, which misplaces attention maps by half a patch.)

    References:
        Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021 (convolutional stems for
        ViTs; theirs uses ``3x3`` kernels).
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"ConvPatchEmbed: expected a power-of-two patch_size >= 2, got {patch_size}")
        self.patch_size, self.in_chans = (patch_size, patch_size), in_chans
        layers, cin, width = [], in_chans, max(8, embed_dim // (patch_size // 2))
        for _ in range(patch_size.bit_length() - 1):
            layers += [nn.Conv2d(cin, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            cin, width = width, min(2 * width, embed_dim)
        layers.append(nn.Conv2d(cin, embed_dim, 1))
        self.stem = nn.Sequential(*layers)

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(Gh, Gw)`` of an ``(Hi, Wi)`` image (``Hi // P``, ``Wi // P``)."""
        return image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1]

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, Hi, Wi)`` -> ``(B, Gh·Gw, E)``; ``Hi`` and ``Wi`` must be multiples of ``P``."""
        check_feature_map(x, self.in_chans, "ConvPatchEmbed")
        if x.shape[2] % self.patch_size[0] or x.shape[3] % self.patch_size[1]:
            raise ValueError(f"ConvPatchEmbed: image {tuple(x.shape[2:])} is not a multiple of {self.patch_size}")
        return self.stem(x).flatten(2).transpose(1, 2)


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
