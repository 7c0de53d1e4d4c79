"""The validated description of one attention call, shared by every backend.

:func:`attnkit.attention` turns its arguments into an :class:`AttentionSpec` (checking them once, at the
public boundary) and hands it to a backend. Backends never re-validate; they read the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from attnkit.functional.block_mask import BlockMask
from attnkit.functional.masks import normalize_window_size
from attnkit.functional.mods import MASK_MOD_PARAMS, SCORE_MOD_PARAMS, MaskMod, ScoreMod, check_mod

__all__ = [
    "AttentionOutput",
    "AttentionSpec",
    "check_block_mask",
    "check_masks",
    "check_number",
    "check_per_head",
    "check_qkv",
    "lse_dtype",
    "make_spec",
]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class AttentionOutput(NamedTuple):
    """What :func:`attnkit.attention` returns when ``return_weights`` or ``return_lse`` is set.

    Attributes:
        output: ``(..., H, Lq, Dv)``, dtype of ``value``.
        weights: ``(..., H, Lq, Lk)`` attention probabilities before dropout (dtype of ``query``; rows with
            no key to attend to are 0), or ``None`` if not requested.
        lse: ``(..., H, Lq)`` log-sum-exp of the scaled, masked scores, float32 (float64 for float64
            inputs), ``-inf`` for rows with no key to attend to; or ``None`` if not requested.
    """

    output: Tensor
    weights: Tensor | None = None
    lse: Tensor | None = None


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    """Normalized arguments of one attention call (see :func:`attnkit.attention` for their meaning).

    ``query`` is ``(*batch, H, Lq, D)``, ``key`` ``(*batch, Hkv, Lk, D)``, ``value`` ``(*batch, Hkv, Lk, Dv)``.
    ``attn_mask`` and ``attn_bias`` are already checked to broadcast to ``(*batch, H, Lq, Lk)``;
    ``window_size`` is a ``(left, right)`` pair or ``None``; ``scale`` is a float. ``mask_mod`` / ``score_mod``
    are FlexAttention-style callables (signatures checked); ``block_mask`` is an :class:`attnkit.sparse.BlockMask`
    whose lengths match ``Lq`` and ``Lk``; ``sinks`` is ``(H,)`` or ``(B..., H)`` (one logit per head).
    """

    query: Tensor
    key: Tensor
    value: Tensor
    attn_mask: Tensor | None = None
    is_causal: bool = False
    window_size: tuple[int, int] | None = None
    attn_bias: Tensor | None = None
    alibi_slopes: Tensor | None = None
    softcap: float | None = None
    scale: float = 1.0
    dropout_p: float = 0.0
    return_weights: bool = False
    return_lse: bool = False
    mask_mod: MaskMod | None = None
    score_mod: ScoreMod | None = None
    block_mask: BlockMask | None = None
    sinks: Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.query.shape[-3]

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[-3]

    @property
    def q_len(self) -> int:
        return self.query.shape[-2]

    @property
    def kv_len(self) -> int:
        return self.key.shape[-2]

    @property
    def batch_shape(self) -> torch.Size:
        return self.query.shape[:-3]

    @property
    def scores_shape(self) -> torch.Size:
        """``(*batch, H, Lq, Lk)``."""
        return (*self.query.shape[:-1], self.kv_len)

    def options(self) -> frozenset[str]:
        """Names of the options this call uses (what a backend must support)."""
        used = []
        if self.attn_mask is not None:
            used.append("attn_mask_bool" if self.attn_mask.dtype == torch.bool else "attn_mask_float")
        if self.is_causal:
            used.append("is_causal")
        if self.window_size is not None:
            used.append("window_size")
        if self.attn_bias is not None:
            used.append("attn_bias")
        if self.alibi_slopes is not None:
            used.append("alibi_slopes")
        if self.softcap is not None:
            used.append("softcap")
        if self.dropout_p > 0:
            used.append("dropout_p")
        if self.return_weights:
            used.append("return_weights")
        if self.return_lse:
            used.append("return_lse")
        if self.num_kv_heads != self.num_heads:
            used.append("gqa")
        if self.mask_mod is not None:
            used.append("mask_mod")
        if self.score_mod is not None:
            used.append("score_mod")
        if self.block_mask is not None:
            used.append("block_mask")
        if self.sinks is not None:
            used.append("sinks")
        return frozenset(used)

    def is_empty(self) -> bool:
        """True when the call has no work: a zero batch dim, zero heads, ``Lq = 0`` or ``Lk = 0``."""
        return self.query.numel() == 0 or self.key.numel() == 0


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a returned log-sum-exp: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_broadcast(name: str, t: Tensor, target: torch.Size) -> None:
    ok = t.ndim <= len(target) and all(s in (1, n) for s, n in zip(reversed(t.shape), reversed(target)))
    if not ok:
        raise ValueError(
            f"attention: {name} of shape {_shape(t)} does not broadcast to the scores' shape "
            f"(*batch, H, Lq, Lk) = {tuple(target)}; each dimension must be 1 or equal to the scores' size"
        )


def check_qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    """Types, ranks, dtypes, devices and sizes of ``query``, ``key``, ``value`` (see :func:`attnkit.attention`).

    Raises:
        TypeError: a non-tensor or non-floating input, or mixed dtypes.
        ValueError: ranks, batch dims, head_dim, lengths or head counts that do not fit; ``D = 0``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: expected {name} to be a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 3:
            raise ValueError(
                f"attention: expected {name} of rank >= 3 (..., heads, length, head_dim), got shape {_shape(t)}"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: expected {name} of dtype float64, float32, bfloat16 or float16, got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"attention: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"attention: query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if not (query.ndim == key.ndim == value.ndim):
        raise ValueError(
            f"attention: query, key and value must have the same rank, got shapes {_shape(query)}, "
            f"{_shape(key)}, {_shape(value)}"
        )
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(
            f"attention: batch dimensions differ: query {_shape(query)}, key {_shape(key)}, value "
            f"{_shape(value)}; expected equal leading (batch) dimensions"
        )
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"attention: query head_dim D={query.shape[-1]} differs from key head_dim {key.shape[-1]} "
            f"(query {_shape(query)}, key {_shape(key)})"
        )
    if query.shape[-1] == 0 or value.shape[-1] == 0:
        raise ValueError(
            f"attention: expected head_dim D >= 1 and Dv >= 1, got query {_shape(query)} and value {_shape(value)}"
        )
    if key.shape[-2] != value.shape[-2] or key.shape[-3] != value.shape[-3]:
        raise ValueError(
            f"attention: key {_shape(key)} and value {_shape(value)} must agree in heads (dim -3) and length (dim -2)"
        )
    num_heads, num_kv_heads = query.shape[-3], key.shape[-3]
    if num_heads == num_kv_heads == 0:
        return
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"attention: expected num_heads (H={num_heads}) to be a multiple of num_kv_heads "
            f"(Hkv={num_kv_heads}), got key {_shape(key)}. Valid Hkv: {', '.join(map(str, valid))}."
        )


def check_masks(query: Tensor, key: Tensor, attn_mask: Tensor | None, attn_bias: Tensor | None) -> None:
    """``attn_mask`` (bool or float) and ``attn_bias`` (float) broadcast to ``(*batch, H, Lq, Lk)``.

    Raises:
        TypeError: a non-tensor, or a mask of a non-bool non-float dtype, or a non-float bias.
        ValueError: a shape that does not broadcast, or another device.
    """
    target = (*query.shape[:-1], key.shape[-2])
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attention: expected attn_mask to be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(
                f"attention: attn_mask must be bool (True = may attend) or floating (added to the scores), "
                f"got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise ValueError(f"attention: attn_mask is on {attn_mask.device}, query on {query.device}")
        _check_broadcast("attn_mask", attn_mask, target)
    if attn_bias is not None:
        if not isinstance(attn_bias, Tensor) or not attn_bias.dtype.is_floating_point:
            raise TypeError("attention: attn_bias must be a floating tensor added to the scores")
        if attn_bias.device != query.device:
            raise ValueError(f"attention: attn_bias is on {attn_bias.device}, query on {query.device}")
        _check_broadcast("attn_bias", attn_bias, target)


def check_per_head(name: str, t: Tensor | None, query: Tensor) -> None:
    """A per-head float tensor (``alibi_slopes``, ``sinks``) of shape ``(H,)`` or ``(B..., H)``.

    Raises:
        TypeError: not a floating tensor.
        ValueError: a shape that does not fit ``query``'s heads and batch dims, another device.
    """
    if t is None:
        return
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"attention: {name} must be a floating tensor of shape (H,) or (B, H)")
    num_heads, batch = query.shape[-3], query.shape[:-3]
    ok = t.ndim >= 1 and t.shape[-1] == num_heads and t.ndim - 1 <= len(batch)
    ok = ok and all(s in (1, n) for s, n in zip(reversed(t.shape[:-1]), reversed(batch)))
    if not ok:
        raise ValueError(
            f"attention: {name} of shape {_shape(t)} do not fit query {_shape(query)}; "
            f"expected (H,) = ({num_heads},) or (B, H) = ({', '.join(map(str, batch))}, {num_heads})"
        )
    if t.device != query.device:
        raise ValueError(f"attention: {name} is on {t.device}, query on {query.device}")


def check_number(name: str, value, ok, expected: str) -> float:
    """``value`` as a float if it is a finite real number (not a bool) for which ``ok(value)`` holds.

    Raises:
        ValueError: anything else: ``"attention: {name} must {expected}, got {value!r}"``.
    """
    good = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and ok(value)
    if not good:
        raise ValueError(f"attention: {name} must {expected}, got {value!r}")
    return float(value)


def check_block_mask(block_mask, query: Tensor, key: Tensor) -> None:
    """``block_mask`` is a :class:`~attnkit.functional.block_mask.BlockMask` for ``(Lq, Lk)`` on query's device.

    Raises:
        TypeError: another type.
        ValueError: built for other lengths or on another device.
    """
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"attention: expected block_mask to be an attnkit.sparse.BlockMask, got {type(block_mask).__name__}"
        )
    if (block_mask.q_len, block_mask.kv_len) != (query.shape[-2], key.shape[-2]):
        raise ValueError(
            f"attention: block_mask was built for (Lq, Lk) = ({block_mask.q_len}, {block_mask.kv_len}), "
            f"but query/key have (Lq, Lk) = ({query.shape[-2]}, {key.shape[-2]}); build it for these lengths"
        )
    if block_mask.device != query.device:
        raise ValueError(f"attention: block_mask is on {block_mask.device}, query on {query.device}")


def _effective_window(window, q_len: int, kv_len: int, is_causal: bool):
    """``None`` for a window that removes no key (so no backend builds a mask for it), else ``window``.

    Under bottom-right alignment row ``i`` sits at key position ``i + Lk - Lq``: the left side removes nothing when
    ``left >= Lk - 1``, the right side when ``right >= Lq - 1`` or the call is causal (which bounds it already).
    """
    if window is None:
        return None
    left, right = window
    left_free = left == -1 or left >= kv_len - 1
    right_free = right == -1 or right >= q_len - 1 or (is_causal and right >= 0)
    return None if left_free and right_free else window


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: ``1 / sqrt(head_dim)`` (Vaswani et al. 2017, Eq. 1)."""
    return 1.0 / math.sqrt(head_dim)


def make_spec(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    window_size=None,
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    sinks: Tensor | None = None,
) -> AttentionSpec:
    """Validate the arguments of :func:`attnkit.attention` and return them as an :class:`AttentionSpec`.

    Raises:
        TypeError: a tensor argument is not a tensor, or has the wrong dtype.
        ValueError: shapes, devices or values that do not fit (the message names the argument).
    """
    check_qkv(query, key, value)
    check_masks(query, key, attn_mask, attn_bias)
    check_per_head("alibi_slopes", alibi_slopes, query)
    check_per_head("sinks", sinks, query)
    if not isinstance(is_causal, bool):
        raise TypeError(f"attention: is_causal must be a bool, got {type(is_causal).__name__}")
    window = _effective_window(
        normalize_window_size(window_size, name="attention: window_size"), query.shape[-2], key.shape[-2], is_causal
    )
    if softcap is not None:
        softcap = check_number("softcap", softcap, lambda x: x > 0, "be a positive number (finite) or None")
    if scale is None:
        scale = default_scale(query.shape[-1])
    scale = check_number("scale", scale, lambda x: True, "be a finite number or None")
    dropout_p = check_number("dropout_p", dropout_p, lambda x: 0.0 <= x < 1.0, "lie in [0, 1)")
    check_mod(mask_mod, "mask_mod", MASK_MOD_PARAMS)
    check_mod(score_mod, "score_mod", SCORE_MOD_PARAMS)
    check_block_mask(block_mask, query, key)
    return AttentionSpec(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        is_causal=is_causal,
        window_size=window,
        attn_bias=attn_bias,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        scale=float(scale),
        dropout_p=dropout_p,
        return_weights=bool(return_weights),
        return_lse=bool(return_lse),
        mask_mod=mask_mod,
        score_mod=score_mod,
        block_mask=block_mask,
        sinks=sinks,
    )
