"""Compact storage of a request's attention maps for the dashboard's layer/head browser.

Each ``(layer, head)`` map is scaled by its peak and quantised to ``uint8`` (the same resolution the HTML report
draws with), then the whole ``(layers, H, L, L)`` block is zlib-compressed: 6 x 12 maps of 128 tokens take about
1.2 MB raw and much less compressed. Decoding gives maps within ``peak / 510`` of the originals.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["pack_maps", "unpack_maps"]


def pack_maps(maps: Tensor, tokens: list[str]) -> tuple[bytes, dict[str, Any]]:
    """``(blob, meta)`` for ``maps`` ``(layers, H, L, L)`` with ``L`` token labels."""
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2] or maps.shape[-1] != len(tokens):
        raise ValueError(
            f"pack_maps: expected (layers, H, L, L) maps for {len(tokens)} tokens, got {tuple(maps.shape)}"
        )
    maps = maps.detach().float().cpu().clamp_min(0)
    layers, heads, length, _ = maps.shape
    flat = maps.reshape(layers * heads, -1)
    peak = flat.amax(-1).clamp_min(1e-30)
    quant = torch.round(flat / peak[:, None] * 255).to(torch.uint8)
    blob = zlib.compress(quant.numpy().tobytes(), 6)
    meta = {"shape": [layers, heads, length, length], "peak": peak.tolist(), "tokens": list(tokens)}
    return blob, meta


def unpack_maps(blob: bytes, meta: dict[str, Any]) -> Tensor:
    """The ``(layers, H, L, L)`` float32 maps of :func:`pack_maps`."""
    shape = meta["shape"]
    quant = np.frombuffer(zlib.decompress(blob), dtype=np.uint8).reshape(shape[0] * shape[1], -1)
    maps = torch.from_numpy(quant.astype(np.float32)) / 255 * torch.tensor(meta["peak"])[:, None]
    return maps.reshape(shape)
