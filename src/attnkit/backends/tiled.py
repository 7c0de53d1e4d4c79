"""The ``"tiled"`` backend: exact attention with FlashAttention's online softmax, never holding ``Lq x Lk``.

Queries are cut into blocks of ``block_q`` rows; each block's key span is its causal/sliding-window band
(keys outside it are never loaded or computed: a causal call does about half the work of a dense one, a window
of ``w`` keys costs ``O(L · (w + block_q))``). Consecutive blocks are batched into steps (sizes from a memory
budget, :mod:`attnkit.backends.flash_core`): one gather of their key/value rows, one batched matmul over every
head and block (grouped-query heads share their key/value head without copies), all of
:func:`attnkit.attention`'s terms applied by :class:`~attnkit.functional.tiles.TileSetup` (``softcap``,
``score_mod``, ``attn_bias``, ALiBi, masks, ``mask_mod``, ``block_mask``), and the online softmax across key
chunks. Calls whose terms reduce to a shared keep-mask run each step as one fused CPU flash-attention kernel
(:mod:`attnkit.backends.flash_fused`; bfloat16/float16 matmuls stay in that dtype there, the softmax in
float32); the others run the explicit online softmax in float32 (float64 for float64), with bfloat16/float16
inputs converted to float32 first: PyTorch's CPU matmuls have no low-precision-in, float32-out form
(``aten::bmm.dtype`` is CUDA-only in torch 2.13), and rounding the scores themselves to bfloat16 would cost up to
about 0.1 at ``|s| ≈ 30``, a 10% error in ``exp(s)`` (FlashAttention accumulates ``q kᵀ`` in float32). Extra memory:
``O((Lq + Lk) · D)`` plus one step, independent of ``Lq · Lk``. The backward pass recomputes each step from the
saved log-sum-exp. Schedules (steps, index tensors, the fused path's shared step masks) are cached per call
geometry (:func:`cached_schedule`): a repeated window call at L = 16384 dispatches 50 aten operations forward
(16 of them computing), against 193 when everything is rebuilt, which matters most on a shared CPU where each
operation waits at an OpenMP barrier.

References:
    Dao, Fu, Ermon, Rudra, Ré 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
    IO-Awareness", Alg. 1-2; Dao 2023, "FlashAttention-2", Alg. 1-2. Online softmax: Milakov & Gimelshein 2018.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from attnkit.backends import flash_core
from attnkit.backends.flash_core import (
    Step,
    blocks_per_step,
    check_alibi_grad,
    make_chunk,
)
from attnkit.backends.flash_fused import run
from attnkit.functional.masks import bottom_right_offset, effective_window
from attnkit.functional.registry import ALL_OPTIONS, Backend, register
from attnkit.functional.spec import AttentionSpec
from attnkit.functional.tiles import TileSetup

__all__ = ["Geometry", "TiledSchedule", "cached_schedule", "tiled_attention"]

#: Query rows per block: 256 for bounded sliding windows (measured at L = 16384, window ±256: 274 ms float32 and
#: 114 ms bfloat16 with 256 rows, 321 / 147 with 128, 331 / 215 with 64), 64 when the window is narrower than 256
#: keys (a block's key span is ``block + left + right``), 128 otherwise.
BLOCK_Q = 128
WINDOW_BLOCK_Q = 256
#: Largest key chunk of the explicit path (the fused path takes a block's whole key span at once).
MAX_BLOCK_KV = 512
#: Auto picks "tiled" over "math" once math's float32 score matrix would exceed this many bytes.
AUTO_MIN_SCORE_BYTES = 32 << 20


def kv_bounds(spec: AttentionSpec | Geometry, q0: int, q1: int) -> tuple[int, int]:
    """Key range ``[lo, hi)`` that query rows ``[q0, q1)`` may attend under ``is_causal``/``window_size``."""
    left, right = effective_window(spec.is_causal, spec.window_size)
    off = bottom_right_offset(spec.q_len, spec.kv_len)
    lo = 0 if left == -1 else max(0, q0 + off - left)
    hi = spec.kv_len if right == -1 else min(spec.kv_len, q1 - 1 + off + right + 1)
    return lo, max(lo, hi)


def block_sizes(spec: AttentionSpec) -> tuple[int, int]:
    """``(block_q, block_kv)``: query rows per block and key columns per chunk of the explicit path."""
    block_q = BLOCK_Q
    if spec.window_size is not None and -1 not in spec.window_size:
        block_q = min(block_q, 64) if sum(spec.window_size) < 256 else max(block_q, WINDOW_BLOCK_Q)
    return max(1, min(spec.q_len, block_q)), max(1, min(spec.kv_len, MAX_BLOCK_KV))


class Geometry(NamedTuple):
    """What a :class:`TiledSchedule` depends on (no tensors: schedules are cached across calls)."""

    q_len: int
    kv_len: int
    is_causal: bool
    window_size: tuple[int, int] | None
    heads: int  # batch x query heads
    head_dim: int
    itemsize: int
    device: torch.device

    @classmethod
    def of(cls, spec: AttentionSpec) -> Geometry:
        q = spec.query
        heads = max(1, math.prod(q.shape[:-2]))
        return cls(
            spec.q_len, spec.kv_len, spec.is_causal, spec.window_size, heads, q.shape[-1], q.element_size(), q.device
        )


#: Schedules kept for reuse: a call's steps, index tensors and step masks depend only on its geometry, so
#: repeated calls (every layer of a model, every training step) issue no operations to build them. At most
#: SCHEDULE_CACHE_SIZE schedules and SCHEDULE_CACHE_BYTES of their tensors are kept, least recently used first out
#: (a window ±256 schedule at L = 16384 holds 0.9 MiB).
SCHEDULE_CACHE_SIZE = 32
SCHEDULE_CACHE_BYTES = 64 << 20
_SCHEDULES: OrderedDict[tuple, tuple[TiledSchedule, int]] = OrderedDict()
_SCHEDULES_LOCK = threading.Lock()


def cached_schedule(spec: AttentionSpec, block_q: int, block_kv: int, *, fused: bool) -> TiledSchedule:
    """The :class:`TiledSchedule` of ``spec``'s geometry, built once per geometry, block sizes and step budgets."""
    budgets = (flash_core.STEP_SCORES, flash_core.FUSED_STEP_BYTES, flash_core.MIN_STEPS)
    key = (Geometry.of(spec), block_q, block_kv, fused, budgets)
    with _SCHEDULES_LOCK:
        found = _SCHEDULES.get(key)
        if found is not None:
            _SCHEDULES.move_to_end(key)
            return found[0]
    sched = TiledSchedule(spec, block_q, block_kv, fused=fused)
    size = sched.nbytes()
    if size > SCHEDULE_CACHE_BYTES // 4:
        return sched
    with _SCHEDULES_LOCK:
        _SCHEDULES[key] = (sched, size)
        while len(_SCHEDULES) > SCHEDULE_CACHE_SIZE or sum(n for _, n in _SCHEDULES.values()) > SCHEDULE_CACHE_BYTES:
            _SCHEDULES.popitem(last=False)
    return sched


class TiledSchedule:
    """Consecutive query blocks of ``block_q`` rows, batched into steps; each block's key span is its
    causal/window band (keys outside it are never loaded), walked in chunks of ``block_kv`` columns
    (one chunk per step on the fused path). Holds no reference to the call's tensors (:class:`Geometry`)."""

    def __init__(self, spec: AttentionSpec | Geometry, block_q: int, block_kv: int, *, fused: bool = False):
        geo = spec if isinstance(spec, Geometry) else Geometry.of(spec)
        self.spec, self.block_q, self.block_kv, self.fused = geo, block_q, block_kv, fused
        self.num_q_blocks = -(-geo.q_len // block_q)
        self._steps: list[Step] | None = None

    def nbytes(self) -> int:
        """Bytes held by the steps' index tensors and masks (builds the steps)."""
        tensors = []
        for st in self.steps():
            tensors.append(st.q_blocks)
            for ch in st.chunks:
                tensors += [ch.index.q_idx, ch.index.kv_idx, ch.gather] + ([ch.keep] if ch.keep is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def steps(self) -> list[Step]:
        if self._steps is not None:
            return self._steps
        spec, r, nq = self.spec, self.block_q, self.num_q_blocks
        dev = spec.device
        bounds = [kv_bounds(spec, i * r, min((i + 1) * r, spec.q_len)) for i in range(nq)]
        widest = max(hi - lo for lo, hi in bounds)
        heads = spec.heads
        left, right = effective_window(spec.is_causal, spec.window_size)
        varying = (left == -1) != (right == -1)  # band widths grow along the rows (causal): keep steps short
        if self.fused:
            cols = widest
            cost = 2 * heads * widest * spec.head_dim * spec.itemsize
            n = blocks_per_step(nq, cost, fused=True, varying=varying)
        else:
            cols = min(widest, self.block_kv)
            n = blocks_per_step(nq, heads * r * cols, fused=False, varying=varying)
        offs = torch.arange(r, device=dev)
        steps = []
        for s0, s1, uniform in self._runs(bounds, widest, n):
            width = max(bounds[i][1] - bounds[i][0] for i in range(s0, s1))
            if width == 0:
                continue  # rows with no key: output 0, lse -inf
            q_blocks = torch.arange(s0, s1, device=dev)
            q_idx = q_blocks[:, None] * r + offs  # (N, r)
            starts = [bounds[i][0] for i in range(s0, s1)]
            lo = torch.tensor(starts, device=dev)[:, None]
            step = Step(q_blocks, s0)
            stride = starts[1] - starts[0] if len(starts) > 1 else 0
            evenly = all(b - a == stride for a, b in itertools.pairwise(starts))
            for c0 in range(0, width, cols or 1):
                c1 = min(width, c0 + cols)
                kv_idx = lo + torch.arange(c0, c1, device=dev)  # (N, c): past hi is masked
                band = self._in_band(bounds, s0, s1, c0, c1)
                slide = (starts[0] + c0, stride) if evenly and stride >= 0 else None
                step.chunks.append(make_chunk(q_idx, kv_idx, spec.kv_len, uniform=uniform, in_band=band, slide=slide))
            steps.append(step)
        self._steps = steps
        return steps

    def _in_band(self, bounds: list[tuple[int, int]], s0: int, s1: int, c0: int, c1: int) -> bool:
        """Whether columns ``[lo + c0, lo + c1)`` of every block ``s0 <= i < s1`` lie inside the causal/window
        band for all of the block's rows (then the band needs no mask there)."""
        spec, r = self.spec, self.block_q
        left, right = effective_window(spec.is_causal, spec.window_size)
        off = bottom_right_offset(spec.q_len, spec.kv_len)
        for i in range(s0, s1):
            lo = bounds[i][0]
            q0, q1 = i * r, (i + 1) * r  # padded rows included: their output is discarded anyway
            if left != -1 and lo + c0 - (q1 - 1) - off < -left:
                return False
            if right != -1 and lo + c1 - 1 - q0 - off > right:
                return False
        return True

    def _runs(self, bounds: list[tuple[int, int]], widest: int, n: int) -> list[tuple[int, int, bool]]:
        """``(first, stop, uniform)`` block ranges of at most ``n`` blocks. A window's interior blocks (key span
        not clipped by either end of the sequence) share one relative layout and run as ``uniform`` steps."""
        spec, r = self.spec, self.block_q
        left, _ = effective_window(spec.is_causal, spec.window_size)
        off = bottom_right_offset(spec.q_len, spec.kv_len)

        def interior(i: int) -> bool:
            lo = bounds[i][0]
            return left != -1 and lo == i * r + off - left and lo + widest <= spec.kv_len and (i + 1) * r <= spec.q_len

        runs, i = [], 0
        while i < self.num_q_blocks:
            kind = interior(i)
            j = i + 1
            while j < self.num_q_blocks and j - i < n and interior(j) == kind:
                j += 1
            runs.append((i, j, kind))
            i = j
        return runs


def tiled_attention(
    spec: AttentionSpec, *, block_q: int | None = None, block_kv: int | None = None
) -> tuple[Tensor, None, Tensor | None]:
    """Run ``spec`` with the FlashAttention algorithm (see the module docstring).

    Args:
        spec: the validated call.
        block_q: query rows per block; default from :func:`block_sizes`.
        block_kv: key columns per chunk of the explicit path; default from :func:`block_sizes`.

    Returns:
        ``(output, None, lse or None)``.
    """
    bq, bk = block_sizes(spec)
    setup = TileSetup(spec)
    out, lse = run(setup, lambda fused: cached_schedule(spec, block_q or bq, block_kv or bk, fused=fused))
    return out, None, (lse if spec.return_lse else None)


def _fit(spec: AttentionSpec) -> str | None:
    score_bytes = 4 * spec.query[..., 0].numel() * spec.kv_len
    if score_bytes < AUTO_MIN_SCORE_BYTES:
        return (
            f"the score matrix is small ({score_bytes / 2**20:.1f} MiB < {AUTO_MIN_SCORE_BYTES >> 20} MiB), "
            f"so materializing it (math) is faster than tiling"
        )
    return None


TILED = register(
    Backend(
        name="tiled",
        forward=tiled_attention,
        options=ALL_OPTIONS - {"return_weights"},
        priority=50,
        description="FlashAttention-2 in PyTorch: online softmax over tiles, O(L) memory, every option but "
        "return_weights; auto picks it when sdpa cannot serve the call and math's scores would be large",
        check=check_alibi_grad,
        fit=_fit,
    )
)
