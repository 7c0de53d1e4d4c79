"""Transformer encoder layer (self-attention + feed-forward), post-norm or pre-norm.

Post-norm is Vaswani et al. 2017, Sec. 3.1 (``x = LayerNorm(x + Sublayer(x))``), the layout of BERT
(Devlin et al. 2019); pre-norm (``x = x + Sublayer(LayerNorm(x))``, Xiong et al. 2020) is the layout of ViT
(Dosovitskiy et al. 2021) and GPT-2. Matches :class:`torch.nn.TransformerEncoderLayer` with copied weights.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnkit.nn.activations import get_activation
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.multihead import MultiHeadAttention
from attnkit.nn.rotary import RotaryEmbedding

__all__ = ["TransformerEncoderLayer"]


def check_layer_options(owner: str, embed_dim: int, ffn_dim: int | None, dropout: float) -> int:
    """Validate the shared layer options; return ``ffn_dim`` (default ``4 · embed_dim``)."""
    ffn_dim = 4 * embed_dim if ffn_dim is None else ffn_dim
    if isinstance(ffn_dim, bool) or not isinstance(ffn_dim, int) or ffn_dim <= 0:
        raise ValueError(f"{owner}: expected ffn_dim to be a positive int, got {ffn_dim!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: expected dropout in [0, 1), got {dropout!r}")
    return ffn_dim


class TransformerEncoderLayer(nn.Module):
    """Self-attention and a two-layer feed-forward block, each with a residual connection and LayerNorm.

    ``norm_first=False`` (post-norm, BERT)::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(linear2(activation(linear1(x)))))

    ``norm_first=True`` (pre-norm, ViT)::

        x = x + dropout1(self_attn(norm1(x)))
        x = x + dropout2(linear2(activation(linear1(norm2(x)))))

    Shapes: ``x`` ``(B, L, E)`` (``(L, B, E)`` if not ``batch_first``). Submodules (stable names):
    ``self_attn`` (:class:`MultiHeadAttention`), ``linear1`` ``(F, E)``, ``linear2`` ``(E, F)``, ``norm1``,
    ``norm2`` (``nn.LayerNorm(E)``), ``dropout1``, ``dropout2``.

    Args:
        embed_dim: ``E``.
        num_heads: ``H``; ``E`` must be a multiple of it.
        ffn_dim: ``F``, hidden width of the feed-forward block (default ``4 · E``).
        dropout: dropout on the two residual branches (BERT's/ViT's ``hidden_dropout_prob``), training only.
            Unlike torch's layer there is no dropout inside the feed-forward block (as in BERT and ViT).
        attn_drop: attention-probability dropout (``attention_probs_dropout_prob``), training only.
        activation: feed-forward activation, a name from :data:`attnkit.nn.activations.ACTIVATIONS`
            (``"gelu"`` (default, exact), ``"gelu_tanh"``, ``"relu"``, ``"silu"``).
        norm_first: pre-norm if ``True``, post-norm (default) if ``False``.
        layer_norm_eps: LayerNorm epsilon (torch 1e-5; BERT and ViT 1e-12).
        bias: biases in every linear layer and LayerNorm.
        num_kv_heads, qk_norm, rope, backend: passed to :class:`MultiHeadAttention`.
        context_parallel_group, context_parallel_layout: passed to :class:`MultiHeadAttention`: with a process
            group, ``x`` is this rank's slice of the sequence and self-attention is context-parallel (the
            feed-forward block and LayerNorms act per token, so nothing else changes).
        batch_first: ``(B, L, E)`` inputs (default) rather than ``(L, B, E)``.
        device, dtype: of the parameters.

    Raises:
        ValueError: invalid sizes or dropout (also those of :class:`MultiHeadAttention`), unknown activation.

    Example:
        >>> import torch
        >>> layer = TransformerEncoderLayer(32, 4, layer_norm_eps=1e-12)
        >>> layer(torch.randn(2, 5, 32)).shape
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
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        rope: RotaryEmbedding | None = None,
        batch_first: bool = True,
        backend: str = "auto",
        context_parallel_group=None,
        context_parallel_layout: str = "contiguous",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        ffn_dim = check_layer_options("TransformerEncoderLayer", embed_dim, ffn_dim, dropout)
        self.activation_name = activation
        self.activation = get_activation(activation)
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiHeadAttention(
            embed_dim,
            num_heads,
            num_kv_heads=num_kv_heads,
            bias=bias,
            dropout=attn_drop,
            qk_norm=qk_norm,
            rope=rope,
            batch_first=batch_first,
            backend=backend,
            context_parallel_group=context_parallel_group,
            context_parallel_layout=context_parallel_layout,
            **factory,
        )
        self.linear1 = nn.Linear(embed_dim, ffn_dim, bias=bias, **factory)
        self.linear2 = nn.Linear(ffn_dim, embed_dim, bias=bias, **factory)
        self.norm1 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm_first = bool(norm_first)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}, norm_first={self.norm_first}"

    def _attn(self, x: Tensor, attn_mask, key_padding_mask, is_causal, kv_cache) -> Tensor:
        out, _ = self.self_attn(
            x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, kv_cache=kv_cache
        )
        return self.dropout1(out)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.activation(self.linear1(x))))

    def forward(
        self,
        x: Tensor,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Apply the layer.

        Args:
            x: ``(B, L, E)`` (``(L, B, E)`` if not ``batch_first``).
            attn_mask: attnkit convention (**bool True = may attend**, or additive float), broadcastable to
                ``(B, H, L, L)``; e.g. BERT's padding as ``attention_mask.bool()[:, None, None, :]``.
            key_padding_mask: ``(B, L)``, **True = padding** (nn.MultiheadAttention's meaning).
            is_causal: causal self-attention (bottom-right aligned).
            kv_cache: a :class:`KVCache` for incremental causal decoding.

        Returns:
            ``(B, L, E)``, same layout as ``x``.
        """
        if self.norm_first:
            x = x + self._attn(self.norm1(x), attn_mask, key_padding_mask, is_causal, kv_cache)
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self._attn(x, attn_mask, key_padding_mask, is_causal, kv_cache))
        return self.norm2(x + self._ffn(x))
