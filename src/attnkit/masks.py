"""Public mask helpers (see :mod:`attnkit.functional.masks` for the conventions)."""

from attnkit.functional.masks import (
    alibi_bias,
    alibi_slopes,
    block_diagonal,
    causal,
    from_key_padding_mask,
    padding,
    sliding_window,
)

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "block_diagonal",
    "causal",
    "from_key_padding_mask",
    "padding",
    "sliding_window",
]
