"""Rotary position embeddings (RoPE).

Su, Lu, Pan, Murtadha, Wen, Liu 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding",
arXiv:2104.09864, Eq. 34: the pair ``(x_{2i}, x_{2i+1})`` of a query/key at position ``m`` is rotated by the
angle ``m · θ_i`` with ``θ_i = base^(-2i/D)``, so that ``<R_m q, R_n k>`` depends on ``m - n`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Rotate query/key features by position-dependent angles (Su et al. 2021, Eq. 34).

    Args:
        head_dim: ``D``, the feature size rotated; must be even.
        base: ``θ`` base of the frequencies ``θ_i = base^(-2i/D)``, ``i = 0 .. D/2 - 1``. Default 10000.
        interleaved: ``True`` (default, the paper's layout and Meta's complex-number implementation) rotates
            adjacent pairs ``(x_{2i}, x_{2i+1})``; ``False`` rotates ``(x_i, x_{i + D/2})`` (the "rotate_half"
            layout of GPT-NeoX and Hugging Face Llama checkpoints).

    Raises:
        ValueError: ``head_dim`` is not a positive even int, or ``base <= 1``.

    Example:
        >>> import torch
        >>> rope = RotaryEmbedding(8)
        >>> x = torch.randn(2, 3, 5, 8)  # (B, H, L, D)
        >>> rope(x, torch.arange(5)).shape
        torch.Size([2, 3, 5, 8])
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, interleaved: bool = True, device=None) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"RotaryEmbedding: expected head_dim to be a positive even int, got {head_dim!r}")
        if not base > 1:
            raise ValueError(f"RotaryEmbedding: expected base > 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)
        self.interleaved = bool(interleaved)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, interleaved={self.interleaved}"

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` at ``positions``.

        Args:
            x: ``(..., L, D)`` queries or keys, e.g. ``(B, H, L, D)``; any floating dtype.
            positions: ``(L,)`` or ``(B, L)`` integer (or float) positions; ``(B, L)`` broadcasts over the
                heads of a ``(B, H, L, D)`` input.

        Returns:
            ``(..., L, D)`` in the dtype of ``x`` (computed in float32, or float64 for float64 input).

        Raises:
            ValueError: ``x.shape[-1] != head_dim`` or ``positions`` does not match ``L``.
        """
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding: expected x of shape (..., L, {self.head_dim}), got {tuple(x.shape)}")
        if positions.ndim not in (1, 2) or positions.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"RotaryEmbedding: expected positions (L,) or (B, L) with L={x.shape[-2]}, got shape "
                f"{tuple(positions.shape)}"
            )
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        # Frequencies in float64 then rounded once: no buffer, so module.to(dtype) cannot coarsen them.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=x.device) / self.head_dim
        inv_freq = (self.base**-exponents).to(acc)
        freqs = positions.to(device=x.device, dtype=acc).unsqueeze(-1) * inv_freq
        if positions.ndim == 2 and x.ndim == 4:
            freqs = freqs.unsqueeze(1)  # (B, 1, L, D/2): the same positions for every head
        cos, sin = freqs.cos(), freqs.sin()
        xf = x.to(acc)
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.to(x.dtype)
