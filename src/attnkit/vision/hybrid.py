"""A small residual CNN with pluggable attention, and optional BoTNet-style self-attention in its last stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.vision._common import check_feature_map, check_int
from attnkit.vision.mhsa import MHSA2d
from attnkit.vision.registry import create_attention

__all__ = ["BasicBlock", "HybridResNet"]


def _conv3x3(cin: int, cout: int, stride: int, dd: dict) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, **dd)


class BasicBlock(nn.Module):
    """ResNet basic block ``relu(attn(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))`` (He et al. 2016, Fig. 2).

    The attention block sits on the residual branch before the addition, where SE-ResNet (Hu et al. 2018,
    Fig. 3), ECA-Net and CBAM place theirs. With ``mhsa`` the 3x3 ``conv2`` is replaced by :class:`MHSA2d`
    (BoTNet's change, Srinivas et al. 2021, Fig. 3, applied to a basic block); striding stays on ``conv1``.

    Args:
        in_channels: input ``C``.
        channels: output ``C``.
        stride: stride of ``conv1`` (and of the 1x1 projection shortcut).
        attention: a name for :func:`attnkit.vision.create_attention`, or ``None``.
        attention_kwargs: extra constructor arguments of the attention block.
        mhsa: replace ``conv2`` by :class:`MHSA2d`.
        mhsa_kwargs: extra constructor arguments of :class:`MHSA2d` (``num_heads``, ``max_size``, ...).
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        stride: int = 1,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        mhsa: bool = False,
        mhsa_kwargs: dict[str, Any] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = _conv3x3(in_channels, channels, stride, dd)
        self.bn1 = nn.BatchNorm2d(channels, **dd)
        self.conv2 = MHSA2d(channels, **(mhsa_kwargs or {}), **dd) if mhsa else _conv3x3(channels, channels, 1, dd)
        self.bn2 = nn.BatchNorm2d(channels, **dd)
        self.attn = create_attention(attention, channels, **(attention_kwargs or {}), **dd)
        self.act = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False, **dd), nn.BatchNorm2d(channels, **dd)
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        return self.act(out + shortcut)


class HybridResNet(nn.Module):
    """A small ResNet whose blocks take any :func:`attnkit.vision.create_attention` block, optionally with
    multi-head self-attention replacing the 3x3 convolutions of the last stage (BoTNet).

    Layout: stem ``conv3x3(in_chans -> widths[0], stride=stem_stride)``-BN-ReLU; stage ``s`` has
    ``depths[s]`` :class:`BasicBlock` of width ``widths[s]``, the first with stride 2 (stride 1 in stage 0);
    global average pooling; dropout; linear classifier ``fc``. With ``mhsa_last_stage`` every block of the last
    stage uses :class:`MHSA2d` instead of its second 3x3 convolution (Srinivas et al. 2021, Sec. 3: "replacing
    the spatial convolutions with global self-attention in the final three bottleneck blocks of a ResNet").
    A 64x64 input with the defaults gives 8x8 maps (64 tokens) in the last stage.

    Args:
        in_chans: input image channels; default 3 (1 for grey-scale digits).
        num_classes: classifier outputs; 0 = no classifier (:meth:`forward` returns pooled features).
        widths: channels per stage; default ``(32, 64, 128, 256)``.
        depths: blocks per stage, same length as ``widths``; default ``(1, 1, 1, 1)``.
        stem_stride: stride of the stem convolution; default 1 (small images).
        attention: attention block name for every block (``"se"``, ``"eca"``, ``"cbam"``, ``"nonlocal"``,
            ``"mhsa"``, ...) or ``None``.
        attention_kwargs: constructor arguments of the attention block (e.g. ``{"reduction": 8}``).
        mhsa_last_stage: BoTNet-style self-attention in the last stage.
        mhsa_kwargs: constructor arguments of :class:`MHSA2d` (default ``num_heads=4``, ``max_size=32``).
        drop_rate: dropout before the classifier.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, in_chans, Hi, Wi)`` -> logits ``(B, num_classes)`` (or ``(B, widths[-1])``).

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: sizes below 1 (``num_classes`` below 0), ``widths``/``depths`` of different or zero length,
            an unknown attention name; an input of the wrong rank or ``in_chans``.

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; Srinivas et al., "Bottleneck
        Transformers for Visual Recognition", CVPR 2021.

    Example:
        >>> import torch
        >>> net = HybridResNet(in_chans=1, num_classes=10, attention="cbam", attention_kwargs={"reduction": 8},
        ...                    mhsa_last_stage=True)
        >>> net(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 1, 1),
        stem_stride: int = 1,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        mhsa_last_stage: bool = False,
        mhsa_kwargs: dict[str, Any] | None = None,
        drop_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "HybridResNet"
        check_int(in_chans, "in_chans", owner)
        check_int(num_classes, "num_classes", owner, minimum=0)
        check_int(stem_stride, "stem_stride", owner)
        widths, depths = tuple(widths), tuple(depths)
        if not widths or len(widths) != len(depths):
            raise ValueError(
                f"{owner}: expected widths and depths of the same non-zero length, got {widths} and {depths}"
            )
        for i, (w, d) in enumerate(zip(widths, depths)):
            check_int(w, f"widths[{i}]", owner)
            check_int(d, f"depths[{i}]", owner)
        dd = {"device": device, "dtype": dtype}
        self.in_chans, self.num_classes, self.num_features = in_chans, num_classes, widths[-1]
        self.stem = nn.Sequential(
            _conv3x3(in_chans, widths[0], stem_stride, dd), nn.BatchNorm2d(widths[0], **dd), nn.ReLU()
        )
        stages, cin = [], widths[0]
        for s, (width, depth) in enumerate(zip(widths, depths)):
            mhsa = mhsa_last_stage and s == len(widths) - 1
            blocks = [
                BasicBlock(
                    cin if i == 0 else width,
                    width,
                    stride=2 if (i == 0 and s > 0) else 1,
                    attention=attention,
                    attention_kwargs=attention_kwargs,
                    mhsa=mhsa,
                    mhsa_kwargs=mhsa_kwargs,
                    **dd,
                )
                for i in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(widths[-1], num_classes, **dd) if num_classes else nn.Identity()
        for m in [self.stem[0], *(b.conv1 for b in self.stages.modules() if isinstance(b, BasicBlock))]:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")  # He et al. 2015

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map of the last stage, ``(B, widths[-1], Hi / 8 / stem_stride, ...)`` for four stages."""
        check_feature_map(x, self.in_chans, "HybridResNet")
        return self.stages(self.stem(x))

    def forward_head(self, features: Tensor) -> Tensor:
        """Global average pooling, dropout and classifier: ``(B, C, h, w)`` -> ``(B, num_classes)``."""
        return self.fc(self.drop(features.mean((2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` (pooled features ``(B, widths[-1])`` when ``num_classes == 0``)."""
        return self.forward_head(self.forward_features(x))
