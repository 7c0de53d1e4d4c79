"""Pictures of detections: boxes over the image, and one panel per detection with what its query looked at.

Returns ``matplotlib.figure.Figure`` objects (no pyplot state), like :mod:`attnkit.explain.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from attnkit.explain.plots import _figure, _grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["detection_figure"]

_COLOURS = ("#e41a1c", "#4daf4a", "#377eb8", "#ff7f00", "#984ea3", "#ffff33", "#a65628", "#f781bf")


def _box(ax, box, colour, text=None) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
    if text:
        ax.text(x0 - 0.5, y0 - 1.5, text, color=colour, fontsize=8, va="bottom")


def detection_figure(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    *,
    maps: Tensor | None = None,
    hits: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    max_panels: int = 8,
    ncols: int = 5,
    cmap: str = "jet",
    alpha: float = 0.9,
) -> Figure:
    """The image with every box, then (with ``maps``) one panel per detection: its map over the image and its box.

    Args:
        image: ``(C, Hi, Wi)`` or ``(Hi, Wi)``, any range (min-max scaled).
        boxes: ``(N, 4)`` xyxy pixels; labels: ``(N,)``; scores: ``(N,)``.
        maps: ``(N, Hi, Wi)`` per-detection maps (e.g. :func:`attnkit.explain.detection_maps.detection_maps`).
        hits: ``(N,)`` bool pointing-game hits, shown in the panel titles.
        class_names: names of the labels (default the label numbers).
        max_panels: detections drawn as panels (best first).
        ncols: panels per row.
        cmap: colormap of the maps; alpha: their largest opacity (each pixel's opacity grows with its value).

    Raises:
        ValueError: a ``maps`` tensor whose shape does not fit ``image`` and ``boxes``.
    """
    img = image.detach().float().cpu()
    if img.ndim == 3:
        img = img.mean(0) if img.shape[0] != 3 else img.permute(1, 2, 0)
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    hi, wi = img.shape[:2]
    n = len(boxes)
    if maps is not None and (maps.ndim != 3 or maps.shape[0] != n or tuple(maps.shape[1:]) != (hi, wi)):
        raise ValueError(f"detection_figure: expected maps ({n}, {hi}, {wi}), got {tuple(maps.shape)}")
    names = [str(int(v)) if class_names is None else class_names[int(v)] for v in labels]
    panels = 1 + (min(n, max_panels) if maps is not None else 0)
    rows, cols = _grid(panels, ncols)
    fig = _figure(2.6 * cols, 2.7 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    gray = "gray" if img.ndim == 2 else None
    for ax in axes.flat:
        ax.axis("off")
    ax = axes.flat[0]
    ax.imshow(img.numpy(), cmap=gray)
    for i in range(n):
        _box(ax, boxes[i], _COLOURS[i % len(_COLOURS)], f"{names[i]} {float(scores[i]):.2f}")
    ax.set_title(f"{n} detection{'s' if n != 1 else ''}", fontsize=9)
    if maps is not None:
        for i in range(min(n, max_panels)):
            ax = axes.flat[1 + i]
            m = maps[i].detach().float().cpu()
            m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
            ax.imshow(img.numpy(), cmap=gray)
            ax.imshow(m.numpy(), cmap=cmap, alpha=(alpha * m.sqrt()).numpy(), vmin=0, vmax=1)  # faint where low
            _box(ax, boxes[i], "white")
            hit = "" if hits is None else (" - peak in box" if bool(hits[i]) else " - peak outside")
            ax.set_title(f"{names[i]} ({float(scores[i]):.2f}){hit}", fontsize=8)
    return fig
