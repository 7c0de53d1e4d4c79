"""The ``"blocksparse"`` backend: exact attention over the visited blocks of a :class:`attnkit.sparse.BlockMask`.

Work is proportional to the number of visited blocks. Query blocks that visit the same number of key blocks
are batched into steps (as many as the memory budget of :mod:`attnkit.backends.flash_core` allows): their
visited key blocks are gathered into one ``(B, Hkv, N, n · block, D)`` operand, the scores
``(B, Hkv, N, G, block, n · block)`` come from one batched matmul over all heads, the layout's cached element
masks are applied to partial blocks only where needed, and FlashAttention's online softmax merges chunks when a
row visits many blocks (global tokens). Calls whose terms reduce to the layout's keep-mask run each step as one
fused CPU flash-attention kernel (:mod:`attnkit.backends.flash_fused`). Backward recomputes the same steps from
the saved log-sum-exp and scatter-adds key/value gradients once per chunk.

The layout is ``block_mask`` and-ed with ``is_causal``/``window_size`` (cached on the mask). With no
``block_mask`` the call runs on the ``"tiled"`` backend's band schedule, which computes each query block's exact
causal/window key range and shares one mask across its interior blocks (measured faster than block-aligned
layouts: ``benchmarks/RESULTS.md``). All other options of
:func:`attnkit.attention` (biases, ALiBi, softcap, ``score_mod``, ``mask_mod``, bool masks, dropout, GQA,
``return_lse``) are applied per tile exactly as in the ``"tiled"`` backend.

References:
    Child et al. 2019 (Sparse Transformers); Beltagy et al. 2020 (Longformer); Zaheer et al. 2020 (BigBird);
    Dao 2023 (FlashAttention-2, Alg. 1-2) for the per-tile forward/backward.
"""

from __future__ import annotations

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
from attnkit.backends.tiled import Geometry, tiled_attention
from attnkit.functional.block_mask import BlockMask
from attnkit.functional.registry import ALL_OPTIONS, Backend, register
from attnkit.functional.spec import AttentionSpec
from attnkit.functional.tiles import TileSetup
from attnkit.sparse.layouts import sliding_window

__all__ = ["BlockSparseSchedule", "blocksparse_attention", "effective_block_mask"]

#: Largest number of key columns gathered per query block and tile.
MAX_TILE_COLS = 1024
#: ``auto`` picks blocksparse for a plain sliding window when it visits at most this fraction of blocks ...
AUTO_MAX_DENSITY = 0.25
#: ... and the score matrix has at least this many entries per head.
AUTO_MIN_SCORES = 1 << 22

_POSITIONAL_CACHE: dict[tuple, BlockMask] = {}


def _default_block(spec: AttentionSpec) -> int:
    if spec.window_size is not None and -1 not in spec.window_size and sum(spec.window_size) < 256:
        return 64
    return 128


def effective_block_mask(spec: AttentionSpec) -> BlockMask:
    """``spec.block_mask`` and-ed with the call's causal/window mask (cached), or that mask alone (all blocks
    when the call has neither: correct, but nothing is skipped)."""
    bm = spec.block_mask
    if bm is not None and not (spec.is_causal or spec.window_size is not None):
        return bm
    window = spec.window_size if spec.window_size is not None else (-1, -1)
    bs = bm.block_size if bm is not None else _default_block(spec)
    key = (spec.q_len, spec.kv_len, spec.is_causal, window, bs, str(spec.query.device))
    pos = _POSITIONAL_CACHE.get(key)
    if pos is None:
        if len(_POSITIONAL_CACHE) > 32:
            _POSITIONAL_CACHE.clear()
        pos = sliding_window(
            spec.q_len, spec.kv_len, window, is_causal=spec.is_causal, block_size=bs, device=spec.query.device
        )
        _POSITIONAL_CACHE[key] = pos
    if bm is None:
        return pos
    combined = bm.derived.get(key)
    if combined is None:
        combined = bm.derived[key] = bm & pos
    return combined


class BlockSparseSchedule:
    """Steps of a :class:`BlockMask`: query blocks with equal visit counts batched (as many as the step budget
    allows), their visited key blocks gathered with one index; on the explicit path a row's key blocks are
    walked in chunks of at most ``MAX_TILE_COLS`` columns, on the fused path all at once."""

    def __init__(self, spec: AttentionSpec, mask: BlockMask, *, fused: bool = False):
        geo = Geometry.of(spec)  # no reference to the call's tensors: schedules are cached with their mask
        self.kv_len, self.row_bytes = geo.kv_len, geo.head_dim * geo.itemsize
        self.mask, self.fused = mask, fused
        self.block_q = mask.block_size
        self.num_q_blocks = mask.visited.shape[0]
        self.heads = geo.heads
        self._steps: list[Step] | None = None

    @classmethod
    def cached(cls, spec: AttentionSpec, mask: BlockMask, *, fused: bool) -> BlockSparseSchedule:
        """The schedule of ``mask`` for ``spec``'s heads and dtype, kept in ``mask.derived`` (a mask reused over
        layers and steps builds its schedule once)."""
        geo = Geometry.of(spec)
        budgets = (flash_core.STEP_SCORES, flash_core.FUSED_STEP_BYTES, MAX_TILE_COLS)
        key = ("schedule", geo.heads, geo.head_dim, geo.itemsize, geo.device, fused, budgets)
        sched = mask.derived.get(key)
        if sched is None:
            sched = mask.derived[key] = cls(spec, mask, fused=fused)
        return sched

    def steps(self) -> list[Step]:
        if self._steps is not None:
            return self._steps
        bs, steps = self.block_q, []
        offs = torch.arange(bs, device=self.mask.device)
        for lg in self.mask.groups():
            n_total = lg.kv_blocks.shape[1]
            if self.fused:
                per_chunk = n_total
                cost = 2 * self.heads * n_total * bs * self.row_bytes
                n_sub = blocks_per_step(len(lg.q_blocks), cost, fused=True)
            else:
                per_chunk = max(1, min(n_total, MAX_TILE_COLS // bs))
                n_sub = blocks_per_step(len(lg.q_blocks), self.heads * bs * per_chunk * bs, fused=False)
            for i0 in range(0, len(lg.q_blocks), n_sub):
                qb = lg.q_blocks[i0 : i0 + n_sub]
                first, last = int(qb[0]), int(qb[-1])
                step = Step(qb, first if last - first == len(qb) - 1 else None)
                q_idx = qb[:, None] * bs + offs  # (N, bs)
                for c0 in range(0, n_total, per_chunk):
                    kb = lg.kv_blocks[i0 : i0 + n_sub, c0 : c0 + per_chunk]
                    kv_idx = (kb[:, :, None] * bs + offs).flatten(1)
                    keep = None if lg.keep is None else lg.keep[i0 : i0 + n_sub, :, c0 * bs : c0 * bs + kv_idx.shape[1]]
                    step.chunks.append(make_chunk(q_idx, kv_idx, self.kv_len, keep))
                steps.append(step)
        self._steps = steps
        return steps


def blocksparse_attention(spec: AttentionSpec) -> tuple[Tensor, None, Tensor | None]:
    """Run ``spec`` over the visited blocks of its layout (see the module docstring).

    Returns:
        ``(output, None, lse or None)``.
    """
    if spec.block_mask is None:  # the layout is the causal/window band itself: the tiled band schedule is exact
        return tiled_attention(spec)  # per row and shares one mask across blocks (measured faster, RESULTS.md)
    mask = effective_block_mask(spec)
    setup = TileSetup(spec, positional=False, block_mask_elements=False)
    out, lse = run(setup, lambda fused: BlockSparseSchedule.cached(spec, mask, fused=fused))
    return out, None, (lse if spec.return_lse else None)


def _fit(spec: AttentionSpec) -> str | None:
    if spec.block_mask is not None:
        return None
    if spec.window_size is None or (spec.window_size[0] == -1 and not spec.is_causal) or spec.window_size[1] == -1:
        return "no block_mask and no bounded sliding window: the fused dense kernels are faster for this mask"
    left, right = spec.window_size
    width = left + (0 if spec.is_causal else right) + 1 + 2 * _default_block(spec)
    density = min(1.0, width / spec.kv_len)
    if density > AUTO_MAX_DENSITY or spec.q_len * spec.kv_len < AUTO_MIN_SCORES:
        return (
            f"the sliding window covers ~{density:.0%} of a {spec.q_len} x {spec.kv_len} score matrix; "
            f"skipping blocks pays off below {AUTO_MAX_DENSITY:.0%} and from {AUTO_MIN_SCORES} scores per head"
        )
    return None


BLOCKSPARSE = register(
    Backend(
        name="blocksparse",
        forward=blocksparse_attention,
        options=ALL_OPTIONS - {"return_weights"},
        priority=5,
        description="computes only the visited blocks of a BlockMask (and of causal/window masks); auto picks "
        "it for a block_mask, or a narrow sliding window over long sequences",
        check=check_alibi_grad,
        fit=_fit,
    )
)
