"""Multi-scale features for the detectors: a small residual CNN and RT-DETR's hybrid encoder.

The backbone is :class:`attnkit.vision.HybridResNet` read at strides 4, 8 and 16. The hybrid encoder (Zhao et al.
2024, "DETRs Beat YOLOs on Real-time Object Detection", Sec. 4.2) runs self-attention on the coarsest level only
(AIFI, "attention-based intra-scale feature interaction") and fuses the levels with convolutions (CCFM, a top-down
then bottom-up path, as in PAN); here a fusion block is a 1x1 and a 3x3 conv-BN-SiLU layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.nn import MultiHeadAttention, sinusoidal_positions
from attnkit.vision.hybrid import HybridResNet

__all__ = ["ConvBackbone", "HybridEncoder", "sincos_2d"]


def sincos_2d(height: int, width: int, embed_dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """2-d sine-cosine position embedding ``(height * width, embed_dim)``, row-major: the first half encodes the
    row, the second the column (:func:`attnkit.nn.sinusoidal_positions` of each; ``embed_dim % 4 == 0``)."""
    half = embed_dim // 2
    pos_y = sinusoidal_positions(height, half, device=device, dtype=dtype)
    pos_x = sinusoidal_positions(width, half, device=device, dtype=dtype)
    return torch.cat([pos_y[:, None].expand(height, width, half), pos_x[None].expand(height, width, half)], -1).flatten(
        0, 1
    )


class ConvBackbone(nn.Module):
    """:class:`attnkit.vision.HybridResNet` (stem stride 2) read at strides 4, 8 and 16.

    With four stage ``widths`` the last three stages give the three levels; with three, the last two stages give
    strides 4 and 8 and a stride-2 3x3 conv-BN-ReLU (``extra``, ``2 * widths[-1]`` channels) adds stride 16, as
    Deformable DETR adds its coarsest level. Three stages fit the shipped digit classifier
    (``attnkit.vision.digits``, ``"cnn"``), whose weights can initialise ``net``.

    Args:
        in_chans: image channels; default 1 (grey digits).
        widths: channels of the three or four stages; default ``(16, 32, 64, 128)``.
        depths: blocks per stage; default one each.
        attention: attention block of every residual block (``"cbam"``, ``"se"``, ... or ``None``).
        attention_kwargs: its constructor arguments.
    """

    strides = (4, 8, 16)

    def __init__(
        self,
        *,
        in_chans: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128),
        depths=None,
        attention: str | None = None,
        attention_kwargs: dict | None = None,
    ):
        super().__init__()
        widths = tuple(widths)
        if len(widths) not in (3, 4):
            raise ValueError(f"ConvBackbone: expected three or four stage widths, got {widths}")
        depths = tuple(depths) if depths is not None else (1,) * len(widths)
        self.net = HybridResNet(
            in_chans=in_chans,
            num_classes=0,
            widths=widths,
            depths=depths,
            stem_stride=2,
            attention=attention,
            attention_kwargs=attention_kwargs,
        )
        self.extra = None
        if len(widths) == 3:
            self.extra = nn.Sequential(
                nn.Conv2d(widths[-1], 2 * widths[-1], 3, 2, 1, bias=False), nn.BatchNorm2d(2 * widths[-1]), nn.ReLU()
            )
            self.channels = (widths[1], widths[2], 2 * widths[2])
        else:
            self.channels = tuple(widths[1:])

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, in_chans, Hi, Wi)`` -> three maps ``(B, C_l, Hi / s_l, Wi / s_l)`` for ``s_l`` in 4, 8, 16."""
        x = self.net.stem(images)
        out = []
        for i, stage in enumerate(self.net.stages):
            x = stage(x)
            if i >= 1:
                out.append(x)
        if self.extra is not None:
            out.append(self.extra(x))
        return out


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class _AIFI(nn.Module):
    """Post-norm transformer encoder layer whose queries and keys carry a 2-d sine-cosine position embedding."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = MultiHeadAttention(embed_dim, num_heads)
        self.norm1, self.norm2 = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(nn.Linear(embed_dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, E)
        pos = sincos_2d(h, w, c, device=x.device, dtype=x.dtype)
        qk = tokens + pos
        tokens = self.norm1(tokens + self.self_attn(qk, qk, tokens)[0])
        tokens = self.norm2(tokens + self.ffn(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class HybridEncoder(nn.Module):
    """Projection of each level to ``embed_dim``, AIFI on the coarsest level, CCFM fusion.

    Args:
        in_channels: channels of the three input levels (fine to coarse).
        embed_dim: output channels of every level.
        num_heads: heads of the AIFI self-attention.
        ffn_dim: hidden width of the AIFI feed-forward block.
        use_attention: run AIFI (``False`` gives a purely convolutional neck, for the baseline).

    Shape:
        three maps ``(B, C_l, h_l, w_l)`` -> three maps ``(B, embed_dim, h_l, w_l)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        embed_dim: int = 64,
        num_heads: int = 4,
        ffn_dim: int = 128,
        use_attention: bool = True,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, embed_dim, 1, bias=False), nn.BatchNorm2d(embed_dim)) for c in in_channels
        )
        self.aifi = _AIFI(embed_dim, num_heads, ffn_dim) if use_attention else None
        n = len(in_channels)
        self.lateral = nn.ModuleList(_conv_bn(embed_dim, embed_dim, 1) for _ in range(n - 1))
        self.fuse_down = nn.ModuleList(
            nn.Sequential(_conv_bn(2 * embed_dim, embed_dim, 1), _conv_bn(embed_dim, embed_dim)) for _ in range(n - 1)
        )
        self.downsample = nn.ModuleList(_conv_bn(embed_dim, embed_dim, 3, 2) for _ in range(n - 1))
        self.fuse_up = nn.ModuleList(
            nn.Sequential(_conv_bn(2 * embed_dim, embed_dim, 1), _conv_bn(embed_dim, embed_dim)) for _ in range(n - 1)
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        feats = [proj(f) for proj, f in zip(self.input_proj, features)]
        if self.aifi is not None:
            feats[-1] = self.aifi(feats[-1])
        # top-down (coarse to fine)
        inner = [feats[-1]]
        for i in range(len(feats) - 2, -1, -1):
            top = self.lateral[i](inner[0])
            inner[0] = top
            up = F.interpolate(top, size=feats[i].shape[-2:], mode="nearest")
            inner.insert(0, self.fuse_down[i](torch.cat([up, feats[i]], 1)))
        # bottom-up (fine to coarse)
        outs = [inner[0]]
        for i in range(len(feats) - 1):
            down = self.downsample[i](outs[-1])
            down = down[..., : inner[i + 1].shape[-2], : inner[i + 1].shape[-1]]
            outs.append(self.fuse_up[i](torch.cat([down, inner[i + 1]], 1)))
        return outs
