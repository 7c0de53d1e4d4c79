"""FlashAttention-2's forward and backward over a schedule of tiles, in plain PyTorch (shared by the
``"tiled"`` and ``"blocksparse"`` backends).

Forward (Dao et al. 2022, Alg. 1; Dao 2023, Alg. 1): for each step of query blocks, walk its key chunks keeping a
running row maximum ``m``, normalizer ``l`` and unnormalized output ``acc``; a chunk's scores ``s`` update them as
``m' = max(m, rowmax s)``, ``p = exp(s - m')``, ``l' = l·exp(m - m') + rowsum p``,
``acc' = acc·exp(m - m') + p v``. The output is ``acc / l`` and the log-sum-exp ``m + log l`` is saved.
Backward (Dao 2023, Alg. 2): recompute ``p = exp(s - lse)`` per tile, ``dv += pᵀ do``, ``dp = do vᵀ``,
``ds = p (dp - delta)`` with ``delta = rowsum(do · o)`` (minus the incoming gradient of the lse), then
``dq += ds k``, ``dk += dsᵀ q``. Only tiles and per-row vectors are ever held, never the ``Lq x Lk`` matrix.

A *schedule* decides which tiles exist and batches them into *steps* (:class:`Step`): ``N`` query blocks of
``r`` rows processed together, their key/value rows gathered with one ``index_select`` over a stacked ``(N, c)``
position index per *chunk*, scores ``(B, Hkv, N, G, r, c)`` from one batched matmul, the online-softmax state
held in batched tensors. ``N`` comes from a memory budget (:data:`STEP_SCORES` score elements per chunk,
:data:`FUSED_STEP_BYTES` gathered bytes per fused step), so the number of tensor operations per call follows the
number of steps and chunks, never the number of tiles: at most about 120 aten calls per call plus 100 per chunk
(views included; forward and backward alike; ``tests/backends/test_op_count.py`` counts them). This is what keeps
the paths fast on a shared CPU, where every operation is an OpenMP region whose barrier waits for a parked
thread. Calls whose terms are only a keep-mask run each step as one fused kernel instead
(:mod:`attnkit.backends.flash_fused`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from attnkit.functional.spec import AttentionSpec
from attnkit.functional.tiles import TileIndex, TileSetup, reshape_qkv

__all__ = [
    "Chunk",
    "Schedule",
    "Step",
    "add_kv",
    "block_matmul",
    "block_matmul_tn",
    "blocks_per_step",
    "check_alibi_grad",
    "flash_attention",
    "load_kv",
    "load_q",
    "make_chunk",
    "pad_rows",
    "shared_keys",
    "store_q",
]


@dataclass
class Chunk:
    """The key columns of one step: ``index.kv_idx (N, c)`` absolute positions per query block (possibly past
    the end of the keys: padding), ``gather (N·c,)`` the rows actually loaded (clamped into ``[0, Lk)``),
    ``keep``, the schedule's structural mask broadcastable to ``(N, r, c)`` (layout blocks, padding) or None, and
    ``slide``: ``(start, stride)`` when block ``n``'s columns are the consecutive keys ``start + n·stride + j``,
    all inside ``[0, Lk)`` (sliding-window interiors, causal prefixes with ``stride = 0``): the fused path then
    reads them as an overlapping strided view instead of gathering a copy."""

    index: TileIndex
    gather: Tensor
    keep: Tensor | None = None
    slide: tuple[int, int] | None = None


@dataclass
class Step:
    """``N`` query blocks of ``r`` rows processed together: ``q_blocks (N,)`` block numbers (``q_start``,
    ``q_start + 1``, ... when ``q_start`` is not None: loads and stores are slices), with their key chunks."""

    q_blocks: Tensor
    q_start: int | None
    chunks: list[Chunk] = field(default_factory=list)
    #: Per-step results that depend only on the schedule (the fused path's kernel masks), kept with it.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_idx(self) -> Tensor:
        return self.chunks[0].index.q_idx


class Schedule(Protocol):
    """Which tiles exist: query blocks of ``block_q`` rows (``num_q_blocks`` of them, the last padded), batched
    into :class:`Step` s. The number of steps and chunks, not the number of tiles, sets the operation count."""

    block_q: int
    num_q_blocks: int

    def steps(self) -> list[Step]: ...


def make_chunk(
    q_idx: Tensor,
    kv_idx: Tensor,
    kv_len: int,
    keep: Tensor | None = None,
    *,
    uniform: bool = False,
    in_band: bool = False,
    slide: tuple[int, int] | None = None,
) -> Chunk:
    """A chunk of absolute key positions ``kv_idx (N, c)``; positions ``>= kv_len`` are masked out.
    ``uniform``, ``in_band``: see :class:`~attnkit.functional.tiles.TileIndex`; ``slide``: see :class:`Chunk`
    (dropped when a position falls outside the keys)."""
    gather = kv_idx.clamp(max=kv_len - 1).flatten()
    if int(kv_idx.max()) >= kv_len:
        inside = (kv_idx < kv_len).unsqueeze(1)  # (N, 1, c)
        keep = inside if keep is None else keep & inside
        slide = None
    return Chunk(TileIndex(q_idx, kv_idx, uniform=uniform, in_band=in_band), gather, keep, slide)


def load_q(x5: Tensor, step: Step, block_q: int) -> Tensor:
    """Rows of the step's query blocks of a padded ``(B, Hkv, G, nq·r, X)`` tensor as ``(B, Hkv, N, G·r, X)``."""
    B, Hkv, G, _, X = x5.shape
    t = x5.unflatten(3, (-1, block_q))
    n = len(step.q_blocks)
    t = t[:, :, :, step.q_start : step.q_start + n] if step.q_start is not None else t.index_select(3, step.q_blocks)
    if G == 1:
        return t.view(B, Hkv, n, block_q, X) if t.is_contiguous() else t.reshape(B, Hkv, n, block_q, X)
    return t.transpose(2, 3).reshape(B, Hkv, n, G * block_q, X)


def store_q(dst5: Tensor, step: Step, block_q: int, val: Tensor) -> None:
    """Write ``val (B, Hkv, N, G·r, X)`` into the step's query blocks of ``dst5 (B, Hkv, G, nq·r, X)``."""
    B, Hkv, G, _, X = dst5.shape
    n = len(step.q_blocks)
    src = val.view(B, Hkv, n, G, block_q, X).transpose(2, 3)
    dst = dst5.view(B, Hkv, G, -1, block_q, X)
    if step.q_start is not None:
        dst[:, :, :, step.q_start : step.q_start + n] = src
    else:
        dst.index_copy_(3, step.q_blocks, src)


def shared_keys(chunk: Chunk) -> bool:
    """Whether every query block of the chunk reads the same keys (a causal prefix: ``slide`` stride 0)."""
    return chunk.slide is not None and chunk.slide[1] == 0 and chunk.index.kv_idx.shape[0] > 1


def load_kv(x4: Tensor, chunk: Chunk) -> Tensor:
    """The chunk's key/value rows of ``x4 (B, Hkv, Lk, X)`` as ``(B, Hkv, N, c, X)`` (one gather), or as a
    ``(B, Hkv, 1, c, X)`` slice when the blocks share their keys (:func:`shared_keys`; no copy)."""
    n, c = chunk.index.kv_idx.shape
    if shared_keys(chunk):
        start = chunk.slide[0]
        return x4[:, :, start : start + c].unsqueeze(2)
    return x4.index_select(2, chunk.gather).view(x4.shape[0], x4.shape[1], n, c, x4.shape[-1])


def block_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a (B, Hkv, N, m, k) @ b (B, Hkv, N | 1, k, n)`` per block: ``(B, Hkv, N, m, n)``. Keys shared by the
    blocks (``b`` with one block) are one matmul over all ``N·m`` rows, not ``N`` matmuls of an expanded copy."""
    B, H, N, m, k = a.shape
    if b.shape[2] == 1 and N > 1:
        return torch.matmul(a.reshape(B, H, 1, N * m, k), b).view(B, H, N, m, b.shape[-1])
    return torch.matmul(a, b)


def block_matmul_tn(a: Tensor, b: Tensor, shared: bool) -> Tensor:
    """``aᵀ b`` per block for ``a (B, Hkv, N, m, c)``, ``b (B, Hkv, N, m, X)``: ``(B, Hkv, N, c, X)``, or summed
    over the blocks as ``(B, Hkv, 1, c, X)`` when they share their keys (one matmul over ``N·m`` rows)."""
    if shared:
        B, H, N, m, c = a.shape
        return torch.matmul(a.reshape(B, H, 1, N * m, c).transpose(-1, -2), b.reshape(B, H, 1, N * m, b.shape[-1]))
    return torch.matmul(a.transpose(-1, -2), b)


def add_kv(dst4: Tensor, chunk: Chunk, val: Tensor) -> None:
    """Add ``val (B, Hkv, N | 1, c, X)`` into the chunk's rows of ``dst4 (B, Hkv, Lk, X)``: one op (a slice
    ``add_`` for shared keys, else one scatter-add)."""
    if val.shape[2] == 1 and shared_keys(chunk):
        start, c = chunk.slide[0], val.shape[3]
        dst4[:, :, start : start + c].add_(val.squeeze(2))
        return
    dst4.index_add_(2, chunk.gather, val.reshape(dst4.shape[0], dst4.shape[1], -1, dst4.shape[-1]))


#: Score elements (all heads, all query blocks of a step) per chunk of the explicit path: 16 MiB of float32.
#: Measured (causal softcap, L = 4096, H = 8, 2 cores): 2^22 293 ms, 2^21 322, 2^20 327, 2^23 with 1024-key
#: chunks 642 (before in-place ops); with the other core busy smaller chunks win (2^20 1070 ms, 2^22 1351).
STEP_SCORES = 1 << 22
#: Bytes of gathered keys and values per step of the fused path.
FUSED_STEP_BYTES = 1 << 26
#: When the rows of a step need different numbers of keys (causal), a step covers at most 1/MIN_STEPS of the
#: query blocks, which bounds the padded work to about 1/MIN_STEPS of the work done.
MIN_STEPS = 8


def blocks_per_step(num_blocks: int, cost_per_block: int, *, fused: bool, varying: bool = False) -> int:
    """How many query blocks a step batches: as many as the budget allows (at least one); ``cost_per_block`` is
    in gathered key/value bytes (``fused``, budget :data:`FUSED_STEP_BYTES`) or score elements (budget
    :data:`STEP_SCORES`)."""
    n = (FUSED_STEP_BYTES if fused else STEP_SCORES) // max(1, cost_per_block)
    if varying:
        n = min(n, -(-num_blocks // MIN_STEPS))
    return max(1, min(n, num_blocks))


def pad_rows(t: Tensor, rows: int, value: float = 0.0) -> Tensor:
    """``t (..., L, X)`` padded with ``value`` to ``rows`` rows along dim -2."""
    extra = rows - t.shape[-2]
    return t if extra == 0 else torch.nn.functional.pad(t, (0, 0, 0, extra), value=value)


def check_alibi_grad(spec: AttentionSpec) -> str | None:
    """Why the tile-recomputing backward cannot serve ``spec`` (ALiBi slopes that need a gradient), or ``None``."""
    if spec.alibi_slopes is not None and spec.alibi_slopes.requires_grad and torch.is_grad_enabled():
        return "alibi_slopes that require grad (the tiled backward does not differentiate ALiBi slopes)"
    return None


def _dropout_keep(setup: TileSetup, shape, seed: int, tile: int, device) -> Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + 1_000_003 * tile) % (2**63 - 1))
    return torch.rand(shape, generator=gen, device=device) >= setup.dropout_p


def _chunk_logits(setup: TileSetup, qt: Tensor, kt: Tensor, ch: Chunk, n: int, r: int) -> Tensor:
    """Final logits ``(B, Hkv, N, G, r, c)`` of one chunk (the schedule's keep and-ed into the call's terms)."""
    extra = None if ch.keep is None else ch.keep.unsqueeze(1).unsqueeze(0).unsqueeze(0)
    return setup.masked_logits(setup.logits(qt, kt, n, r), ch.index, extra)


def _forward(setup: TileSetup, sched: Schedule, q5: Tensor, k4: Tensor, v4: Tensor, seed: int):
    """Returns ``out5 (B, Hkv, G, Lq, Dv)`` in the value dtype and ``lse5 (B, Hkv, G, Lq, 1)``."""
    B, Hkv, G, Lq, _ = q5.shape
    Dv, r = v4.shape[-1], sched.block_q
    rows = sched.num_q_blocks * r
    qp = pad_rows(setup.prepare_query(q5), rows)
    kp, vp = setup.prepare_kv(k4), setup.prepare_kv(v4)
    out = torch.zeros((B, Hkv, G, rows, Dv), dtype=setup.acc, device=q5.device)
    lse = torch.full((B, Hkv, G, rows, 1), float("-inf"), dtype=setup.acc, device=q5.device)
    inv_keep = 1.0 / (1.0 - setup.dropout_p)
    tile = 0
    for st in sched.steps():
        n = len(st.q_blocks)
        qt = load_q(qp, st, r)
        m = acc = l_sum = None
        for ch in st.chunks:
            s = _chunk_logits(setup, qt, load_kv(kp, ch), ch, n, r)
            if setup.score_mod is not None:
                s = s.clone()  # the result may alias its inputs (score_mod); the steps below work in place
            m_new = s.amax(-1, keepdim=True)
            if m is not None:
                m_new = torch.maximum(m, m_new)
            m_safe = m_new.nan_to_num(neginf=0.0)  # a row with nothing kept yet: subtract 0
            p = s.sub_(m_safe).exp_()  # (B, Hkv, N, G, r, c); masked entries are exp(-inf) = 0
            row = p.sum(-1, keepdim=True)
            pd = p * _dropout_keep(setup, p.shape, seed, tile, p.device) * inv_keep if setup.dropout_p > 0 else p
            pv = block_matmul(pd.view(B, Hkv, n, G * r, -1), load_kv(vp, ch))
            if m is None:
                acc, l_sum = pv, row
            else:
                alpha = torch.exp(m - m_new)  # m = -inf -> 0; both -inf -> nan, but then l_sum = acc = 0
                alpha = alpha.nan_to_num_(nan=0.0)
                l_sum = l_sum.mul_(alpha).add_(row)
                acc = acc.mul_(alpha.view(B, Hkv, n, G * r, 1)).add_(pv)
            m = m_new
            tile += 1
        if m is None:
            continue
        # Rows with nothing kept: l_sum = 0 -> output 0, lse = m + log 0 = -inf (m is finite or -inf).
        o = acc.div_(l_sum.view(B, Hkv, n, G * r, 1).clamp(min=torch.finfo(setup.acc).tiny))
        lse_t = m.nan_to_num(neginf=0.0).add_(l_sum.log())
        store_q(out, st, r, o)
        store_q(lse, st, r, lse_t.view(B, Hkv, n, G * r, 1))
    return out[:, :, :, :Lq].to(v4.dtype), lse[:, :, :, :Lq]


def _backward(setup, sched, q5, k4, v4, out5, lse5, dout5, dlse5, seed):
    """Gradients ``dq5, dk4, dv4`` (input dtypes) and the float-term gradients."""
    B, Hkv, G, Lq, _D = q5.shape
    acc, r = setup.acc, sched.block_q
    rows = sched.num_q_blocks * r
    delta = (dout5.to(acc) * out5.to(acc)).sum(-1, keepdim=True)  # (B, Hkv, G, Lq, 1)
    if dlse5 is not None:
        delta = delta - dlse5.to(acc)
    qp, dop = pad_rows(setup.prepare_query(q5), rows), pad_rows(dout5.to(acc), rows)
    lp, deltap = pad_rows(lse5.nan_to_num(neginf=0.0), rows, float("inf")), pad_rows(delta, rows)  # p = 0 on pads
    kp, vp = setup.prepare_kv(k4), setup.prepare_kv(v4)
    dq = torch.zeros(qp.shape, dtype=acc, device=q5.device)
    dk = torch.zeros(kp.shape, dtype=acc, device=q5.device)
    dv = torch.zeros(vp.shape, dtype=acc, device=q5.device)
    bias_bufs = setup.bias_grad_buffers()
    inv_keep = 1.0 / (1.0 - setup.dropout_p)
    tile = 0
    for st in sched.steps():
        n = len(st.q_blocks)
        qt, dot = load_q(qp, st, r), load_q(dop, st, r)
        lse_t = load_q(lp, st, r).view(B, Hkv, n, G, r, 1)
        delta_t = load_q(deltap, st, r).view(B, Hkv, n, G, r, 1)
        dq_t = None
        for ch in st.chunks:
            kt, vt = load_kv(kp, ch), load_kv(vp, ch)
            s_raw = setup.logits(qt, kt, n, r)
            if setup.score_mod is not None:
                s_raw.requires_grad_(True)
                with torch.enable_grad():
                    s_mod = setup.transform(s_raw, ch.index)
            else:
                s_mod = setup.transform(s_raw, ch.index)
            bias, keep = setup.terms(ch.index)
            if ch.keep is not None:
                extra = ch.keep.unsqueeze(1).unsqueeze(0).unsqueeze(0)
                keep = extra if keep is None else keep & extra
            s = s_mod.detach()
            if bias is not None:
                s = s + bias
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            elif bias is None and s_mod is not s_raw:
                s = s.clone()  # s_mod (and what score_mod saved) is still needed below
            p = s.sub_(lse_t).exp_()  # (B, Hkv, N, G, r, c); a fresh tensor or the unused raw scores
            dp = block_matmul(dot, vt.transpose(-1, -2)).view(p.shape)
            if setup.dropout_p > 0:
                z = _dropout_keep(setup, p.shape, seed, tile, p.device) * inv_keep
                pd, dp = p * z, dp * z
            else:
                pd = p
            shared = shared_keys(ch)
            add_kv(dv, ch, block_matmul_tn(pd.view(B, Hkv, n, G * r, -1), dot, shared))
            ds = p.mul_(dp.sub_(delta_t))
            setup.accumulate_bias_grad(bias_bufs, ds, ch.index)
            if setup.score_mod is not None:
                (ds,) = torch.autograd.grad(s_mod, s_raw, ds)
            else:
                ds = setup.transform_grad(s_raw, s_mod, ds)
            # q is pre-scaled: dk = ds^T (scale q) directly, and dq = scale · (ds k), scaled once at the end.
            ds = ds.view(B, Hkv, n, G * r, -1)
            part = block_matmul(ds, kt)
            dq_t = part if dq_t is None else dq_t.add_(part)
            add_kv(dk, ch, block_matmul_tn(ds, qt, shared))
            tile += 1
        if dq_t is not None:
            store_q(dq, st, r, dq_t)
    dq.mul_(setup.scale)
    grads = (dq[:, :, :, :Lq].to(q5.dtype), dk.to(k4.dtype), dv.to(v4.dtype))
    return grads, setup.bias_grads(bias_bufs)


class _FlashFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup, sched, seed, q5, k4, v4, *bias_inputs):
        out5, lse5 = _forward(setup, sched, q5, k4, v4, seed)
        ctx.setup, ctx.sched, ctx.seed = setup, sched, seed
        ctx.save_for_backward(q5, k4, v4, out5, lse5)
        return out5, lse5

    @staticmethod
    def backward(ctx, dout5, dlse5):
        q5, k4, v4, out5, lse5 = ctx.saved_tensors
        (dq, dk, dv), dbias = _backward(ctx.setup, ctx.sched, q5, k4, v4, out5, lse5, dout5, dlse5, ctx.seed)
        return (None, None, None, dq, dk, dv, *dbias)


def flash_attention(setup: TileSetup, sched: Schedule) -> tuple[Tensor, Tensor]:
    """Run the call of ``setup`` over ``sched``'s tiles.

    Returns:
        ``(output (*batch, H, Lq, Dv), lse (*batch, H, Lq))``; differentiable w.r.t. query, key, value and the
        float ``attn_bias``/``attn_mask`` through the tile-recomputing backward.
    """
    spec = setup.spec
    q5, k4, v4 = reshape_qkv(spec)
    seed = int(torch.randint(0, 2**62, ())) if setup.dropout_p > 0 else 0
    bias_inputs = [orig for orig, _ in setup.biases]
    out5, lse5 = _FlashFunction.apply(setup, sched, seed, q5, k4, v4, *bias_inputs)
    out = out5.reshape((*spec.query.shape[:-1], spec.value.shape[-1]))
    return out, lse5.reshape(spec.query.shape[:-1])
