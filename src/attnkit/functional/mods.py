"""FlexAttention-style callbacks: ``mask_mod`` and ``score_mod``, their types, signature checks and evaluation.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` says which (query, key) pairs may attend; a
``score_mod(score, b, h, q_idx, kv_idx) -> float tensor`` rewrites a score. Both are called on broadcastable
int64 index tensors (one tile at a time by the tiled backends), so they must work elementwise.

Reference: the signatures of ``torch.nn.attention.flex_attention`` (PyTorch >= 2.5).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["MASK_MOD_PARAMS", "SCORE_MOD_PARAMS", "MaskMod", "ScoreMod", "call_mask_mod", "call_score_mod", "check_mod"]

#: ``mask_mod(b, h, q_idx, kv_idx) -> Tensor[bool]`` (True = may attend).
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
#: ``score_mod(score, b, h, q_idx, kv_idx) -> Tensor[float]``.
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

MASK_MOD_PARAMS = ("b", "h", "q_idx", "kv_idx")
SCORE_MOD_PARAMS = ("score", "b", "h", "q_idx", "kv_idx")


def check_mod(fn, name: str, params: tuple[str, ...], *, who: str = "attention") -> None:
    """Raise unless ``fn`` is ``None`` or a callable accepting exactly ``len(params)`` positional arguments.

    Raises:
        TypeError: ``fn`` is not callable, or its signature cannot take ``params`` positionally.
    """
    if fn is None:
        return
    expected = f"{name}({', '.join(params)})"
    if not callable(fn):
        raise TypeError(f"{who}: expected {name} to be a callable {expected}, got {type(fn).__name__}")
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
            f"{who}: {name} must take {len(params)} positional arguments, {expected} (FlexAttention's "
            f"signature), got a callable with signature {name}{sig}"
        )


def call_mask_mod(mask_mod: MaskMod, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor, *, name="mask_mod") -> Tensor:
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


def call_score_mod(score_mod: ScoreMod, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
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
            f"attention: {name} returned shape {tuple(out.shape)}, which does not broadcast to the tile's shape "
            f"{tuple(target)}; it must work elementwise on broadcastable index tensors"
        ) from None
