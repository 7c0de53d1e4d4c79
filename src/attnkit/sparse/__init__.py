"""Block-sparse attention layouts: :class:`BlockMask` and the Longformer / BigBird / document layouts.

Example:
    >>> import torch, attnkit
    >>> from attnkit import sparse
    >>> mask = sparse.sliding_window(512, window_size=64, block_size=64)
    >>> round(mask.density(), 3)
    0.344
    >>> q = k = v = torch.randn(1, 2, 512, 16)
    >>> attnkit.attention(q, k, v, block_mask=mask, backend="blocksparse").shape
    torch.Size([1, 2, 512, 16])
"""

from attnkit.functional.block_mask import BlockMask, LayoutGroup
from attnkit.sparse.layouts import bigbird, causal, document, global_tokens, longformer, sliding_window

__all__ = [
    "BlockMask",
    "LayoutGroup",
    "bigbird",
    "causal",
    "document",
    "global_tokens",
    "longformer",
    "sliding_window",
]
