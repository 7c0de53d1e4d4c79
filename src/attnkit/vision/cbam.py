"""Convolutional Block Attention Module (Woo et al. 2018, https://arxiv.org/abs/1807.06521)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.vision._common import check_feature_map, check_int, emit_map
from attnkit.vision.squeeze_excite import reduced_width

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention"]

_POOL_ORDERS = ("avg_max", "max_avg")


class ChannelAttention(nn.Module):
    r"""CBAM channel attention: a shared MLP over the average- and max-pooled channel descriptors.

    Implements Woo et al. 2018, Eq. 2: ``M_c = sigmoid(W1 relu(W0 F_avg) + W1 relu(W0 F_max))`` with
    ``F_avg, F_max`` ``(B, C)`` the spatial mean and max, ``W0: C/r x C``, ``W1: C x C/r``; ``out = M_c · x``.

    Paper vs code: Eq. 2 has no biases (default ``mlp_bias=False``, as timm's ``ChannelAttn``); the official code
    (Jongchan/attention-module) uses ``nn.Linear`` layers with biases (``mlp_bias=True``). The MLP is stored as
    1x1 convolutions ``fc1``/``fc2`` (timm's key names and shapes). ``M_c`` ``(B, C)`` is reported as a
    ``"channel"`` event.

    Args:
        channels: ``C``.
        reduction: ``r``; default 16. Must not exceed ``channels``.
        reduced_channels: explicit bottleneck width, overriding ``reduction``; default ``None``.
        mlp_bias: biases in the MLP; default ``False`` (paper).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: sizes below 1, ``reduction > channels``; an input that is not ``(B, C, Hi, Wi)``.

    References:
        Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018, Eq. 2.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        reduced_channels: int | None = None,
        mlp_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if reduced_channels is None:
            reduced_channels = reduced_width(channels, reduction, owner="ChannelAttention")
        else:
            check_int(channels, "channels", "ChannelAttention")
            check_int(reduced_channels, "reduced_channels", "ChannelAttention")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, reduced_channels, 1, bias=mlp_bias, **dd)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced_channels, channels, 1, bias=mlp_bias, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """Gate ``x`` ``(B, C, Hi, Wi)`` channel-wise; returns the same shape."""
        check_feature_map(x, self.channels, "ChannelAttention")
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))  # (B, C, 1, 1)
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))  # (B, C, 1, 1)
        m = torch.sigmoid(avg + mx)
        emit_map("channel", m.flatten(1), self)
        return x * m


class _ConvNorm(nn.Module):
    """A bias-free 2-D convolution followed by an optional BatchNorm (timm ``ConvNormAct`` key layout)."""

    def __init__(self, kernel_size: int, norm: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not norm, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(1, device=device, dtype=dtype) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class SpatialAttention(nn.Module):
    r"""CBAM spatial attention: a ``k x k`` convolution over the channel-wise average and max maps.

    Implements Woo et al. 2018, Eq. 3: ``M_s = sigmoid(f^{k x k}([AvgPool_c(F); MaxPool_c(F)]))`` ``(B, 1, Hi, Wi)``
    with zero padding ``k // 2`` (same size), ``out = M_s · x``.

    Paper vs code: the paper stacks ``[avg; max]`` (default ``pool_order="avg_max"``, also timm's order); the
    official code stacks ``[max, mean]`` (``pool_order="max_avg"``) — swapping the order permutes the input
    channels of the convolution, so weights only transfer with the matching order. Eq. 3 is a plain convolution
    (default ``norm=False``, with a bias); the official code and timm's ``SpatialAttn`` use a bias-free
    convolution followed by BatchNorm (``norm=True``). The convolution is stored as ``conv.conv`` and the norm as
    ``conv.bn`` (timm's key names). ``M_s`` is reported as a ``"spatial"`` event.

    Args:
        kernel_size: odd ``k``; default 7 (the paper's choice).
        pool_order: ``"avg_max"`` (paper, timm) or ``"max_avg"`` (official code).
        norm: BatchNorm after the convolution; default ``False``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        TypeError: a non-int ``kernel_size``; a non-tensor or non-floating input.
        ValueError: an even or non-positive ``kernel_size``; an unknown ``pool_order``; an input of rank != 4.

    References:
        Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018, Eq. 3.
    """

    def __init__(
        self,
        *,
        kernel_size: int = 7,
        pool_order: str = "avg_max",
        norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int(kernel_size, "kernel_size", "SpatialAttention")
        if kernel_size % 2 == 0:
            raise ValueError(f"SpatialAttention: expected an odd kernel_size (same-size output), got {kernel_size}")
        if pool_order not in _POOL_ORDERS:
            raise ValueError(f"SpatialAttention: pool_order must be one of {_POOL_ORDERS}, got {pool_order!r}")
        self.kernel_size = kernel_size
        self.pool_order = pool_order
        self.conv = _ConvNorm(kernel_size, norm, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Gate ``x`` ``(B, C, Hi, Wi)`` position-wise; returns the same shape."""
        check_feature_map(x, None, "SpatialAttention")
        avg, mx = x.mean(1, keepdim=True), x.amax(1, keepdim=True)  # (B, 1, Hi, Wi) each
        pooled = torch.cat([avg, mx] if self.pool_order == "avg_max" else [mx, avg], dim=1)
        m = torch.sigmoid(self.conv(pooled))  # (B, 1, Hi, Wi)
        emit_map("spatial", m, self)
        return x * m

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, pool_order={self.pool_order!r}"


class CBAM(nn.Module):
    r"""Convolutional Block Attention Module: :class:`ChannelAttention` followed by :class:`SpatialAttention`.

    Implements Woo et al. 2018, Eq. 1: ``F' = M_c(F) · F``, ``F'' = M_s(F') · F'`` (sequential, channel first,
    the arrangement the paper found best). Submodules are ``channel`` and ``spatial`` (timm ``CbamModule`` keys:
    with ``mlp_bias=False`` and ``spatial_norm=True`` timm state dicts load unchanged). Both maps are reported.

    Args:
        channels: ``C``.
        reduction: channel-MLP ratio ``r``; default 16.
        spatial_kernel: spatial convolution size; default 7.
        mlp_bias: biases in the channel MLP; default ``False`` (paper Eq. 2; official code ``True``).
        pool_order: ``"avg_max"`` (paper, timm) or ``"max_avg"`` (official code).
        spatial_norm: BatchNorm after the spatial convolution; default ``False`` (paper; official code and timm
            ``True``).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, C, Hi, Wi)``, any spatial size, contiguous or channels_last -> same shape.

    Raises:
        TypeError, ValueError: as :class:`ChannelAttention` and :class:`SpatialAttention`.

    References:
        Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018, Eq. 1-3.

    Example:
        >>> import torch
        >>> CBAM(32, reduction=8)(torch.randn(1, 32, 5, 6)).shape
        torch.Size([1, 32, 5, 6])
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        spatial_kernel: int = 7,
        mlp_bias: bool = False,
        pool_order: str = "avg_max",
        spatial_norm: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channel = ChannelAttention(channels, reduction=reduction, mlp_bias=mlp_bias, **dd)
        self.spatial = SpatialAttention(kernel_size=spatial_kernel, pool_order=pool_order, norm=spatial_norm, **dd)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the channel gate, then the spatial gate; returns the shape of ``x``."""
        return self.spatial(self.channel(x))
