"""Non-local block, embedded-Gaussian form (Wang et al. 2018, https://arxiv.org/abs/1711.07971)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnkit.functional.attention import attention
from attnkit.vision._common import check_feature_map, check_int
from attnkit.vision.squeeze_excite import reduced_width

__all__ = ["NonLocal2d"]


class NonLocal2d(nn.Module):
    r"""Non-local block: every position attends to every (optionally subsampled) position, with a residual.

    Implements Wang et al. 2018, Eq. 1, 3 and 6 (embedded Gaussian):
    ``y_i = sum_j softmax_j(s · theta(x_i)ᵀ phi(x_j)) g(x_j)``, ``z_i = BN(W_z y_i) + x_i``, where ``theta``,
    ``phi``, ``g`` are 1x1 convolutions to ``C_i = C / reduction`` channels and ``W_z`` a 1x1 convolution back to
    ``C``. The softmax-weighted sum runs through :func:`attnkit.attention` (one head, ``L = S = Hi·Wi``), so any
    registered backend (e.g. a tiled one for large feature maps) can serve it and observers see the
    ``(B, 1, Hi·Wi, S)`` attention (tokens in row-major ``(y, x)`` order; see :attr:`token_layout`).

    Paper vs code, and the options reproducing the others:

    - width: the paper uses ``C_i = C / 2`` (``reduction=2``); timm's ``NonLocalAttn`` uses ``C / 8`` rounded to a
      multiple of 8 (``reduction=8, round_to=8``).
    - scaling: Eq. 3 has none (``scale=1.0``, default); the official video-nonlocal-net code (``use_scale``)
      multiplies by ``C_i ** -0.5`` (``scale=None``); timm uses ``C ** -0.5`` (``scale=channels ** -0.5``).
    - subsampling: the paper's Sec. 3.3 trick of 2x2 max pooling after ``phi`` and ``g`` (``subsample=True``);
      off by default, as in timm.
    - the BatchNorm's scale is initialised to 0 so the block starts as the identity (Sec. 4.1); ``norm=False``
      drops the BatchNorm.

    Parameters are named as in timm (``t`` = theta, ``p`` = phi, ``g``, ``z`` = ``W_z``, ``norm``), all 1x1 convs
    with biases, so timm state dicts of the same width load unchanged.

    Args:
        channels: ``C``.
        reduction: ``C / C_i``; default 2 (paper). Must not exceed ``channels``.
        reduced_channels: explicit ``C_i``, overriding ``reduction``/``round_to``.
        round_to: round ``C_i`` to a multiple of this; default 1.
        scale: multiplies ``theta(x)ᵀ phi(x)``; ``None`` = ``C_i ** -0.5``; default 1.0 (paper).
        subsample: 2x2 max pooling of ``phi`` and ``g`` (keys on a ``floor(Hi/2) x floor(Wi/2)`` grid).
        norm: BatchNorm after ``W_z`` (zero-initialised scale); default ``True``.
        backend: :func:`attnkit.attention` backend; default ``"auto"``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, C, Hi, Wi)``, any spatial size (``>= 2`` per side with ``subsample``) -> same shape.

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: sizes below 1, ``reduction > channels``; a rank other than 4 or wrong ``C``; a map smaller
            than 2x2 with ``subsample``.

    References:
        Wang, Girshick, Gupta, He, "Non-local Neural Networks", CVPR 2018, Eq. 1 (non-local operation), Eq. 3
        (embedded Gaussian), Eq. 6 (residual block), Sec. 3.3 (C/2 width, subsampling), Sec. 4.1 (zero-init BN).

    Example:
        >>> import torch
        >>> NonLocal2d(16)(torch.randn(2, 16, 5, 7)).shape
        torch.Size([2, 16, 5, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 2,
        reduced_channels: int | None = None,
        round_to: int = 1,
        scale: float | None = 1.0,
        subsample: bool = False,
        norm: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if reduced_channels is None:
            reduced_channels = reduced_width(channels, reduction, round_to, owner="NonLocal2d")
        else:
            check_int(channels, "channels", "NonLocal2d")
            check_int(reduced_channels, "reduced_channels", "NonLocal2d")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"NonLocal2d: expected scale to be a number or None, got {scale!r}")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.reduced_channels = reduced_channels
        self.scale = float(scale) if scale is not None else reduced_channels**-0.5
        self.subsample = subsample
        self.backend = backend
        self.t = nn.Conv2d(channels, reduced_channels, 1, **dd)
        self.p = nn.Conv2d(channels, reduced_channels, 1, **dd)
        self.g = nn.Conv2d(channels, reduced_channels, 1, **dd)
        self.z = nn.Conv2d(reduced_channels, channels, 1, **dd)
        self.norm = nn.BatchNorm2d(channels, **dd) if norm else nn.Identity()
        if norm:
            nn.init.zeros_(self.norm.weight)
        #: Token layout of the last forward (for capture tools): query grid ``(Hi, Wi)``, key grid, no prefix.
        self.token_layout: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` ``(B, C, Hi, Wi)``; returns the same shape."""
        check_feature_map(x, self.channels, "NonLocal2d")
        b, _, h, w = x.shape
        if self.subsample and (h < 2 or w < 2):
            raise ValueError(f"NonLocal2d: subsample=True needs Hi, Wi >= 2, got x of shape {tuple(x.shape)}")
        q = self.t(x)  # (B, Ci, Hi, Wi)
        k, v = self.p(x), self.g(x)
        if self.subsample:
            k, v = nn.functional.max_pool2d(k, 2), nn.functional.max_pool2d(v, 2)  # (B, Ci, Hi/2, Wi/2)
        self.token_layout = {"grid": (h, w), "key_grid": tuple(k.shape[-2:]), "num_prefix_tokens": 0}
        q = q.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, Ci)
        k = k.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, S, Ci)
        v = v.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, S, Ci)
        y = attention(q, k, v, scale=self.scale, backend=self.backend)  # (B, 1, N, Ci)
        y = y.squeeze(1).transpose(1, 2).reshape(b, self.reduced_channels, h, w)
        return self.norm(self.z(y)) + x

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, reduced_channels={self.reduced_channels}, scale={self.scale:g}, "
            f"subsample={self.subsample}"
        )
