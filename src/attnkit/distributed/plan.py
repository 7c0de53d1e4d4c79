"""Which (query rows x key rows) blocks a rank computes, and how each is expressed as an :func:`attnkit.attention`
call whose masks, windows and ALiBi use **global** positions.

A rank's queries and a key/value block are each one or two runs of global positions (:mod:`.layout`). For a
pair of runs ``[qs, qe) x [ks, ke)`` the plan first trims both to the rectangle the causal/window band and the
``block_mask`` layout can reach (an empty rectangle: the pair is skipped, and if every pair of two ranks is
skipped their key/value blocks are never sent). The rectangle's call then needs the global masks in its own
coordinates. :func:`attnkit.attention` aligns ``Lq`` and ``Lk`` bottom-right: local row ``i`` sits at key ``i +
Lk - Lq``, so a global difference ``d = j_g - i_g`` equals the local one plus ``c = k1 - q1`` (the difference of
the two runs' ends). A band ``-left <= d <= right`` is therefore the local window ``(left + c, right - c)`` when
both sides stay ``>= 0`` (or unbounded), ALiBi ``|d|`` is the native term when ``c = 0``, and everything else
(windows cut on both sides, ALiBi off the diagonal, a user's ``mask_mod``/``score_mod``/``block_mask``) becomes
a FlexAttention-style closure adding the runs' global offsets. Native terms keep the fast kernels (SDPA's causal
path, the block-sparse window); closures are exact everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit.distributed.layout import Segment
from attnkit.functional.masks import effective_window

__all__ = ["GlobalOptions", "SubCall", "pair_needed", "plan_pair"]

_INF = 1 << 62


@dataclass(frozen=True)
class GlobalOptions:
    """The options of a context-parallel call, in global positions (``seq_len`` = ``L`` of the whole sequence)."""

    seq_len: int
    is_causal: bool = False
    window_size: tuple[int, int] | None = None
    alibi_slopes: Tensor | None = None
    softcap: float | None = None
    scale: float | None = None
    mask_mod: Callable[..., Tensor] | None = None
    score_mod: Callable[..., Tensor] | None = None
    block_mask: object = None

    @property
    def band(self) -> tuple[int, int] | None:
        """``(lo, hi)`` bounds of ``d = j - i`` (``±2^62`` = unbounded), or ``None`` without causal/window."""
        if not self.is_causal and self.window_size is None:
            return None
        left, right = effective_window(self.is_causal, self.window_size)
        return (-_INF if left == -1 else -left), (_INF if right == -1 else right)


@dataclass
class SubCall:
    """One :func:`attnkit.attention` call of a step: local query rows ``q`` x local key rows ``kv``."""

    q: tuple[int, int]
    kv: tuple[int, int]
    kwargs: dict = field(default_factory=dict)


def _trim(opts: GlobalOptions, qseg: Segment, kseg: Segment) -> tuple[int, int, int, int] | None:
    """The global rectangle ``(q0, q1, k0, k1)`` of the pair that may hold an allowed pair, or ``None``."""
    q0, q1, k0, k1 = qseg.start, qseg.stop, kseg.start, kseg.stop
    band = opts.band
    if band is not None:
        lo, hi = band
        k0, k1 = max(k0, q0 + lo), min(k1, q1 - 1 + hi + 1)
        q0, q1 = max(q0, kseg.start - hi), min(q1, kseg.stop - 1 - lo + 1)
        if k0 >= k1 or q0 >= q1:
            return None
    bm = opts.block_mask
    if bm is not None:
        bs = bm.block_size
        vis = bm.visited[q0 // bs : (q1 - 1) // bs + 1, k0 // bs : (k1 - 1) // bs + 1]
        rows, cols = vis.any(1).nonzero().flatten(), vis.any(0).nonzero().flatten()
        if rows.numel() == 0:
            return None
        qb0, kb0 = q0 // bs, k0 // bs
        q0, q1 = max(q0, (qb0 + int(rows[0])) * bs), min(q1, (qb0 + int(rows[-1]) + 1) * bs)
        k0, k1 = max(k0, (kb0 + int(cols[0])) * bs), min(k1, (kb0 + int(cols[-1]) + 1) * bs)
    return q0, q1, k0, k1


def pair_needed(opts: GlobalOptions, q_segs: list[Segment], kv_segs: list[Segment]) -> bool:
    """Whether any query of ``q_segs`` may attend to any key of ``kv_segs`` (cheap: no element masks)."""
    return any(_trim(opts, qs, ks) is not None for qs in q_segs for ks in kv_segs)


def _shift_mask_mod(fn, q0: int, k0: int):
    return lambda b, h, q_idx, kv_idx: fn(b, h, q_idx + q0, kv_idx + k0)


def _shift_score_mod(fn, q0: int, k0: int):
    return lambda score, b, h, q_idx, kv_idx: fn(score, b, h, q_idx + q0, kv_idx + k0)


def _band_mask_mod(lo: int, hi: int, q0: int, k0: int):
    def mask_mod(b, h, q_idx, kv_idx):
        d = (kv_idx + k0) - (q_idx + q0)
        return (d >= lo) & (d <= hi)

    return mask_mod


def _alibi_score_mod(slopes: Tensor, q0: int, k0: int):
    """``score - slope[b, h] · |i_g - j_g|`` (Press et al. 2022 with FlashAttention's symmetric distance)."""
    table = slopes.detach().reshape(-1, slopes.shape[-1]).float()  # (B' in {1, B}, H)

    def score_mod(score, b, h, q_idx, kv_idx):
        slope = table[b if table.shape[0] > 1 else torch.zeros_like(b), h]
        dist = ((q_idx + q0) - (kv_idx + k0)).abs()
        return score - (slope * dist).to(score.dtype)

    return score_mod


def _and(a, b):
    if a is None or b is None:
        return b if a is None else a
    return lambda bb, h, q, k: a(bb, h, q, k) & b(bb, h, q, k)


def _sub_block_mask(opts: GlobalOptions, q0: int, q1: int, k0: int, k1: int, cache: dict):
    """The user's global ``block_mask`` restricted to the rectangle: a :class:`BlockMask` when the rectangle is
    block-aligned (the block-sparse backend then skips its empty blocks), else ``None`` and a ``mask_mod``."""
    from attnkit.sparse import BlockMask

    bm, length = opts.block_mask, opts.seq_len
    bs = bm.block_size
    aligned = q0 % bs == 0 and k0 % bs == 0 and (q1 % bs == 0 or q1 == length) and (k1 % bs == 0 or k1 == length)
    mod = _shift_mask_mod(bm.mask_mod, q0, k0)
    if not aligned:
        return None, mod
    key = (id(bm), q0, q1, k0, k1)
    if key not in cache:
        vis = bm.visited[q0 // bs : -(-q1 // bs), k0 // bs : -(-k1 // bs)]
        full = bm.full[q0 // bs : -(-q1 // bs), k0 // bs : -(-k1 // bs)]
        cache[key] = BlockMask(
            mod, q1 - q0, k1 - k0, block_size=bs, visited=vis, full=full, description=f"{bm.description}[rect]"
        )
    return cache[key], None


def plan_pair(
    opts: GlobalOptions, q_segs: list[Segment], kv_segs: list[Segment], cache: dict | None = None
) -> list[SubCall]:
    """The calls that compute a rank's queries (``q_segs``) against one key/value block (``kv_segs``).

    Returns:
        a list of :class:`SubCall` (empty when no query may attend to any key of the block); adjacent plain
        calls (no mask, no position-dependent term) are fused into one.
    """
    cache = {} if cache is None else cache
    calls: list[SubCall] = []
    for qseg in q_segs:
        for kseg in kv_segs:
            rect = _trim(opts, qseg, kseg)
            if rect is None:
                continue
            q0, q1, k0, k1 = rect
            calls.append(_sub_call(opts, qseg, kseg, q0, q1, k0, k1, cache))
    return _fuse(calls)


def _sub_call(opts, qseg, kseg, q0, q1, k0, k1, cache) -> SubCall:
    kwargs: dict = {}
    mask_mod = score_mod = None
    c = k1 - q1  # global d = local d + c
    band = opts.band
    if band is not None:
        lo, hi = band
        dmin, dmax = k0 - (q1 - 1), (k1 - 1) - q0
        if dmin < lo or dmax > hi:  # the band cuts the rectangle
            left = -1 if lo == -_INF else -lo + c
            right = -1 if hi == _INF else hi - c
            # a side reaching past the rectangle (local d spans [-(Lk - 1), Lq - 1]) is unbounded: plain causal
            # blocks then keep the fused kernels
            if left >= k1 - k0 - 1:
                left, lo = -1, -_INF
            if right >= q1 - q0 - 1:
                right, hi = -1, _INF
            if left >= -1 and right >= -1 and (left != -1 or lo == -_INF) and (right != -1 or hi == _INF):
                if left == -1 and right == 0:
                    kwargs["is_causal"] = True
                else:
                    kwargs["window_size"] = (left, right)
            else:
                mask_mod = _band_mask_mod(lo, hi, q0, k0)
    if opts.mask_mod is not None:
        mask_mod = _and(mask_mod, _shift_mask_mod(opts.mask_mod, q0, k0))
    if opts.block_mask is not None:
        sub, mod = _sub_block_mask(opts, q0, q1, k0, k1, cache)
        if sub is not None:
            kwargs["block_mask"] = sub
        mask_mod = _and(mask_mod, mod)
    if opts.score_mod is not None:
        score_mod = _shift_score_mod(opts.score_mod, q0, k0)
    if opts.alibi_slopes is not None:
        if c == 0 and q0 - k0 == (k1 - k0) - (q1 - q0):
            kwargs["alibi_slopes"] = opts.alibi_slopes
        else:
            alibi = _alibi_score_mod(opts.alibi_slopes, q0, k0)
            user = score_mod
            score_mod = alibi if user is None else (lambda s, b, h, q, k: alibi(user(s, b, h, q, k), b, h, q, k))
    if mask_mod is not None:
        kwargs["mask_mod"] = mask_mod
    if score_mod is not None:
        kwargs["score_mod"] = score_mod
    q_local = qseg.local + (q0 - qseg.start)
    k_local = kseg.local + (k0 - kseg.start)
    return SubCall((q_local, q_local + q1 - q0), (k_local, k_local + k1 - k0), kwargs)


def _fuse(calls: list[SubCall]) -> list[SubCall]:
    """Fuse plain calls that share their query rows and have adjacent key rows, then the converse."""
    for same, adj in (("q", "kv"), ("kv", "q")):
        out: list[SubCall] = []
        for call in calls:
            prev = out[-1] if out else None
            if (
                prev is not None
                and not prev.kwargs
                and not call.kwargs
                and getattr(prev, same) == getattr(call, same)
                and getattr(prev, adj)[1] == getattr(call, adj)[0]
            ):
                rng = (getattr(prev, adj)[0], getattr(call, adj)[1])
                out[-1] = SubCall(prev.q if same == "q" else rng, rng if same == "q" else prev.kv)
            else:
                out.append(call)
        calls = out
    return calls
