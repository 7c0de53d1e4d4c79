"""Fixed sinusoidal position encodings (Vaswani et al. 2017, Sec. 3.5)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalPositionalEncoding", "sinusoidal_positions"]


def sinusoidal_positions(
    length: int, embed_dim: int, *, base: float = 10000.0, offset: int = 0, device=None, dtype=torch.float32
) -> Tensor:
    """``PE(pos, 2i) = sin(pos / base^(2i/E))``, ``PE(pos, 2i+1) = cos(pos / base^(2i/E))``.

    Args:
        length: ``L``, number of positions.
        embed_dim: ``E``, must be even.
        base: 10000 in the paper.
        offset: first position (e.g. the number of cached tokens when decoding).
        device, dtype: of the result (computed in float64 and rounded).

    Returns:
        ``(L, E)`` tensor; row ``p`` encodes position ``offset + p``.

    Raises:
        ValueError: ``length < 0``, ``embed_dim`` not a positive even int, or ``offset < 0``.

    References:
        Vaswani et al. 2017, "Attention Is All You Need", Sec. 3.5.

    Example:
        >>> import torch
        >>> sinusoidal_positions(2, 4).tolist()[0]
        [0.0, 1.0, 0.0, 1.0]
    """
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0 or embed_dim % 2:
        raise ValueError(f"sinusoidal_positions: expected embed_dim to be a positive even int, got {embed_dim!r}")
    if length < 0 or offset < 0:
        raise ValueError(f"sinusoidal_positions: expected length >= 0 and offset >= 0, got {length}, {offset}")
    pos = torch.arange(offset, offset + length, dtype=torch.float64, device=device).unsqueeze(-1)
    inv_freq = base ** (-torch.arange(0, embed_dim, 2, dtype=torch.float64, device=device) / embed_dim)
    angles = pos * inv_freq  # (L, E/2)
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave: sin at 2i, cos at 2i+1
    return pe.to(dtype)


class SinusoidalPositionalEncoding(nn.Module):
    """Add :func:`sinusoidal_positions` to token embeddings (no parameters).

    Args:
        embed_dim: ``E``, even.
        base: 10000 in the paper.
        batch_first: ``x`` is ``(B, L, E)`` (default) rather than ``(L, B, E)``.

    Example:
        >>> SinusoidalPositionalEncoding(8)(torch.zeros(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, embed_dim: int, *, base: float = 10000.0, batch_first: bool = True) -> None:
        super().__init__()
        sinusoidal_positions(0, embed_dim)  # validates embed_dim
        self.embed_dim, self.base, self.batch_first = embed_dim, float(base), bool(batch_first)

    def forward(self, x: Tensor, *, offset: int = 0) -> Tensor:
        """Return ``x + PE`` for positions ``offset .. offset + L - 1``.

        Args:
            x: ``(B, L, E)`` (``(L, B, E)`` if not ``batch_first``).
            offset: position of the first token.

        Raises:
            ValueError: ``x`` is not 3-D with last dim ``E``.
        """
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"SinusoidalPositionalEncoding: expected x of shape (B, L, {self.embed_dim}), got {tuple(x.shape)}"
            )
        length = x.shape[1] if self.batch_first else x.shape[0]
        pe = sinusoidal_positions(length, self.embed_dim, base=self.base, offset=offset, device=x.device, dtype=x.dtype)
        return x + (pe if self.batch_first else pe.unsqueeze(1))
