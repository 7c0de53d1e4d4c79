"""How a sequence is split across the ranks of a process group: ``"contiguous"`` and ``"zigzag"`` layouts.

``"contiguous"``: rank ``r`` of ``P`` holds global positions ``[r·L/P, (r+1)·L/P)``.
``"zigzag"``: the sequence is cut into ``2P`` chunks of ``L/(2P)`` and rank ``r`` holds chunks ``r`` and
``2P-1-r`` (in that order). Under a causal mask every rank then does the same work, which the contiguous layout
does not (rank ``P-1`` would attend to everything, rank 0 to its own block only): Brandon et al. 2023,
"Striped Attention" (the load-balancing argument) and the zigzag order of Zhu's ``ring-flash-attention`` and
Llama 3's context parallelism (Dubey et al. 2024, Sec. 3.3.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["LAYOUTS", "Segment", "global_positions", "segments", "shard", "unshard"]

#: Valid ``layout`` names.
LAYOUTS = ("contiguous", "zigzag")


class Segment(NamedTuple):
    """A run of global positions ``[start, stop)`` held by a rank at local rows ``[local, local + stop - start)``."""

    start: int
    stop: int
    local: int


def check_layout(layout: str, owner: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{owner}: unknown layout {layout!r}; valid: {', '.join(map(repr, LAYOUTS))}")
    return layout


def pieces(layout: str, world_size: int) -> int:
    """Number of equal chunks the global sequence is cut into: ``P`` (contiguous) or ``2P`` (zigzag)."""
    return world_size if layout == "contiguous" else 2 * world_size


def segments(layout: str, rank: int, world_size: int, local_len: int) -> list[Segment]:
    """The global runs held by ``rank`` when each rank holds ``local_len`` positions (``L = P · local_len``).

    Raises:
        ValueError: an unknown layout, or a zigzag ``local_len`` that is odd (each rank holds two equal chunks).
    """
    check_layout(layout, "segments")
    if layout == "contiguous":
        return [Segment(rank * local_len, (rank + 1) * local_len, 0)]
    if local_len % 2:
        raise ValueError(
            f"zigzag layout: each rank holds two equal chunks, so the local length must be even, got {local_len} "
            f"(global length {local_len * world_size} must be a multiple of 2·P = {2 * world_size})"
        )
    c = local_len // 2
    late = 2 * world_size - 1 - rank
    return [Segment(rank * c, (rank + 1) * c, 0), Segment(late * c, (late + 1) * c, c)]


def global_positions(layout: str, rank: int, world_size: int, local_len: int, *, device=None) -> Tensor:
    """``(local_len,)`` int64 global position of each local row (e.g. for rotary embeddings)."""
    parts = [torch.arange(s.start, s.stop, device=device) for s in segments(layout, rank, world_size, local_len)]
    return torch.cat(parts)


def _group_info(group, rank, world_size) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("shard: a group was given but torch.distributed is not initialized")
        return 0, 1  # one process holds the whole sequence, as in ring_attention
    return dist.get_rank(group), dist.get_world_size(group)


def shard(
    x: Tensor, dim: int, layout: str = "contiguous", *, group=None, rank: int | None = None, world_size=None
) -> Tensor:
    """This rank's slice of a full-sequence tensor, along ``dim``, in ``layout``.

    Args:
        x: the full tensor; ``x.shape[dim]`` is the global sequence length ``L``.
        dim: the sequence dimension (``-2`` for ``(B, H, L, D)``, ``1`` for ``(B, L, E)``).
        layout: ``"contiguous"`` or ``"zigzag"`` (see the module docstring).
        group: the process group (default: the world, or one process when torch.distributed is not
            initialized); ignored when ``rank`` and ``world_size`` are given.
        rank, world_size: the position in the group, to shard without an initialized process group.

    Returns:
        ``x`` with ``L / P`` positions along ``dim`` (a copy for zigzag, a view for contiguous).

    Raises:
        ValueError: an unknown layout, ``L`` not a multiple of ``P`` (contiguous) or ``2P`` (zigzag), or a
            ``group`` while torch.distributed is not initialized.
    """
    check_layout(layout, "shard")
    rank, world_size = _group_info(group, rank, world_size)
    length = x.shape[dim]
    n = pieces(layout, world_size)
    if length % n:
        raise ValueError(
            f"shard: the {layout} layout cuts the sequence (dim {dim}, length {length}) into {n} equal chunks "
            f"for {world_size} ranks; expected a length that is a multiple of {n}, got {length}"
        )
    local = length // world_size
    parts = [x.narrow(dim, s.start, s.stop - s.start) for s in segments(layout, rank, world_size, local)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(x: Tensor | Sequence[Tensor], dim: int, layout: str = "contiguous", *, group=None) -> Tensor:
    """Reassemble the full sequence from every rank's slice (the inverse of :func:`shard`).

    Args:
        x: this rank's slice (then the slices are all-gathered over ``group``: every rank gets the full tensor;
            not differentiable), or the list of every rank's slices in rank order (no communication).
        dim: the sequence dimension.
        layout: the layout the slices were made with.
        group: the process group for the all-gather (default: the world).

    Returns:
        the full tensor, ``P · L_local`` positions along ``dim``.

    Raises:
        ValueError: an unknown layout, slices of different shapes, or a zigzag slice of odd length.
    """
    check_layout(layout, "unshard")
    if isinstance(x, Tensor):
        import torch.distributed as dist

        world_size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
    else:
        parts = list(x)
        if not parts or any(p.shape != parts[0].shape for p in parts):
            raise ValueError(f"unshard: expected equal-shaped slices, got {[tuple(p.shape) for p in parts]}")
    world_size = len(parts)
    local = parts[0].shape[dim]
    chunks: dict[int, Tensor] = {}
    for rank, part in enumerate(parts):
        for s in segments(layout, rank, world_size, local):
            chunks[s.start] = part.narrow(dim, s.local, s.stop - s.start)
    return torch.cat([chunks[k] for k in sorted(chunks)], dim)
