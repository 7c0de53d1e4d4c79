"""FlashAttention-2's forward and backward over a schedule of tiles, in plain PyTorch (shared by the
``"tiled"`` and ``"blocksparse"`` backends).

Forward (Dao et al. 2022, Alg. 1; Dao 2023, Alg. 1): for each group of query rows, walk its key chunks keeping a
running row maximum ``m``, normalizer ``l`` and unnormalized output ``acc``; a chunk's scores ``s`` update them as
``m' = max(m, rowmax s)``, ``p = exp(s - m')``, ``l' = l·exp(m - m') + rowsum p``,
``acc' = acc·exp(m - m') + p v``. The output is ``acc / l`` and the log-sum-exp ``m + log l`` is saved.
Backward (Dao 2023, Alg. 2): recompute ``p = exp(s - lse)`` per tile, ``dv += pᵀ do``, ``dp = do vᵀ``,
``ds = p (dp - delta)`` with ``delta = rowsum(do · o)`` (minus the incoming gradient of the lse), then
``dq += ds k``, ``dk += dsᵀ q``. Only tiles and per-row vectors are ever held, never the ``Lq x Lk`` matrix.

A *schedule* decides which tiles exist and how blocks of Q/K/V are loaded and stored (slices for the dense
tiled backend, gathers for block-sparse layouts); see :class:`Schedule`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from attnkit.functional.spec import AttentionSpec
from attnkit.functional.tiles import TileIndex, TileSetup, reshape_qkv

__all__ = ["Chunk", "Group", "Schedule", "check_alibi_grad", "flash_attention"]


@dataclass
class Chunk:
    """One tile's key columns: where they are (``index``) and how the schedule finds them (``where``)."""

    index: TileIndex
    where: object
    keep: Tensor | None = None  # extra bool mask (N, r, c) from a block layout, or None


@dataclass
class Group:
    """A set of ``N`` query blocks of ``r`` rows processed together, with their key chunks."""

    where: object
    q_idx: Tensor
    q_range: tuple[int, int] | None
    chunks: list[Chunk] = field(default_factory=list)


class Schedule(Protocol):
    """How tiles are laid out. ``x5`` tensors are ``(B, Hkv, G, Lq_padded, X)``, ``x4`` ``(B, Hkv, Lk_padded, X)``."""

    q_pad: int
    kv_pad: int

    def groups(self) -> list[Group]: ...

    def load_q(self, x5: Tensor, group: Group) -> Tensor: ...  # -> (B, Hkv, N, G*r, X)

    def store_q(self, dst5: Tensor, group: Group, val: Tensor) -> None: ...

    def load_kv(self, x4: Tensor, chunk: Chunk) -> Tensor: ...  # -> (B, Hkv, N, c, X)

    def add_kv(self, dst4: Tensor, chunk: Chunk, val: Tensor) -> None: ...


def _pad(t: Tensor, extra: int, dim: int) -> Tensor:
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def check_alibi_grad(spec: AttentionSpec) -> str | None:
    """Why the tile-recomputing backward cannot serve ``spec`` (ALiBi slopes that need a gradient), or ``None``."""
    if spec.alibi_slopes is not None and spec.alibi_slopes.requires_grad and torch.is_grad_enabled():
        return "alibi_slopes that require grad (the tiled backward does not differentiate ALiBi slopes)"
    return None


def _scores(setup: TileSetup, qt: Tensor, kt: Tensor, n: int, r: int) -> Tensor:
    """Scaled scores ``(B, Hkv, N, G, r, c)`` in the accumulation dtype (``qt`` prepared by the setup)."""
    return setup.logits(qt, kt, n, r)


def _dropout_keep(setup: TileSetup, shape, seed: int, tile: int, device) -> Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + 1_000_003 * tile) % (2**63 - 1))
    return torch.rand(shape, generator=gen, device=device) >= setup.dropout_p


def _forward(setup: TileSetup, sched: Schedule, q5: Tensor, k4: Tensor, v4: Tensor, seed: int):
    """Returns ``out5 (B, Hkv, G, Lq, Dv)`` in the value dtype and ``lse5 (B, Hkv, G, Lq, 1)``."""
    B, Hkv, G, Lq, _ = q5.shape
    Dv = v4.shape[-1]
    qp = _pad(setup.prepare_query(q5), sched.q_pad, 3)
    kp, vp = _pad(setup.prepare_kv(k4), sched.kv_pad, 2), _pad(setup.prepare_kv(v4), sched.kv_pad, 2)
    out = torch.zeros((B, Hkv, G, qp.shape[3], Dv), dtype=setup.acc, device=q5.device)
    lse = torch.full((B, Hkv, G, qp.shape[3], 1), float("-inf"), dtype=setup.acc, device=q5.device)
    inv_keep = 1.0 / (1.0 - setup.dropout_p)
    tile = 0
    for g in sched.groups():
        n, r = g.q_idx.shape
        qt = sched.load_q(qp, g)
        m = acc = l_sum = None
        for ch in g.chunks:
            extra = None if ch.keep is None else ch.keep.view(1, 1, n, 1, r, -1)
            s = setup.masked_logits(_scores(setup, qt, sched.load_kv(kp, ch), n, r), ch.index, extra)
            if setup.score_mod is not None:
                s = s.clone()  # the result may alias its inputs (score_mod); the steps below work in place
            m_new = s.amax(-1, keepdim=True)
            if m is not None:
                m_new = torch.maximum(m, m_new)
            m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = s.sub_(m_safe).exp_()  # (B, Hkv, N, G, r, c); masked entries are exp(-inf) = 0
            row = p.sum(-1, keepdim=True)
            pd = p * _dropout_keep(setup, p.shape, seed, tile, p.device) * inv_keep if setup.dropout_p > 0 else p
            vt = sched.load_kv(vp, ch)
            pv = torch.matmul(pd.view(B, Hkv, n, G * r, -1), vt)
            if m is None:
                acc, l_sum = pv, row
            else:
                alpha = torch.exp(m - m_safe)  # m = -inf -> 0
                l_sum = l_sum * alpha + row
                acc = acc.mul_(alpha.view(B, Hkv, n, G * r, 1)).add_(pv)
            m = m_safe.masked_fill(torch.isneginf(m_new), float("-inf"))
            tile += 1
        if m is None:
            continue
        nonempty = l_sum > 0
        safe_l = torch.where(nonempty, l_sum, torch.ones_like(l_sum))
        o = acc / safe_l.view(B, Hkv, n, G * r, 1)
        lse_t = torch.where(nonempty, m + torch.log(safe_l), torch.full_like(m, float("-inf")))
        sched.store_q(out, g, o)
        sched.store_q(lse, g, lse_t.view(B, Hkv, n, G * r, 1))
    return out[:, :, :, :Lq].to(v4.dtype), lse[:, :, :, :Lq]


def _backward(setup, sched, q5, k4, v4, out5, lse5, dout5, dlse5, seed):
    """Gradients ``dq5, dk4, dv4`` (input dtypes) and the float-term gradients."""
    B, Hkv, G, Lq, _D = q5.shape
    acc = setup.acc
    delta = (dout5.to(acc) * out5.to(acc)).sum(-1, keepdim=True)  # (B, Hkv, G, Lq, 1)
    if dlse5 is not None:
        delta = delta - dlse5.to(acc)
    lse_safe = torch.where(torch.isneginf(lse5), torch.zeros_like(lse5), lse5)
    qp, dop = _pad(setup.prepare_query(q5), sched.q_pad, 3), _pad(dout5.to(acc), sched.q_pad, 3)
    lp, deltap = _pad(lse_safe, sched.q_pad, 3), _pad(delta, sched.q_pad, 3)
    kp, vp = _pad(setup.prepare_kv(k4), sched.kv_pad, 2), _pad(setup.prepare_kv(v4), sched.kv_pad, 2)
    dq = torch.zeros(qp.shape, dtype=acc, device=q5.device)
    dk = torch.zeros(kp.shape, dtype=acc, device=q5.device)
    dv = torch.zeros(vp.shape, dtype=acc, device=q5.device)
    bias_bufs = setup.bias_grad_buffers()
    inv_keep = 1.0 / (1.0 - setup.dropout_p)
    tile = 0
    for g in sched.groups():
        n, r = g.q_idx.shape
        qt, dot = sched.load_q(qp, g), sched.load_q(dop, g)
        lse_t = sched.load_q(lp, g).view(B, Hkv, n, G, r, 1)
        delta_t = sched.load_q(deltap, g).view(B, Hkv, n, G, r, 1)
        dq_t = None
        for ch in g.chunks:
            kt, vt = sched.load_kv(kp, ch), sched.load_kv(vp, ch)
            s_raw = _scores(setup, qt, kt, n, r)
            if setup.score_mod is not None:
                s_raw.requires_grad_(True)
                with torch.enable_grad():
                    s_mod = setup.transform(s_raw, ch.index)
            else:
                s_mod = setup.transform(s_raw, ch.index)
            bias, keep = setup.terms(ch.index)
            if ch.keep is not None:
                extra = ch.keep.view(1, 1, n, 1, r, -1)
                keep = extra if keep is None else keep & extra
            s = s_mod.detach()
            if bias is not None:
                s = s + bias
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            p = torch.exp(s - lse_t)  # (B, Hkv, N, G, r, c)
            dp = torch.matmul(dot, vt.transpose(-1, -2)).to(acc).view(p.shape)
            if setup.dropout_p > 0:
                z = _dropout_keep(setup, p.shape, seed, tile, p.device) * inv_keep
                pd, dp = p * z, dp * z
            else:
                pd = p
            pd = pd.view(B, Hkv, n, G * r, -1)
            sched.add_kv(dv, ch, torch.matmul(pd.transpose(-1, -2), dot))
            ds = p.mul_(dp.sub_(delta_t))
            setup.accumulate_bias_grad(bias_bufs, ds, ch.index)
            if setup.score_mod is not None:
                (ds,) = torch.autograd.grad(s_mod, s_raw, ds)
            else:
                ds = setup.transform_grad(s_raw, s_mod, ds)
            # q is pre-scaled: dk = ds^T (scale q) directly, and dq = scale · (ds k), scaled once at the end.
            ds = ds.view(B, Hkv, n, G * r, -1)
            part = torch.matmul(ds, kt)
            dq_t = part if dq_t is None else dq_t.add_(part)
            sched.add_kv(dk, ch, torch.matmul(ds.transpose(-1, -2), qt))
            tile += 1
        if dq_t is not None:
            sched.store_q(dq, g, dq_t)
    Lk = k4.shape[2]
    dq.mul_(setup.scale)
    grads = (dq[:, :, :, :Lq].to(q5.dtype), dk[:, :, :Lk].to(k4.dtype), dv[:, :, :Lk].to(v4.dtype))
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
