"""The ``"math"`` backend: the reference implementation of every option.

Materializes the ``(*batch, H, Lq, Lk)`` score matrix, computes a numerically safe softmax in float32
(float64 for float64 inputs), and relies on autograd for gradients. Every other backend is tested against it
run in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.backends.registry import ALL_OPTIONS, Backend, register
from attnkit.functional.spec import AttentionSpec, call_mask_mod, call_score_mod, tile_terms

__all__ = ["grouped", "index_grids", "masked_softmax", "math_attention"]


def grouped(t: Tensor, num_kv_heads: int) -> Tensor:
    """View ``(*batch, H, ...)`` as ``(*batch, Hkv, H // Hkv, ...)`` without a copy; size-1 heads stay 1.

    Query head ``h`` becomes ``(h // G, h % G)`` with ``G = H // Hkv``, so it meets key/value head ``h // G``
    (the grouped-query attention convention of Ainslie et al. 2023).
    """
    heads = t.shape[-3]
    if heads == 1:
        return t.unsqueeze(-3)
    return t.unflatten(-3, (num_kv_heads, heads // num_kv_heads))


def _pad_dims(t: Tensor, ndim: int) -> Tensor:
    """Left-pad ``t`` with size-1 dims up to ``ndim`` dims (a view)."""
    return t.reshape((1,) * (ndim - t.ndim) + tuple(t.shape)) if t.ndim < ndim else t


def masked_softmax(scores: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim that gives 0 (not NaN) for rows with nothing left, and their log-sum-exp.

    Args:
        scores: ``(..., Lk)`` floating scores; ``-inf`` entries are masked.
        keep: bool mask broadcastable to ``scores`` (True = keep), or ``None``.

    Returns:
        ``(probs, lse)``: probabilities shaped like ``scores`` (all-zero rows where nothing is kept) and the
        row log-sum-exp ``(...,)`` (``-inf`` for such rows). Gradients of both are finite everywhere.
    """
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    probs = exp / safe_total
    lse = torch.where(nonempty, row_max + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return probs, lse.squeeze(-1)


def index_grids(spec: AttentionSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """int64 ``(b, h, q_idx, kv_idx)`` broadcasting to the grouped scores ``(*batch, Hkv, G, Lq, Lk)``.

    ``b`` numbers the flattened batch dims (0 for unbatched inputs); ``h`` is the query head.
    """
    dev = spec.query.device
    batch = tuple(spec.batch_shape)
    n_batch = math.prod(batch)
    b = torch.arange(n_batch, device=dev).reshape((*batch, 1, 1, 1, 1))
    h = torch.arange(spec.num_heads, device=dev).reshape(spec.num_kv_heads, -1, 1, 1)
    q_idx = torch.arange(spec.q_len, device=dev).unsqueeze(-1)
    kv_idx = torch.arange(spec.kv_len, device=dev)
    return b, h, q_idx, kv_idx


def _mod_terms(spec: AttentionSpec, scores: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Apply ``score_mod`` to the grouped scores and fold ``mask_mod``/``block_mask`` into ``keep``."""
    b, h, q_idx, kv_idx = index_grids(spec)
    if spec.score_mod is not None:
        scores = call_score_mod(spec.score_mod, scores, b, h, q_idx, kv_idx)
    extra = []
    if spec.mask_mod is not None:
        extra.append(call_mask_mod(spec.mask_mod, b, h, q_idx, kv_idx))
    if spec.block_mask is not None:
        extra.append(spec.block_mask.element_mask(q_idx, kv_idx))
    for m in extra:
        keep = m if keep is None else keep & m
    return scores, keep


def math_attention(spec: AttentionSpec) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Reference attention for ``spec``: ``softmax(softcap(scale * q @ k^T) + bias, masked) @ v``.

    Returns:
        ``(output, weights or None, lse or None)`` as described in :class:`attnkit.AttentionOutput`.
    """
    q, k, v = spec.query, spec.key, spec.value
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    hkv = spec.num_kv_heads
    # Grouped view: (*batch, Hkv, G, L, D) against (*batch, Hkv, 1, S, D); broadcasting, not copies.
    qg = grouped(q, hkv).to(acc)
    kg = k.unsqueeze(-3).to(acc)
    vg = v.unsqueeze(-3)
    scores = torch.matmul(qg, kg.transpose(-1, -2)) * spec.scale  # (*batch, Hkv, G, Lq, Lk)
    if spec.softcap is not None:
        scores = spec.softcap * torch.tanh(scores / spec.softcap)
    bias, keep = tile_terms(spec)
    ndim = q.ndim
    if keep is not None:
        keep = grouped(_pad_dims(keep, ndim), hkv)
    if spec.score_mod is not None or spec.mask_mod is not None or spec.block_mask is not None:
        scores, keep = _mod_terms(spec, scores, keep)  # score_mod sees the score before the biases
    if bias is not None:
        scores = scores + grouped(_pad_dims(bias, ndim), hkv)
    probs, lse = masked_softmax(scores, keep)
    dropped = probs
    if spec.dropout_p > 0:
        dropped = torch.nn.functional.dropout(probs, p=spec.dropout_p, training=True)
    out = torch.matmul(dropped, vg.to(acc))
    out = out.flatten(-4, -3).to(v.dtype)  # (*batch, H, Lq, Dv)
    weights = probs.flatten(-4, -3).to(q.dtype) if spec.return_weights else None
    lse_out = lse.flatten(-3, -2) if spec.return_lse else None  # float32 (float64 for float64)
    return out, weights, lse_out


MATH = register(
    Backend(
        name="math",
        forward=math_attention,
        options=ALL_OPTIONS,
        priority=100,
        description="reference: materializes the scores; every option; float32 softmax (float64 for float64)",
    )
)
