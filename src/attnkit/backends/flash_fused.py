"""The fused step of the ``"tiled"`` and ``"blocksparse"`` backends: one CPU flash-attention kernel per step.

When a call's tile terms reduce to a keep-mask shared by every batch element and head (causal, windows, block
layouts, ``mask_mod``-free bool masks, no float terms, no ``softcap``/``score_mod``/dropout), each step of the
schedule runs as three large operations instead of an explicit online softmax: gather the key/value rows of its
``N`` query blocks (``(B·N, H, c, D)``), build the step's additive mask from
:meth:`attnkit.functional.tiles.TileSetup.terms` (the one definition of what is kept), and call
``aten::_scaled_dot_product_flash_attention_for_cpu`` on the ``(B·N, H, r, D)`` query blocks. That kernel keeps
its softmax in float32 and runs bfloat16/float16 matmuls in the low-precision dtype (oneDNN); its backward is
the fused ``_scaled_dot_product_flash_attention_for_cpu_backward``, reached through autograd (the gathers'
backward scatter-adds the key/value gradients). A step holds every key column its query blocks need (one
chunk), so no online merge between steps is needed.

References:
    Dao 2023, "FlashAttention-2" (the kernel's algorithm); PyTorch's CPU flash attention kernel
    (``aten/src/ATen/native/cpu/FlashAttentionKernel.cpp``), whose logsumexp output is
    ``logsumexp(scale · q kᵀ + mask)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnkit.backends.flash_core import Schedule, Step, flash_attention
from attnkit.backends.sdpa import CPU_FLASH, kernel_mask_from_keep
from attnkit.functional.spec import lse_dtype
from attnkit.functional.tiles import TileSetup, reshape_qkv

__all__ = ["fusable", "fused_attention", "run"]

#: Set to False to run every call on the explicit online-softmax path (the tests run both).
enabled = True


def fusable(setup: TileSetup) -> str | None:
    """Why the fused step cannot serve ``setup``'s call, or ``None`` if it can."""
    spec = setup.spec
    if not enabled or CPU_FLASH is None or spec.query.device.type != "cpu":
        return "the fused step is disabled or needs the CPU flash kernel"
    if spec.query.shape[-1] != spec.value.shape[-1]:
        return "the CPU flash kernel needs head_dim == value head_dim"
    if setup.softcap is not None or setup.score_mod is not None or setup.dropout_p > 0:
        return "softcap, score_mod and dropout are applied per tile by the explicit path"
    if setup.biases or setup.alibi is not None:
        return "float terms (attn_bias, float attn_mask, ALiBi) are added per tile by the explicit path"
    if setup.mask_mod is not None or any(t.shape[0] != 1 or t.shape[1] != 1 for t in setup.bool_masks):
        return "a mask that depends on the batch element or head"
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (spec.query, spec.key, spec.value))
    if spec.return_lse and needs_grad:
        return "the kernel's lse has no gradient"
    return None


def _rows(x: Tensor, step: Step, block_q: int) -> Tensor:
    """The step's query blocks of ``x (B, H, nq·r, X)`` as ``(B·N, H, r, X)``."""
    B, H, _, X = x.shape
    t = x.view(B, H, -1, block_q, X)
    n = len(step.q_blocks)
    t = t[:, :, step.q_start : step.q_start + n] if step.q_start is not None else t.index_select(2, step.q_blocks)
    t = t.transpose(1, 2).reshape(B * n, H, block_q, X)
    return t if t.stride(-1) == 1 else t.contiguous()  # the kernel misreads a strided head_dim (see sdpa.py)


def _cols(x4: Tensor, gather: Tensor, n: int, groups: int) -> Tensor:
    """Gathered key/value rows of ``x4 (B, Hkv, Lk, X)`` as ``(B·N, H, c, X)`` (GQA heads repeated)."""
    B, Hkv, _, X = x4.shape
    t = x4.index_select(2, gather).view(B, Hkv, 1, n, -1, X)
    if groups > 1:
        t = t.expand(B, Hkv, groups, n, t.shape[-2], X)
    t = t.reshape(B, Hkv * groups, n, -1, X).transpose(1, 2).reshape(B * n, Hkv * groups, -1, X)
    return t if t.stride(-1) == 1 else t.contiguous()


def _step(setup: TileSetup, step: Step, q: Tensor, k4: Tensor, v4: Tensor, block_q: int) -> tuple[Tensor, Tensor]:
    (ch,) = step.chunks
    B, H = q.shape[0], q.shape[1]
    n, c = ch.index.kv_idx.shape
    _bias, keep = setup.terms(ch.index)  # keep: (1, 1, N|1, 1, r|1, c|1) by fusable(); bias is None
    if keep is not None:
        keep = keep.view(keep.shape[2], keep.shape[4], keep.shape[5])
    if ch.keep is not None:
        keep = ch.keep if keep is None else keep & ch.keep
    mask = empty = None
    if keep is not None:
        mask, empty = kernel_mask_from_keep(keep.expand(n, block_q, c), q.dtype)
        mask = mask.unsqueeze(1) if B == 1 else mask.expand(B, n, block_q, c).reshape(B * n, 1, block_q, c)
        empty = empty.view(1, n, 1, block_q, 1) if bool(empty.any()) else None
    out, lse = CPU_FLASH(
        _rows(q, step, block_q),
        _cols(k4, ch.gather, n, setup.G),
        _cols(v4, ch.gather, n, setup.G),
        0.0,
        False,
        attn_mask=mask,
        scale=setup.scale,
    )
    out, lse = out.view(B, n, H, block_q, -1), lse.view(B, n, H, block_q, 1)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def fused_attention(setup: TileSetup, sched: Schedule) -> tuple[Tensor, Tensor]:
    """Run ``setup``'s call over ``sched``'s steps (each one chunk), one fused kernel per step.

    Returns:
        ``(output (*batch, H, Lq, Dv) in the value dtype, lse (*batch, H, Lq) float32/float64)``, differentiable
        w.r.t. query, key and value through the kernel's fused backward (the lse is not).
    """
    spec = setup.spec
    q5, k4, v4 = reshape_qkv(spec)
    B, Hkv, G, Lq, D = q5.shape
    r, nq = sched.block_q, sched.num_q_blocks
    q = q5.reshape(B, Hkv * G, Lq, D)
    if nq * r != Lq:
        q = torch.nn.functional.pad(q, (0, 0, 0, nq * r - Lq))
    steps = sched.steps()
    if not steps:
        out = torch.zeros((*spec.query.shape[:-1], spec.value.shape[-1]), dtype=v4.dtype, device=q.device)
        return out, torch.full(spec.query.shape[:-1], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    parts = [_step(setup, st, q, k4, v4, r) for st in steps]
    out = torch.cat([o for o, _ in parts], 1) if len(parts) > 1 else parts[0][0]  # (B, Nsum, H, r, Dv)
    lse = torch.cat([s for _, s in parts], 1) if len(parts) > 1 else parts[0][1]
    covered = 0
    for st in steps:
        if st.q_start != covered:
            break
        covered += len(st.q_blocks)
    if covered != nq:  # blocks visited in another order, or blocks no step visits (output 0, lse -inf)
        index = torch.cat([st.q_blocks for st in steps])
        out = out.new_zeros((B, nq, *out.shape[2:])).index_copy(1, index, out)
        lse = lse.new_full((B, nq, *lse.shape[2:]), float("-inf")).index_copy(1, index, lse)
    out = out.transpose(1, 2).reshape(B, Hkv * G, nq * r, -1)[:, :, :Lq]
    lse = lse.transpose(1, 2).reshape(B, Hkv * G, nq * r)[:, :, :Lq]
    out = out.reshape((*spec.query.shape[:-1], spec.value.shape[-1]))
    return out, lse.reshape(spec.query.shape[:-1]).to(lse_dtype(spec.query.dtype))


def run(setup: TileSetup, make_schedule: Callable[[bool], Schedule]) -> tuple[Tensor, Tensor]:
    """Run ``setup``'s call on the fused step when :func:`fusable`, else on the explicit online softmax
    (:func:`attnkit.backends.flash_core.flash_attention`); ``make_schedule(fused)`` builds the schedule."""
    fused = fusable(setup) is None
    sched = make_schedule(fused)
    return (fused_attention if fused else flash_attention)(setup, sched)
