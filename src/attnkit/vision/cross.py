"""Cross-attention block: tokens of one modality or scale attend to tokens of another."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.nn.multihead import MultiHeadAttention
from attnkit.vision._common import check_int, check_tokens

__all__ = ["CrossAttentionBlock", "Mlp"]


class Mlp(nn.Module):
    """Two-layer feed-forward ``fc2(act(fc1(x)))`` with GELU (timm ``Mlp`` key names ``fc1``/``fc2``)."""

    def __init__(self, embed_dim: int, hidden_dim: int, *, drop: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, embed_dim, device=device, dtype=dtype)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class CrossAttentionBlock(nn.Module):
    r"""Pre-norm cross-attention block: ``x`` (queries) attends to ``context`` (keys/values), then an MLP.

    Computes::

        x = x + proj_drop(cross_attn(norm1(x), norm_context(context)))     # Vaswani et al. 2017, Sec. 3.2.3
        x = x + mlp(norm2(x))                                              # (omitted if mlp_ratio == 0)

    with ``cross_attn`` a :class:`attnkit.nn.MultiHeadAttention` (``kdim = vdim = context_dim``; query heads
    attend over all context tokens, ``softmax(Q Kᵀ / sqrt(D)) V`` per head, Eq. 1-2 of Vaswani et al.), so the
    attention runs through :func:`attnkit.attention` and observers receive the ``(B, H, N, M)`` map. This is the
    "encoder-decoder attention" of the Transformer in the pre-norm arrangement (Xiong et al. 2020) used by
    vision-language and multi-scale models (e.g. image tokens reading text tokens, or one feature scale reading
    another). Submodules: ``norm1``, ``norm_context``, ``cross_attn`` (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``), ``norm2``, ``mlp`` (``fc1``, ``fc2``).

    Args:
        embed_dim: ``E``, width of ``x`` and of the output; a multiple of ``num_heads``.
        num_heads: ``H``.
        context_dim: width of ``context``; default ``E``.
        mlp_ratio: MLP hidden width / ``E``; default 4.0; 0 drops the MLP (and ``norm2``).
        qkv_bias: biases in the attention projections; default ``True``.
        attn_drop: attention-probability dropout (training only).
        proj_drop: dropout on the attention and MLP branches (training only).
        layer_norm_eps: LayerNorm epsilon; default 1e-6 (ViT/timm).
        backend: :func:`attnkit.attention` backend; default ``"auto"``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, N, E)``; ``context``: ``(B, M, context_dim)``; output ``(B, N, E)``.

    Raises:
        TypeError: non-int sizes, non-tensor or non-floating inputs.
        ValueError: sizes below 1, ``E`` not a multiple of ``H``, negative ``mlp_ratio``; inputs of the wrong
            rank or width, or with different batch sizes.

    References:
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017, Eq. 1-2 and Sec. 3.2.3; Xiong et al., "On Layer
        Normalization in the Transformer Architecture", ICML 2020 (pre-norm).

    Example:
        >>> import torch
        >>> block = CrossAttentionBlock(32, 4, context_dim=24)
        >>> block(torch.randn(2, 49, 32), torch.randn(2, 7, 24)).shape
        torch.Size([2, 49, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        layer_norm_eps: float = 1e-6,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "CrossAttentionBlock"
        check_int(embed_dim, "embed_dim", owner)
        check_int(num_heads, "num_heads", owner)
        context_dim = embed_dim if context_dim is None else check_int(context_dim, "context_dim", owner)
        if embed_dim % num_heads:
            raise ValueError(f"{owner}: embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio < 0:
            raise ValueError(f"{owner}: expected mlp_ratio >= 0, got {mlp_ratio!r}")
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.context_dim = embed_dim, context_dim
        self.norm1 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **dd)
        self.norm_context = nn.LayerNorm(context_dim, eps=layer_norm_eps, **dd)
        self.cross_attn = MultiHeadAttention(
            embed_dim,
            num_heads,
            kdim=context_dim,
            vdim=context_dim,
            bias=qkv_bias,
            dropout=attn_drop,
            backend=backend,
            **dd,
        )
        self.proj_drop = nn.Dropout(proj_drop)
        hidden = int(embed_dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **dd) if hidden else None
        self.mlp = Mlp(embed_dim, hidden, drop=proj_drop, **dd) if hidden else None

    def forward(self, x: Tensor, context: Tensor, *, context_padding_mask: Tensor | None = None) -> Tensor:
        """Let ``x`` ``(B, N, E)`` attend to ``context`` ``(B, M, context_dim)``; returns ``(B, N, E)``.

        ``context_padding_mask`` ``(B, M)``: **True = padding** (ignored), the meaning of
        ``key_padding_mask`` in :class:`torch.nn.MultiheadAttention`.
        """
        owner = "CrossAttentionBlock"
        check_tokens(x, self.embed_dim, owner)
        check_tokens(context, self.context_dim, owner, name="context")
        if x.shape[0] != context.shape[0]:
            raise ValueError(f"{owner}: x {tuple(x.shape)} and context {tuple(context.shape)} differ in batch size")
        attended, _ = self.cross_attn(self.norm1(x), self.norm_context(context), key_padding_mask=context_padding_mask)
        x = x + self.proj_drop(attended)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x
