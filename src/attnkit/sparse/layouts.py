"""Block-sparse layouts of long-document attention, each returned as a :class:`BlockMask`.

Every function computes its block layout directly (no ``Lq x Lk`` evaluation) and carries the exact element
mask as a ``mask_mod``. Positions are bottom-right aligned like :func:`attnkit.attention` (query ``i`` sits at
key position ``i + Lk - Lq``); windows are inclusive, ``-1`` = unbounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit.functional.block_mask import BlockMask, check_block_len
from attnkit.functional.masks import bottom_right_offset, normalize_window_size

__all__ = ["bigbird", "causal", "document", "global_tokens", "longformer", "sliding_window"]


def _block_bounds(length: int, block_size: int, device) -> tuple[Tensor, Tensor]:
    check_block_len("length", length), check_block_len("block_size", block_size)
    start = torch.arange(0, length, block_size, device=device)
    return start, (start + block_size).clamp(max=length) - 1


def sliding_window(
    q_len: int,
    kv_len: int | None = None,
    window_size=256,
    *,
    is_causal: bool = False,
    block_size: int = 128,
    device=None,
) -> BlockMask:
    """Band mask ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (Longformer's window; with ``is_causal``
    or ``(w, 0)`` Mistral's).

    Args:
        q_len: ``Lq``.
        kv_len: ``Lk`` (default ``Lq``).
        window_size: int ``w`` = ``(w, w)`` or ``(left, right)``; ``-1`` = unbounded side.
        is_causal: also require ``j <= i + Lk - Lq``.
        block_size: rows/columns per block.
        device: device of the layout.

    Raises:
        TypeError, ValueError: bad ``window_size`` or lengths.
    """
    kv_len = q_len if kv_len is None else kv_len
    left, right = normalize_window_size(window_size, name="sliding_window: window_size")
    if is_causal:
        right = 0 if right == -1 else min(right, 0)
    off = bottom_right_offset(q_len, kv_len)
    q0, q1 = _block_bounds(q_len, block_size, device)
    k0, k1 = _block_bounds(kv_len, block_size, device)
    d_min = k0[None, :] - q1[:, None] - off  # min over the block of j - (i + off)
    d_max = k1[None, :] - q0[:, None] - off
    big = 1 << 62
    lo, hi = (-big if left == -1 else -left), (big if right == -1 else right)
    visited = (d_max >= lo) & (d_min <= hi)
    full = (d_min >= lo) & (d_max <= hi)

    def mask_mod(b, h, q_idx, kv_idx):
        d = kv_idx - (q_idx + off)
        return (d >= lo) & (d <= hi)

    name = f"sliding_window({left}, {right})"
    return BlockMask(mask_mod, q_len, kv_len, block_size=block_size, visited=visited, full=full, description=name)


def causal(q_len: int, kv_len: int | None = None, *, block_size: int = 128, device=None) -> BlockMask:
    """Bottom-right aligned causal mask ``j <= i + Lk - Lq`` as a block layout."""
    mask = sliding_window(q_len, kv_len, (-1, 0), block_size=block_size, device=device)
    mask.description = "causal"
    return mask


def _as_flags(tokens, length: int, name: str, device) -> Tensor:
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        if not 0 <= tokens <= length:
            raise ValueError(f"{name}: expected a count of leading global tokens in [0, {length}], got {tokens}")
        flags = torch.zeros(length, dtype=torch.bool, device=device)
        flags[:tokens] = True
        return flags
    idx = torch.as_tensor(tokens, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (length,):
            raise ValueError(f"{name}: expected a bool tensor of shape ({length},), got {tuple(idx.shape)}")
        return idx
    idx = idx.long().flatten()
    bad = idx[(idx < 0) | (idx >= length)]
    if bad.numel():
        raise ValueError(f"{name}: token positions {bad.tolist()} are outside [0, {length})")
    flags = torch.zeros(length, dtype=torch.bool, device=device)
    flags[idx] = True
    return flags


def global_tokens(seq_len: int, tokens, *, block_size: int = 128, device=None) -> BlockMask:
    """Longformer's global attention: global tokens attend everywhere and are attended by every token.

    Args:
        seq_len: ``L`` (self-attention, ``Lq = Lk``).
        tokens: a count ``n`` (the first ``n`` tokens, e.g. [CLS]), a list/tensor of positions, or a bool ``(L,)``.
        block_size: rows/columns per block.

    Raises:
        ValueError: positions outside ``[0, L)``.
    """
    check_block_len("seq_len", seq_len), check_block_len("block_size", block_size)
    flags = _as_flags(tokens, seq_len, "global_tokens", device)
    nb = -(-seq_len // block_size)
    padded = torch.cat([flags, flags.new_zeros(nb * block_size - seq_len)]).view(nb, block_size)
    any_g = padded.any(1)
    all_g = (padded | (torch.arange(nb * block_size, device=flags.device) >= seq_len).view(nb, block_size)).all(1)
    visited = any_g[:, None] | any_g[None, :]
    full = all_g[:, None] | all_g[None, :]

    def mask_mod(b, h, q_idx, kv_idx):
        return flags[q_idx] | flags[kv_idx]

    bs = block_size
    return BlockMask(mask_mod, seq_len, seq_len, block_size=bs, visited=visited, full=full, description="global")


def longformer(seq_len: int, window_size=256, tokens=1, *, block_size: int = 128, device=None) -> BlockMask:
    """Longformer (Beltagy et al. 2020): sliding window ``|i - j| <= window_size`` plus global ``tokens``."""
    mask = sliding_window(seq_len, seq_len, window_size, block_size=block_size, device=device) | global_tokens(
        seq_len, tokens, block_size=block_size, device=device
    )
    mask.description = "longformer"
    return mask


def bigbird(
    seq_len: int,
    *,
    block_size: int = 64,
    num_window_blocks: int = 3,
    num_global_blocks: int = 2,
    num_random_blocks: int = 3,
    seed: int = 0,
    device=None,
) -> BlockMask:
    """BigBird's ITC layout (Zaheer et al. 2020, Sec. 2 and App. D): window + global + random blocks.

    Query block ``i`` visits key blocks ``i - w//2 .. i + w//2`` (``w = num_window_blocks``), the first
    ``num_global_blocks`` blocks (which also visit every block), and ``num_random_blocks`` other blocks drawn
    per query block with ``torch.Generator().manual_seed(seed)`` (reproducible).

    Raises:
        ValueError: negative counts.
    """
    for name, n in (("num_window_blocks", num_window_blocks), ("num_global_blocks", num_global_blocks)):
        if n < 0:
            raise ValueError(f"bigbird: expected {name} >= 0, got {n}")
    if num_random_blocks < 0:
        raise ValueError(f"bigbird: expected num_random_blocks >= 0, got {num_random_blocks}")
    check_block_len("seq_len", seq_len), check_block_len("block_size", block_size)
    nb = -(-seq_len // block_size)
    i = torch.arange(nb)
    table = (i[:, None] - i[None, :]).abs() <= num_window_blocks // 2
    table[:num_global_blocks, :] = True
    table[:, :num_global_blocks] = True
    gen = torch.Generator().manual_seed(seed)
    for row in range(num_global_blocks, nb):
        free = torch.nonzero(~table[row]).flatten()
        if free.numel():
            pick = free[torch.randperm(free.numel(), generator=gen)[:num_random_blocks]]
            table[row, pick] = True
    mask = BlockMask.from_layout(table.to(device), seq_len, seq_len, block_size=block_size, device=device)
    mask.description = "bigbird"
    return mask


def document(
    seq_lens: Sequence[int] | Tensor, *, is_causal: bool = False, block_size: int = 128, device=None
) -> BlockMask:
    """Block-diagonal mask of packed sequences: a token attends only within its own document.

    Args:
        seq_lens: lengths of the documents packed back to back (sum = ``L``), all ``>= 0``.
        is_causal: also causal inside each document.
        block_size: rows/columns per block.

    Raises:
        ValueError: negative lengths or a zero total.
    """
    lens = torch.as_tensor(seq_lens, dtype=torch.long, device=device)
    if lens.ndim != 1 or bool((lens < 0).any()) or int(lens.sum()) < 1:
        raise ValueError(f"document: expected non-negative 1-D seq_lens with a positive sum, got {lens.tolist()}")
    doc = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    length = doc.numel()
    start, stop = _block_bounds(length, block_size, lens.device)
    lo, hi = doc[start], doc[stop]  # doc ids are non-decreasing: a block spans documents [lo, hi]
    visited = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])
    full = (lo[:, None] == hi[:, None]) & (lo[None, :] == hi[None, :]) & (lo[:, None] == lo[None, :])

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    bs = block_size
    mask = BlockMask(mask_mod, length, length, block_size=bs, visited=visited, full=full, description="document")
    if is_causal:
        mask = mask & causal(length, block_size=block_size, device=device)
        mask.description = "causal document"
    return mask
