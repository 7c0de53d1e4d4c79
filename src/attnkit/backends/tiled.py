"""The ``"tiled"`` backend: exact attention with FlashAttention's online softmax, never holding ``Lq x Lk``.

Queries are cut into blocks of ``block_q`` rows and keys into chunks of ``block_kv`` columns; each tile's scores
``(B, Hkv, 1, G, block_q, block_kv)`` are computed with one batched matmul over every head (grouped-query heads
share their key/value head's tiles without copies), all of :func:`attnkit.attention`'s terms are applied to the
tile (``softcap``, ``score_mod``, ``attn_bias``, ALiBi, masks, ``mask_mod``, ``block_mask``), and the online
softmax folds it into the running output. Key chunks outside the causal/sliding window band of a query block
are skipped entirely. Extra memory: ``O((Lq + Lk) · D)`` plus one tile, independent of ``Lq · Lk``. The
backward pass recomputes tiles from the saved log-sum-exp (:mod:`attnkit.backends.flash_core`).

References:
    Dao, Fu, Ermon, Rudra, Ré 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
    IO-Awareness", Alg. 1-2; Dao 2023, "FlashAttention-2", Alg. 1-2. Online softmax: Milakov & Gimelshein 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.backends.flash_core import Chunk, Group, check_alibi_grad, flash_attention
from attnkit.functional.masks import bottom_right_offset, effective_window
from attnkit.functional.registry import ALL_OPTIONS, Backend, register
from attnkit.functional.spec import AttentionSpec
from attnkit.functional.tiles import TileIndex, TileSetup

__all__ = ["TiledSchedule", "tiled_attention"]

#: Target number of score elements per tile (all heads): 4 MiB of float32, about what stays in the caches of
#: this project's CPU; measured on 2 cores, L = 4096, B·H = 8: 256 x 512 tiles beat 512 x 1024 by ~2x.
TILE_ELEMENTS = 1 << 20
#: Smallest query block.
MIN_BLOCK_Q = 32
#: Largest key chunk.
MAX_BLOCK_KV = 512
#: Auto picks "tiled" over "math" once math's float32 score matrix would exceed this many bytes.
AUTO_MIN_SCORE_BYTES = 32 << 20


def kv_bounds(spec: AttentionSpec, q0: int, q1: int) -> tuple[int, int]:
    """Key range ``[lo, hi)`` that query rows ``[q0, q1)`` may attend under ``is_causal``/``window_size``."""
    left, right = effective_window(spec.is_causal, spec.window_size)
    off = bottom_right_offset(spec.q_len, spec.kv_len)
    lo = 0 if left == -1 else max(0, q0 + off - left)
    hi = spec.kv_len if right == -1 else min(spec.kv_len, q1 - 1 + off + right + 1)
    return lo, max(lo, hi)


def block_sizes(spec: AttentionSpec) -> tuple[int, int]:
    """``(block_q, block_kv)``: wide key chunks, and query blocks sized so a tile holds ~``TILE_ELEMENTS``."""
    heads = max(1, spec.query[..., 0, 0].numel())  # B * H
    block_kv = min(spec.kv_len, MAX_BLOCK_KV)
    if spec.window_size is not None:
        left, right = spec.window_size
        if left != -1 and right != -1:
            block_kv = min(block_kv, max(64, left + right + 1))
    block_kv = max(block_kv, 1)
    block_q = max(MIN_BLOCK_Q, TILE_ELEMENTS // (heads * block_kv))
    return min(spec.q_len, block_q), block_kv


class TiledSchedule:
    """Dense rectangles: query blocks of ``block_q`` rows, each with key chunks of ``block_kv`` columns
    restricted to the causal/window band."""

    q_pad = 0
    kv_pad = 0

    def __init__(self, spec: AttentionSpec, block_q: int, block_kv: int):
        self.spec, self.block_q, self.block_kv = spec, block_q, block_kv
        self._groups: list[Group] | None = None
        self.G = spec.num_heads // spec.num_kv_heads

    def groups(self) -> list[Group]:
        if self._groups is not None:
            return self._groups
        spec, dev = self.spec, self.spec.query.device
        groups = []
        for q0 in range(0, spec.q_len, self.block_q):
            q1 = min(q0 + self.block_q, spec.q_len)
            q_idx = torch.arange(q0, q1, device=dev).unsqueeze(0)
            g = Group(where=(q0, q1), q_idx=q_idx, q_range=(q0, q1))
            lo, hi = kv_bounds(spec, q0, q1)
            for k0 in range(lo, hi, self.block_kv):
                k1 = min(k0 + self.block_kv, hi)
                kv_idx = torch.arange(k0, k1, device=dev).unsqueeze(0)
                g.chunks.append(Chunk(TileIndex(q_idx, kv_idx, (q0, q1), (k0, k1)), where=(k0, k1)))
            groups.append(g)
        self._groups = groups
        return groups

    def load_q(self, x5: Tensor, group: Group) -> Tensor:
        q0, q1 = group.where
        t = x5[:, :, :, q0:q1]  # (B, Hkv, G, r, X)
        if self.G == 1:
            return t  # (B, Hkv, N=1, r, X): a view
        return t.reshape(t.shape[0], t.shape[1], 1, self.G * (q1 - q0), t.shape[-1])

    def store_q(self, dst5: Tensor, group: Group, val: Tensor) -> None:
        q0, q1 = group.where
        dst5[:, :, :, q0:q1] = val.view(val.shape[0], val.shape[1], self.G, q1 - q0, val.shape[-1])

    def load_kv(self, x4: Tensor, chunk: Chunk) -> Tensor:
        k0, k1 = chunk.where
        return x4[:, :, None, k0:k1]

    def add_kv(self, dst4: Tensor, chunk: Chunk, val: Tensor) -> None:
        k0, k1 = chunk.where
        dst4[:, :, k0:k1] += val[:, :, 0]


def tiled_attention(
    spec: AttentionSpec, *, block_q: int | None = None, block_kv: int | None = None
) -> tuple[Tensor, None, Tensor | None]:
    """Run ``spec`` with the FlashAttention algorithm (see the module docstring).

    Args:
        spec: the validated call.
        block_q: query rows per tile; default from :func:`block_sizes`.
        block_kv: key columns per tile; default from :func:`block_sizes`.

    Returns:
        ``(output, None, lse or None)``.
    """
    bq, bk = block_sizes(spec)
    sched = TiledSchedule(spec, block_q or bq, block_kv or bk)
    out, lse = flash_attention(TileSetup(spec), sched)
    return out, None, (lse if spec.return_lse else None)


def _fit(spec: AttentionSpec) -> str | None:
    score_bytes = 4 * spec.query[..., 0].numel() * spec.kv_len
    if score_bytes < AUTO_MIN_SCORE_BYTES:
        return (
            f"the score matrix is small ({score_bytes / 2**20:.1f} MiB < {AUTO_MIN_SCORE_BYTES >> 20} MiB), "
            f"so materializing it (math) is faster than tiling"
        )
    return None


TILED = register(
    Backend(
        name="tiled",
        forward=tiled_attention,
        options=ALL_OPTIONS - {"return_weights"},
        priority=50,
        description="FlashAttention-2 in PyTorch: online softmax over tiles, O(L) memory, every option but "
        "return_weights; auto picks it when sdpa cannot serve the call and math's scores would be large",
        check=check_alibi_grad,
        fit=_fit,
    )
)
