"""Sliding-window self-attention for long documents: ``LocalAttention`` and Longformer's window + global tokens.

Beltagy, Peters, Cohan 2020, "Longformer: The Long-Document Transformer", Sec. 3.1 (sliding window and global
attention). Attention runs through :func:`attnkit.attention`: a narrow window over a long sequence goes to the
``"blocksparse"`` backend under ``backend="auto"``, whose cost grows with the window, not with ``L²``.
Simplification: global tokens use the same projections as local ones (the paper trains separate ``Q_g, K_g,
V_g``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.functional.attention import attention
from attnkit.functional.masks import from_key_padding_mask, normalize_window_size

__all__ = ["LocalAttention", "LongformerAttention"]


class LocalAttention(nn.Module):
    """Multi-head self-attention restricted to a sliding window of keys around each token.

    Token ``i`` attends to tokens ``i - left .. i + right`` (inclusive; ``is_causal`` drops the right side),
    the window of Longformer / Mistral. A drop-in self-attention: ``(B, L, E) -> (B, L, E)``.

    Args:
        embed_dim: ``E``.
        num_heads: ``H``; ``E % H == 0``.
        window_size: int ``w`` = ``(w, w)`` or ``(left, right)``; ``-1`` = unbounded side. Default 256.
        is_causal: also causal (a decoder). Default ``False``.
        num_kv_heads: ``Hkv`` for grouped-query attention (default ``H``).
        bias: biases in the projections.
        dropout: attention dropout probability during training.
        backend: passed to :func:`attnkit.attention` (default ``"auto"``).
        device, dtype: of the parameters.

    Raises:
        ValueError: ``embed_dim`` not a multiple of ``num_heads``, or ``num_heads`` not a multiple of
            ``num_kv_heads``; bad ``window_size`` (also TypeError).

    Example:
        >>> layer = LocalAttention(32, 4, window_size=8)
        >>> layer(torch.randn(2, 100, 32)).shape
        torch.Size([2, 100, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        window_size: int | tuple[int, int] = 256,
        is_causal: bool = False,
        num_kv_heads: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"{type(self).__name__}: embed_dim={embed_dim} is not a multiple of num_heads={num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"{type(self).__name__}: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.window_size = normalize_window_size(window_size, name=f"{type(self).__name__}: window_size")
        self.is_causal, self.dropout, self.backend = is_causal, dropout, backend
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.kv_proj = nn.Linear(embed_dim, 2 * num_kv_heads * self.head_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def _mask_kwargs(self, seq_len: int, device) -> dict:
        return {"window_size": self.window_size, "is_causal": self.is_causal}

    def forward(self, x: Tensor, *, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attend within the window.

        Args:
            x: ``(B, L, E)``.
            key_padding_mask: ``(B, L)`` bool, **True = padding, ignored** (``nn.MultiheadAttention``'s
                convention), or ``None``.

        Returns:
            ``(B, L, E)``.

        Raises:
            ValueError: ``x`` is not ``(B, L, E)`` with ``E = embed_dim``.
        """
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{type(self).__name__}: expected x of shape (B, L, E={self.embed_dim}), got {tuple(x.shape)}"
            )
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        kv = self.kv_proj(x).view(B, L, 2, self.num_kv_heads, self.head_dim)
        k, v = kv.unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, L, D)
        mask = None if key_padding_mask is None else from_key_padding_mask(key_padding_mask)
        out = attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
            **self._mask_kwargs(L, x.device),
        )
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))


class LongformerAttention(LocalAttention):
    """Longformer self-attention: a sliding window plus global tokens that attend, and are attended by, all.

    Args:
        embed_dim, num_heads, window_size, num_kv_heads, bias, dropout, backend, device, dtype: as
            :class:`LocalAttention` (non-causal).
        global_tokens: default global tokens: a count of leading tokens (e.g. 1 for ``[CLS]``), or positions.
        block_size: block of the :class:`attnkit.sparse.BlockMask` layout (default 128).

    Example:
        >>> layer = LongformerAttention(32, 4, window_size=8, global_tokens=1, block_size=16)
        >>> layer(torch.randn(2, 100, 32)).shape
        torch.Size([2, 100, 32])
    """

    def __init__(self, embed_dim: int, num_heads: int, *, global_tokens=1, block_size: int = 128, **kwargs):
        if kwargs.get("is_causal"):
            raise ValueError("LongformerAttention: global tokens see the whole sequence; use LocalAttention for causal")
        super().__init__(embed_dim, num_heads, **kwargs)
        self.global_tokens, self.block_size = global_tokens, block_size
        self._cache: tuple | None = None

    def _mask_kwargs(self, seq_len: int, device) -> dict:
        from attnkit.sparse.layouts import longformer  # attnkit.sparse is optional for the rest of nn

        tokens = self.global_tokens
        key = (seq_len, str(device), tokens if isinstance(tokens, int) else tuple(torch.as_tensor(tokens).tolist()))
        if self._cache is None or self._cache[0] != key:
            mask = longformer(seq_len, self.window_size, tokens, block_size=self.block_size, device=device)
            self._cache = (key, mask)
        return {"block_mask": self._cache[1]}
