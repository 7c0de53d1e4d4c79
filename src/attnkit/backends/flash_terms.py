"""Per-tile score terms for the tiled kernels: everything :func:`attnkit.attention` adds to ``scale · q kᵀ``.

A tile covers ``N`` query blocks of ``r`` rows and, for each, ``c`` key columns; its scores are laid out as
``(B, Hkv, N, G, r, c)`` (``B`` the flattened batch, ``G = H // Hkv`` query heads per key head). Row and column
positions are given as int64 index tensors ``q_idx (N, r)`` and ``kv_idx (N, c)`` (absolute positions, possibly
past the end for padded blocks), and, when the tile is a plain rectangle, as ``(start, stop)`` ranges so that
dense masks are sliced instead of gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.functional.masks import band_keep, effective_window, positional_mask
from attnkit.functional.spec import AttentionSpec, call_mask_mod, call_score_mod, lse_dtype

__all__ = ["TileIndex", "TileSetup"]


@dataclass
class TileIndex:
    """Where a tile lies: ``q_idx (N, r)``, ``kv_idx (N, c)``, optional rectangle ranges (``N == 1``)."""

    q_idx: Tensor
    kv_idx: Tensor
    q_range: tuple[int, int] | None = None
    kv_range: tuple[int, int] | None = None


def _to_4d(t: Tensor, spec: AttentionSpec) -> Tensor:
    """A mask/bias broadcastable to ``(*batch, H, Lq, Lk)`` as ``(B' in {1, B}, H', Lq', Lk')``."""
    nd = spec.query.ndim
    t = t.reshape((1,) * (nd - t.ndim) + tuple(t.shape))
    batch = tuple(spec.batch_shape)
    if all(s == 1 for s in t.shape[: len(batch)]):
        return t.reshape(t.shape[len(batch) :]).unsqueeze(0)
    t = t.expand(batch + tuple(t.shape[len(batch) :]))
    return t.reshape((-1, *t.shape[len(batch) :]))


class TileSetup:
    """The terms of one call, prepared once and evaluated per tile.

    Args:
        spec: the validated call.
        positional: evaluate ``is_causal``/``window_size`` per tile (False when the schedule's layout already
            applies them exactly).
        block_mask_elements: evaluate ``spec.block_mask`` per tile (False when the layout applies it).
    """

    def __init__(self, spec: AttentionSpec, *, positional: bool = True, block_mask_elements: bool = True):
        q = spec.query
        self.spec = spec
        self.acc = lse_dtype(q.dtype)
        self.B = math.prod(spec.batch_shape)
        self.H, self.Hkv = spec.num_heads, spec.num_kv_heads
        self.G = self.H // self.Hkv
        self.q_len, self.kv_len = spec.q_len, spec.kv_len
        self.offset = spec.kv_len - spec.q_len
        self.scale, self.softcap, self.score_mod = spec.scale, spec.softcap, spec.score_mod
        self.mask_mod = spec.mask_mod
        self.block_mask = spec.block_mask if block_mask_elements else None
        self.positional = positional and (spec.is_causal or spec.window_size is not None)
        self.dropout_p = spec.dropout_p
        self.biases: list[tuple[Tensor, Tensor]] = []  # (original, 4-D float view)
        self.bool_masks: list[Tensor] = []
        for t in (spec.attn_bias, spec.attn_mask):
            if t is None:
                continue
            if t.dtype == torch.bool:
                self.bool_masks.append(_to_4d(t, spec))
            else:
                self.biases.append((t, _to_4d(t, spec)))
        self.alibi = None
        if spec.alibi_slopes is not None:
            slopes = spec.alibi_slopes.detach().to(self.acc)
            slopes = _to_4d(slopes[..., None, None], spec)[..., 0, 0]  # (B', H)
            self.alibi = slopes.reshape(slopes.shape[0], self.Hkv, 1, self.G, 1, 1)
        dev = q.device
        self.b_idx = torch.arange(self.B, device=dev).view(-1, 1, 1, 1, 1, 1)
        self.h_idx = torch.arange(self.H, device=dev).view(1, self.Hkv, 1, self.G, 1, 1)

    # ----------------------------------------------------------------------------------------------------
    def _mod_indices(self, ti: TileIndex) -> tuple[Tensor, Tensor]:
        n, r = ti.q_idx.shape
        c = ti.kv_idx.shape[1]
        qi = ti.q_idx.clamp(max=self.q_len - 1).view(1, 1, n, 1, r, 1)
        ki = ti.kv_idx.clamp(max=self.kv_len - 1).view(1, 1, n, 1, 1, c)
        return qi, ki

    def transform(self, s: Tensor, ti: TileIndex) -> Tensor:
        """``softcap`` then ``score_mod`` on scaled scores ``(B, Hkv, N, G, r, c)`` (autograd-friendly)."""
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.score_mod is not None:
            qi, ki = self._mod_indices(ti)
            s = call_score_mod(self.score_mod, s, self.b_idx, self.h_idx, qi, ki)
        return s

    def transform_grad(self, s_raw: Tensor, s_mod: Tensor, ds: Tensor) -> Tensor:
        """Gradient w.r.t. the scaled scores given ``ds`` w.r.t. ``transform``'s output (no score_mod)."""
        if self.softcap is not None:
            return ds * (1.0 - (s_mod / self.softcap) ** 2)
        return ds

    def _dense_tile(self, t4: Tensor, ti: TileIndex) -> Tensor:
        """Entries of a ``(B', H', Lq', Lk')`` term at the tile, broadcastable to ``(B, Hkv, N, G, r, c)``."""
        _bp, hp, lq, lk = t4.shape
        if ti.q_range is not None and ti.kv_range is not None:
            rows = slice(*ti.q_range) if lq > 1 else slice(None)
            cols = slice(*ti.kv_range) if lk > 1 else slice(None)
            t = t4[:, :, rows, cols].unsqueeze(2)  # (B', H', 1, r', c')
        else:
            qi = ti.q_idx.clamp(max=lq - 1) if lq > 1 else ti.q_idx[:, :1] * 0
            ki = ti.kv_idx.clamp(max=lk - 1) if lk > 1 else ti.kv_idx[:, :1] * 0
            t = t4[:, :, qi[:, :, None], ki[:, None, :]]  # (B', H', N, r', c')
        if hp == 1:
            return t.unsqueeze(3)
        return t.unflatten(1, (self.Hkv, self.G)).transpose(2, 3)

    def terms(self, ti: TileIndex) -> tuple[Tensor | None, Tensor | None]:
        """``(bias, keep)`` of the tile: float additive term and bool mask, broadcastable, or ``None``."""
        n, r = ti.q_idx.shape
        c = ti.kv_idx.shape[1]
        bias = None
        for _, t4 in self.biases:
            t = self._dense_tile(t4, ti).to(self.acc)
            bias = t if bias is None else bias + t
        if self.alibi is not None:
            dist = (ti.q_idx[:, :, None] + self.offset - ti.kv_idx[:, None, :]).abs().to(self.acc)
            t = -self.alibi * dist.view(1, 1, n, 1, r, c)
            bias = t if bias is None else bias + t
        keep = None
        if self.positional:
            if ti.q_range is not None and ti.kv_range is not None:
                keep = positional_mask(
                    self.q_len,
                    self.kv_len,
                    is_causal=self.spec.is_causal,
                    window_size=self.spec.window_size,
                    device=ti.q_idx.device,
                    q_range=ti.q_range,
                    kv_range=ti.kv_range,
                )
                keep = None if keep is None else keep.view(1, 1, 1, 1, r, c)
            else:
                keep = self._positional_gathered(ti).view(1, 1, n, 1, r, c)
        for t4 in self.bool_masks:
            m = self._dense_tile(t4, ti)
            keep = m if keep is None else keep & m
        if self.mask_mod is not None:
            qi, ki = self._mod_indices(ti)
            m = call_mask_mod(self.mask_mod, self.b_idx, self.h_idx, qi, ki)
            keep = m if keep is None else keep & m
        if self.block_mask is not None:
            m = self.block_mask.element_mask(ti.q_idx[:, :, None], ti.kv_idx[:, None, :]).view(1, 1, n, 1, r, c)
            keep = m if keep is None else keep & m
        return bias, keep

    def _positional_gathered(self, ti: TileIndex) -> Tensor:
        left, right = effective_window(self.spec.is_causal, self.spec.window_size)
        return band_keep(ti.kv_idx[:, None, :] - (ti.q_idx[:, :, None] + self.offset), left, right)

    # ----------------------------------------------------------------------------------------------------
    def bias_grad_buffers(self) -> list[Tensor | None]:
        """Zero accumulators for the float terms that require grad (``None`` for the others)."""
        return [
            torch.zeros(t4.shape, dtype=self.acc, device=t4.device) if orig.requires_grad else None
            for orig, t4 in self.biases
        ]

    def accumulate_bias_grad(self, buffers: list[Tensor | None], ds: Tensor, ti: TileIndex) -> None:
        """Add the tile's score gradient ``ds (B, Hkv, N, G, r, c)`` into each buffer's entries."""
        for buf, (_, t4) in zip(buffers, self.biases):
            if buf is None:
                continue
            bp, hp, lq, lk = t4.shape
            d = ds.sum((1, 3), keepdim=True).squeeze(3) if hp == 1 else ds.transpose(2, 3).flatten(1, 2)
            if bp == 1:
                d = d.sum(0, keepdim=True)
            if lq == 1:
                d = d.sum(3, keepdim=True)
            if lk == 1:
                d = d.sum(4, keepdim=True)  # d: (B', H', N, r', c')
            if ti.q_range is not None and ti.kv_range is not None:
                rows = slice(*ti.q_range) if lq > 1 else slice(None)
                cols = slice(*ti.kv_range) if lk > 1 else slice(None)
                buf[:, :, rows, cols] += d[:, :, 0]
                continue
            n = ti.q_idx.shape[0]
            qi = ti.q_idx.clamp(max=lq - 1) if lq > 1 else ti.q_idx[:, :1] * 0
            ki = ti.kv_idx.clamp(max=lk - 1) if lk > 1 else ti.kv_idx[:, :1] * 0
            dev = buf.device
            index = (
                torch.arange(bp, device=dev).view(-1, 1, 1, 1, 1),
                torch.arange(hp, device=dev).view(1, -1, 1, 1, 1),
                qi.view(1, 1, n, -1, 1),
                ki.view(1, 1, n, 1, -1),
            )
            buf.index_put_(index, d, accumulate=True)

    def bias_grads(self, buffers: list[Tensor | None]) -> list[Tensor | None]:
        """The accumulated buffers reshaped and reduced to the shapes of the original tensors."""
        grads = []
        batch = tuple(self.spec.batch_shape)
        nd = self.spec.query.ndim
        for buf, (orig, _) in zip(buffers, self.biases):
            if buf is None:
                grads.append(None)
                continue
            padded = (1,) * (nd - orig.ndim) + tuple(orig.shape)
            if buf.shape[0] == 1:
                g = buf.reshape((1,) * len(batch) + tuple(buf.shape[1:]))
            else:
                g = buf.reshape(batch + tuple(buf.shape[1:]))
            grads.append(g.sum_to_size(padded).reshape(orig.shape).to(orig.dtype))
        return grads
