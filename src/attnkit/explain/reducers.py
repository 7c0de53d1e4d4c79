"""Streaming reducers: summarise each attention map as :func:`capture` recomputes it, instead of storing it.

A reducer sees every selected map tile by tile (``start(record)``, ``add(probs, rows)`` per query-row tile,
``finish(record)``), so memory stays bounded by what the reducer keeps. ``probs`` tiles are
``(B, H', t, Lk)`` (``H'`` the selected heads) and ``rows`` the long ``(t,)`` query positions of the tile.
Read the outcome with ``result()`` after the ``with`` block.

Example::

    roll = Rollout()
    with capture(model, reducers=[roll], store=False):
        model(x)
    roll.result()  # (B, L, L)
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.explain.records import AttentionRecord
from attnkit.explain.rollout import _check_options, augment, fuse_heads

__all__ = ["Entropy", "HeadMean", "Received", "Reducer", "Rollout", "TopK"]


class Reducer:
    """Base class: collects one result per map in :attr:`results`, with the matching :attr:`records`."""

    def __init__(self) -> None:
        self.records: list[AttentionRecord] = []
        self.results: list = []

    def start(self, record: AttentionRecord) -> None:
        """A new map begins."""
        self.records.append(record)

    def add(self, probs: Tensor, rows: Tensor) -> None:  # pragma: no cover - abstract
        """One tile of the current map."""
        raise NotImplementedError

    def finish(self, record: AttentionRecord) -> None:
        """The current map is complete."""

    def result(self):
        """The per-map results stacked along a new first (layer) dim when their shapes agree, else a list.

        Raises:
            RuntimeError: nothing was reduced (the capture recorded nothing, or the reducer was not passed).
        """
        if not self.results:
            raise RuntimeError(f"{type(self).__name__}.result: no attention map was reduced; pass it to capture()")
        if all(isinstance(r, Tensor) for r in self.results) and len({r.shape for r in self.results}) == 1:
            return torch.stack(self.results, 0)
        return list(self.results)


class HeadMean(Reducer):
    """Head-averaged maps ``(B, Lq', Lk)`` per layer (``H`` times less memory than per-head maps)."""

    def start(self, record: AttentionRecord) -> None:
        super().start(record)
        self.results.append([])

    def add(self, probs: Tensor, rows: Tensor) -> None:
        self.results[-1].append(probs.mean(1))

    def finish(self, record: AttentionRecord) -> None:
        self.results[-1] = torch.cat(self.results[-1], 1)


class Received(Reducer):
    """Attention received per key: ``mean over heads and query rows of A[b, h, i, j]`` -> ``(B, Lk)`` per layer.

    Sums to 1 over keys when every query row of the map does (no fully masked rows).
    """

    def start(self, record: AttentionRecord) -> None:
        super().start(record)
        self._n = 0
        self.results.append(None)

    def add(self, probs: Tensor, rows: Tensor) -> None:
        part = probs.sum(dim=(1, 2))
        self.results[-1] = part if self.results[-1] is None else self.results[-1] + part
        self._n += probs.shape[1] * probs.shape[2]

    def finish(self, record: AttentionRecord) -> None:
        self.results[-1] = self.results[-1] / max(self._n, 1)


class Entropy(Reducer):
    """Per-head mean entropy of the query rows, ``-Σ_j p log p`` in nats -> ``(B, H')`` per layer.

    Uniform attention over ``n`` keys gives ``log n``; attention on one key gives 0.
    """

    def start(self, record: AttentionRecord) -> None:
        super().start(record)
        self._n = 0
        self.results.append(None)

    def add(self, probs: Tensor, rows: Tensor) -> None:
        h = -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(-1).sum(-1)
        self.results[-1] = h if self.results[-1] is None else self.results[-1] + h
        self._n += probs.shape[2]

    def finish(self, record: AttentionRecord) -> None:
        self.results[-1] = self.results[-1] / max(self._n, 1)


class TopK(Reducer):
    """The ``k`` most attended keys of each query row: ``(values, indices)``, each ``(B, H', Lq', k)``.

    Args:
        k: keys kept per row (fewer when a map has fewer keys).
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TopK: k must be a positive int, got {k!r}")
        self.k = k

    def start(self, record: AttentionRecord) -> None:
        super().start(record)
        self._parts: list[tuple[Tensor, Tensor]] = []

    def add(self, probs: Tensor, rows: Tensor) -> None:
        top = probs.topk(min(self.k, probs.shape[-1]), dim=-1)
        self._parts.append((top.values, top.indices))

    def finish(self, record: AttentionRecord) -> None:
        self.results.append((torch.cat([v for v, _ in self._parts], 2), torch.cat([i for _, i in self._parts], 2)))

    def result(self):
        """List of ``(values, indices)`` per map."""
        if not self.results:
            raise RuntimeError("TopK.result: no attention map was reduced; pass it to capture()")
        return list(self.results)


class Rollout(Reducer):
    """Attention rollout accumulated layer by layer (same options and result as :func:`rollout`).

    Keeps two ``(B, L, L)`` buffers whatever the number of layers and heads. Self-attention maps only (cross
    maps are skipped); all query rows are needed, so do not combine with ``query_rows``.
    """

    def __init__(self, *, head_fusion: str = "mean", discard_ratio: float = 0.0, residual: bool = True) -> None:
        super().__init__()
        _check_options(head_fusion, discard_ratio, "Rollout")
        self.head_fusion, self.discard_ratio, self.residual = head_fusion, discard_ratio, residual
        self._acc: Tensor | None = None
        self._cur: Tensor | None = None

    def start(self, record: AttentionRecord) -> None:
        self._cur = None
        if record.kind != "self":
            return
        b, _, lq, lk = record.shape
        if record.query_rows is not None or lq != lk:
            raise ValueError(f"Rollout: needs whole square self-attention maps, got {record!r}")
        if self._acc is not None and self._acc.shape[-1] != lk:
            raise ValueError(
                f"Rollout: mismatched token counts: earlier layers have {self._acc.shape[-1]} tokens, "
                f"{record.name!r} has {lk}"
            )
        super().start(record)
        self._cur = torch.zeros(b, lq, lk)

    def add(self, probs: Tensor, rows: Tensor) -> None:
        if self._cur is None:
            return
        if self._cur.dtype != probs.dtype or self._cur.device != probs.device:
            self._cur = self._cur.to(probs)
        fused = fuse_heads(probs, self.head_fusion, self.discard_ratio)
        self._cur[:, rows.to(probs.device)] = augment(fused, rows, self.residual)

    def finish(self, record: AttentionRecord) -> None:
        if self._cur is None:
            return
        self._acc = self._cur if self._acc is None else self._cur @ self._acc
        self._cur = None
        self.results = [self._acc]

    def result(self) -> Tensor:
        """``(B, L, L)`` rollout of the layers seen so far."""
        if self._acc is None:
            raise RuntimeError("Rollout.result: no self-attention map was reduced; pass it to capture()")
        return self._acc
