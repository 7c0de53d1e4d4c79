"""The tiled and block-sparse backends issue few, large tensor operations: the count is a property of the schedule.

On a CPU every tensor operation is an OpenMP region with a barrier; when another process holds a core, each
barrier waits for a parked thread, so a call's time under contention grows with its operation count. The count
per call must grow with the number of steps (``L`` / step size, set by a memory budget), never with the number
of tiles. Counted with a ``TorchDispatchMode`` (every aten call, views included), forward and backward.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import sparse
from attnkit.backends import blocksparse, flash_core, flash_fused, tiled
from attnkit.functional.spec import make_spec
from op_count import count_ops as _count

#: Documented bound (attnkit.backends.flash_core): aten calls (views included) per call and per chunk of a step.
FIXED, PER_CHUNK = 120, 100


def _ops(q, backend, **kwargs) -> tuple[int, int]:
    out = None

    def fwd():
        nonlocal out
        out = attnkit.attention(q, q, q, backend=backend, **kwargs)

    return _count(fwd), _count(lambda: out.sum().backward())


@pytest.fixture(params=["fused", "explicit"])
def path(request, monkeypatch):
    monkeypatch.setattr(flash_fused, "enabled", request.param == "fused")
    # Budgets of 128 query rows per step at H = 2, D = 8 and key spans of 96 (query blocks of 32, window ±32).
    monkeypatch.setattr(flash_core, "STEP_SCORES", 2 * 128 * 96)
    monkeypatch.setattr(flash_core, "FUSED_STEP_BYTES", 4 * (2 * 2 * 96 * 8 * 4))
    return request.param


def _chunks(sched) -> tuple[int, int]:
    """(steps, chunks) of a schedule."""
    steps = sched.steps()
    return len(steps), sum(len(st.chunks) for st in steps)


@pytest.mark.parametrize("L", [512, 1024])
def test_tiled_ops_follow_the_steps_not_the_tiles(path, monkeypatch, L):
    """Window ±32 with query blocks of 32 and of 8 rows: the count stays within FIXED + PER_CHUNK · chunks, and
    a step batches many blocks (the explicit path's step holds the same number of rows for either block size,
    so 4x more tiles cost about the same number of operations)."""
    q = torch.randn(1, 2, L, 8, requires_grad=True)
    spec = make_spec(q, q, q, window_size=(32, 32))
    counts = {}
    for block in (32, 8):
        monkeypatch.setattr(tiled, "BLOCK_Q", block)
        fwd, bwd = _ops(q, "tiled", window_size=(32, 32))
        steps, chunks = _chunks(tiled.TiledSchedule(spec, block, 96, fused=path == "fused"))
        assert max(fwd, bwd) <= FIXED + PER_CHUNK * chunks, (block, fwd, bwd, chunks)
        assert steps <= (L // block) / 2  # at least two query blocks per step
        counts[block] = (fwd, bwd)
    if path == "explicit":
        assert counts[8][0] <= 1.2 * counts[32][0] and counts[8][1] <= 1.2 * counts[32][1], counts


def test_doubling_the_length_adds_only_the_steps_it_needs(path):
    """ops(2L) - ops(L) is bounded by the cost of the extra chunks."""
    counts, chunks = [], []
    for L in (512, 1024):
        q = torch.randn(1, 2, L, 8, requires_grad=True)
        spec = make_spec(q, q, q, window_size=(32, 32))
        counts.append(_ops(q, "tiled", window_size=(32, 32)))
        chunks.append(_chunks(tiled.TiledSchedule(spec, *tiled.block_sizes(spec), fused=path == "fused"))[1])
    extra = chunks[1] - chunks[0]
    assert 0 < extra <= chunks[0] + 1
    assert counts[1][0] - counts[0][0] <= PER_CHUNK * extra and counts[1][1] - counts[0][1] <= PER_CHUNK * extra


def test_blocksparse_ops_are_bounded_by_its_schedule(path):
    L = 1024
    q = torch.randn(1, 2, L, 8, requires_grad=True)
    mask = sparse.bigbird(L, block_size=16, num_window_blocks=3, num_global_blocks=1, num_random_blocks=1)
    fwd, bwd = _ops(q, "blocksparse", block_mask=mask)
    spec = make_spec(q, q, q, block_mask=mask)
    steps, chunks = _chunks(blocksparse.BlockSparseSchedule(spec, mask, fused=path == "fused"))
    assert steps <= int(mask.visited.sum()) // 4  # far fewer steps than visited tiles
    assert max(fwd, bwd) <= FIXED + PER_CHUNK * chunks, (fwd, bwd, chunks)
