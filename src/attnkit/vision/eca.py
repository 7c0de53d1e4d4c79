"""Efficient Channel Attention (Wang et al. 2020, https://arxiv.org/abs/1910.03151)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.vision._common import check_feature_map, check_int, emit_map

__all__ = ["ECA", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0, *, min_kernel_size: int = 1) -> int:
    r"""The paper's adaptive kernel size ``k = |log2(C) / gamma + b / gamma|_odd`` (Wang et al. 2020, Eq. 12).

    ``|t|_odd`` is the odd number nearest to ``t``; for ``t`` in ``[2m, 2m + 2)`` that is ``2m + 1``, so an
    exact even ``t`` rounds up. This equals the official code's ``int(t)`` made odd by adding 1 when even, and
    timm's ``EcaModule`` formula, except that timm also clamps the result to at least 3
    (``min_kernel_size=3`` reproduces timm). Examples (``gamma=2, b=1``): C=64 -> 3, 256 -> 5, 512 -> 5,
    1024 -> 5, 2048 -> 7. The released ECA-Net50 checkpoints instead use the fixed kernels 3, 5, 5, 7 for its four
    stages (256 ... 2048 channels); pass ``kernel_size`` to :class:`ECA` to reproduce them.

    Raises:
        TypeError: a non-int ``channels`` or ``min_kernel_size``.
        ValueError: ``channels < 1``, a non-positive ``gamma``, or an even ``min_kernel_size``.
    """
    check_int(channels, "channels", "eca_kernel_size")
    check_int(min_kernel_size, "min_kernel_size", "eca_kernel_size")
    if min_kernel_size % 2 == 0:
        raise ValueError(f"eca_kernel_size: expected an odd min_kernel_size, got {min_kernel_size}")
    if not gamma > 0:
        raise ValueError(f"eca_kernel_size: expected gamma > 0, got {gamma!r}")
    t = abs(math.log2(channels) / gamma + b / gamma)
    k = 2 * math.floor(t / 2) + 1
    return max(k, min_kernel_size)


class ECA(nn.Module):
    r"""Efficient Channel Attention: a channel gate from a 1-D convolution across the pooled channel descriptor.

    Implements Wang et al. 2020, Eq. 9-12: ``y = mean_{i,j} x[:, :, i, j]`` ``(B, C)``,
    ``w = sigmoid(conv1d_k(y))`` (one shared kernel of ``k`` taps, zero padding ``(k - 1) / 2``, no bias), and
    ``out[c] = w_c · x[c]``. Each channel interacts with its ``k`` neighbours; the block adds only ``k``
    parameters. ``k`` defaults to :func:`eca_kernel_size` (the paper's Eq. 12; see there for how it relates to
    the official code, timm's clamp to >= 3, and the released ECA-Net50 kernels 3, 5, 5, 7).

    The convolution is stored as ``conv`` (``nn.Conv1d(1, 1, k, bias=False)``, weight ``(1, 1, k)``), the key name
    and shape of timm's ``EcaModule``. The gate ``w`` ``(B, C)`` is reported as a ``"channel"`` event.

    Args:
        channels: ``C``.
        gamma: ``gamma`` of Eq. 12; default 2.
        b: ``b`` of Eq. 12; default 1.
        kernel_size: explicit odd ``k``, overriding Eq. 12; default ``None``.
        min_kernel_size: lower bound on the Eq. 12 kernel; default 1 (paper), 3 = timm.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, C, Hi, Wi)``, any spatial size, contiguous or channels_last -> same shape.

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: ``channels < 1``; an even or non-positive ``kernel_size``; a rank other than 4 or wrong ``C``.

    References:
        Wang, Wu, Zhu, Li, Zuo, Hu, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
        Networks", CVPR 2020, Eq. 9 (gate), Eq. 12 (kernel size). Key names follow timm ``EcaModule``.

    Example:
        >>> import torch
        >>> eca = ECA(256)
        >>> eca.kernel_size, sum(p.numel() for p in eca.parameters())
        (5, 5)
    """

    def __init__(
        self,
        channels: int,
        *,
        gamma: float = 2.0,
        b: float = 1.0,
        kernel_size: int | None = None,
        min_kernel_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, b, min_kernel_size=min_kernel_size)
        else:
            check_int(channels, "channels", "ECA")
            check_int(kernel_size, "kernel_size", "ECA")
            if kernel_size % 2 == 0:
                raise ValueError(f"ECA: expected an odd kernel_size (symmetric padding), got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Gate ``x`` ``(B, C, Hi, Wi)`` channel-wise; returns the same shape."""
        check_feature_map(x, self.channels, "ECA")
        y = x.mean((2, 3)).unsqueeze(1)  # (B, 1, C)
        w = torch.sigmoid(self.conv(y)).squeeze(1)  # (B, C)
        emit_map("channel", w, self)
        return x * w[:, :, None, None]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
