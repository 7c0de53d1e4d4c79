"""Transformer decoder layer (causal self-attention, cross-attention, feed-forward), post- or pre-norm.

Vaswani et al. 2017, Sec. 3.1 (decoder stack). Matches :class:`torch.nn.TransformerDecoderLayer` with copied
weights (``cross_attn`` plays the role of torch's ``multihead_attn``).
"""

from __future__ import annotations

from torch import Tensor, nn

from attnkit.nn.activations import get_activation
from attnkit.nn.encoder_layer import check_layer_options
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.multihead import MultiHeadAttention
from attnkit.nn.rotary import RotaryEmbedding

__all__ = ["TransformerDecoderLayer"]


class TransformerDecoderLayer(nn.Module):
    """Self-attention, cross-attention to an encoder ``memory``, and a feed-forward block.

    ``norm_first=False`` (post-norm)::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(cross_attn(x, memory)))
        x = norm3(x + dropout3(linear2(activation(linear1(x)))))

    ``norm_first=True`` (pre-norm) applies each norm to the sublayer input instead:
    ``x = x + dropout_i(sublayer(norm_i(x)))``.

    Shapes: ``x`` ``(B, L, E)``, ``memory`` ``(B, S, kdim)`` (sequence dims first if not ``batch_first``).
    Submodules (stable names): ``self_attn``, ``cross_attn`` (:class:`MultiHeadAttention`), ``linear1``,
    ``linear2``, ``norm1``, ``norm2``, ``norm3``, ``dropout1``, ``dropout2``, ``dropout3``.

    Args:
        embed_dim: ``E``.
        num_heads: ``H``.
        ffn_dim: ``F`` (default ``4 · E``).
        dropout: residual-branch dropout, training only (none inside the feed-forward block, unlike torch).
        attn_drop: attention-probability dropout, training only.
        activation: ``"gelu"`` (default), ``"gelu_tanh"``, ``"relu"`` or ``"silu"``.
        norm_first: pre-norm if ``True``, post-norm (default) if ``False``.
        layer_norm_eps: LayerNorm epsilon (default 1e-5 as torch).
        bias: biases in linear layers and LayerNorms.
        memory_dim: width of ``memory`` (cross-attention ``kdim``/``vdim``; default ``E``).
        num_kv_heads, rope: self-attention options of :class:`MultiHeadAttention` (RoPE on self-attention
            only).
        batch_first, backend, device, dtype: as :class:`TransformerEncoderLayer`.

    Raises:
        ValueError: invalid sizes, dropout or activation.

    Example:
        >>> import torch
        >>> layer = TransformerDecoderLayer(32, 4)
        >>> layer(torch.randn(2, 5, 32), torch.randn(2, 9, 32), is_causal=True).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
        attn_drop: float = 0.0,
        activation: str = "gelu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        memory_dim: int | None = None,
        num_kv_heads: int | None = None,
        rope: RotaryEmbedding | None = None,
        batch_first: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        ffn_dim = check_layer_options("TransformerDecoderLayer", embed_dim, ffn_dim, dropout)
        self.activation_name = activation
        self.activation = get_activation(activation)
        factory = {"device": device, "dtype": dtype}
        common = {
            "bias": bias,
            "dropout": attn_drop,
            "batch_first": batch_first,
            "backend": backend,
            **factory,
        }
        self.self_attn = MultiHeadAttention(embed_dim, num_heads, num_kv_heads=num_kv_heads, rope=rope, **common)
        self.cross_attn = MultiHeadAttention(embed_dim, num_heads, kdim=memory_dim, vdim=memory_dim, **common)
        self.linear1 = nn.Linear(embed_dim, ffn_dim, bias=bias, **factory)
        self.linear2 = nn.Linear(ffn_dim, embed_dim, bias=bias, **factory)
        self.norm1 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.norm_first = bool(norm_first)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}, norm_first={self.norm_first}"

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        memory_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Apply the layer.

        Args:
            x: ``(B, L, E)`` decoder input (``(L, B, E)`` if not ``batch_first``).
            memory: ``(B, S, memory_dim)`` encoder output.
            attn_mask: self-attention mask, attnkit convention (**bool True = may attend**, or additive
                float), broadcastable to ``(B, H, L, L)``.
            key_padding_mask: ``(B, L)``, **True = padding** (nn.MultiheadAttention's meaning).
            is_causal: causal self-attention, bottom-right aligned.
            memory_mask: cross-attention mask (attnkit convention), broadcastable to ``(B, H, L, S)``.
            memory_key_padding_mask: ``(B, S)``, **True = padding**.
            kv_cache: a :class:`KVCache` for the self-attention keys/values (incremental decoding).

        Returns:
            ``(B, L, E)``, same layout as ``x``.
        """

        def sa(h: Tensor) -> Tensor:
            out, _ = self.self_attn(
                h,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                is_causal=is_causal,
                kv_cache=kv_cache,
            )
            return self.dropout1(out)

        def ca(h: Tensor) -> Tensor:
            out, _ = self.cross_attn(h, memory, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)
            return self.dropout2(out)

        def ff(h: Tensor) -> Tensor:
            return self.dropout3(self.linear2(self.activation(self.linear1(h))))

        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            return x + ff(self.norm3(x))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + ca(x))
        return self.norm3(x + ff(x))
