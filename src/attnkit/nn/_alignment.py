"""Shared helpers of the classic (recurrent encoder-decoder) attention modules: checks, masked softmax."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.functional import observe
from attnkit.functional.tiles import masked_softmax

__all__ = ["check_inputs", "softmax_context"]


def check_inputs(owner: str, query: Tensor, key: Tensor, value: Tensor | None, query_dim: int, key_dim: int) -> Tensor:
    """Validate ``(B, Lq, query_dim)``, ``(B, Lk, key_dim)``, ``(B, Lk, Dv)`` inputs; return ``value``."""
    value = key if value is None else value
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: expected {name} to be a tensor, got {type(t).__name__}")
        if t.ndim != 3:
            raise ValueError(f"{owner}: expected {name} of shape (B, L, features), got {tuple(t.shape)}")
    if query.shape[-1] != query_dim or key.shape[-1] != key_dim:
        raise ValueError(
            f"{owner}: expected query (B, Lq, {query_dim}) and key (B, Lk, {key_dim}), got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    if not (query.shape[0] == key.shape[0] == value.shape[0]) or key.shape[1] != value.shape[1]:
        raise ValueError(
            f"{owner}: query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
            f"must share the batch size, and key and value the length Lk"
        )
    return value


def softmax_context(owner: str, scores: Tensor, value: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Masked softmax of ``(B, Lq, Lk)`` scores over keys, and the context ``weights @ value``.

    Rows with no key left give zero weights and a zero context. The weights are announced on the
    :mod:`attnkit.functional.observe` channel as a ``"token"`` event of shape ``(B, 1, Lq, Lk)``.
    """
    keep = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise TypeError(f"{owner}: attn_mask must be a bool (True = may attend) or float tensor")
        try:
            torch.broadcast_shapes(attn_mask.shape, scores.shape)
        except RuntimeError:
            raise ValueError(
                f"{owner}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, Lq, Lk) = "
                f"{tuple(scores.shape)}"
            ) from None
        if attn_mask.dtype == torch.bool:
            keep = attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    weights, _ = masked_softmax(scores, keep)
    context = torch.matmul(weights.to(value.dtype), value)
    if observe.is_observed():
        observe.emit(observe.AttentionEvent("token", output=context, weights=weights.unsqueeze(1)))
    return context, weights
