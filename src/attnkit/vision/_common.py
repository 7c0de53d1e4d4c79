"""Input validation and attention-map reporting shared by the vision blocks (private)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnkit.functional import observe

__all__ = ["check_feature_map", "check_int", "check_tokens", "emit_map"]


def check_int(value: Any, name: str, owner: str, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int ``>= minimum`` (bools rejected), else raise naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: expected {name} to be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{owner}: expected {name} >= {minimum}, got {value}")
    return value


def check_feature_map(x: Any, channels: int | None, owner: str) -> None:
    """Check that ``x`` is a floating ``(B, C, Hi, Wi)`` tensor with ``C == channels`` (when given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected x to be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{owner}: expected x of rank 4 (B, C, Hi, Wi), got shape {tuple(x.shape)} (rank {x.ndim})")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{owner}: expected a floating-point x, got {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{owner}: expected x with {channels} channels (dim 1, as constructed), got shape {tuple(x.shape)}"
        )


def check_tokens(x: Any, embed_dim: int | None, owner: str, name: str = "x") -> None:
    """Check that ``x`` is a floating ``(B, N, C)`` tensor with ``C == embed_dim`` (when given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{owner}: expected {name} of rank 3 (B, N, C), got shape {tuple(x.shape)} (rank {x.ndim})")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{owner}: expected a floating-point {name}, got {x.dtype}")
    if embed_dim is not None and x.shape[-1] != embed_dim:
        raise ValueError(
            f"{owner}: expected {name} with embed_dim {embed_dim} (last dim, as constructed), "
            f"got shape {tuple(x.shape)}"
        )


def emit_map(kind: str, weights: Tensor, module: Any, **layout: Any) -> None:
    """Report a channel ``(B, C)`` or spatial ``(B, 1, Hi, Wi)`` map to installed observers, if any.

    The tensor is detached so an observer cannot change the forward or backward pass; ``layout`` always
    carries ``module`` (the class name) so a capture tool can tell blocks apart.
    """
    if observe.is_observed():
        layout = {"module": type(module).__name__, **layout}
        observe.emit(observe.AttentionEvent(kind, weights=weights.detach(), layout=layout))
