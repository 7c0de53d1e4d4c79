"""The validated description of one attention call, shared by every backend.

:func:`attnkit.attention` turns its arguments into an :class:`AttentionSpec` (checking them once, at the
public boundary) and hands it to a backend. Backends never re-validate; they read the spec.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from attnkit.functional.masks import alibi_bias, normalize_window_size, positional_mask

__all__ = ["AttentionOutput", "AttentionSpec", "call_mask_mod", "call_score_mod", "make_spec", "tile_terms"]

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
    whose lengths match ``Lq`` and ``Lk``.
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
    mask_mod: Callable[..., Tensor] | None = None
    score_mod: Callable[..., Tensor] | None = None
    block_mask: Any = None

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
        return frozenset(used)


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
    mask_mod: Callable[..., Tensor] | None = None,
    score_mod: Callable[..., Tensor] | None = None,
    block_mask: Any = None,
) -> AttentionSpec:
    """Validate the arguments of :func:`attnkit.attention` and return them as an :class:`AttentionSpec`.

    Raises:
        TypeError: a tensor argument is not a tensor, or has the wrong dtype.
        ValueError: shapes, devices or values that do not fit (the message names the argument).
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
    if key.shape[-2] != value.shape[-2] or key.shape[-3] != value.shape[-3]:
        raise ValueError(
            f"attention: key {_shape(key)} and value {_shape(value)} must agree in heads (dim -3) and length (dim -2)"
        )
    num_heads, num_kv_heads = query.shape[-3], key.shape[-3]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"attention: expected num_heads (H={num_heads}) to be a multiple of num_kv_heads "
            f"(Hkv={num_kv_heads}), got key {_shape(key)}. Valid Hkv: {', '.join(map(str, valid))}."
        )

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
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.dtype.is_floating_point:
            raise TypeError("attention: alibi_slopes must be a floating tensor of shape (H,) or (B, H)")
        batch = query.shape[:-3]
        ok = alibi_slopes.ndim >= 1 and alibi_slopes.shape[-1] == num_heads
        ok = ok and alibi_slopes.ndim - 1 <= len(batch)
        ok = ok and all(s in (1, n) for s, n in zip(reversed(alibi_slopes.shape[:-1]), reversed(batch)))
        if not ok:
            raise ValueError(
                f"attention: alibi_slopes of shape {_shape(alibi_slopes)} do not fit query {_shape(query)}; "
                f"expected (H,) = ({num_heads},) or (B, H) = ({', '.join(map(str, batch))}, {num_heads})"
            )
        if alibi_slopes.device != query.device:
            raise ValueError(f"attention: alibi_slopes is on {alibi_slopes.device}, query on {query.device}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"attention: is_causal must be a bool, got {type(is_causal).__name__}")
    window = normalize_window_size(window_size, name="attention: window_size")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
            raise ValueError(f"attention: softcap must be a positive number or None, got {softcap!r}")
        softcap = float(softcap)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must lie in [0, 1), got {dropout_p!r}")
    _check_mod(mask_mod, "mask_mod", ("b", "h", "q_idx", "kv_idx"))
    _check_mod(score_mod, "score_mod", ("score", "b", "h", "q_idx", "kv_idx"))
    if block_mask is not None:
        from attnkit.sparse.block_mask import BlockMask  # lazy: attnkit.sparse builds on this module

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
        dropout_p=float(dropout_p),
        return_weights=bool(return_weights),
        return_lse=bool(return_lse),
        mask_mod=mask_mod,
        score_mod=score_mod,
        block_mask=block_mask,
    )


def _check_mod(fn, name: str, params: tuple[str, ...]) -> None:
    """Raise unless ``fn`` is ``None`` or a callable accepting exactly ``len(params)`` positional arguments."""
    if fn is None:
        return
    expected = f"{name}({', '.join(params)})"
    if not callable(fn):
        raise TypeError(f"attention: expected {name} to be a callable {expected}, got {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: checked when called
        return
    kinds = [p.kind for p in sig.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if len(required) > len(params) or len(positional) < len(params):
        raise TypeError(
            f"attention: {name} must take {len(params)} positional arguments, {expected} (FlexAttention's "
            f"signature), got a callable with signature {name}{sig}"
        )


def call_mask_mod(mask_mod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor, *, name="mask_mod") -> Tensor:
    """Evaluate ``mask_mod(b, h, q_idx, kv_idx)`` on broadcastable int64 index tensors and check the result.

    Returns:
        a bool tensor broadcastable to ``broadcast_shapes(b, h, q_idx, kv_idx)`` (True = may attend).

    Raises:
        TypeError: the result is not a bool tensor.
        ValueError: its shape does not broadcast to the indices' shape.
    """
    out = mask_mod(b, h, q_idx, kv_idx)
    if not isinstance(out, Tensor) or out.dtype != torch.bool:
        got = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(
            f"attention: {name}(b, h, q_idx, kv_idx) must return a bool tensor (True = may attend), got {got}; "
            f"it is called on broadcastable int64 index tensors, so use elementwise tensor operations"
        )
    _check_mod_shape(name, out, b, h, q_idx, kv_idx)
    return out


def call_score_mod(score_mod, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Evaluate ``score_mod(score, b, h, q_idx, kv_idx)`` and check that it returns a float tensor like ``score``.

    Raises:
        TypeError: the result is not a floating tensor.
        ValueError: its shape does not broadcast to ``score``'s.
    """
    out = score_mod(score, b, h, q_idx, kv_idx)
    if not isinstance(out, Tensor) or not out.dtype.is_floating_point:
        got = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"attention: score_mod(score, b, h, q_idx, kv_idx) must return a float tensor, got {got}")
    _check_mod_shape("score_mod", out, score, b, h, q_idx, kv_idx)
    if out.shape != score.shape:
        out = out.expand(score.shape)
    return out.to(score.dtype)


def _check_mod_shape(name: str, out: Tensor, *inputs: Tensor) -> None:
    target = torch.broadcast_shapes(*(t.shape for t in inputs))
    try:
        if torch.broadcast_shapes(out.shape, target) != target:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"attention: {name} returned shape {_shape(out)}, which does not broadcast to the tile's shape "
            f"{tuple(target)}; it must work elementwise on broadcastable index tensors"
        ) from None


def _narrow_tile(t: Tensor, q_range: tuple[int, int], kv_range: tuple[int, int]) -> Tensor:
    """Take rows ``q_range`` and columns ``kv_range`` of a mask/bias whose last dims may be broadcast (size 1)."""
    if t.ndim >= 2 and t.shape[-2] != 1:
        t = t[..., q_range[0] : q_range[1], :]
    if t.ndim >= 1 and t.shape[-1] != 1:
        t = t[..., kv_range[0] : kv_range[1]]
    return t


def tile_terms(
    spec: AttentionSpec,
    q_range: tuple[int, int] | None = None,
    kv_range: tuple[int, int] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Everything a backend adds to the (soft-capped) scores of one tile, except the scores themselves.

    Args:
        spec: the call.
        q_range: ``(start, stop)`` query rows of the tile; default all.
        kv_range: ``(start, stop)`` key columns of the tile; default all.

    Returns:
        ``(bias, keep)``: ``bias`` is a float32 (float64 for float64 inputs) additive term broadcastable to
        ``(*batch, H, rows, cols)`` — the sum of ``attn_bias``, ALiBi and a float ``attn_mask`` — or ``None``;
        ``keep`` is a bool mask (True = may attend) combining a bool ``attn_mask``, ``is_causal`` and
        ``window_size``, or ``None`` when nothing is masked. Neither is expanded beyond what broadcasting needs.
    """
    q_range = q_range if q_range is not None else (0, spec.q_len)
    kv_range = kv_range if kv_range is not None else (0, spec.kv_len)
    acc = lse_dtype(spec.query.dtype)
    bias = None
    if spec.attn_bias is not None:
        bias = _narrow_tile(spec.attn_bias, q_range, kv_range).to(acc)
    if spec.alibi_slopes is not None:
        alibi = alibi_bias(spec.alibi_slopes, spec.q_len, spec.kv_len, q_range=q_range, kv_range=kv_range, dtype=acc)
        bias = alibi if bias is None else bias + alibi
    keep = positional_mask(
        spec.q_len,
        spec.kv_len,
        is_causal=spec.is_causal,
        window_size=spec.window_size,
        device=spec.query.device,
        q_range=q_range,
        kv_range=kv_range,
    )
    if spec.attn_mask is not None:
        mask = _narrow_tile(spec.attn_mask, q_range, kv_range)
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            bias = mask.to(acc) if bias is None else bias + mask
    return bias, keep
