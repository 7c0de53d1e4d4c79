"""Pictures of attention, batched: image overlays, token heatmaps, layer x head grids, alignment matrices and
attention-distance plots. Every function returns a ``matplotlib.figure.Figure`` (no pyplot global state);
:func:`save_figure` writes one atomically. Needs matplotlib: ``pip install attnkit[explain]``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

from attnkit.explain.records import TokenLayout
from attnkit.io.atomic import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "alignment_plot",
    "distance_plot",
    "figure_png",
    "head_grid",
    "image_overlays",
    "save_figure",
    "token_heatmaps",
    "token_saliency_grid",
]


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("attnkit.explain.plots needs matplotlib: pip install attnkit[explain]") from e
    return Figure(figsize=(width, height), layout="constrained")


def _grid(n: int, ncols: int) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def token_saliency_grid(saliency: Tensor, layout: TokenLayout) -> Tensor:
    """``(B, L)`` token scores -> ``(B, Gh, Gw)`` patch-grid scores (prefix tokens dropped).

    Raises:
        ValueError: the layout has no grid or does not account for ``L`` tokens.
    """
    if layout.grid is None:
        raise ValueError("token_saliency_grid: the layout has no patch grid")
    layout.check_tokens(saliency.shape[-1], who="token_saliency_grid")
    return saliency[:, layout.num_prefix_tokens :].reshape(saliency.shape[0], *layout.grid)


def _as_hwc(images: Tensor) -> Tensor:
    if images.ndim != 4:
        raise ValueError(f"image_overlays: expected images (B, C, Hi, Wi) or (B, Hi, Wi, C), got {tuple(images.shape)}")
    if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.permute(0, 2, 3, 1)
    images = images.detach().float().cpu()
    lo = images.amin(dim=(1, 2, 3), keepdim=True)
    hi = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - lo) / (hi - lo).clamp_min(1e-12)


def image_overlays(
    images: Tensor,
    saliency: Tensor,
    *,
    layout: TokenLayout | None = None,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Figure:
    """Saliency heatmaps over images, one panel per batch item.

    Args:
        images: ``(B, C, Hi, Wi)`` or ``(B, Hi, Wi, C)`` (C = 1 or 3), any range (min-max scaled per image).
        saliency: ``(B, Gh, Gw)`` grid scores (upsampled bilinearly to the image), ``(B, Hi, Wi)``, or ``(B, L)``
            token scores with a ``layout`` giving the grid (prefix tokens dropped).
        layout: the token layout, for ``(B, L)`` saliency.
        titles: one caption per image.
        ncols: panels per row.
        alpha: heatmap opacity.
        cmap: matplotlib colormap name.

    Returns:
        the figure.

    Raises:
        ValueError: batch sizes differ, bad shapes, or ``(B, L)`` saliency without a grid layout.
    """
    if saliency.ndim == 2:
        if layout is None:
            raise ValueError("image_overlays: (B, L) token saliency needs layout=TokenLayout(grid=...)")
        saliency = token_saliency_grid(saliency, layout)
    if saliency.ndim != 3 or saliency.shape[0] != images.shape[0]:
        raise ValueError(
            f"image_overlays: expected saliency (B, Gh, Gw) with B = {images.shape[0]}, got {tuple(saliency.shape)}"
        )
    img = _as_hwc(images)
    b, hi, wi = img.shape[:3]
    sal = F.interpolate(saliency.detach().float().cpu()[:, None], size=(hi, wi), mode="bilinear", align_corners=False)
    sal = sal[:, 0]
    sal = (sal - sal.amin(dim=(1, 2), keepdim=True)) / (
        sal.amax(dim=(1, 2), keepdim=True) - sal.amin(dim=(1, 2), keepdim=True)
    ).clamp_min(1e-12)
    rows, cols = _grid(b, ncols)
    fig = _figure(3 * cols, 3 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= b:
            continue
        ax.imshow(img[i].squeeze(-1).numpy(), cmap="gray" if img.shape[-1] == 1 else None)
        ax.imshow(sal[i].numpy(), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
    return fig


def token_heatmaps(
    tokens: Sequence[Sequence[str]],
    scores: Tensor,
    *,
    per_line: int = 12,
    cmap: str = "Reds",
    titles: Sequence[str] | None = None,
) -> Figure:
    """Tokens drawn as text on cells coloured by their scores, one block per batch item.

    Args:
        tokens: ``B`` lists of token strings.
        scores: ``(B, L)`` with ``L >= len(tokens[b])`` (extra scores, e.g. padding, are ignored); each item is
            min-max scaled for colour.
        per_line: tokens per line.
        cmap: matplotlib colormap name.
        titles: one caption per item.

    Raises:
        ValueError: batch sizes differ, or an item has more tokens than scores.
    """
    if scores.ndim != 2 or len(tokens) != scores.shape[0]:
        raise ValueError(f"token_heatmaps: expected scores (B, L) with B = {len(tokens)}, got {tuple(scores.shape)}")
    import matplotlib

    colormap = matplotlib.colormaps[cmap]
    lines = [math.ceil(max(len(t), 1) / per_line) for t in tokens]
    fig = _figure(1.1 * per_line, 0.45 * sum(lines) + 0.5 * len(tokens) + 0.2)
    ax = fig.add_subplot()
    ax.axis("off")
    total = sum(lines) + len(tokens)
    ax.set_xlim(0, per_line)
    ax.set_ylim(total, 0)
    y = 0
    for b, toks in enumerate(tokens):
        if len(toks) > scores.shape[1]:
            raise ValueError(f"token_heatmaps: item {b} has {len(toks)} tokens but {scores.shape[1]} scores")
        s = scores[b, : len(toks)].detach().float().cpu()
        s = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12) if len(toks) else s
        ax.text(0, y + 0.7, titles[b] if titles is not None else f"item {b}", fontsize=9, weight="bold")
        y += 1
        for i, tok in enumerate(toks):
            r, c = divmod(i, per_line)
            ax.add_patch(matplotlib.patches.Rectangle((c + 0.03, y + r + 0.05), 0.94, 0.9, color=colormap(float(s[i]))))
            ax.text(
                c + 0.5,
                y + r + 0.55,
                str(tok)[:14],
                ha="center",
                va="center",
                fontsize=8,
                color="white" if float(s[i]) > 0.6 else "black",
            )
        y += lines[b]
    return fig


def head_grid(maps: Tensor, *, layer_names: Sequence[str] | None = None, cmap: str = "viridis") -> Figure:
    """A layers x heads grid of attention maps for one example.

    Args:
        maps: ``(layers, H, Lq, Lk)`` (e.g. ``rec.stack()[:, b]``).
        layer_names: row labels; default ``"layer i"``.
        cmap: matplotlib colormap name.

    Raises:
        ValueError: ``maps`` is not 4-D.
    """
    if maps.ndim != 4:
        raise ValueError(f"head_grid: expected maps (layers, H, Lq, Lk) for one example, got {tuple(maps.shape)}")
    layers, heads = maps.shape[:2]
    fig = _figure(1.4 * heads + 0.8, 1.4 * layers + 0.4)
    axes = fig.subplots(layers, heads, squeeze=False)
    data = maps.detach().float().cpu()
    for li in range(layers):
        for h in range(heads):
            ax = axes[li, h]
            ax.imshow(data[li, h].numpy(), cmap=cmap, vmin=0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(layer_names[li] if layer_names is not None else f"layer {li}", fontsize=8)
    return fig


def alignment_plot(
    weights: Tensor,
    *,
    query_tokens: Sequence[Sequence[str]] | None = None,
    key_tokens: Sequence[Sequence[str]] | None = None,
    ncols: int = 2,
    cmap: str = "Blues",
) -> Figure:
    """Source x target alignment matrices (e.g. cross-attention averaged over heads), one panel per item.

    Args:
        weights: ``(B, Lq, Lk)``.
        query_tokens: ``B`` lists of ``Lq`` row labels (targets), optional.
        key_tokens: ``B`` lists of ``Lk`` column labels (sources), optional.
        ncols: panels per row.
        cmap: matplotlib colormap name.

    Raises:
        ValueError: ``weights`` is not 3-D or labels do not match its sizes.
    """
    if weights.ndim != 3:
        raise ValueError(f"alignment_plot: expected weights (B, Lq, Lk), got {tuple(weights.shape)}")
    b, lq, lk = weights.shape
    for name, labels, n in (("query_tokens", query_tokens, lq), ("key_tokens", key_tokens, lk)):
        if labels is not None and (len(labels) != b or any(len(t) != n for t in labels)):
            raise ValueError(f"alignment_plot: {name} must be {b} lists of {n} labels")
    rows, cols = _grid(b, ncols)
    fig = _figure(max(3.0, 0.35 * lk + 1.5) * cols, max(3.0, 0.35 * lq + 1.2) * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    data = weights.detach().float().cpu()
    for i, ax in enumerate(axes.flat):
        if i >= b:
            ax.axis("off")
            continue
        ax.imshow(data[i].numpy(), cmap=cmap, vmin=0, aspect="auto", interpolation="nearest")
        if key_tokens is not None:
            ax.set_xticks(range(lk), [str(t) for t in key_tokens[i]], rotation=90, fontsize=7)
        if query_tokens is not None:
            ax.set_yticks(range(lq), [str(t) for t in query_tokens[i]], fontsize=7)
        ax.set_xlabel("source (keys)", fontsize=8)
        ax.set_ylabel("target (queries)", fontsize=8)
    return fig


def distance_plot(distance: Tensor, *, unit: str = "tokens") -> Figure:
    """Mean attention distance per head against layer (as in the ViT paper's Figure 7).

    Args:
        distance: ``(layers, H)`` or ``(layers, B, H)`` (averaged over the batch) from
            :func:`attnkit.explain.heads.attention_distance`.
        unit: axis label.

    Raises:
        ValueError: ``distance`` is not 2-D or 3-D.
    """
    if distance.ndim == 3:
        distance = distance.mean(1)
    if distance.ndim != 2:
        raise ValueError(f"distance_plot: expected (layers, H) or (layers, B, H), got {tuple(distance.shape)}")
    layers, heads = distance.shape
    fig = _figure(5, 3.5)
    ax = fig.add_subplot()
    d = distance.detach().float().cpu()
    for h in range(heads):
        ax.scatter(range(layers), d[:, h].numpy(), s=12, label=f"head {h}" if heads <= 16 else None)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean attention distance ({unit})")
    if heads <= 16:
        ax.legend(fontsize=6, ncols=2)
    return fig


def _plain_text(fig: Figure) -> None:
    """Turn off mathtext on every text of ``fig``: labels (tokens, file names, titles) are plain text, so ``$5
    and $6`` prints as written and a lone ``$`` cannot break rendering."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_parse_math(False)


def _render(fig: Figure, buf: io.BytesIO, fmt: str, dpi: int) -> None:
    """The one place attnkit renders figures: texts plain (also tick labels made while drawing), no TeX."""
    import matplotlib

    _plain_text(fig)
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig.savefig(buf, format=fmt, dpi=dpi)


def figure_png(fig: Figure, *, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (every label rendered as plain text, see :func:`save_figure`)."""
    buf = io.BytesIO()
    _render(fig, buf, "png", dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, *, overwrite: bool = False, dpi: int = 100) -> Path:
    """Save ``fig`` (format from the suffix: png, svg, pdf) atomically.

    Every text is rendered as written: matplotlib's mathtext (``$...$``) is turned off, because attnkit's labels
    are tokens, file names and user text in which ``$`` is a character.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: an unsupported suffix.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"save_figure: unsupported file type {path.suffix!r}; use .png, .svg or .pdf")
    buf = io.BytesIO()
    _render(fig, buf, fmt, dpi)
    return atomic_write(path, buf.getvalue(), overwrite=overwrite, who="save_figure")
