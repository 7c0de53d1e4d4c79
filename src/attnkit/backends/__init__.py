"""Attention backends: an open registry, ``available()`` to list it and ``select()`` to see what ``auto`` picks.

Each backend lives in its own module and registers itself on import into the core's registry
(:mod:`attnkit.functional.registry`, whose :func:`dispatch` runs a validated call on the chosen one).
"""

from __future__ import annotations

from torch import Tensor

from attnkit.backends import blocksparse as _blocksparse  # noqa: F401  (registers "blocksparse")
from attnkit.backends import math as _math  # noqa: F401  (registers "math")
from attnkit.backends import sdpa as _sdpa  # noqa: F401  (registers "sdpa")
from attnkit.backends import tiled as _tiled  # noqa: F401  (registers "tiled")
from attnkit.functional.registry import (
    ALL_OPTIONS,
    Backend,
    BackendInfo,
    Selection,
    available,
    dispatch,
    get,
    register,
    select_for_spec,
)
from attnkit.functional.spec import make_spec

__all__ = [
    "ALL_OPTIONS",
    "Backend",
    "BackendInfo",
    "Selection",
    "available",
    "dispatch",
    "get",
    "register",
    "select",
]


def select(query: Tensor, key: Tensor, value: Tensor, *, backend: str = "auto", **options) -> Selection:
    """Which backend :func:`attnkit.attention` would run for these inputs, and why the others were not chosen.

    Takes the same arguments as :func:`attnkit.attention`.

    Returns:
        a :class:`Selection`; ``str(selection)`` is a readable explanation.

    Raises:
        the errors of :func:`attnkit.attention` for invalid inputs.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 4, 8)
        >>> select(q, q, q, softcap=30.0).backend
        'math'
    """
    return select_for_spec(make_spec(query, key, value, **options), backend)
