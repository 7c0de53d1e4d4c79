"""The fused step of the ``"tiled"`` and ``"blocksparse"`` backends: one CPU flash-attention kernel per step.

When a call's tile terms reduce to a keep-mask shared by every batch element and head (causal, windows, block
layouts, ``mask_mod``-free bool masks, no float terms, no ``softcap``/``score_mod``/dropout), each step of the
schedule runs as three large operations instead of an explicit online softmax: gather the key/value rows of its
``N`` query blocks (``(B·N, H, c, D)``), build the step's additive mask from
:meth:`attnkit.functional.tiles.TileSetup.terms` (the one definition of what is kept), and call
``aten::_scaled_dot_product_flash_attention_for_cpu`` on the ``(B·N, H, r, D)`` query blocks. When a step's
blocks read consecutive keys at a constant stride (:attr:`~attnkit.backends.flash_core.Chunk.slide`: the interior
of a sliding window, a causal prefix), nothing is gathered: queries, keys and values are passed as overlapping
strided views ``(N, B·H, ·, D)`` of the inputs (the kernel reads any batch/head/row strides; grouped-query heads
are the kernel's own), and the output is written through the same view: one kernel call and one copy per step.
With the schedule cache, a window ±256 call at L = 16384 went from 1.10x to 1.71x compiled FlexAttention's speed in
float32 and from 0.72x to 0.84-1.02x in bfloat16 (``benchmarks/RESULTS.md``, "Long context"). That kernel keeps
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

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from attnkit.backends.flash_core import Schedule, Step, flash_attention, pad_rows
from attnkit.backends.sdpa import CPU_FLASH, kernel_mask_from_keep
from attnkit.functional.spec import lse_dtype
from attnkit.functional.tiles import TileSetup, reshape_qkv

__all__ = ["fusable", "fused_attention", "run"]

CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

#: Set to False to run every call on the explicit online-softmax path (the tests run both).
enabled = True
#: Step masks up to this size are kept with their (cached) schedule.
MASK_CACHE_BYTES = 1 << 20


def fusable(setup: TileSetup) -> str | None:
    """Why the fused step cannot serve ``setup``'s call, or ``None`` if it can."""
    spec = setup.spec
    if not enabled or CPU_FLASH is None or CPU_FLASH_BACKWARD is None or spec.query.device.type != "cpu":
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


def _store(dst: Tensor, step: Step, block_q: int, val: Tensor) -> None:
    """Write ``val (B·N, H, r, X)`` into the step's query blocks of ``dst (B, H, nq·r, X)``."""
    B, H, _, X = dst.shape
    n = len(step.q_blocks)
    src = val.view(B, n, H, block_q, X).transpose(1, 2)
    blocks = dst.view(B, H, -1, block_q, X)
    if step.q_start is not None:
        blocks[:, :, step.q_start : step.q_start + n] = src
    else:
        blocks.index_copy_(2, step.q_blocks, src)


@functools.cache
def _native_gqa() -> bool:
    """Whether this torch's CPU flash kernel (forward and backward) takes fewer key/value heads than query heads."""
    q, k = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    try:
        o, lse = CPU_FLASH(q, k, k, 0.0, False, attn_mask=None, scale=None)
        grads = CPU_FLASH_BACKWARD(o, q, k, k, o, lse, 0.0, False, attn_mask=None, scale=None)
    except RuntimeError:
        return False
    return grads[1].shape == k.shape


def _slidable(x: Tensor) -> bool:
    """Whether ``x (B, H, L, X)`` merges its batch and head dims into one stride (views of :func:`_slide`)."""
    return x.stride(-1) == 1 and (x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1))


def _slide(x: Tensor, start: int, stride: int, n: int, length: int) -> Tensor:
    """Rows ``start + i·stride + [0, length)`` of ``x (B, H, L, X)`` for ``i < n`` as an ``(n, B·H, length, X)``
    view (overlapping when ``stride < length``; no copy)."""
    B, H, _, X = x.shape
    row = x.stride(2)
    return x.as_strided((n, B * H, length, X), (stride * row, x.stride(1), row, 1), x.storage_offset() + start * row)


def _q_rows(x: Tensor, step: Step, block_q: int, slide: bool) -> Tensor:
    """The step's query blocks of ``x (B, H, nq·r, X)``: an ``(N, B·H, r, X)`` view (``slide``) or the
    ``(B·N, H, r, X)`` copy of :func:`_rows`."""
    if not slide:
        return _rows(x, step, block_q)
    return _slide(x, step.q_start * block_q, block_q, len(step.q_blocks), block_q)


def _add_slid(dst: Tensor, g: Tensor, chunk) -> None:
    """Add ``g (N, B·Hkv, c, X)``, the gradient of :func:`_slide`'s overlapping view of ``dst (B, Hkv, Lk, X)``'s
    rows, into ``dst``: ``c / stride`` strided in-place adds when the span is a whole number of strides (each add
    touches every row once), one sum for a shared prefix (stride 0), else one ``index_add_``."""
    (start, stride), (n, c) = chunk.slide, chunk.index.kv_idx.shape
    if stride == 0:
        _slide(dst, start, 0, 1, c)[0].add_(g.sum(0))
    elif c % stride == 0:
        for j in range(c // stride):
            _slide(dst, start + j * stride, stride, n, stride).add_(g[:, :, j * stride : (j + 1) * stride])
    else:
        flat = dst.view(-1, dst.shape[-2], dst.shape[-1])
        flat.index_add_(1, chunk.gather, g.transpose(0, 1).reshape(flat.shape[0], -1, g.shape[-1]).to(dst.dtype))


def _step_inputs(setup: TileSetup, step: Step, qp: Tensor, k4: Tensor, v4: Tensor):
    """``(slide, mask, empty rows, keys, values)`` of one step, forward and backward alike: the keys and values as
    strided views when :func:`_slide_step`, else gathered (and the mask laid out to match)."""
    (ch,) = step.chunks
    n = len(step.q_blocks)
    slide = _slide_step(step, (qp, k4, v4), setup.G)
    mask, empty = _mask(setup, step, 1 if slide else qp.shape[0], qp.dtype)
    if slide:
        (start, stride), c = ch.slide, ch.index.kv_idx.shape[1]
        return slide, mask, empty, _slide(k4, start, stride, n, c), _slide(v4, start, stride, n, c)
    return slide, mask, empty, _cols(k4, ch.gather, n, setup.G), _cols(v4, ch.gather, n, setup.G)


def _write(dst: Tensor, step: Step, block_q: int, slide: bool, val: Tensor) -> None:
    """Write a step's kernel result into its query blocks of ``dst (B, H, nq·r, X)`` (the layout of ``slide``)."""
    if slide:
        _q_rows(dst, step, block_q, True).copy_(val)
    else:
        _store(dst, step, block_q, val)


def _slide_step(step: Step, tensors: tuple[Tensor, ...], groups: int) -> bool:
    """Whether ``step`` runs on strided views (see the module docstring) for these ``(B, H, L, X)`` tensors."""
    (ch,) = step.chunks
    if ch.slide is None or step.q_start is None or not all(_slidable(t) for t in tensors):
        return False
    return groups == 1 or _native_gqa()


def _mask(setup: TileSetup, step: Step, batch: int, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """The step's additive kernel mask ``(B·N, 1, r, c)`` and its empty rows ``(B·N, 1, r, 1)`` (or None).

    When the call's only terms are positional (causal, window: what the schedule itself encodes), the result is
    kept with the step, so a cached schedule (:func:`attnkit.backends.tiled.cached_schedule`) builds it once."""
    positional_only = not setup.bool_masks and setup.block_mask is None and setup.mask_mod is None
    if not positional_only:
        return _build_mask(setup, step, batch, dtype)
    key = ("kernel_mask", batch, dtype)
    found = step.cache.get(key)
    if found is None:
        found = _build_mask(setup, step, batch, dtype)
        if sum(t.untyped_storage().nbytes() for t in found if t is not None) <= MASK_CACHE_BYTES:
            step.cache[key] = found  # shared (r, c) layouts; a causal step's (N, r, c) diagonal is rebuilt
    return found


def _build_mask(setup: TileSetup, step: Step, batch: int, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    (ch,) = step.chunks
    (n, r), c = ch.index.q_idx.shape, ch.index.kv_idx.shape[1]
    _bias, keep = setup.terms(ch.index)  # keep: (1, 1, N|1, 1, r|1, c|1) by fusable(); bias is None
    if keep is not None:
        keep = keep.view(keep.shape[2], keep.shape[4], keep.shape[5])
    if ch.keep is not None:
        keep = ch.keep if keep is None else keep & ch.keep
    if keep is None:
        return None, None
    m = keep.shape[0]  # N, or 1 for a uniform chunk: one (r, c) mask broadcast to every block
    mask, empty = kernel_mask_from_keep(keep.expand(m, r, c), dtype)
    empty = empty.unsqueeze(1) if bool(empty.any()) else None  # (m, 1, r, 1)
    if m == 1:
        mask = mask.unsqueeze(1).expand(batch * n, 1, r, c)
        return mask, None if empty is None else empty.expand(batch * n, 1, r, 1)
    if batch == 1:
        return mask.unsqueeze(1), empty
    mask = mask.expand(batch, n, r, c).reshape(batch * n, 1, r, c)
    return mask, None if empty is None else empty.expand(batch, n, 1, r, 1).reshape(batch * n, 1, r, 1)


class _FusedFunction(torch.autograd.Function):
    """Forward: one kernel call per step. Backward: the kernel's fused backward per step (keys/values gathered
    again, their gradients scatter-added once per step), so no gathered tensor outlives its step."""

    @staticmethod
    def forward(ctx, setup, sched, q, k4, v4):
        r = sched.block_q
        qp = pad_rows(q, sched.num_q_blocks * r)
        out = torch.zeros((*qp.shape[:-1], v4.shape[-1]), dtype=v4.dtype, device=q.device)
        lse = None
        for st in sched.steps():
            slide, mask, empty, k_, v_ = _step_inputs(setup, st, qp, k4, v4)
            o, lse_t = CPU_FLASH(_q_rows(qp, st, r, slide), k_, v_, 0.0, False, attn_mask=mask, scale=setup.scale)
            if lse is None:
                lse = torch.full((*qp.shape[:-1], 1), float("-inf"), dtype=lse_t.dtype, device=q.device)
            lse_t = lse_t.unsqueeze(-1)
            if empty is not None:  # rows that keep nothing: output 0, lse -inf
                o, lse_t = o.masked_fill(empty, 0.0), lse_t.masked_fill(empty, float("-inf"))
            _write(out, st, r, slide, o)
            _write(lse, st, r, slide, lse_t)
        if lse is None:
            lse = torch.full((*qp.shape[:-1], 1), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        ctx.setup, ctx.sched = setup, sched
        ctx.save_for_backward(q, k4, v4, out, lse)
        Lq = q.shape[2]
        lse_out = lse[:, :, :Lq, 0]
        ctx.mark_non_differentiable(lse_out)
        return out[:, :, :Lq], lse_out

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k4, v4, out, lse = ctx.saved_tensors
        setup, sched = ctx.setup, ctx.sched
        B, Lq = q.shape[0], q.shape[2]
        r, rows, acc = sched.block_q, out.shape[2], setup.acc
        qp, dop = pad_rows(q, rows), pad_rows(dout.to(out.dtype), rows)
        dop = dop if _slidable(dop) else dop.contiguous()
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows with no key: p = exp(s - inf) = 0
        dq = torch.zeros(qp.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k4.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v4.shape, dtype=acc, device=q.device)
        Hkv = k4.shape[1]
        for st in sched.steps():
            (ch,) = st.chunks
            n = len(st.q_blocks)
            slide, mask, _, k_, v_ = _step_inputs(setup, st, qp, k4, v4)
            gq, gk, gv = CPU_FLASH_BACKWARD(
                _q_rows(dop, st, r, slide),
                _q_rows(qp, st, r, slide),
                k_,
                v_,
                _q_rows(out, st, r, slide),
                _q_rows(lse, st, r, slide).squeeze(-1),
                0.0,
                False,
                attn_mask=mask,
                scale=setup.scale,
            )
            _write(dq, st, r, slide, gq)
            if slide:  # (N, B·Hkv, c, X): the kernel already summed each KV head's group
                for dst, g in ((dk, gk), (dv, gv)):
                    _add_slid(dst, g, ch)
                continue
            for dst, g in ((dk, gk), (dv, gv)):  # (B·N, H, c, X) -> summed over each KV head's group
                g = g.view(B, n, Hkv, setup.G, g.shape[-2], g.shape[-1])
                g = g.sum(3) if setup.G > 1 else g.squeeze(3)  # (B, N, Hkv, c, X)
                dst.index_add_(2, ch.gather, g.transpose(1, 2).reshape(B, Hkv, -1, g.shape[-1]).to(acc))
        return None, None, dq[:, :, :Lq], dk.to(k4.dtype), dv.to(v4.dtype)


def fused_attention(setup: TileSetup, sched: Schedule) -> tuple[Tensor, Tensor]:
    """Run ``setup``'s call over ``sched``'s steps (each one chunk), one fused kernel per step.

    Returns:
        ``(output (*batch, H, Lq, Dv) in the value dtype, lse (*batch, H, Lq) float32/float64)``, differentiable
        w.r.t. query, key and value through the kernel's fused backward (the lse is not).
    """
    spec = setup.spec
    q5, k4, v4 = reshape_qkv(spec)
    B, Hkv, G, Lq, D = q5.shape
    out, lse = _FusedFunction.apply(setup, sched, q5.reshape(B, Hkv * G, Lq, D), k4, v4)
    out = out.reshape((*spec.query.shape[:-1], spec.value.shape[-1]))
    return out, lse.reshape(spec.query.shape[:-1]).to(lse_dtype(spec.query.dtype))


def run(setup: TileSetup, make_schedule: Callable[[bool], Schedule]) -> tuple[Tensor, Tensor]:
    """Run ``setup``'s call on the fused step when :func:`fusable`, else on the explicit online softmax
    (:func:`attnkit.backends.flash_core.flash_attention`); ``make_schedule(fused)`` builds the schedule."""
    fused = fusable(setup) is None
    sched = make_schedule(fused)
    return (fused_attention if fused else flash_attention)(setup, sched)
