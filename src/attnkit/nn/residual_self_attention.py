"""Self-attention added to an existing network as a residual branch that starts as the identity (SAGAN's gate).

Zhang et al. 2019, "Self-Attention Generative Adversarial Networks", Sec. 3, Eq. 3: ``y = γ · o + x`` with the
learnable scalar ``γ`` initialised to 0, so the network with the block inserted computes exactly what it computed
before, and learns how much to use the attention. Here ``o`` is :class:`attnkit.nn.MultiHeadAttention` over the
positions of ``x`` after a LayerNorm over channels (pre-norm, Xiong et al. 2020), with any number of heads
(``num_heads=1``: single-head attention).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.nn.multihead import MultiHeadAttention

__all__ = ["LAYOUTS", "ResidualSelfAttention"]

#: Tensor layouts the block accepts: feature maps ``(B, C, Hi, Wi)``, channels-first sequences ``(B, C, L)`` (a
#: Conv1d's output), batch-first ``(B, L, C)`` and sequence-first ``(L, B, C)`` states (an RNN's output).
LAYOUTS = ("BCHW", "BCL", "BLC", "LBC")


class ResidualSelfAttention(nn.Module):
    r"""``x + γ · MultiHeadAttention(LayerNorm(x))`` over the positions of ``x``, ``γ`` initialised to 0.

    Every position (pixel of a map, step of a sequence) is a token of width ``C``; the attention has no position
    encoding (like the non-local block), so it is equivariant to permutations of the positions.

    Args:
        channels: ``C``; a multiple of ``num_heads``.
        num_heads: ``H``; default 1 (single-head attention).
        layout: one of :data:`LAYOUTS` (default ``"BCHW"``).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x`` in ``layout`` with ``C`` channels -> the same shape.

    Raises:
        ValueError: an unknown ``layout``; ``channels`` not a multiple of ``num_heads``; an input whose rank or
            channel count does not match ``layout`` and ``channels``.

    References:
        Zhang et al. 2019 (SAGAN), Eq. 3 (the zero-initialised residual gate); Vaswani et al. 2017, Sec. 3.2.2
        (multi-head attention); Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"
        (pre-norm).

    Example:
        >>> block = ResidualSelfAttention(16, num_heads=1)
        >>> x = torch.randn(2, 16, 5, 7)
        >>> torch.equal(block(x), x)  # gamma = 0 at initialisation: the identity
        True
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        layout: str = "BCHW",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"ResidualSelfAttention: unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
        dd = {"device": device, "dtype": dtype}
        self.channels, self.num_heads, self.layout = channels, num_heads, layout
        self.norm = nn.LayerNorm(channels, **dd)
        self.attn = MultiHeadAttention(channels, num_heads, **dd)
        self.gamma = nn.Parameter(torch.zeros((), **dd))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_heads={self.num_heads}, layout={self.layout!r}"

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the positions of ``x`` (in :attr:`layout`); returns the same shape."""
        rank = 4 if self.layout == "BCHW" else 3
        channel_dim = 1 if self.layout in ("BCHW", "BCL") else 2
        if not isinstance(x, Tensor) or x.ndim != rank or x.shape[channel_dim] != self.channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"ResidualSelfAttention: expected x in layout {self.layout} with C={self.channels} "
                f"(dim {channel_dim}), got {shape}"
            )
        if self.layout == "LBC":
            tokens = x.transpose(0, 1)  # (B, L, C)
        elif self.layout == "BLC":
            tokens = x
        else:
            tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        out, _ = self.attn(self.norm(tokens))  # (B, N, C)
        if self.layout == "LBC":
            out = out.transpose(0, 1)
        elif self.layout != "BLC":
            out = out.transpose(1, 2).reshape(x.shape)
        return x + self.gamma * out
