"""Feed-forward activations of the transformer layers: a registry of names filled by a decorator."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "get_activation", "register_activation"]

#: name -> function ``Tensor -> Tensor``.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {}


def register_activation(name: str) -> Callable[[Callable[[Tensor], Tensor]], Callable[[Tensor], Tensor]]:
    """Decorator adding a function to :data:`ACTIVATIONS` under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def add(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        if name in ACTIVATIONS:
            raise ValueError(f"register_activation: {name!r} is already registered")
        ACTIVATIONS[name] = fn
        return fn

    return add


@register_activation("relu")
def relu(x: Tensor) -> Tensor:
    """``max(x, 0)`` (Vaswani et al. 2017, Eq. 2)."""
    return F.relu(x)


@register_activation("gelu")
def gelu(x: Tensor) -> Tensor:
    """Exact GELU ``x · Φ(x)`` (Hendrycks & Gimpel 2016); BERT's and ViT's ``hidden_act="gelu"``."""
    return F.gelu(x)


@register_activation("gelu_tanh")
def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (Hendrycks & Gimpel 2016; GPT-2's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


@register_activation("silu")
def silu(x: Tensor) -> Tensor:
    """``x · sigmoid(x)`` (Elfwing et al. 2018; "swish")."""
    return F.silu(x)


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation: unknown name {name!r}; valid: {', '.join(map(repr, ACTIVATIONS))}") from None
