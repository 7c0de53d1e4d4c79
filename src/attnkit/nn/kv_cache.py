"""Key/value cache for incremental (token-by-token) decoding with :class:`attnkit.nn.MultiHeadAttention`."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache"]


class KVCache:
    """The projected (and rotated) keys and values a self-attention layer has seen so far.

    Pass one cache per attention layer as ``kv_cache=`` to :meth:`MultiHeadAttention.forward`; each call
    appends its new keys/values and attends over everything cached. With ``is_causal=True`` the new queries
    are aligned **bottom-right** against the cached keys (query ``i`` of ``Lq`` new ones sits at key position
    ``i + Lk - Lq``), so feeding a sequence one token at a time gives the same outputs as one causal call over
    the whole sequence.

    Attributes:
        key: ``(B, Hkv, Lk, D)`` cached keys, or ``None`` before the first update.
        value: ``(B, Hkv, Lk, Dv)`` cached values, or ``None``.

    Example:
        >>> import torch
        >>> cache = KVCache()
        >>> k, v = cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
        >>> cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))[0].shape, len(cache)
        (torch.Size([1, 2, 4, 4]), 4)
    """

    def __init__(self) -> None:
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    def __len__(self) -> int:
        """``Lk``, the number of cached positions."""
        return 0 if self.key is None else self.key.shape[-2]

    def reset(self) -> None:
        """Forget every cached position."""
        self.key = None
        self.value = None

    def update(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``key``/``value`` along the length dimension and return the full cache.

        Args:
            key: ``(B, Hkv, L, D)`` new keys.
            value: ``(B, Hkv, L, Dv)`` new values.

        Returns:
            ``(key, value)``: ``(B, Hkv, Lk + L, D)`` and ``(B, Hkv, Lk + L, Dv)``.

        Raises:
            ValueError: ``key``/``value`` are not 4-D, or their batch, head or head_dim sizes differ from the
                cached ones.
        """
        if key.ndim != 4 or value.ndim != 4:
            raise ValueError(
                f"KVCache.update: expected key (B, Hkv, L, D) and value (B, Hkv, L, Dv), got shapes "
                f"{tuple(key.shape)} and {tuple(value.shape)}"
            )
        if self.key is None:
            self.key, self.value = key, value
            return key, value
        for name, new, old in (("key", key, self.key), ("value", value, self.value)):
            if new.shape[:2] != old.shape[:2] or new.shape[-1] != old.shape[-1]:
                raise ValueError(
                    f"KVCache.update: new {name} of shape {tuple(new.shape)} does not continue the cached "
                    f"{tuple(old.shape)}; expected the same (B, Hkv, *, D)"
                )
        self.key = torch.cat([self.key, key], dim=-2)
        self.value = torch.cat([self.value, value], dim=-2)
        return self.key, self.value
