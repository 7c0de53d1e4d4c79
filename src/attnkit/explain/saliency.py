"""Saliency maps of image classifiers over their input pixels, and the accuracy they are reported with.

Measured with :func:`attnkit.explain.metrics.pointing_game` and :func:`attnkit.explain.metrics.deletion`
(``attnkit demo`` and ``scripts/train_digits.py`` do it for the shipped digit models). Saliency maps are
``(B, Hi, Wi)`` over the image pixels:

* ``"rollout"`` (ViT): attention rollout (:func:`attnkit.explain.rollout`, Abnar & Zuidema 2020) of the maps
  captured with :func:`attnkit.explain.capture`; the class-token row over the patch grid, ``R[:, 0, 1:]``;
* ``"relevance"`` (ViT): gradient-weighted relevance (:func:`attnkit.explain.relevance.relevance`, Chefer et al.
  2021) for the predicted class, same row;
* ``"attnlrp"`` / ``"cp-lrp"`` (ViT): :func:`attnkit.explain.lrp` for the predicted class (AttnLRP, Achtibat et al.
  2024; CP-LRP, Ali et al. 2022; ``conserve=True``), the patch tokens' relevance on the grid;
  ``"attnlrp-pixels"`` / ``"cp-lrp-pixels"``: the same propagated through the convolutional patch stem to the
  pixels (z^B rule with each image's own range; ``lrp(..., pixels=True)``), not upsampled. On the shipped digit
  ViT the token maps score better on insertion, sufficiency and pointing, the pixel maps on comprehensiveness
  (``benchmarks/RESULTS.md``);
* ``"cbam"`` (CNN): the spatial map ``M_s`` of the first CBAM block (:data:`CBAM_BLOCK`; 32x32 on 64x64
  canvases). Chosen on validation canvases: the maps of the deeper blocks stay close to 1 almost everywhere (they
  barely gate) and their peaks do not find the digit; every block is measured by ``scripts/train_digits.py``;
* ``"random"``: uniform noise per pixel (:func:`attnkit.explain.metrics.random_saliency`, the chance baseline);
* ``"ink"``: the canvas blurred by a digit-sized (15x15) box filter, "where is the most ink" (the trivial
  baseline a saliency method has to beat: on :class:`~attnkit.datasets.DigitCanvases` decoys carry as much ink
  as the digit).

Grid maps are upsampled to the image bilinearly (``align_corners=False``); pixel maps are returned as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnkit.explain.capture import capture
from attnkit.explain.metrics import random_saliency
from attnkit.explain.rollout import rollout

__all__ = [
    "CBAM_BLOCK",
    "METHODS",
    "accuracy",
    "cbam_maps",
    "ink_maps",
    "lrp_maps",
    "predict",
    "relevance_maps",
    "rollout_maps",
    "saliency",
    "upsample",
]

METHODS = ("rollout", "relevance", "attnlrp", "cp-lrp", "attnlrp-pixels", "cp-lrp-pixels", "cbam", "random", "ink")
CBAM_BLOCK = 0


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """``(B,)`` predicted classes of ``images`` ``(B, 1, Hi, Wi)``."""
    return torch.cat([model(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 256) -> float:
    """Fraction of ``images`` classified as ``labels``."""
    return (predict(model, images, batch_size=batch_size) == labels).float().mean().item()


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(B, h, w)`` maps to ``(B, *size)``."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def _grid(model: nn.Module, images: Tensor) -> tuple[int, int, int]:
    layout = model.token_layout
    return layout["num_prefix_tokens"], *layout["grid"]


@torch.no_grad()
def rollout_maps(model: nn.Module, images: Tensor) -> Tensor:
    """``(B, Gh, Gw)`` attention rollout of the class token over the patch grid of a :class:`VisionTransformer`."""
    with capture(model) as rec:
        model(images)
    prefix, gh, gw = _grid(model, images)
    return rollout(rec.maps)[:, 0, prefix:].reshape(-1, gh, gw)


def relevance_maps(model: nn.Module, images: Tensor, target: Tensor | None = None) -> Tensor:
    """``(B, Gh, Gw)`` Chefer et al. relevance of the class token for ``target`` (default: the prediction)."""
    from attnkit.explain.relevance import relevance

    if target is None:
        target = predict(model, images)
    result = relevance(model, images, target)
    prefix, gh, gw = _grid(model, images)
    return result.get()[:, 0, prefix:].reshape(-1, gh, gw)


def lrp_maps(
    model: nn.Module, images: Tensor, target: Tensor | None = None, *, rule: str = "cp-lrp", pixels: bool = False
) -> Tensor:
    """:func:`attnkit.explain.lrp` relevance for ``target`` (default: the prediction), float32: ``(B, Gh, Gw)`` of
    the patch tokens, or with ``pixels`` ``(B, Hi, Wi)`` through the convolutional patch stem (ValueError
    without one)."""
    from attnkit.explain.lrp import lrp

    if target is None:
        target = predict(model, images)
    result = lrp(model, images, target, rule=rule, pixels=pixels)
    if pixels:
        return result.relevance.float()
    prefix, gh, gw = _grid(model, images)
    return result.relevance[:, prefix:].reshape(-1, gh, gw).float()


@torch.no_grad()
def cbam_maps(model: nn.Module, images: Tensor, *, block: int = -1) -> Tensor:
    """``(B, h, w)`` CBAM spatial map of one block of a :class:`HybridResNet` (default the last block)."""
    with capture(model) as rec:
        model(images)
    spatial = [m.weights for m in rec.maps if m.kind == "spatial"]
    if not spatial:
        raise ValueError("cbam_maps: the model has no CBAM spatial attention")
    return spatial[block][:, 0]


def ink_maps(images: Tensor, *, size: int = 15) -> Tensor:
    """``(B, Hi, Wi)`` local ink mass: ``images`` ``(B, 1, Hi, Wi)`` averaged over ``size x size`` windows."""
    return F.avg_pool2d(images, size, stride=1, padding=size // 2)[:, 0]


def saliency(
    method: str,
    model: nn.Module,
    images: Tensor,
    *,
    target: Tensor | None = None,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(B, Hi, Wi)`` saliency of ``method`` (one of :data:`METHODS`) upsampled to the image size.

    ``target`` ``(B,)``: the classes ``"relevance"``, ``"attnlrp"`` and ``"cp-lrp"`` explain (default: the
    predictions); ``generator`` seeds ``"random"``.
    """
    if method not in METHODS:
        raise ValueError(f"saliency: unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "random":
        return random_saliency(images[:, 0], generator=generator)
    if method == "ink":
        return ink_maps(images)
    size = tuple(images.shape[-2:])
    parts = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        chunk_target = None if target is None else target[i : i + batch_size]
        if method == "rollout":
            grid = rollout_maps(model, chunk)
        elif method == "relevance":
            grid = relevance_maps(model, chunk, chunk_target)
        elif method.startswith(("attnlrp", "cp-lrp")):
            rule = method.removesuffix("-pixels")
            grid = lrp_maps(model, chunk, chunk_target, rule=rule, pixels=method != rule)
        else:
            grid = cbam_maps(model, chunk, block=CBAM_BLOCK)
        parts.append(grid if tuple(grid.shape[-2:]) == size else upsample(grid, size))
    return torch.cat(parts)
