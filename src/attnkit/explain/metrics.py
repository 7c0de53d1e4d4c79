"""Faithfulness of a saliency map, generic over model, input and saliency.

* :func:`pointing_game` (Zhang et al. 2016): does the saliency peak fall on the annotated object?
* :func:`deletion` / :func:`insertion` (Petsiuk, Das & Saenko 2018, RISE, Sec. 4.1): remove (or insert) the
  input units in order of decreasing saliency and integrate the model's score; a faithful saliency makes the
  deletion curve drop fast (low AUC) and the insertion curve rise fast (high AUC).
* :func:`aopc` (DeYoung et al. 2020, ERASER): comprehensiveness and sufficiency of the top-k% units.
* :func:`alignment_error_rate` (Och & Ney 2003): how far a source-target map is from gold word alignments.

Saliency ``(B, *S)`` is over *units* of the input ``x`` ``(B, ...)``: the trailing dims of ``x`` (image pixels
``(Hi, Wi)`` of ``(B, C, Hi, Wi)``, token ids ``(B, L)``), the dims right after the batch (token embeddings
``(B, L, E)`` with ``S = (L,)``), or a coarser grid whose cells tile the trailing dims exactly (a ViT patch grid
``(Gh, Gw)`` over ``(Hi, Wi)``: each patch is one unit).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AOPCResult",
    "CurveResult",
    "alignment_error_rate",
    "aopc",
    "deletion",
    "insertion",
    "pointing_game",
    "random_saliency",
    "scores_at",
]


class CurveResult(NamedTuple):
    """A deletion or insertion curve.

    Attributes:
        auc: ``(B,)`` area under the curve over the fraction of units changed, in ``[0, 1]`` on the x axis
            (trapezoid rule), in the units of the score.
        curve: ``(B, steps + 1)`` scores after changing ``fractions[k]`` of the units.
        fractions: ``(steps + 1,)`` from 0 to 1.
    """

    auc: Tensor
    curve: Tensor
    fractions: Tensor


def random_saliency(like: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """A uniform random saliency shaped like ``like`` (the baseline a real saliency must beat)."""
    return torch.rand(like.shape, generator=generator, dtype=torch.float32).to(like.device)


def _box_hits(saliency: Tensor, boxes: Tensor, tolerance: float) -> Tensor:
    b, _, w = saliency.shape
    if boxes.shape != (b, 4) or (boxes.is_floating_point() and not bool(torch.isfinite(boxes).all())):
        raise ValueError(f"pointing_game: boxes must be (B, 4) = ({b}, 4) finite (x0, y0, x1, y1), got {boxes!r:.80}")
    x0, y0, x1, y1 = boxes.to(torch.float64).unbind(-1)
    empty = ((x1 <= x0) | (y1 <= y0)).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"pointing_game: items {empty} have an empty box (x1 <= x0 or y1 <= y0)")
    peak = saliency.reshape(b, -1).argmax(-1).to(boxes.device)  # first maximum in row-major order
    y, x = (peak // w).double(), (peak % w).double()
    # Distance from the peak pixel to the nearest pixel of the half-open box [x0, x1) x [y0, y1).
    dx = torch.clamp(torch.maximum(x0 - x, x - (x1 - 1)), min=0)
    dy = torch.clamp(torch.maximum(y0 - y, y - (y1 - 1)), min=0)
    return (torch.hypot(dx, dy) <= tolerance).to(saliency.device)


def pointing_game(saliency: Tensor, target: Tensor, *, tolerance: float = 0.0) -> Tensor:
    """Hit (True) when the saliency maximum lies within ``tolerance`` units of the target (Zhang et al. 2016).

    The target is either a mask or, for 2-D maps, one box per item; both give the same hits for the same
    object. Ties: the first maximum in row-major order.

    Args:
        saliency: ``(B, *S)`` scores, e.g. ``(B, Hi, Wi)`` pixel maps or ``(B, Gh, Gw)`` patch grids.
        target: ``(B, *S)`` bool, True on the annotated object; or ``(B, 4)`` integer/float boxes
            ``(x0, y0, x1, y1)`` in the units of a ``(B, Hi, Wi)`` saliency, half-open (``x0 <= x < x1``).
        tolerance: Euclidean distance in units (the paper uses 15 pixels) from the maximum to the nearest
            target unit; 0 = the maximum must be on the target.

    Returns:
        ``(B,)`` bool hits; ``hits.float().mean()`` is the pointing accuracy.

    Raises:
        ValueError: shapes that fit neither form, an item with no target unit (an empty mask or box), or
            a negative or non-finite ``tolerance``.
        TypeError: ``target`` is neither a bool mask nor numeric boxes.

    References:
        Zhang et al. 2016/2018, "Top-down Neural Attention by Excitation Backprop", Sec. 5.1.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
        raise ValueError(f"pointing_game: tolerance must be a finite number >= 0, got {tolerance!r}")
    if not isinstance(saliency, Tensor) or not isinstance(target, Tensor):
        raise TypeError("pointing_game: saliency and target must be tensors")
    if target.dtype != torch.bool:
        if target.dtype.is_complex:
            raise TypeError(f"pointing_game: target must be a bool mask or numeric boxes, got {target.dtype}")
        if saliency.ndim == 3 and target.ndim == 2 and target.shape[-1] == 4:
            return _box_hits(saliency, target, float(tolerance))
        raise TypeError(
            f"pointing_game: target must be a bool mask (B, *S) or boxes (B, 4) for (B, Hi, Wi) maps, got "
            f"{target.dtype} {tuple(target.shape)} for saliency {tuple(saliency.shape)}"
        )
    if saliency.shape != target.shape or saliency.ndim < 2:
        raise ValueError(
            f"pointing_game: saliency {tuple(saliency.shape)} and target {tuple(target.shape)} must both be (B, *S)"
        )
    empty = [i for i in range(target.shape[0]) if not bool(target[i].any())]
    if empty:
        raise ValueError(f"pointing_game: items {empty} have no target unit")
    spatial = saliency.shape[1:]
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in spatial], indexing="ij"), -1)
    coords = coords.reshape(-1, len(spatial)).double()  # (N, ndim)
    peak = saliency.reshape(saliency.shape[0], -1).argmax(-1).cpu()  # (B,)
    dist = torch.cdist(coords[peak], coords)  # (B, N)
    dist = dist.masked_fill(~target.reshape(target.shape[0], -1).cpu(), float("inf"))
    return (dist.amin(-1) <= tolerance).to(saliency.device)


def _unit_map(x: Tensor, saliency: Tensor) -> Callable[[Tensor], Tensor]:
    """A function turning a unit mask ``(B, *S)`` into a mask broadcastable to ``x``."""
    s = tuple(saliency.shape[1:])
    n = len(s)
    if saliency.shape[0] != x.shape[0]:
        raise ValueError(f"faithfulness: saliency batch {saliency.shape[0]} != input batch {x.shape[0]}")
    if tuple(x.shape[-n:]) == s and x.ndim > n:
        lead = x.ndim - 1 - n
        return lambda m: m.reshape(m.shape[:1] + (1,) * lead + s)
    if tuple(x.shape[1 : 1 + n]) == s:
        trail = x.ndim - 1 - n
        return lambda m: m.reshape(m.shape + (1,) * trail)
    tail = tuple(x.shape[-n:])
    if x.ndim > n and all(t % u == 0 for t, u in zip(tail, s)):
        factors = [t // u for t, u in zip(tail, s)]
        lead = x.ndim - 1 - n

        def up(m: Tensor) -> Tensor:
            for d, f in enumerate(factors):
                m = m.repeat_interleave(f, dim=1 + d)
            return m.reshape(m.shape[:1] + (1,) * lead + tail)

        return up
    raise ValueError(
        f"faithfulness: saliency units {s} match neither the trailing dims {tuple(x.shape[-n:])} nor the dims "
        f"after the batch {tuple(x.shape[1 : 1 + n])} of the input {tuple(x.shape)}, nor tile the trailing dims; "
        "resample the saliency (torch.nn.functional.interpolate)"
    )


def _scores(model_fn, xm: Tensor, target: Tensor | None, batch_size: int | None) -> Tensor:
    size = batch_size or len(xm)
    out = []
    for i in range(0, len(xm), size):
        score = model_fn(xm[i : i + size])
        if target is not None:
            if not isinstance(score, Tensor) or score.ndim != 2:
                raise ValueError(
                    f"faithfulness: with target, model_fn must return (B, classes) logits, got {score!r:.80}"
                )
            score = score.softmax(-1).gather(1, target[i : i + size, None])[:, 0]
        out.append(score)
    return torch.cat(out) if len(out) > 1 else out[0]


def _check_curve_args(x, saliency, baseline, target, batch_size):
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"faithfulness: batch_size must be a positive int or None, got {batch_size!r}")
    expand = _unit_map(x, saliency)
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if base.ndim and base.shape != x.shape:
        raise ValueError(
            f"faithfulness: baseline {tuple(base.shape)} must be a scalar or shaped like x {tuple(x.shape)}"
        )
    b = x.shape[0]
    if target is not None:
        target = torch.as_tensor(target, device=x.device)
        if target.shape != (b,) or target.dtype.is_floating_point or target.dtype == torch.bool:
            raise ValueError(f"faithfulness: target must be (B,) = ({b},) class indices, got {target!r:.80}")
    return expand, base, target


def scores_at(
    model_fn, x, saliency, fractions: Tensor, *, baseline=0.0, insert: bool = False, target=None, batch_size=None
) -> Tensor:
    """``(B, len(fractions))`` scores after replacing (``insert=False``: the most salient; ``insert=True``: all
    but the most salient) ``round(f · units)`` units by ``baseline``, for each fraction ``f``.

    The one perturbation loop behind :func:`deletion`, :func:`insertion` and :func:`aopc` (arguments as
    :func:`deletion`; ties in the saliency are broken by unit order, a stable sort).
    """
    expand, base, target = _check_curve_args(x, saliency, baseline, target, batch_size)
    b = x.shape[0]
    flat = saliency.reshape(b, -1)
    units = flat.shape[1]
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(units, device=order.device).expand(b, units))
    scores, previous = [], None
    with torch.no_grad():
        for f in fractions:
            changed = (rank < round(float(f) * units)).reshape(saliency.shape)
            keep_x = ~changed if not insert else changed
            xm = torch.where(expand(keep_x), x, base)
            if target is not None and previous is not None:
                # A classifier scores each item alone: re-run only the items whose input changed this step.
                todo = (xm != previous[0]).reshape(b, -1).any(-1).nonzero()[:, 0]
                score = previous[1].clone()
                if len(todo):
                    score[todo] = _scores(model_fn, xm[todo], target[todo], batch_size).to(score.dtype)
            else:
                score = _scores(model_fn, xm, target, batch_size)
            if not isinstance(score, Tensor) or score.shape != (b,):
                raise ValueError(f"faithfulness: model_fn must return (B,) = ({b},) scores, got {score!r:.80}")
            previous = (xm, score)
            scores.append(score.detach().double().cpu())
    return torch.stack(scores, 1)


def _curve(model_fn, x, saliency, *, steps, baseline, insert, target=None, batch_size=None) -> CurveResult:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"faithfulness: steps must be a positive int, got {steps!r}")
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    curve = scores_at(
        model_fn, x, saliency, fractions, baseline=baseline, insert=insert, target=target, batch_size=batch_size
    )
    return CurveResult(torch.trapezoid(curve, fractions), curve, fractions)


def deletion(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    saliency: Tensor,
    *,
    steps: int = 20,
    baseline=0.0,
    target: Tensor | None = None,
    batch_size: int | None = None,
) -> CurveResult:
    """Deletion curve: replace the most salient units by ``baseline`` first (Petsiuk et al. 2018, RISE).

    Args:
        model_fn: ``x -> (B,)`` scores, e.g. the probability of the explained class; with ``target``, a
            classifier ``x -> (B, classes)`` logits whose softmax probability of ``target`` is the score.
        x: ``(B, ...)`` input (float images, embeddings, or integer token ids with a pad/mask id baseline).
        saliency: ``(B, *S)`` unit scores (see the module docstring for how units map onto ``x``).
        steps: number of deletion steps (``steps + 1`` evaluations; step ``k`` changes ``round(k / steps *
            units)`` units).
        baseline: scalar or tensor shaped like ``x`` that replaces deleted units (0 = black image; a mask id).
        target: ``(B,)`` class indices (see ``model_fn``). Items are then scored independently, so an item whose
            input did not change at a step (e.g. black pixels set to black) keeps its score without a forward.
        batch_size: items per ``model_fn`` call (default: the whole batch).

    Returns:
        :class:`CurveResult`; lower ``auc`` = more faithful.

    Raises:
        ValueError: saliency units that do not fit ``x``; bad ``steps``/``baseline``/``target``/``batch_size``;
            wrong score shape.

    References:
        Petsiuk, Das & Saenko 2018, "RISE: Randomized Input Sampling for Explanation of Black-box Models",
        BMVC, Sec. 4.1 (deletion and insertion metrics).
    """
    return _curve(
        model_fn, x, saliency, steps=steps, baseline=baseline, insert=False, target=target, batch_size=batch_size
    )


def insertion(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    saliency: Tensor,
    *,
    steps: int = 20,
    baseline=0.0,
    target: Tensor | None = None,
    batch_size: int | None = None,
) -> CurveResult:
    """Insertion curve: start from ``baseline`` (RISE uses a blurred image) and insert the most salient units
    first. Same arguments as :func:`deletion`; higher ``auc`` = more faithful.
    """
    return _curve(
        model_fn, x, saliency, steps=steps, baseline=baseline, insert=True, target=target, batch_size=batch_size
    )


class AOPCResult(NamedTuple):
    """ERASER's faithfulness scores (DeYoung et al. 2020, Sec. 4).

    Attributes:
        comprehensiveness: ``(B,)`` mean drop of the score when the top-``k`` units are removed (higher = the
            explanation found what the model needs).
        sufficiency: ``(B,)`` mean drop when only the top-``k`` units are kept (lower = they suffice).
        fractions: ``(K,)`` the bins ``k`` as fractions of the units.
        full: ``(B,)`` the score of the unchanged input.
    """

    comprehensiveness: Tensor
    sufficiency: Tensor
    fractions: Tensor
    full: Tensor


def aopc(
    model_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    saliency: Tensor,
    *,
    fractions=(0.01, 0.05, 0.1, 0.2, 0.5),
    baseline=0.0,
    target: Tensor | None = None,
    batch_size: int | None = None,
) -> AOPCResult:
    """AOPC comprehensiveness and sufficiency (DeYoung et al. 2020, ERASER, Sec. 4, "Area Over the Perturbation
    Curve"): ``comp = 1/|K| Σ_k (m(x) - m(x \\ r_k))``, ``suff = 1/|K| Σ_k (m(x) - m(r_k))`` where ``r_k`` are
    the top ``k`` of the units by saliency (``round(k · units)`` of them, as :func:`deletion` counts) and
    removed units take ``baseline``.

    Args:
        model_fn, x, saliency, baseline, target, batch_size: as :func:`deletion` (with ``target``, ``m`` is
            the softmax probability of the target class, ERASER's choice).
        fractions: the bins ``K``; default ERASER's ``{1, 5, 10, 20, 50}%``.

    Returns:
        :class:`AOPCResult`.

    Raises:
        ValueError: as :func:`deletion`; fractions outside ``(0, 1]`` or none.

    References:
        DeYoung et al. 2020, "ERASER: A Benchmark to Evaluate Rationalized NLP Models", ACL, Sec. 4 (Eq. 1-3).
    """
    bins = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    if not len(bins) or bool(((bins <= 0) | (bins > 1)).any()):
        raise ValueError(f"aopc: fractions must be non-empty and in (0, 1], got {fractions!r}")
    points = torch.cat([torch.zeros(1, dtype=torch.float64), bins])
    kw = {"baseline": baseline, "target": target, "batch_size": batch_size}
    removed = scores_at(model_fn, x, saliency, points, insert=False, **kw)
    kept = scores_at(model_fn, x, saliency, bins, insert=True, **kw)
    full = removed[:, 0]
    return AOPCResult((full[:, None] - removed[:, 1:]).mean(1), (full[:, None] - kept).mean(1), bins, full)


def _hard_links(alignment: Tensor) -> Tensor:
    """Bool links from a bool matrix, or from a soft map by argmax per target row (rows without a positive
    weight give no link; ties: the first maximum)."""
    if alignment.dtype == torch.bool:
        return alignment
    if not (alignment.is_floating_point() and bool(torch.isfinite(alignment).all())):
        raise ValueError(f"alignment_error_rate: a soft alignment must be finite floats, got {alignment.dtype}")
    peak = alignment.argmax(-1, keepdim=True)
    links = torch.zeros_like(alignment, dtype=torch.bool).scatter_(-1, peak, True)
    return links & (alignment.amax(-1, keepdim=True) > 0)


def alignment_error_rate(
    alignment: Tensor, sure: Tensor, possible: Tensor | None = None, *, reduction: str = "none"
) -> Tensor:
    """Alignment error rate ``AER = 1 - (|A ∩ S| + |A ∩ P|) / (|A| + |S|)`` (Och & Ney 2003, Eq. 4).

    ``A`` are the hypothesised links, ``S`` the sure and ``P`` the possible gold links (``S ⊆ P``). A map that
    links exactly the sure links (or any subset of ``P`` containing ``S``) scores 0; one whose links all miss
    ``P`` scores 1.

    Hard links from a soft map: each target position (row) is linked to its highest-weighted source position
    (``argmax`` over the last dim; ties: the first maximum); a row without a positive weight (e.g. a fully
    masked row, all 0) gives no link. A soft map therefore proposes at most one link per target position —
    score only the rows that should have a link (slice the others away first), as a hyphen that comes from no
    source character would otherwise count as a wrong link.

    Args:
        alignment: ``(T, S)`` or ``(B, T, S)`` target x source map: bool links, or float weights (attention,
            rollout, relevance) turned into links as above.
        sure: bool, shaped like ``alignment``: the sure gold links ``S``.
        possible: bool, shaped like ``alignment``: the possible gold links ``P``, which must contain ``S``;
            default ``S`` (no ambiguous links).
        reduction: ``"none"``: one AER per item; ``"corpus"``: the counts summed over the batch first (Och &
            Ney's corpus-level AER, what alignment papers report).

    Returns:
        float64 tensor: ``()`` for a ``(T, S)`` input or ``reduction="corpus"``; ``(B,)`` otherwise. An item
        with no hypothesised and no sure link (``|A| + |S| = 0``) scores 0.

    Raises:
        TypeError: non-tensor inputs, or ``sure``/``possible`` that are not bool.
        ValueError: mismatched shapes, a rank other than 2 or 3, non-finite soft weights, a sure link missing
            from ``possible``, or an unknown ``reduction``.

    References:
        Och & Ney 2003, "A Systematic Comparison of Various Statistical Alignment Models", Computational
        Linguistics 29(1), Sec. 5 (Eq. 4).
    """
    if reduction not in ("none", "corpus"):
        raise ValueError(f"alignment_error_rate: reduction must be 'none' or 'corpus', got {reduction!r}")
    possible = sure if possible is None else possible
    for name, t in (("alignment", alignment), ("sure", sure), ("possible", possible)):
        if not isinstance(t, Tensor):
            raise TypeError(f"alignment_error_rate: expected {name} to be a tensor, got {type(t).__name__}")
    for name, t in (("sure", sure), ("possible", possible)):
        if t.dtype != torch.bool:
            raise TypeError(f"alignment_error_rate: expected {name} to be a bool tensor, got {t.dtype}")
    if alignment.ndim not in (2, 3) or sure.shape != alignment.shape or possible.shape != alignment.shape:
        raise ValueError(
            "alignment_error_rate: expected alignment, sure and possible of one shape (T, S) or (B, T, S), got "
            f"{tuple(alignment.shape)}, {tuple(sure.shape)}, {tuple(possible.shape)}"
        )
    if bool((sure & ~possible).any()):
        raise ValueError("alignment_error_rate: every sure link must also be possible (S ⊆ P)")
    links = _hard_links(alignment)
    dims = (-2, -1) if reduction == "none" else tuple(range(links.ndim))
    hits_s = (links & sure).sum(dims, dtype=torch.float64)
    hits_p = (links & possible).sum(dims, dtype=torch.float64)
    total = links.sum(dims, dtype=torch.float64) + sure.sum(dims, dtype=torch.float64)
    return torch.where(total > 0, 1 - (hits_s + hits_p) / total.clamp_min(1), torch.zeros_like(total))
