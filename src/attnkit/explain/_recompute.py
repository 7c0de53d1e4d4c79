"""Attention probabilities recomputed on the side from a call's inputs, in query-row tiles.

The model keeps its own (fused) kernel; these helpers rebuild ``softmax(mask(scale · Q Kᵀ) + bias)`` for the
selected heads and query rows only, ``_TILE_ELEMENTS`` scores at a time, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from attnkit.backends.math import grouped, masked_softmax
from attnkit.functional.spec import AttentionSpec, make_spec, tile_terms

__all__ = ["probability_tiles", "sdpa_math", "select_index", "select_weights", "spec_from_sdpa"]

#: Scores per tile (float32): 2**24 = 64 MiB.
_TILE_ELEMENTS = 1 << 24


def spec_from_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """An :class:`AttentionSpec` with the semantics of one ``torch.nn.functional.scaled_dot_product_attention`` call.

    torch's ``is_causal`` is top-left aligned; attnkit's is bottom-right, so for ``Lq != Lk`` the causal mask is
    passed as an explicit bool mask. ``enable_gqa`` maps query head ``h`` to key head ``h // (H // Hkv)`` in
    both libraries.
    """
    lq, lk = query.shape[-2], key.shape[-2]
    if is_causal and lq != lk:
        tril = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
        attn_mask = (
            tril
            if attn_mask is None
            else (attn_mask & tril if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~tril, float("-inf")))
        )
        is_causal = False
    return make_spec(query, key, value, attn_mask=attn_mask, is_causal=bool(is_causal), scale=scale)


def _take(t: Tensor | None, dim: int, index: Tensor | None) -> Tensor | None:
    """``t.index_select(dim, index)`` unless ``t`` is broadcast (size 1) along ``dim`` or ``index`` is None."""
    if t is None or index is None:
        return t
    dim = t.ndim + dim
    if dim < 0 or t.shape[dim] == 1:
        return t
    return t.index_select(dim, index.to(t.device))


def _pad(t: Tensor | None, ndim: int) -> Tensor | None:
    if t is None or t.ndim >= ndim:
        return t
    return t.reshape((1,) * (ndim - t.ndim) + tuple(t.shape))


def _flat_batch(t: Tensor | None, batch_shape: torch.Size) -> Tensor | None:
    """``(*batch or 1s, H|1, Lq|1, Lk|1)`` -> ``(B|1, H|1, Lq|1, Lk|1)`` with the batch dims of the scores flattened."""
    if t is None:
        return None
    lead, tail = t.shape[:-3], tuple(t.shape[-3:])
    if all(s == 1 for s in lead):
        return t.reshape((1, *tail))
    return t.expand(tuple(batch_shape) + tail).reshape((-1, *tail))


def probability_tiles(
    spec: AttentionSpec,
    *,
    heads: Tensor | None = None,
    rows: Tensor | None = None,
    lse: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(probs, row_index)`` tiles of the attention probabilities of ``spec``.

    Args:
        spec: the call.
        heads: long ``(H',)`` query heads to compute, or ``None`` for all.
        rows: long ``(Lq',)`` query rows to compute, or ``None`` for all.
        lse: ``(*batch, H, Lq)`` log-sum-exp of the call when the kernel returned it; then
            ``p = exp(s - lse)`` replaces the softmax reductions.

    Yields:
        ``probs`` ``(B, H', t, Lk)`` float32 (float64 for float64 inputs) with the batch dims flattened, and the
        long ``(t,)`` positions of its rows in the full query axis. Rows with no key to attend to are 0.
    """
    q, k = spec.query, spec.key
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_heads, lq, lk = spec.num_heads, spec.q_len, spec.kv_len
    ndim = q.ndim
    q = q.reshape((-1, *tuple(q.shape[-3:])))  # (B, H, Lq, D)
    k = k.reshape((-1, *tuple(k.shape[-3:])))  # (B, Hkv, Lk, D)
    bias, keep = tile_terms(spec)
    bias = _flat_batch(_pad(bias, ndim), spec.batch_shape)
    keep = _flat_batch(_pad(keep, ndim), spec.batch_shape)
    if lse is not None:
        lse = lse.reshape((-1, num_heads, lq))
    group = num_heads // spec.num_kv_heads
    head_index = heads if heads is not None else torch.arange(num_heads, device=q.device)
    if heads is not None:
        q = q.index_select(1, heads.to(q.device))
    if group != 1 or heads is not None:
        k = k.index_select(1, torch.div(head_index, group, rounding_mode="floor").to(k.device))
    bias, keep = _take(bias, -3, heads), _take(keep, -3, heads)
    if lse is not None and heads is not None:
        lse = lse.index_select(1, heads.to(lse.device))
    kt = k.to(acc).mT  # (B, H', D, Lk)
    row_index = rows if rows is not None else torch.arange(lq, device=q.device)
    per_row = max(1, q.shape[0] * q.shape[1] * lk)
    step = max(1, _TILE_ELEMENTS // per_row)
    for start in range(0, row_index.numel(), step):
        r = row_index[start : start + step]
        contiguous = rows is None
        qt = q[:, :, start : start + step] if contiguous else q.index_select(2, r.to(q.device))
        # (B, H', t, Lk) = scale * (q @ k^T): one GEMM with alpha, bit-identical to (q @ k^T) * scale as eager
        # implementations compute it, and one pass over the scores cheaper.
        b_, h_, t_ = qt.shape[0], qt.shape[1], qt.shape[2]
        q3 = qt.to(acc).reshape(b_ * h_, t_, qt.shape[-1])
        k3 = kt.reshape(b_ * h_, kt.shape[-2], lk)
        s = torch.baddbmm(q3.new_empty(1, 1, 1), q3, k3, beta=0.0, alpha=spec.scale).view(b_, h_, t_, lk)
        if spec.softcap is not None:
            s = spec.softcap * torch.tanh(s / spec.softcap)
        b = None if bias is None else (bias[..., start : start + step, :] if contiguous else _take(bias, -2, r))
        m = None if keep is None else (keep[..., start : start + step, :] if contiguous else _take(keep, -2, r))
        if b is not None:
            s.add_(b)
        if m is not None:
            s.masked_fill_(~m, float("-inf"))
        if lse is not None:
            lt = lse[:, :, start : start + step] if contiguous else lse.index_select(2, r.to(lse.device))
            lt = lt.to(acc).unsqueeze(-1)
            p = s.sub_(torch.where(torch.isfinite(lt), lt, torch.zeros_like(lt))).exp_()
            p.masked_fill_(torch.isneginf(lt), 0.0)
        else:
            p = torch.softmax(s, -1)
            if m is not None or b is not None:
                p = p.nan_to_num_(0.0)  # rows with no key left: 0, not NaN
        yield p, r


def sdpa_math(spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """Differentiable attention for ``spec`` through explicit probabilities (the ``"math"`` semantics).

    Returns:
        ``(output (*batch, H, Lq, Dv) in the value dtype, probs (*batch, H, Lq, Lk))``; ``probs`` is on the
        autograd path of ``output``, so gradients with respect to it exist (what relevance needs).
        Dropout is applied to the probabilities used for the output when ``spec.dropout_p > 0``.
    """
    q, k, v = spec.query, spec.key, spec.value
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    hkv = spec.num_kv_heads
    qg = grouped(q, hkv).to(acc)  # (*batch, Hkv, G, Lq, D)
    s = torch.matmul(qg, k.unsqueeze(-3).to(acc).mT) * spec.scale
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    bias, keep = tile_terms(spec)
    if bias is not None:
        s = s + grouped(_pad(bias, q.ndim), hkv)
    if keep is not None:
        keep = grouped(_pad(keep, q.ndim), hkv)
    p, _ = masked_softmax(s, keep)
    probs = p.flatten(-4, -3)  # (*batch, H, Lq, Lk)
    if torch.is_grad_enabled() and not probs.requires_grad:
        probs.requires_grad_()  # inputs without grad: make the probabilities a leaf so their gradient exists
    used = probs
    if spec.dropout_p > 0:
        used = torch.nn.functional.dropout(probs, p=spec.dropout_p, training=True)
    out = torch.matmul(grouped(used, hkv), v.unsqueeze(-3).to(acc)).flatten(-4, -3)
    return out.to(v.dtype), probs


def select_index(sel, size: int, what: str, name: str) -> Tensor | None:
    """Long index for a heads / query_rows selection (``None`` = all); ValueError when out of range."""
    if sel is None:
        return None
    if isinstance(sel, slice):
        return torch.arange(size)[sel]
    bad = [i for i in sel if not -size <= i < size] if what == "query_rows" else [i for i in sel if i >= size]
    if bad:
        raise ValueError(f"capture: {what} {bad} out of range for {name!r}, which has {size} {what.split('_')[-1]}")
    return torch.tensor([i % size for i in sel], dtype=torch.long)


def select_weights(full: Tensor, heads: Tensor | None, rows: Tensor | None) -> Tensor:
    """The selected heads and rows of full ``(B, H, Lq, Lk)`` weights, in float32 (float64 kept)."""
    acc = torch.float64 if full.dtype == torch.float64 else torch.float32
    out = full.to(acc)
    if heads is not None:
        out = out.index_select(1, heads.to(out.device))
    if rows is not None:
        out = out.index_select(2, rows.to(out.device))
    return out
