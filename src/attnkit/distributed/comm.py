"""Point-to-point exchange of key/value blocks for context-parallel attention (``torch.distributed``).

The schedule is a list of ring *offsets* ``t``: at offset ``t`` rank ``r`` sends its own block to ``r + t`` and
receives the block of ``r - t`` (mod ``P``), so with every offset ``1 .. P-1`` each rank sees every block once,
as in a ring, while an offset that no rank needs (a window or a block mask makes all its pairs empty) is left
out entirely and a pair that only some ranks need moves only those blocks. Transfers are asynchronous
(``isend``/``irecv``) and posted one step ahead, so they overlap with the current block's computation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Exchange", "Schedule"]


class Schedule:
    """Which blocks move at which offset, from the ``needed(q_rank, kv_rank)`` relation (same on every rank).

    Attributes:
        rank, size: this rank and the group size ``P``.
        offsets: the offsets ``t >= 1`` at which at least one pair is needed, ascending.
    """

    def __init__(self, rank: int, size: int, needed: Callable[[int, int], bool]):
        self.rank, self.size = rank, size
        table = [[needed(a, b) for b in range(size)] for a in range(size)]
        self.table = table
        self.offsets = [t for t in range(1, size) if any(table[a][(a - t) % size] for a in range(size))]

    def recv_from(self, t: int) -> int | None:
        """The rank whose block this rank receives (and needs) at offset ``t``, or ``None``."""
        src = (self.rank - t) % self.size
        return src if self.table[self.rank][src] else None

    def send_to(self, t: int) -> int | None:
        """The rank that needs this rank's block at offset ``t``, or ``None``."""
        dst = (self.rank + t) % self.size
        return dst if self.table[dst][self.rank] else None

    def local_needed(self) -> bool:
        return self.table[self.rank][self.rank]


class Exchange:
    """Asynchronous sends/receives of tensor tuples within ``group``; ``wait()`` returns the received tensors."""

    def __init__(self, group):
        self.group = group if group is not None else dist.group.WORLD
        self._sends: list = []

    def _peer(self, r: int) -> int:
        return dist.get_global_rank(self.group, r)

    def post(
        self, send: tuple[Tensor, ...] | None, dst: int | None, like: tuple[Tensor, ...], src: int | None, tag: int
    ) -> list | None:
        """Send ``send`` to ``dst`` (if not ``None``) and receive tensors shaped like ``like`` from ``src``."""
        if dst is not None and send is not None:
            for i, t in enumerate(send):
                t = t.contiguous()
                self._sends.append((dist.isend(t, self._peer(dst), group=self.group, tag=tag + i), t))
        if src is None:
            return None
        bufs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]
        works = [dist.irecv(b, self._peer(src), group=self.group, tag=tag + i) for i, b in enumerate(bufs)]
        return [works, bufs]

    @staticmethod
    def wait(pending: list | None) -> list[Tensor] | None:
        if pending is None:
            return None
        works, bufs = pending
        for w in works:
            w.wait()
        return bufs

    def finish(self) -> None:
        """Wait for every send posted so far (their tensors may then be freed or modified)."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
