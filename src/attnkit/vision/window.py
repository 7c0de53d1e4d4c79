"""Window attention with relative position bias and shifted windows (Swin, Liu et al. 2021,
https://arxiv.org/abs/2103.14030)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnkit.functional.attention import attention
from attnkit.vision._common import check_int

__all__ = ["WindowAttention", "relative_position_index", "shifted_window_mask"]


def relative_position_index(window_size: int, *, device: torch.device | str | None = None) -> Tensor:
    """Index ``(N, N)`` (``N = window_size²``) into a ``((2w - 1)², H)`` relative position bias table.

    Tokens are numbered row-major inside a window; for tokens at ``(y1, x1)`` and ``(y2, x2)`` the index is
    ``(y1 - y2 + w - 1) · (2w - 1) + (x1 - x2 + w - 1)`` (Liu et al. 2021, Sec. 3.2, "Relative position bias").
    """
    coords = torch.arange(window_size, device=device)
    y = coords.repeat_interleave(window_size)  # (N,)
    x = coords.repeat(window_size)  # (N,)
    dy = y[:, None] - y[None, :] + window_size - 1
    dx = x[:, None] - x[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Bool mask ``(nW, N, N)`` (True = may attend) for shifted windows of a ``height x width`` map.

    After the cyclic shift by ``-shift_size``, a window can hold tokens from up to four regions that were not
    adjacent in the image; each token may attend only to tokens of its own region (Liu et al. 2021, Sec. 3.2,
    "Efficient batch computation for shifted configuration"). ``height`` and ``width`` must be multiples of
    ``window_size``; windows are numbered row-major.
    """

    def regions(n: int) -> Tensor:
        idx = torch.arange(n, device=device)
        return (idx >= n - window_size).long() + (idx >= n - shift_size).long()

    label = regions(height)[:, None] * 3 + regions(width)[None, :]  # (height, width)
    nh, nw = height // window_size, width // window_size
    label = label.reshape(nh, window_size, nw, window_size).transpose(1, 2).reshape(nh * nw, -1)  # (nW, N)
    return label[:, :, None] == label[:, None, :]


class WindowAttention(nn.Module):
    r"""(Shifted) window multi-head self-attention with a learned relative position bias (Swin W-MSA / SW-MSA).

    The ``Hi x Wi`` map is zero-padded at the bottom/right to multiples of ``window_size`` ``w``, cyclically
    shifted by ``-shift_size`` (SW-MSA; 0 = W-MSA), split into ``w x w`` windows of ``N = w²`` tokens, and in
    each window Liu et al. 2021, Eq. 4 is applied per head:
    ``Attention(Q, K, V) = SoftMax(Q Kᵀ / sqrt(d) + B) V`` with ``B[i, j] = table[index(i, j), h]``
    (:func:`relative_position_index`); with a shift, tokens from different image regions are masked
    (:func:`shifted_window_mask`). Outputs go through ``proj``, are merged, shifted back and cropped. The
    attention runs through :func:`attnkit.attention` with batch dims ``(B, nW)``, ``attn_bias`` ``(H, N, N)``
    and a bool mask ``(nW, 1, N, N)``.

    Paper vs code: the official code and transformers mask with an additive -100 rather than -inf (identical in
    float32: ``exp(-100)`` is below float32 resolution relative to the unmasked terms). Padded tokens are
    zeros that are *not* masked (their keys are the projection biases), as in the official code and
    transformers. The official code also shrinks the window to the map size (and drops the shift) when the map
    is no larger than one window; here the window is fixed and the map is padded instead. Parameters follow
    timm's ``WindowAttention``: ``qkv`` (``(3C, C)``, query/key/value stacked in that order), ``proj``,
    ``relative_position_bias_table`` ``((2w - 1)², H)``, buffer ``relative_position_index`` (not saved).

    :attr:`token_layout` holds the last call's partition (for capture tools): ``grid`` (padded map size),
    ``input_grid``, ``window_size``, ``shift_size``, ``windows`` ``(nh, nw)``, ``num_prefix_tokens`` (0); the
    attention event's batch dims are ``(B, nh·nw)`` with windows row-major over the *shifted* map.

    Args:
        embed_dim: ``C``; a multiple of ``num_heads``.
        num_heads: ``H``.
        window_size: ``w``; default 7 (the paper's).
        shift_size: cyclic shift in ``[0, w)``; ``w // 2`` in every second Swin block. Default 0.
        qkv_bias: biases on ``qkv``; default ``True``.
        scale: multiplies ``Q Kᵀ``; default ``head_dim ** -0.5``.
        attn_drop: attention-probability dropout (training only).
        proj_drop: dropout after ``proj`` (training only).
        backend: :func:`attnkit.attention` backend; default ``"auto"``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, Hi, Wi, C)`` (channels last, as in Swin), or tokens ``(B, Hi·Wi, C)`` with ``grid=(Hi, Wi)``;
        the output has the same shape.

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: sizes below 1, ``embed_dim`` not a multiple of ``num_heads``, ``shift_size`` outside
            ``[0, window_size)``, a dropout outside ``[0, 1)``; an input of the wrong rank/width, or tokens
            without a matching ``grid``.

    References:
        Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021,
        Eq. 4 and Sec. 3.2. Matches ``transformers.models.swin.modeling_swin.SwinLayer``'s attention path.

    Example:
        >>> import torch
        >>> wa = WindowAttention(32, 4, window_size=4, shift_size=2)
        >>> wa(torch.randn(2, 9, 10, 32)).shape
        torch.Size([2, 9, 10, 32])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        window_size: int = 7,
        shift_size: int = 0,
        qkv_bias: bool = True,
        scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "WindowAttention"
        check_int(embed_dim, "embed_dim", owner)
        check_int(num_heads, "num_heads", owner)
        check_int(window_size, "window_size", owner)
        check_int(shift_size, "shift_size", owner, minimum=0)
        if embed_dim % num_heads:
            raise ValueError(f"{owner}: embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if shift_size >= window_size:
            raise ValueError(f"{owner}: expected shift_size in [0, window_size={window_size}), got {shift_size}")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"{owner}: expected {name} in [0, 1), got {p!r}")
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.window_size, self.shift_size = window_size, shift_size
        self.scale = scale
        self.attn_drop = float(attn_drop)
        self.backend = backend
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(embed_dim, embed_dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, num_heads, **dd))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size, device=device), persistent=False
        )
        #: Partition of the last forward call (see the class docstring).
        self.token_layout: dict[str, Any] = {}

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}"
        )

    def relative_position_bias(self) -> Tensor:
        """The bias ``B`` ``(H, N, N)`` of Eq. 4, gathered from the table."""
        n = self.window_size**2
        return (
            self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
            .reshape(n, n, -1)
            .permute(2, 0, 1)
        )

    def forward(self, x: Tensor, *, grid: tuple[int, int] | None = None) -> Tensor:
        """Apply (shifted) window attention; see the class docstring for shapes."""
        owner = "WindowAttention"
        if not isinstance(x, Tensor):
            raise TypeError(f"{owner}: expected x to be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{owner}: expected a floating-point x, got {x.dtype}")
        tokens = x.ndim == 3
        if tokens:
            if grid is None or len(grid) != 2 or grid[0] * grid[1] != x.shape[1]:
                raise ValueError(
                    f"{owner}: tokens (B, N, C) need grid=(Hi, Wi) with Hi·Wi = N = {x.shape[1]}, got grid={grid}"
                )
            x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[2])
        elif x.ndim != 4:
            raise ValueError(
                f"{owner}: expected x of shape (B, Hi, Wi, C) or tokens (B, N, C) with grid, got {tuple(x.shape)}"
            )
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"{owner}: expected x with embed_dim {self.embed_dim} last, got {tuple(x.shape)}")
        b, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        xp = nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
        hp, wp = h + pad_h, w + pad_w
        nh, nw = hp // ws, wp // ws
        if shift:
            xp = torch.roll(xp, shifts=(-shift, -shift), dims=(1, 2))
        windows = xp.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b, nh * nw, ws * ws, c)
        self.token_layout = {
            "grid": (hp, wp),
            "input_grid": (h, w),
            "window_size": ws,
            "shift_size": shift,
            "windows": (nh, nw),
            "num_prefix_tokens": 0,
        }
        qkv = self.qkv(windows).reshape(b, nh * nw, ws * ws, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, H, N, D)
        mask = None
        if shift:
            mask = shifted_window_mask(hp, wp, ws, shift, device=x.device)[:, None]  # (nW, 1, N, N)
        out = attention(
            q,
            k,
            v,
            attn_bias=self.relative_position_bias().to(q.dtype),
            attn_mask=mask,
            scale=self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
            backend=self.backend,
        )  # (B, nW, H, N, D)
        out = self.proj_drop(self.proj(out.transpose(2, 3).reshape(b, nh * nw, ws * ws, c)))
        out = out.reshape(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        out = out[:, :h, :w]
        return out.reshape(b, h * w, c) if tokens else out
