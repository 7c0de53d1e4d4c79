"""What a tile of attention is: the one definition of the scores and the keep-mask of :func:`attnkit.attention`.

Every consumer of attention semantics goes through :class:`TileSetup`: the ``"math"`` backend (one tile covering
the whole call), the ``"sdpa"`` backend's mask, the tiled and block-sparse backends (many tiles), and
:mod:`attnkit.explain`'s recomputation of probabilities (tiles of query rows). A new option of
:func:`attnkit.attention` is added here once.

For query row ``i`` and key ``j`` of the call (``b`` the flattened batch index, ``h`` the query head)::

    s   = (scale · q_i) · k_j                                    # logits(), accumulation dtype
    s   = softcap · tanh(s / softcap)                            # transform()
    s   = score_mod(s, b, h, i, j)                               # transform()
    s   = s + attn_bias + alibi + float attn_mask                # terms() -> bias
    s   = -inf where not (bool attn_mask & causal & window & mask_mod & block_mask)    # terms() -> keep
    p   = softmax over [s_i·, sink_h] without the sink column    # masked_softmax(); rows with no key: p = 0

Tile layout: ``N`` query blocks of ``r`` rows, each with ``c`` key columns; scores are
``(B, Hkv, N, G, r, c)`` (``B`` the flattened batch, ``G = H // Hkv`` query heads per key/value head, so
grouped-query heads share their key tiles without copies). Positions are int64 ``q_idx (N, r)`` and
``kv_idx (N, c)``, absolute in the call (possibly past the end for padded blocks), and, for a plain rectangle,
``(start, stop)`` ranges so that dense masks are sliced instead of gathered. The accumulation dtype is float32
(float64 for float64 inputs): scores are never formed in float16/bfloat16.

References:
    Vaswani et al. 2017 (Eq. 1); softcap: Gemma 2 (Team et al. 2024); ALiBi: Press et al. 2022 with
    FlashAttention's bottom-right convention; sinks: Xiao et al. 2023 and gpt-oss (a learned per-head logit in
    the softmax denominator); mask_mod/score_mod: PyTorch FlexAttention's signatures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.functional.masks import band_keep, bottom_right_offset, effective_window, positional_mask
from attnkit.functional.mods import call_mask_mod, call_score_mod
from attnkit.functional.spec import AttentionSpec, lse_dtype

__all__ = ["TileIndex", "TileSetup", "flatten_batch", "masked_softmax", "reshape_qkv", "to_heads", "whole"]


@dataclass
class TileIndex:
    """Where a tile lies: ``q_idx (N, r)``, ``kv_idx (N, c)``, optional rectangle ranges (``N == 1``).

    ``uniform``: every block's positions are the first block's shifted by one amount on both axes, so the
    terms that depend only on ``kv_idx - q_idx`` (``is_causal``/``window_size``) are evaluated once, on the
    first block, and broadcast over ``N``. ``in_band``: every pair lies inside the causal/window band, so
    those terms keep everything and are not evaluated.
    """

    q_idx: Tensor
    kv_idx: Tensor
    q_range: tuple[int, int] | None = None
    kv_range: tuple[int, int] | None = None
    uniform: bool = False
    in_band: bool = False

    @classmethod
    def rect(cls, q_range: tuple[int, int], kv_range: tuple[int, int], device) -> TileIndex:
        """The rectangle of rows ``[q0, q1)`` and columns ``[k0, k1)``."""
        q_idx = torch.arange(*q_range, device=device).unsqueeze(0)
        kv_idx = torch.arange(*kv_range, device=device).unsqueeze(0)
        return cls(q_idx, kv_idx, q_range, kv_range)

    @classmethod
    def rows(cls, rows: Tensor, kv_len: int, device) -> TileIndex:
        """Arbitrary query rows ``(r,)`` against every key."""
        return cls(rows.to(device).unsqueeze(0), torch.arange(kv_len, device=device).unsqueeze(0), None, (0, kv_len))


def flatten_batch(t: Tensor, spec: AttentionSpec) -> Tensor:
    """A mask/bias broadcastable to ``(*batch, H, Lq, Lk)`` as ``(B' in {1, B}, H', Lq', Lk')`` (a view if possible).

    The one place where attnkit's any-number-of-batch-dims convention is folded into one batch dim.
    """
    nd = spec.query.ndim
    t = t.reshape((1,) * (nd - t.ndim) + tuple(t.shape))
    batch = tuple(spec.batch_shape)
    if all(s == 1 for s in t.shape[: len(batch)]):
        return t.reshape(t.shape[len(batch) :]).unsqueeze(0)
    t = t.expand(batch + tuple(t.shape[len(batch) :]))
    return t.reshape((-1, *t.shape[len(batch) :]))


def to_heads(t: Tensor, num_kv_heads: int, groups: int) -> Tensor:
    """A one-block tile term ``(B', Hkv|1, 1, G|1, r, c)`` as ``(B', H|1, r, c)`` (query head ``kv · G + g``)."""
    if t.shape[1] == 1 and t.shape[3] == 1:
        return t[:, :, 0, 0]
    t = t[:, :, 0]
    return t.expand(t.shape[0], num_kv_heads, groups, t.shape[-2], t.shape[-1]).flatten(1, 2)


def masked_softmax(
    scores: Tensor, keep: Tensor | None = None, sink: Tensor | None = None, *, finite_rows: bool = False
) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim, optionally with a sink logit in the denominator; 0 (not NaN) for empty rows.

    Args:
        scores: ``(..., Lk)`` floating scores; ``-inf`` entries are masked.
        keep: bool mask broadcastable to ``scores`` (True = keep), or ``None``.
        sink: logits broadcastable to ``scores[..., :1]`` that join every row's denominator with a zero value
            (attention sinks), or ``None``.
        finite_rows: the caller guarantees that every row has a finite maximum (nothing masked, no ``-inf``
            score): the guards for empty rows are skipped (six kernels fewer, the same result).

    Returns:
        ``(probs, lse)``: probabilities shaped like ``scores`` (rows sum to ``1 - sink mass``; all-zero where
        nothing is kept) and the row log-sum-exp ``(...,)`` including the sink (``-inf`` for a row with no key
        and no sink). Gradients of both are finite everywhere.
    """
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    if sink is not None:
        sink = sink.to(scores.dtype).expand_as(row_max) if sink.dim() else sink.to(scores.dtype)
        row_max = torch.maximum(row_max, sink)
    if not finite_rows:
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    row_max = row_max.detach()
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink - row_max)
    if finite_rows:  # every total is >= 1 (the maximum's own term)
        return exp / total, (row_max + torch.log(total)).squeeze(-1)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    probs = exp / safe_total
    lse = torch.where(nonempty, row_max + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return probs, lse.squeeze(-1)


class TileSetup:
    """The terms of one call, prepared once and evaluated per tile (see the module docstring).

    Args:
        spec: the validated call.
        positional: evaluate ``is_causal``/``window_size`` per tile (False when the schedule's layout already
            applies them exactly).
        block_mask_elements: evaluate ``spec.block_mask`` per tile (False when the layout applies it).

    Attributes:
        plain: the scores are ``scale · q kᵀ`` alone: no mask, bias, ALiBi, sink, softcap, ``score_mod``,
            ``mask_mod``, block mask, ``is_causal`` or ``window_size`` (:meth:`masked_logits` changes nothing
            and :meth:`tile_probs` is one softmax).
    """

    def __init__(self, spec: AttentionSpec, *, positional: bool = True, block_mask_elements: bool = True):
        q = spec.query
        self.spec = spec
        self.acc = lse_dtype(q.dtype)
        self.B = math.prod(spec.batch_shape)
        self.H, self.Hkv = spec.num_heads, spec.num_kv_heads
        self.G = self.H // self.Hkv
        self.q_len, self.kv_len = spec.q_len, spec.kv_len
        self.offset = bottom_right_offset(spec.q_len, spec.kv_len)
        self.scale, self.softcap, self.score_mod = spec.scale, spec.softcap, spec.score_mod
        self.mask_mod = spec.mask_mod
        self.block_mask = spec.block_mask if block_mask_elements else None
        self.positional = positional and (spec.is_causal or spec.window_size is not None)
        self.dropout_p = spec.dropout_p
        self.biases: list[tuple[Tensor, Tensor]] = []  # (original, 4-D float view)
        self.bool_masks: list[Tensor] = []
        for t in (spec.attn_bias, spec.attn_mask):
            if t is None:
                continue
            if t.dtype == torch.bool:
                self.bool_masks.append(flatten_batch(t, spec))
            else:
                self.biases.append((t, flatten_batch(t, spec)))
        self.alibi = self._per_head(spec.alibi_slopes)
        self.sink = self._per_head(spec.sinks)
        self.plain = not (self.biases or self.bool_masks or spec.is_causal or spec.window_size is not None) and all(
            term is None
            for term in (self.alibi, self.sink, self.softcap, self.score_mod, self.mask_mod, spec.block_mask)
        )
        self._mod_index: tuple[Tensor, Tensor] | None = None

    @property
    def mod_index(self) -> tuple[Tensor, Tensor]:
        """``(b_idx (B, 1, 1, 1, 1, 1), h_idx (1, Hkv, 1, G, 1, 1))``: the batch and query-head indices passed to
        ``score_mod``/``mask_mod``, built on first use (most calls have neither)."""
        if self._mod_index is None:
            dev = self.spec.query.device
            b_idx = torch.arange(self.B, device=dev).view(-1, 1, 1, 1, 1, 1)
            h_idx = torch.arange(self.H, device=dev).view(1, self.Hkv, 1, self.G, 1, 1)
            self._mod_index = (b_idx, h_idx)
        return self._mod_index

    def _per_head(self, t: Tensor | None) -> Tensor | None:
        """``(H,)`` or ``(B..., H)`` as ``(B', Hkv, 1, G, 1, 1)`` in the accumulation dtype (autograd kept)."""
        if t is None:
            return None
        t = flatten_batch(t.to(self.acc)[..., None, None], self.spec)[..., 0, 0]  # (B', H)
        return t.reshape(t.shape[0], self.Hkv, 1, self.G, 1, 1)

    # ---------------------------------------------------------------------------------------------- scores
    def prepare_query(self, q: Tensor) -> Tensor:
        """Queries in the accumulation dtype, multiplied by ``scale`` (the one place the scale is applied)."""
        return (q if q.dtype == self.acc else q.to(self.acc)) * self.scale

    def prepare_kv(self, t: Tensor) -> Tensor:
        """Keys or values in the accumulation dtype (scores and outputs are never formed in fp16/bf16)."""
        return t if t.dtype == self.acc else t.to(self.acc)

    def logits(self, qt: Tensor, kt: Tensor, n: int, r: int) -> Tensor:
        """Scaled scores ``(B, Hkv, N, G, r, c)`` of prepared ``qt (B, Hkv, N, G·r, D)``, ``kt (B, Hkv, N, c, D)``
        or ``(B, Hkv, 1, c, D)`` keys shared by the ``N`` blocks (then one matmul over all ``N·G·r`` rows)."""
        B, H, N, m, D = qt.shape
        if kt.shape[2] == 1 and N > 1:
            s = torch.matmul(qt.reshape(B, H, 1, N * m, D), kt.transpose(-1, -2))
        else:
            s = torch.matmul(qt, kt.transpose(-1, -2))
        return s.view(B, H, n, self.G, r, s.shape[-1])

    def _mod_indices(self, ti: TileIndex) -> tuple[Tensor, Tensor]:
        n, r = ti.q_idx.shape
        c = ti.kv_idx.shape[1]
        qi = ti.q_idx.clamp(max=self.q_len - 1).view(1, 1, n, 1, r, 1)
        ki = ti.kv_idx.clamp(max=self.kv_len - 1).view(1, 1, n, 1, 1, c)
        return qi, ki

    def transform(self, s: Tensor, ti: TileIndex, *, inplace: bool = False) -> Tensor:
        """``softcap`` then ``score_mod`` on scaled scores ``(B, Hkv, N, G, r, c)`` (autograd-friendly;
        ``inplace``: ``s`` may be overwritten)."""
        if self.softcap is not None:
            s = (
                s.div_(self.softcap).tanh_().mul_(self.softcap)
                if inplace
                else torch.tanh(s / self.softcap) * self.softcap
            )
        if self.score_mod is not None:
            qi, ki = self._mod_indices(ti)
            s = call_score_mod(self.score_mod, s, *self.mod_index, qi, ki)
        return s

    def transform_grad(self, s_raw: Tensor, s_mod: Tensor, ds: Tensor) -> Tensor:
        """Gradient w.r.t. the scaled scores given ``ds`` w.r.t. ``transform``'s output (no score_mod)."""
        if self.softcap is not None:
            return ds * (1.0 - (s_mod / self.softcap) ** 2)
        return ds

    def _dense_tile(self, t4: Tensor, ti: TileIndex) -> Tensor:
        """Entries of a ``(B', H', Lq', Lk')`` term at the tile, broadcastable to ``(B, Hkv, N, G, r, c)``."""
        _bp, hp, lq, lk = t4.shape
        if ti.q_range is not None and ti.kv_range is not None:
            rows = slice(*ti.q_range) if lq > 1 else slice(None)
            cols = slice(*ti.kv_range) if lk > 1 else slice(None)
            t = t4[:, :, rows, cols].unsqueeze(2)  # (B', H', 1, r', c')
        else:
            qi = ti.q_idx.clamp(max=lq - 1) if lq > 1 else ti.q_idx[:, :1] * 0
            ki = ti.kv_idx.clamp(max=lk - 1) if lk > 1 else ti.kv_idx[:, :1] * 0
            t = t4[:, :, qi[:, :, None], ki[:, None, :]]  # (B', H', N, r', c')
        if hp == 1:
            return t.unsqueeze(3)
        return t.unflatten(1, (self.Hkv, self.G)).transpose(2, 3)

    def terms(self, ti: TileIndex) -> tuple[Tensor | None, Tensor | None]:
        """``(bias, keep)`` of the tile: float additive term and bool mask, broadcastable, or ``None``."""
        n, r = ti.q_idx.shape
        c = ti.kv_idx.shape[1]
        bias = None
        for _, t4 in self.biases:
            t = self._dense_tile(t4, ti).to(self.acc)
            bias = t if bias is None else bias + t
        if self.alibi is not None:
            dist = (ti.q_idx[:, :, None] + self.offset - ti.kv_idx[:, None, :]).abs().to(self.acc)
            t = -self.alibi * dist.view(1, 1, n, 1, r, c)
            bias = t if bias is None else bias + t
        keep = None
        if self.positional and not ti.in_band:
            if ti.q_range is not None and ti.kv_range is not None:
                keep = positional_mask(
                    self.q_len,
                    self.kv_len,
                    is_causal=self.spec.is_causal,
                    window_size=self.spec.window_size,
                    device=ti.q_idx.device,
                    q_range=ti.q_range,
                    kv_range=ti.kv_range,
                )
                keep = None if keep is None else keep.view(1, 1, 1, 1, r, c)
            elif ti.uniform:
                keep = self._positional_gathered(TileIndex(ti.q_idx[:1], ti.kv_idx[:1])).view(1, 1, 1, 1, r, c)
            else:
                keep = self._positional_gathered(ti).view(1, 1, n, 1, r, c)
        for t4 in self.bool_masks:
            m = self._dense_tile(t4, ti)
            keep = m if keep is None else keep & m
        if self.mask_mod is not None:
            qi, ki = self._mod_indices(ti)
            m = call_mask_mod(self.mask_mod, *self.mod_index, qi, ki)
            keep = m if keep is None else keep & m
        if self.block_mask is not None:
            m = self.block_mask.element_mask(ti.q_idx[:, :, None], ti.kv_idx[:, None, :]).view(1, 1, n, 1, r, c)
            keep = m if keep is None else keep & m
        return bias, keep

    def _positional_gathered(self, ti: TileIndex) -> Tensor:
        left, right = effective_window(self.spec.is_causal, self.spec.window_size)
        return band_keep(ti.kv_idx[:, None, :] - (ti.q_idx[:, :, None] + self.offset), left, right)

    def masked_logits(self, s_raw: Tensor, ti: TileIndex, extra_keep: Tensor | None = None) -> Tensor:
        """The tile's final logits: ``transform`` + bias, ``-inf`` where not kept (``extra_keep`` and-ed in).

        ``s_raw`` (fresh scores from :meth:`logits`) is consumed: without autograd it is overwritten in place
        (up to a ``score_mod``, whose result may alias other tensors)."""
        inplace = not s_raw.requires_grad
        s = self.transform(s_raw, ti, inplace=inplace)
        inplace = inplace and self.score_mod is None
        bias, keep = self.terms(ti)
        if extra_keep is not None:
            keep = extra_keep if keep is None else keep & extra_keep
        if bias is not None:
            s = s.add_(bias) if inplace else s + bias
        if keep is not None:
            s = s.masked_fill_(~keep, float("-inf")) if inplace else s.masked_fill(~keep, float("-inf"))
        return s

    def tile_probs(self, s: Tensor, *, lse: bool = True) -> tuple[Tensor, Tensor | None]:
        """Softmax of final logits ``(B, Hkv, N, G, r, c)`` over the whole key axis, with this call's sinks.

        Returns ``(probs, lse)`` as :func:`masked_softmax` (``lse`` ``None`` when not asked for). For a
        :attr:`plain` call (no mask, bias, ALiBi, sink, softcap or mods: no ``-inf`` and every row has its keys)
        :func:`masked_softmax` needs no guards for empty rows, and without ``lse`` it is ``torch.softmax``: one
        kernel instead of about a dozen, most of the cost of short calls.
        """
        if self.plain and not lse:
            return torch.softmax(s, -1), None
        probs, row_lse = masked_softmax(s, None, self.sink, finite_rows=self.plain)
        return probs, (row_lse if lse else None)

    # ---------------------------------------------------------------------------------------------- grads
    def bias_grad_buffers(self) -> list[Tensor | None]:
        """Zero accumulators for the float terms that require grad (``None`` for the others)."""
        return [
            torch.zeros(t4.shape, dtype=self.acc, device=t4.device) if orig.requires_grad else None
            for orig, t4 in self.biases
        ]

    def accumulate_bias_grad(self, buffers: list[Tensor | None], ds: Tensor, ti: TileIndex) -> None:
        """Add the tile's score gradient ``ds (B, Hkv, N, G, r, c)`` into each buffer's entries."""
        for buf, (_, t4) in zip(buffers, self.biases):
            if buf is None:
                continue
            bp, hp, lq, lk = t4.shape
            d = ds.sum((1, 3), keepdim=True).squeeze(3) if hp == 1 else ds.transpose(2, 3).flatten(1, 2)
            if bp == 1:
                d = d.sum(0, keepdim=True)
            if lq == 1:
                d = d.sum(3, keepdim=True)
            if lk == 1:
                d = d.sum(4, keepdim=True)  # d: (B', H', N, r', c')
            if ti.q_range is not None and ti.kv_range is not None:
                rows = slice(*ti.q_range) if lq > 1 else slice(None)
                cols = slice(*ti.kv_range) if lk > 1 else slice(None)
                buf[:, :, rows, cols] += d[:, :, 0]
                continue
            n = ti.q_idx.shape[0]
            qi = ti.q_idx.clamp(max=lq - 1) if lq > 1 else ti.q_idx[:, :1] * 0
            ki = ti.kv_idx.clamp(max=lk - 1) if lk > 1 else ti.kv_idx[:, :1] * 0
            dev = buf.device
            index = (
                torch.arange(bp, device=dev).view(-1, 1, 1, 1, 1),
                torch.arange(hp, device=dev).view(1, -1, 1, 1, 1),
                qi.view(1, 1, n, -1, 1),
                ki.view(1, 1, n, 1, -1),
            )
            buf.index_put_(index, d, accumulate=True)

    def bias_grads(self, buffers: list[Tensor | None]) -> list[Tensor | None]:
        """The accumulated buffers reshaped and reduced to the shapes of the original tensors."""
        grads = []
        batch = tuple(self.spec.batch_shape)
        nd = self.spec.query.ndim
        for buf, (orig, _) in zip(buffers, self.biases):
            if buf is None:
                grads.append(None)
                continue
            padded = (1,) * (nd - orig.ndim) + tuple(orig.shape)
            if buf.shape[0] == 1:
                g = buf.reshape((1,) * len(batch) + tuple(buf.shape[1:]))
            else:
                g = buf.reshape(batch + tuple(buf.shape[1:]))
            grads.append(g.sum_to_size(padded).reshape(orig.shape).to(orig.dtype))
        return grads


def whole(spec: AttentionSpec) -> TileIndex:
    """The one tile covering the whole call."""
    return TileIndex.rect((0, spec.q_len), (0, spec.kv_len), spec.query.device)


def reshape_qkv(spec: AttentionSpec) -> tuple[Tensor, Tensor, Tensor]:
    """``q5 (B, Hkv, G, Lq, D)``, ``k4 (B, Hkv, Lk, D)``, ``v4 (B, Hkv, Lk, Dv)`` with the batch dims flattened."""
    B = math.prod(spec.batch_shape)
    hkv = spec.num_kv_heads
    q5 = spec.query.reshape(B, hkv, spec.num_heads // hkv, spec.q_len, spec.query.shape[-1])
    k4 = spec.key.reshape(B, hkv, spec.kv_len, spec.key.shape[-1])
    v4 = spec.value.reshape(B, hkv, spec.kv_len, spec.value.shape[-1])
    return q5, k4, v4
