"""``BlockMask``: a reusable block-level layout of an ``(Lq, Lk)`` attention mask.

The query and key axes are cut into blocks of ``block_size``; the layout records which key blocks each query
block *visits* (contains at least one allowed pair) and which of those are *full* (every pair allowed, so no
element mask is needed). The exact element mask is a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx)``,
evaluated once per partial block when the layout is first used and cached. The ``"blocksparse"`` backend
computes only visited blocks. A layout is shared by every batch element and head (``mask_mod`` is called with
``b = h = 0``); for head-dependent masks pass a ``mask_mod`` to :func:`attnkit.attention` as well.

Invariants (kept by every constructor): ``visited`` ⊇ blocks with an allowed pair, ``full`` ⊆ blocks whose
pairs are all allowed, so skipping unvisited blocks and unmasking full ones is exact.

Reference: the block-sparse layouts of Child et al. 2019 (Sparse Transformers), Beltagy et al. 2020
(Longformer), Zaheer et al. 2020 (BigBird); the ``BlockMask`` idea of PyTorch's FlexAttention
(``torch.nn.attention.flex_attention.create_block_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.functional.mods import MASK_MOD_PARAMS, MaskMod, call_mask_mod, check_mod

__all__ = ["BlockMask", "LayoutGroup", "check_block_len"]

#: Element evaluations per chunk when a mask_mod is evaluated over a whole layout.
_EVAL_CHUNK = 1 << 22


@dataclass
class LayoutGroup:
    """Query blocks that visit the same number of key blocks, processed as one batch.

    Attributes:
        q_blocks: ``(N,)`` query block numbers.
        kv_blocks: ``(N, n)`` key block numbers visited by each, ascending.
        keep: ``(N, block_size, n * block_size)`` bool element mask, or ``None`` when every block is full.
    """

    q_blocks: Tensor
    kv_blocks: Tensor
    keep: Tensor | None


def check_block_len(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockMask: expected {name} to be a positive int, got {value!r}")
    return value


def _check_mod(mask_mod) -> None:
    if mask_mod is None:
        raise TypeError("BlockMask: expected mask_mod to be a callable mask_mod(b, h, q_idx, kv_idx), got None")
    check_mod(mask_mod, "mask_mod", MASK_MOD_PARAMS, who="BlockMask")


class BlockMask:
    """Block layout plus exact element mask of an ``(Lq, Lk)`` attention pattern.

    Build it with a layout function of :mod:`attnkit.sparse` (``causal``, ``sliding_window``, ``longformer``,
    ``bigbird``, ``document``), :meth:`from_mask_mod`, :meth:`from_dense` or :meth:`from_layout`; combine
    masks with ``&`` and ``|``. Pass it as ``attnkit.attention(..., block_mask=mask)``.

    Attributes:
        q_len, kv_len: ``Lq``, ``Lk`` the mask was built for.
        block_size: rows/columns per block.
        visited: ``(ceil(Lq / block_size), ceil(Lk / block_size))`` bool, True = the block is computed.
        full: same shape, True = the block needs no element mask.
        mask_mod: the exact element mask, ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """

    def __init__(
        self,
        mask_mod: MaskMod,
        q_len: int,
        kv_len: int,
        *,
        block_size: int,
        visited: Tensor,
        full: Tensor | None = None,
        description: str = "custom",
    ):
        """Low-level constructor; ``visited``/``full`` must satisfy the invariants of the module docstring
        (the layout functions guarantee them). Raises ValueError for wrong shapes or sizes."""
        self.q_len, self.kv_len = check_block_len("q_len", q_len), check_block_len("kv_len", kv_len)
        self.block_size = check_block_len("block_size", block_size)
        _check_mod(mask_mod)
        shape = (-(-q_len // block_size), -(-kv_len // block_size))
        for name, t in (("visited", visited), ("full", full)):
            if t is not None and (not isinstance(t, Tensor) or t.dtype != torch.bool or tuple(t.shape) != shape):
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"BlockMask: expected {name} as a bool tensor of shape (ceil(Lq/block), ceil(Lk/block)) = "
                    f"{shape} for Lq={q_len}, Lk={kv_len}, block_size={block_size}; got {got}"
                )
        self.mask_mod = mask_mod
        self.visited = visited
        full = torch.zeros_like(visited) if full is None else full & visited
        if kv_len % block_size:  # the padded last key block always needs its element mask
            full = full.clone()
            full[:, -1] = False
        self.full = full
        self.description = description
        self._groups: list[LayoutGroup] | None = None
        self.derived: dict = {}  # cache of this mask combined with positional masks (used by the backend)

    # ---------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.visited.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_len, self.kv_len)

    def element_mask(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """The exact mask at broadcastable int64 positions (False outside ``[0, Lq) x [0, Lk)``)."""
        zero = torch.zeros((), dtype=torch.long, device=q_idx.device)
        inside = (q_idx < self.q_len) & (kv_idx < self.kv_len)
        m = call_mask_mod(self.mask_mod, zero, zero, q_idx.clamp(max=self.q_len - 1), kv_idx.clamp(max=self.kv_len - 1))
        return m & inside

    def to_dense(self) -> Tensor:
        """``(Lq, Lk)`` bool mask, True = may attend (materializes ``Lq · Lk`` booleans; for tests/plots)."""
        q = torch.arange(self.q_len, device=self.device).unsqueeze(-1)
        k = torch.arange(self.kv_len, device=self.device)
        return self.element_mask(q, k).expand(self.q_len, self.kv_len)

    def density(self) -> float:
        """Fraction of the ``Lq x Lk`` score matrix inside visited blocks: the compute done relative to dense."""
        bs = self.block_size
        rows = torch.full((self.visited.shape[0],), bs, device=self.device)
        rows[-1] = self.q_len - bs * (self.visited.shape[0] - 1)
        cols = torch.full((self.visited.shape[1],), bs, device=self.device)
        cols[-1] = self.kv_len - bs * (self.visited.shape[1] - 1)
        area = (rows[:, None] * cols[None, :] * self.visited).sum().item()
        return area / (self.q_len * self.kv_len)

    def __repr__(self) -> str:
        return (
            f"BlockMask({self.description}, Lq={self.q_len}, Lk={self.kv_len}, block_size={self.block_size}, "
            f"visited={int(self.visited.sum())}/{self.visited.numel()} blocks "
            f"({int(self.full.sum())} full), density={self.density():.4f})"
        )

    # ---------------------------------------------------------------------------------------------------
    def _check_same(self, other, op: str) -> None:
        if not isinstance(other, BlockMask):
            raise TypeError(f"BlockMask {op}: expected another BlockMask, got {type(other).__name__}")
        if (self.q_len, self.kv_len, self.block_size) != (other.q_len, other.kv_len, other.block_size):
            raise ValueError(
                f"BlockMask {op}: masks differ in (Lq, Lk, block_size): "
                f"{(self.q_len, self.kv_len, self.block_size)} vs {(other.q_len, other.kv_len, other.block_size)}"
            )

    def __and__(self, other: BlockMask) -> BlockMask:
        self._check_same(other, "&")
        a, b = self.mask_mod, other.mask_mod
        return BlockMask(
            lambda bb, h, q, k: a(bb, h, q, k) & b(bb, h, q, k),
            self.q_len,
            self.kv_len,
            block_size=self.block_size,
            visited=self.visited & other.visited,
            full=self.full & other.full,
            description=f"({self.description} & {other.description})",
        )

    def __or__(self, other: BlockMask) -> BlockMask:
        self._check_same(other, "|")
        a, b = self.mask_mod, other.mask_mod
        return BlockMask(
            lambda bb, h, q, k: a(bb, h, q, k) | b(bb, h, q, k),
            self.q_len,
            self.kv_len,
            block_size=self.block_size,
            visited=self.visited | other.visited,
            full=self.full | other.full,
            description=f"({self.description} | {other.description})",
        )

    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_mask_mod(
        cls, mask_mod: MaskMod, q_len: int, kv_len: int, *, block_size: int = 128, device=None
    ) -> BlockMask:
        """Find the layout of any ``mask_mod`` by evaluating it on every position, in chunks of query blocks.

        Costs ``Lq · Lk`` elementwise evaluations once (the layout functions of :mod:`attnkit.sparse` compute
        their layouts directly instead). Raises TypeError for a ``mask_mod`` of the wrong signature/result.
        """
        check_block_len("q_len", q_len), check_block_len("kv_len", kv_len), check_block_len("block_size", block_size)
        _check_mod(mask_mod)
        nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
        visited = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        full = torch.zeros_like(visited)
        zero = torch.zeros((), dtype=torch.long, device=device)
        kv = torch.arange(nk * block_size, device=device)
        step = max(1, _EVAL_CHUNK // (block_size * nk * block_size))
        for i0 in range(0, nq, step):
            i1 = min(nq, i0 + step)
            q = torch.arange(i0 * block_size, i1 * block_size, device=device).unsqueeze(-1)
            inside = (q < q_len) & (kv < kv_len)
            m = call_mask_mod(mask_mod, zero, zero, q.clamp(max=q_len - 1), kv.clamp(max=kv_len - 1))
            m = (m & inside).expand(q.shape[0], kv.shape[0]).reshape(i1 - i0, block_size, nk, block_size)
            visited[i0:i1] = m.any(3).any(1)
            full[i0:i1] = (m | ~inside.view(i1 - i0, block_size, nk, block_size)).all(3).all(1)
        return cls(mask_mod, q_len, kv_len, block_size=block_size, visited=visited, full=full, description="mask_mod")

    @classmethod
    def from_dense(cls, mask: Tensor, *, block_size: int = 128) -> BlockMask:
        """Layout of a dense ``(Lq, Lk)`` bool mask (True = may attend); the mask is kept for the elements."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"BlockMask.from_dense: expected a 2-D bool tensor (Lq, Lk), got {got}")
        dense = mask
        return cls.from_mask_mod(
            lambda b, h, q, k: dense[q, k], mask.shape[0], mask.shape[1], block_size=block_size, device=mask.device
        )

    @classmethod
    def from_layout(cls, layout, q_len: int, kv_len: int, *, block_size: int = 128, device=None) -> BlockMask:
        """A mask defined at block level: every pair inside a listed block may attend.

        Args:
            layout: ``(ceil(Lq/block), ceil(Lk/block))`` bool tensor, or one list of key block numbers per
                query block.
            q_len, kv_len: ``Lq``, ``Lk``.
            block_size: rows/columns per block.

        Raises:
            ValueError: wrong shape, wrong number of rows, or a block number outside ``[0, ceil(Lk/block))``.
        """
        check_block_len("q_len", q_len), check_block_len("kv_len", kv_len), check_block_len("block_size", block_size)
        nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
        if not isinstance(layout, Tensor):
            rows = list(layout)
            if len(rows) != nq:
                raise ValueError(
                    f"BlockMask.from_layout: expected {nq} rows of key blocks (one per query block of "
                    f"{block_size} for Lq={q_len}), got {len(rows)}"
                )
            table = torch.zeros(nq, nk, dtype=torch.bool, device=device)
            for i, row in enumerate(rows):
                idx = torch.as_tensor(list(row), dtype=torch.long)
                bad = idx[(idx < 0) | (idx >= nk)]
                if bad.numel():
                    raise ValueError(
                        f"BlockMask.from_layout: query block {i} lists key blocks {bad.tolist()} outside "
                        f"[0, {nk}) (Lk={kv_len}, block_size={block_size})"
                    )
                table[i, idx.to(table.device)] = True
        else:
            table = layout.to(device) if device is not None else layout
            if table.dtype != torch.bool or tuple(table.shape) != (nq, nk):
                raise ValueError(
                    f"BlockMask.from_layout: expected a bool layout of shape {(nq, nk)} for Lq={q_len}, "
                    f"Lk={kv_len}, block_size={block_size}; got {table.dtype} {tuple(table.shape)}"
                )
        bs = block_size
        return cls(
            lambda b, h, q, k: table[q // bs, k // bs],
            q_len,
            kv_len,
            block_size=bs,
            visited=table.clone(),
            full=table.clone(),
            description="layout",
        )

    # ---------------------------------------------------------------------------------------------------
    def groups(self) -> list[LayoutGroup]:
        """Query blocks grouped by visit count, with gathered element masks (computed once, cached)."""
        if self._groups is not None:
            return self._groups
        bs, dev = self.block_size, self.device
        counts = self.visited.sum(1)
        groups = []
        for n in sorted(set(counts.tolist()) - {0}):
            q_blocks = torch.nonzero(counts == n).flatten()
            vis = self.visited[q_blocks]
            kv_blocks = torch.nonzero(vis)[:, 1].view(len(q_blocks), n)  # row-major: ascending per row
            full = torch.gather(self.full[q_blocks], 1, kv_blocks)
            keep = None
            if not bool(full.all()):
                keep = torch.empty(len(q_blocks), bs, n * bs, dtype=torch.bool, device=dev)
                offs = torch.arange(bs, device=dev)
                step = max(1, _EVAL_CHUNK // (bs * n * bs))
                for i0 in range(0, len(q_blocks), step):
                    qb, kb = q_blocks[i0 : i0 + step], kv_blocks[i0 : i0 + step]
                    q_idx = (qb[:, None] * bs + offs).unsqueeze(-1)  # (N, bs, 1)
                    kv_idx = (kb[:, :, None] * bs + offs).flatten(1).unsqueeze(1)  # (N, 1, n*bs)
                    keep[i0 : i0 + step] = self.element_mask(q_idx, kv_idx)
            groups.append(LayoutGroup(q_blocks, kv_blocks, keep))
        self._groups = groups
        return groups
