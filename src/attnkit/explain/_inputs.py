"""How the explanation methods call a model with the inputs a user passes them (one rule for all of them)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["call_model"]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping (e.g. a tokenizer's batch), ``model(*inputs)`` for a tuple or list, else
    ``model(inputs)`` (one tensor)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
