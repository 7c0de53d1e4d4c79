"""Squeeze-and-Excitation channel attention (Hu et al. 2018, https://arxiv.org/abs/1709.01507)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.vision._common import check_feature_map, check_int, emit_map

__all__ = ["SqueezeExcite", "reduced_width"]


def reduced_width(channels: int, reduction: int, round_to: int = 1, *, owner: str = "reduced_width") -> int:
    """Width of a bottleneck MLP: ``channels / reduction``, optionally rounded to a multiple of ``round_to``.

    With ``round_to=1`` (the papers) it is ``channels // reduction``. With ``round_to=d > 1`` it is
    ``channels / reduction`` rounded half-up to the nearest multiple of ``d`` and at least ``d`` (what timm's
    ``make_divisible(v, d, round_limit=0)`` computes, e.g. 64 / 16 = 4 -> 8).

    Raises:
        TypeError: a non-int argument.
        ValueError: ``channels``, ``reduction`` or ``round_to`` below 1, or ``reduction > channels``.
    """
    check_int(channels, "channels", owner)
    check_int(reduction, "reduction", owner)
    check_int(round_to, "round_to", owner)
    if reduction > channels:
        raise ValueError(
            f"{owner}: reduction ({reduction}) is larger than channels ({channels}); the bottleneck would have "
            f"no units. Use a reduction between 1 and {channels}, or pass reduced_channels."
        )
    if round_to == 1:
        return channels // reduction
    return max(round_to, math.floor(channels / reduction / round_to + 0.5) * round_to)


class SqueezeExcite(nn.Module):
    r"""Squeeze-and-Excitation gate: rescale each channel by a function of the global average of all channels.

    Implements Hu et al. 2018, Eq. 2-4: with ``z_c = mean_{i,j} x[c, i, j]`` (squeeze),
    ``s = sigmoid(W2 · relu(W1 · z + b1) + b2)`` (excitation; ``W1: C/r x C``, ``W2: C x C/r``) and
    ``out[c] = s_c · x[c]`` (scale).

    Paper vs timm: the paper's bottleneck has ``C // reduction`` units; timm's ``SEModule`` rounds
    ``C / reduction`` to a multiple of 8 (``round_to=8`` here reproduces it). The two FC layers are stored as
    1x1 convolutions named ``fc1``/``fc2`` (weights ``(C/r, C, 1, 1)`` and ``(C, C/r, 1, 1)``, with biases), so
    timm ``SEModule`` state dicts of the same width load unchanged.

    The gate ``s`` (``(B, C)``) is reported to :mod:`attnkit.functional.observe` as a ``"channel"`` event.

    Args:
        channels: ``C``, input and output channels.
        reduction: ``r``, bottleneck ratio; default 16 (the paper's choice). Must not exceed ``channels``.
        reduced_channels: bottleneck width, overriding ``reduction``/``round_to``; default ``None``.
        round_to: round the bottleneck width to a multiple of this; default 1 (paper), 8 = timm.
        bias: biases in ``fc1``/``fc2``; default ``True``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, C, Hi, Wi)`` any spatial size, contiguous or channels_last -> same shape and memory format.

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: sizes below 1, ``reduction > channels``; an input that is not rank 4 or has the wrong ``C``.

    References:
        Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018, Eq. 2 (squeeze), Eq. 3 (excitation),
        Eq. 4 (scale). Key names follow timm ``timm.layers.squeeze_excite.SEModule``.

    Example:
        >>> import torch
        >>> se = SqueezeExcite(64)
        >>> se(torch.randn(2, 64, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        reduced_channels: int | None = None,
        round_to: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if reduced_channels is None:
            reduced_channels = reduced_width(channels, reduction, round_to, owner="SqueezeExcite")
        else:
            check_int(channels, "channels", "SqueezeExcite")
            check_int(reduced_channels, "reduced_channels", "SqueezeExcite")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.reduced_channels = reduced_channels
        self.fc1 = nn.Conv2d(channels, reduced_channels, kernel_size=1, bias=bias, **dd)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced_channels, channels, kernel_size=1, bias=bias, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """Gate ``x`` ``(B, C, Hi, Wi)`` channel-wise; returns the same shape."""
        check_feature_map(x, self.channels, "SqueezeExcite")
        z = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        s = torch.sigmoid(self.fc2(self.act(self.fc1(z))))  # (B, C, 1, 1)
        emit_map("channel", s.flatten(1), self)
        return x * s

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduced_channels={self.reduced_channels}"
