"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", Sec. 3).

Per layer ``l`` the heads are fused (``mean``/``max``/``min``), the residual connection is modelled as
``Â_l = 0.5 · A_l + 0.5 · I`` and each row is re-normalised to sum to 1; the rollout is the product from the
first layer to the last, ``R = Â_L ··· Â_2 · Â_1``. Row ``i`` of ``R`` says how much each input token ``j``
contributes to token ``i`` at the output; a ViT's explanation is the class-token row ``R[:, 0, prefix:]``.

Two mistakes of a widely copied implementation are avoided and tested: rows are normalised with the row sums
kept as a column (``sum(-1, keepdim=True)``), and layers are multiplied in forward order (``Â_l · R_{l-1}``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.explain.records import maps_of

__all__ = ["augment", "fuse_heads", "rollout"]

_FUSIONS = ("mean", "max", "min")


def _check_options(head_fusion: str, discard_ratio: float, who: str) -> None:
    if head_fusion not in _FUSIONS:
        raise ValueError(f"{who}: head_fusion must be one of {', '.join(map(repr, _FUSIONS))}, got {head_fusion!r}")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0 <= discard_ratio < 1:
        raise ValueError(f"{who}: discard_ratio must lie in [0, 1), got {discard_ratio!r}")


def fuse_heads(probs: Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0) -> Tensor:
    """Fuse the heads of ``probs`` ``(B, H, t, Lk)`` into ``(B, t, Lk)``, then zero each row's weakest weights.

    ``discard_ratio`` is the fraction of keys per query row (``floor(ratio · Lk)``) whose fused weights are set
    to 0 before the residual term is added (the "discard" option of later rollout variants; 0 = the paper).
    """
    if head_fusion == "mean":
        fused = probs.mean(1)
    elif head_fusion == "max":
        fused = probs.amax(1)
    else:
        fused = probs.amin(1)
    drop = int(discard_ratio * fused.shape[-1])
    if drop > 0:
        idx = fused.topk(drop, dim=-1, largest=False).indices
        fused = fused.scatter(-1, idx, 0.0)
    return fused


def augment(fused: Tensor, rows: Tensor | None = None, residual: bool = True) -> Tensor:
    """``Â`` rows: ``0.5 · A + 0.5 · I`` (if ``residual``) re-normalised so each row sums to 1.

    Args:
        fused: ``(B, t, L)`` fused attention rows.
        rows: long ``(t,)`` positions of these rows (where the identity's 1 sits); ``None``: every row of a
            square map in order (``t = L``, row ``i`` is token ``i``).
        residual: add the identity (the paper's residual model); ``False`` only re-normalises.

    Rows summing to 0 stay 0.
    """
    return _augment(0.5 * fused, rows, 0.5) if residual else _normalise(fused)


def _augment(weighted: Tensor, rows: Tensor | None, identity: float) -> Tensor:
    """``weighted + identity · I`` re-normalised; ``weighted`` is a fresh tensor (the identity is added in place).

    ``0.5 · A`` with ``identity = 0.5`` is :func:`augment`. The sum of ``H`` heads with ``identity = H`` is ``2H``
    times the same matrix, so its normalised rows are the same ``Â`` rows in one kernel fewer; a row whose total is
    not positive is divided by ``2 · identity`` instead, which leaves it as :func:`augment` does."""
    if rows is None:
        weighted.diagonal(dim1=-2, dim2=-1).add_(identity)
    else:
        weighted[:, torch.arange(len(rows)), rows.to(weighted.device)] += identity
    return _normalise(weighted, 2.0 * identity)


def _normalise(x: Tensor, fallback: float = 1.0) -> Tensor:
    """Rows of ``x`` divided by their sums; rows summing to 0 or less are divided by ``fallback`` instead."""
    total = x.sum(-1, keepdim=True)
    return x / torch.where(total > 0, total, fallback)


def rollout(
    maps,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
) -> Tensor:
    """Attention rollout ``R = Â_L ··· Â_1`` over the self-attention maps of consecutive layers.

    Args:
        maps: per-layer attention probabilities from the first layer to the last: a list of ``(B, H, L, L)``
            tensors or :class:`AttentionRecord` (e.g. ``rec.maps`` of a :func:`capture`), or one
            ``(layers, B, H, L, L)`` tensor. Head-averaged maps (``H = 1``) are fine.
        head_fusion: how heads are fused: ``"mean"`` (the paper), ``"max"`` or ``"min"``.
        discard_ratio: fraction in ``[0, 1)`` of the weakest keys per query row set to 0 after fusion.
        residual: model the residual connection, ``Â = 0.5 · A + 0.5 · I`` (the paper); ``False`` uses ``A``.

    Returns:
        ``(B, L, L)`` float tensor (dtype of the maps); each row sums to 1 when every row of the maps does.

    Raises:
        ValueError: no maps, maps of mismatched token counts or batch sizes, cross-attention maps, a bad
            ``head_fusion`` or ``discard_ratio``.

    References:
        Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL, Sec. 3 (attention rollout).
    """
    _check_options(head_fusion, discard_ratio, "rollout")
    if isinstance(maps, Tensor) and maps.ndim == 5 and maps.shape[-1] == maps.shape[-2]:
        stacked = maps  # already one tensor of equal maps: nothing to gather or compare
    else:
        tensors = maps_of(maps, who="rollout")
        if len({t.shape for t in tensors}) > 1:  # layers with different head counts
            hats = [augment(fuse_heads(a, head_fusion, discard_ratio), None, residual) for a in tensors]
            return _chain(hats)
        stacked = torch.stack(tensors, 0)
    n, b, h, length = stacked.shape[:4]
    if n == 0:
        raise ValueError("rollout: got no attention maps; did the capture record anything?")
    # one fusion + augmentation for every layer at once: a few kernels, not a few per layer
    flat = stacked.reshape(n * b, h, length, length)
    if head_fusion == "mean" and discard_ratio == 0 and residual:
        hats = _augment(flat.sum(1), None, float(h))  # (Σ_h A + H·I) / rows = (mean_h A / 2 + I / 2) / rows
    else:
        hats = augment(fuse_heads(flat, head_fusion, discard_ratio), None, residual)
    return _chain(hats.view(n, b, length, length).unbind(0))


def _chain(hats) -> Tensor:
    """``Â_L ··· Â_1`` of the per-layer ``(B, L, L)`` matrices ``hats`` (first layer first)."""
    result = hats[0]
    for a_hat in hats[1:]:
        result = torch.bmm(a_hat, result)  # (B, L, L) each: one kernel (``@`` adds broadcasting views)
    return result
