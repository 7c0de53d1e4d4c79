"""Attention masks and position biases.

Conventions (shared by every attnkit backend):

* A **boolean** mask is ``True`` where a query **may attend** to a key (the convention of
  :func:`torch.nn.functional.scaled_dot_product_attention`). A **float** mask is added to the scores;
  ``-inf`` removes a key.
* Causal and sliding-window masks are aligned **bottom-right** when ``Lq != Lk``: query ``i`` sits at key
  position ``i + Lk - Lq`` (FlashAttention >= 2.1, and what KV-cache decoding needs). Query ``i`` may attend
  key ``j`` iff ``j <= i + Lk - Lq`` (causal) and ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``
  (window, both ends inclusive, ``-1`` meaning unbounded on that side). For ``Lq == Lk`` this is the usual
  lower-triangular mask; torch SDPA's ``is_causal=True`` is instead aligned top-left (``j <= i``).

Every function here is pure: tensors in, tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "band_keep",
    "block_diagonal",
    "bottom_right_offset",
    "causal",
    "effective_window",
    "from_key_padding_mask",
    "normalize_window_size",
    "padding",
    "positional_mask",
    "sliding_window",
]


def bottom_right_offset(q_len: int, kv_len: int) -> int:
    """Key position of query row 0 under bottom-right alignment: ``Lk - Lq`` (query ``i`` sits at ``i + Lk - Lq``).

    The one definition of attnkit's alignment of queries against keys when ``Lq != Lk`` (FlashAttention >= 2.1;
    what a KV cache needs: the new queries are the last ``Lq`` positions of the ``Lk`` keys).
    """
    return kv_len - q_len


def normalize_window_size(window_size: int | Sequence[int] | None, *, name: str = "window_size"):
    """Return ``window_size`` as a ``(left, right)`` tuple of ints (or ``None``).

    Args:
        window_size: ``None``, an int ``w`` meaning ``(w, w)``, or a pair ``(left, right)``. Each side is a
            count of keys (inclusive), ``>= 0``, or ``-1`` for unbounded.

    Raises:
        TypeError: ``window_size`` is not an int or a pair of ints.
        ValueError: a side is negative other than ``-1``.
    """
    if window_size is None:
        return None
    if isinstance(window_size, bool):
        raise TypeError(f"{name}: expected an int or a (left, right) pair of ints, got bool {window_size!r}")
    if isinstance(window_size, int):
        pair = (window_size, window_size)
    else:
        try:
            pair = tuple(window_size)
        except TypeError:
            raise TypeError(
                f"{name}: expected an int or a (left, right) pair of ints, got {type(window_size).__name__}"
            ) from None
        if len(pair) != 2 or not all(isinstance(w, int) and not isinstance(w, bool) for w in pair):
            raise TypeError(f"{name}: expected an int or a (left, right) pair of ints, got {window_size!r}")
    for side, w in zip(("left", "right"), pair):
        if w < -1:
            raise ValueError(f"{name}: {side} = {w} is negative; expected a count >= 0, or -1 for unbounded")
    return pair


def positional_mask(
    q_len: int,
    kv_len: int,
    *,
    is_causal: bool = False,
    window_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    q_range: tuple[int, int] | None = None,
    kv_range: tuple[int, int] | None = None,
) -> Tensor | None:
    """Bool mask ``(Lq', Lk')`` for ``is_causal`` and ``window_size``, bottom-right aligned; ``None`` if all-True.

    Args:
        q_len: ``Lq``, the full query length (sets the alignment).
        kv_len: ``Lk``, the full key length.
        is_causal: keep ``j <= i + Lk - Lq``.
        window_size: ``(left, right)`` as returned by :func:`normalize_window_size`, or ``None``.
        device: device of the result.
        q_range: ``(start, stop)`` rows to build (a tile); default all ``Lq`` rows.
        kv_range: ``(start, stop)`` columns to build; default all ``Lk`` columns.

    Returns:
        ``None`` when nothing is masked in the requested tile, else a bool tensor, True = may attend.
    """
    left, right = effective_window(is_causal, window_size)
    q0, q1 = q_range if q_range is not None else (0, q_len)
    k0, k1 = kv_range if kv_range is not None else (0, kv_len)
    offset = bottom_right_offset(q_len, kv_len)
    # d = j - (i + offset) spans [k0 - (q1 - 1) - offset, (k1 - 1) - q0 - offset] inside the tile.
    d_min = k0 - (q1 - 1) - offset
    d_max = (k1 - 1) - q0 - offset
    if (left == -1 or d_min >= -left) and (right == -1 or d_max <= right):
        return None
    rows = torch.arange(q0 + offset, q1 + offset, device=device).unsqueeze(-1)
    cols = torch.arange(k0, k1, device=device)
    return band_keep(cols - rows, left, right)


def effective_window(is_causal: bool, window_size: tuple[int, int] | None) -> tuple[int, int]:
    """``(left, right)`` combining ``is_causal`` (``right <= 0``) with ``window_size``; ``-1`` = unbounded."""
    left, right = window_size if window_size is not None else (-1, -1)
    if is_causal:
        right = 0 if right == -1 else min(right, 0)
    return left, right


def band_keep(diff: Tensor, left: int, right: int) -> Tensor:
    """``-left <= diff <= right`` elementwise (``-1`` = unbounded side), where ``diff = j - (i + Lk - Lq)``."""
    keep = torch.ones_like(diff, dtype=torch.bool)
    if left != -1:
        keep &= diff >= -left
    if right != -1:
        keep &= diff <= right
    return keep


def causal(q_len: int, kv_len: int | None = None, *, device=None) -> Tensor:
    """Bottom-right aligned causal mask.

    Args:
        q_len: ``Lq``.
        kv_len: ``Lk`` (default ``Lq``).
        device: device of the result.

    Returns:
        Bool tensor ``(Lq, Lk)``, True where ``j <= i + Lk - Lq``.

    Example:
        >>> causal(2, 3).int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    kv_len = q_len if kv_len is None else kv_len
    mask = positional_mask(q_len, kv_len, is_causal=True, device=device)
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device) if mask is None else mask


def sliding_window(q_len: int, kv_len: int | None, window_size, *, device=None) -> Tensor:
    """Bottom-right aligned sliding-window (band) mask, both ends inclusive.

    Args:
        q_len: ``Lq``.
        kv_len: ``Lk`` (``None`` means ``Lq``).
        window_size: int ``w`` (= ``(w, w)``) or ``(left, right)``; ``-1`` = unbounded on that side.
            ``(w, 0)`` is the causal sliding window of Mistral / Longformer's one-sided window.
        device: device of the result.

    Returns:
        Bool tensor ``(Lq, Lk)``, True where ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``.

    Raises:
        TypeError, ValueError: as :func:`normalize_window_size`.

    Example:
        >>> sliding_window(3, 3, (1, 0)).int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    kv_len = q_len if kv_len is None else kv_len
    window = normalize_window_size(window_size)
    mask = positional_mask(q_len, kv_len, window_size=window, device=device)
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device) if mask is None else mask


def padding(lengths: Tensor | Sequence[int], max_len: int | None = None, *, device=None) -> Tensor:
    """Key-padding mask from sequence lengths, in attnkit's convention (True = real token, may be attended).

    Args:
        lengths: ``(B,)`` ints, the number of real tokens of each sequence (left-aligned).
        max_len: ``L``; default ``max(lengths)``.
        device: device of the result (default: that of ``lengths``).

    Returns:
        Bool tensor ``(B, 1, 1, L)``, ready to pass as ``attn_mask`` for ``(B, H, Lq, L)`` scores.

    Raises:
        ValueError: a length is negative or larger than ``max_len``.

    Example:
        >>> padding([1, 3]).squeeze().int().tolist()
        [[1, 0, 0], [1, 1, 1]]
    """
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.ndim != 1 or lengths.dtype.is_floating_point:
        raise ValueError(f"padding: expected lengths as a 1-D integer tensor, got shape {tuple(lengths.shape)}")
    max_len = int(lengths.max()) if max_len is None else max_len
    if bool((lengths < 0).any()) or bool((lengths > max_len).any()):
        raise ValueError(f"padding: lengths must lie in [0, max_len={max_len}], got {lengths.tolist()}")
    keep = torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(-1)
    return keep[:, None, None, :]


def from_key_padding_mask(key_padding_mask: Tensor) -> Tensor:
    """Convert :class:`torch.nn.MultiheadAttention`'s ``key_padding_mask`` to an attnkit ``attn_mask``.

    Args:
        key_padding_mask: ``(B, Lk)``; bool with **True = padding, ignored** (nn.MultiheadAttention's
            convention), or float added to the scores.

    Returns:
        ``(B, 1, 1, Lk)``: bool with True = may attend, or the float mask unchanged (reshaped).

    Raises:
        ValueError: ``key_padding_mask`` is not 2-D.
    """
    if key_padding_mask.ndim != 2:
        raise ValueError(f"key_padding_mask: expected shape (B, Lk), got {tuple(key_padding_mask.shape)}")
    mask = ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask
    return mask[:, None, None, :]


def block_diagonal(seq_lens: Sequence[int] | Tensor, *, is_causal: bool = False, device=None) -> Tensor:
    """Mask for packed variable-length sequences: each token attends only within its own sequence.

    Args:
        seq_lens: lengths of the sequences packed back to back; their sum is ``L``.
        is_causal: also apply a causal mask inside each sequence.
        device: device of the result.

    Returns:
        Bool tensor ``(L, L)``, True where query and key belong to the same sequence.

    Raises:
        ValueError: a length is negative.

    Example:
        >>> block_diagonal([1, 2]).int().tolist()
        [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    """
    seq_lens = torch.as_tensor(seq_lens, device=device)
    if seq_lens.ndim != 1 or bool((seq_lens < 0).any()):
        raise ValueError(f"block_diagonal: expected non-negative 1-D seq_lens, got {seq_lens.tolist()}")
    doc = torch.repeat_interleave(torch.arange(len(seq_lens), device=seq_lens.device), seq_lens)
    keep = doc.unsqueeze(-1) == doc
    if is_causal:
        keep &= torch.ones_like(keep).tril()
    return keep


def alibi_slopes(num_heads: int, *, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The geometric ALiBi head slopes of Press et al. 2022 ("Train Short, Test Long"), for any head count.

    For ``n`` a power of two the slopes are ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``. Otherwise the slopes of the
    closest smaller power of two ``m`` are followed by every other slope of ``2m`` (the paper's reference
    implementation, ``ofirpress/attention_with_linear_biases``).

    Args:
        num_heads: ``H >= 1``.

    Returns:
        ``(H,)`` tensor of positive slopes.

    Raises:
        ValueError: ``num_heads < 1``.

    Example:
        >>> alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: expected num_heads >= 1, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, device=device, dtype=dtype)


def alibi_bias(
    slopes: Tensor,
    q_len: int,
    kv_len: int,
    *,
    q_range: tuple[int, int] | None = None,
    kv_range: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ALiBi bias ``-slope * |i + Lk - Lq - j|`` (FlashAttention's bottom-right convention).

    Args:
        slopes: ``(..., H)``, e.g. ``(H,)`` or ``(B, H)``.
        q_len, kv_len: full lengths ``Lq``, ``Lk`` (they set the alignment).
        q_range, kv_range: ``(start, stop)`` of the tile to build; default the whole matrix.
        dtype: dtype of the result (float32 by default; float64 for a float64 reference).

    Returns:
        ``(..., H, Lq', Lk')`` tensor.
    """
    q0, q1 = q_range if q_range is not None else (0, q_len)
    k0, k1 = kv_range if kv_range is not None else (0, kv_len)
    off = bottom_right_offset(q_len, kv_len)
    rows = torch.arange(q0 + off, q1 + off, device=slopes.device).unsqueeze(-1)
    cols = torch.arange(k0, k1, device=slopes.device)
    dist = (rows - cols).abs().to(dtype)
    return -slopes.to(dtype)[..., None, None] * dist
