"""Multi-head self-attention over a feature map with 2-D relative position logits (BoTNet, Srinivas et al. 2021,
https://arxiv.org/abs/2101.11605)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnkit.functional.attention import attention
from attnkit.vision._common import check_feature_map, check_int

__all__ = ["MHSA2d"]


def _relative_logits(q: Tensor, table: Tensor, pos: Tensor, max_size: int) -> Tensor:
    """``out[..., i, j] = q[..., i, :] · table[pos[j] - pos[i] + max_size - 1]`` for ``q`` ``(B, H, N, D)``."""
    qr = q @ table.T  # (B, H, N, 2M - 1)
    idx = pos[None, :] - pos[:, None] + max_size - 1  # (N, N)
    return torch.gather(qr, -1, idx.expand(*q.shape[:-2], -1, -1))


class MHSA2d(nn.Module):
    r"""All-to-all multi-head self-attention on a ``(B, C, Hi, Wi)`` map, with relative position logits.

    Implements the MHSA layer of Srinivas et al. 2021 (Fig. 4): ``q, k, v`` from one 1x1 convolution, and per
    head ``softmax(s · q kᵀ + q rᵀ) v`` where ``r_{ij} = R_h[y_j - y_i] + R_w[x_j - x_i]`` are learned relative
    height and width embeddings (``(2M - 1, D)`` tables; the Attention Augmented Conv / Music Transformer
    relative logits). The content scale ``s`` is ``D ** -0.5`` (the paper's reference gist and timm's
    ``BottleneckAttn``; Fig. 4 shows no scale); ``scale_pos_embed=True`` scales the position logits too. The
    attention runs through :func:`attnkit.attention` with the position logits as ``attn_bias`` (so gradients
    reach ``q`` through both terms) and observers receive the ``(B, H, Hi·Wi, Hi·Wi)`` map.

    Any map up to ``max_size x max_size`` works (the tables are indexed by the offsets that occur);
    ``pos_embed=False`` removes the position term and the size limit. With ``max_size`` equal to timm's
    ``feat_size`` the parameters ``qkv`` (``(3C, C, 1, 1)``, no bias), ``pos_embed.height_rel``,
    ``pos_embed.width_rel`` have timm's names and shapes (``qk_ratio=1``).

    Args:
        channels: ``C`` (input and output); a multiple of ``num_heads``.
        num_heads: ``H``; default 4 (BoTNet).
        max_size: the largest ``Hi`` and ``Wi`` accepted with position logits; default 32.
        pos_embed: use relative position logits; default ``True``.
        scale_pos_embed: also scale the position logits by ``D ** -0.5``; default ``False``.
        qkv_bias: bias on the ``qkv`` convolution; default ``False``.
        backend: :func:`attnkit.attention` backend; default ``"auto"``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, C, Hi, Wi)`` (contiguous or channels_last) -> ``(B, C, Hi, Wi)``.

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: sizes below 1, ``channels`` not a multiple of ``num_heads``; an input of rank != 4, with
            the wrong ``C``, or larger than ``max_size`` with position logits.

    References:
        Srinivas et al., "Bottleneck Transformers for Visual Recognition", CVPR 2021, Fig. 4; Bello et al.,
        "Attention Augmented Convolutional Networks", ICCV 2019, Eq. 3 (relative logits).

    Example:
        >>> import torch
        >>> MHSA2d(32, num_heads=4)(torch.randn(2, 32, 7, 5)).shape
        torch.Size([2, 32, 7, 5])
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 4,
        max_size: int = 32,
        pos_embed: bool = True,
        scale_pos_embed: bool = False,
        qkv_bias: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "MHSA2d"
        check_int(channels, "channels", owner)
        check_int(num_heads, "num_heads", owner)
        check_int(max_size, "max_size", owner)
        if channels % num_heads:
            raise ValueError(f"{owner}: channels ({channels}) must be a multiple of num_heads ({num_heads})")
        dd = {"device": device, "dtype": dtype}
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.max_size, self.scale_pos_embed, self.backend = max_size, scale_pos_embed, backend
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=qkv_bias, **dd)
        self.pos_embed: nn.Module | None = None
        if pos_embed:
            self.pos_embed = nn.Module()
            self.pos_embed.height_rel = nn.Parameter(torch.empty(2 * max_size - 1, self.head_dim, **dd))
            self.pos_embed.width_rel = nn.Parameter(torch.empty(2 * max_size - 1, self.head_dim, **dd))
            nn.init.trunc_normal_(self.pos_embed.height_rel, std=self.head_dim**-0.5)
            nn.init.trunc_normal_(self.pos_embed.width_rel, std=self.head_dim**-0.5)
        #: Token layout of the last forward (for capture tools): grid ``(Hi, Wi)``, row-major, no prefix.
        self.token_layout: dict[str, Any] = {}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_heads={self.num_heads}, max_size={self.max_size}"

    def forward(self, x: Tensor) -> Tensor:
        """Attend over all ``Hi·Wi`` positions of ``x`` ``(B, C, Hi, Wi)``; returns the same shape."""
        check_feature_map(x, self.channels, "MHSA2d")
        b, c, h, w = x.shape
        if self.pos_embed is not None and max(h, w) > self.max_size:
            raise ValueError(
                f"MHSA2d: feature map {h}x{w} exceeds max_size={self.max_size} of the relative position tables; "
                f"construct with max_size >= {max(h, w)} or pos_embed=False"
            )
        qkv = self.qkv(x).reshape(b, 3, self.num_heads, self.head_dim, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, H, N, D)
        bias = None
        scale = self.head_dim**-0.5
        if self.pos_embed is not None:
            ys = torch.arange(h, device=x.device).repeat_interleave(w)  # (N,) row of each token
            xs = torch.arange(w, device=x.device).repeat(h)  # (N,) column of each token
            bias = _relative_logits(q, self.pos_embed.height_rel, ys, self.max_size)
            bias = bias + _relative_logits(q, self.pos_embed.width_rel, xs, self.max_size)  # (B, H, N, N)
            if self.scale_pos_embed:
                bias = bias * scale
        self.token_layout = {"grid": (h, w), "num_prefix_tokens": 0}
        out = attention(q, k, v, attn_bias=bias, scale=scale, backend=self.backend)  # (B, H, N, D)
        return out.transpose(-1, -2).reshape(b, c, h, w)
