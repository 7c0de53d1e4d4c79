"""One block of a ring step: a rank's queries against one key/value block, forward and gradients.

:class:`RingCall` holds what every block of a call shares (global options, the layout's segments, the schedule).
Gradients of a block are computed with the *global* log-sum-exp of the rows: either by torch's fused CPU
FlashAttention backward, which takes the output and log-sum-exp as inputs (plain and causal-diagonal blocks), or
for every other block by recomputing it through :func:`attnkit.attention` and back-propagating with the output
gradient scaled by ``exp(lse_b - lse)`` and the lse gradient ``exp(lse_b - lse) · (dO · o_b - delta)``, which
makes the block's ``p = exp(s - lse_b)`` and ``delta`` exactly those of FlashAttention-2's Alg. 2 with the global
values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.distributed.comm import Schedule
from attnkit.distributed.layout import segments
from attnkit.distributed.plan import GlobalOptions, SubCall, pair_needed, plan_pair
from attnkit.functional.attention import attention
from attnkit.functional.spec import AttentionOutput

__all__ = ["RingCall", "block_grads", "fusable", "fused_block_grads"]


class RingCall:
    """Everything a call needs on this rank: options, schedule and the per-block calls."""

    def __init__(self, opts: GlobalOptions, layout: str, group, rank: int, size: int, local_len: int, backend: str):
        self.opts, self.layout, self.group, self.rank, self.size = opts, layout, group, rank, size
        self.backend = backend
        self.segs = [segments(layout, r, size, local_len) for r in range(size)]
        self.schedule = Schedule(rank, size, lambda a, b: pair_needed(opts, self.segs[a], self.segs[b]))
        self._cache: dict = {}

    def calls(self, src: int) -> list[SubCall]:
        return plan_pair(self.opts, self.segs[self.rank], self.segs[src], self._cache)

    def forward_backend(self, call: SubCall) -> str:
        """The backend of a block's forward: a windowed block under ``"auto"`` goes to ``"blocksparse"``, whose
        memory is ``O(L)``, because ``auto`` may pick SDPA with a dense ``(Lq, Lk)`` mask for a block that is
        denser than the whole call (a 16k-row diagonal block with a 4096-key window covers 27% of its scores)."""
        if self.backend == "auto" and "window_size" in call.kwargs:
            return "blocksparse"
        return self.backend

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call: SubCall, backend: str) -> AttentionOutput:
        (a, b), (c, d) = call.q, call.kv
        return attention(
            q[..., a:b, :],
            k[..., c:d, :],
            v[..., c:d, :],
            softcap=self.opts.softcap,
            scale=self.opts.scale,
            return_lse=True,
            backend=backend,
            **call.kwargs,
        )

    def grad_backend(self, q: Tensor, k: Tensor, v: Tensor, call: SubCall) -> str:
        """A backend with a differentiable log-sum-exp for the block ``q`` x ``k, v`` (already sliced): "sdpa"'s
        is not differentiable, so it is replaced by "tiled"."""
        backend = self.forward_backend(call)
        if backend == "auto":
            from attnkit.backends import select

            options = {"softcap": self.opts.softcap, "scale": self.opts.scale, **call.kwargs}
            backend = select(q, k, v, return_lse=True, **options).backend
        return "tiled" if backend == "sdpa" else backend


def block_grads(ring: RingCall, q, k, v, call: SubCall, dout, lse, delta):
    """Gradients of one block's queries, keys and values with the global ``lse`` and ``delta``, in float32
    (float64 for float64 inputs)."""
    (a, b), (c, d) = call.q, call.kv
    # float16/bfloat16 blocks are recomputed in float32: the core's backward rounds each block's gradient to the
    # input dtype, and summing P rounded partial gradients would make the error grow with the number of ranks.
    acc = lse.dtype
    with torch.enable_grad():
        qb = q[..., a:b, :].detach().to(acc).requires_grad_(True)
        kb = k[..., c:d, :].detach().to(acc).requires_grad_(True)
        vb = v[..., c:d, :].detach().to(acc).requires_grad_(True)
        part = attention(
            qb,
            kb,
            vb,
            softcap=ring.opts.softcap,
            scale=ring.opts.scale,
            return_lse=True,
            backend=ring.grad_backend(qb, kb, vb, call),
            **call.kwargs,
        )
        lse_b, lse_g, do = part.lse, lse[..., a:b], dout[..., a:b, :].to(lse.dtype)
        # O = Σ_b w_b o_b with w_b = exp(lse_b - lse): dL/do_b = w_b dO, dL/dlse_b = w_b (dO·o_b - delta).
        finite = torch.isfinite(lse_g) & torch.isfinite(lse_b)
        w = torch.where(finite, torch.exp(lse_b.detach() - torch.where(finite, lse_g, 0.0)), 0.0)
        g_out = (do * w.unsqueeze(-1)).to(part.output.dtype)
        g_lse = w * ((do * part.output.detach().to(lse.dtype)).sum(-1) - delta[..., a:b])
        return torch.autograd.grad((part.output, lse_b), (qb, kb, vb), (g_out, g_lse.to(lse_b.dtype)))


def fusable(ring: RingCall, q: Tensor, v: Tensor, call: SubCall, dlse) -> bool:
    """Whether torch's fused CPU FlashAttention backward computes this block exactly: no term but a causal mask
    (diagonal blocks only, where torch's top-left and attnkit's bottom-right causal agree), no lse gradient."""
    plain = set(call.kwargs) <= {"is_causal"} and ring.opts.softcap is None
    square = "is_causal" not in call.kwargs or call.q[1] - call.q[0] == call.kv[1] - call.kv[0]
    return (
        plain
        and square
        and dlse is None
        and q.device.type == "cpu"
        and q.dtype != torch.float64
        and q.shape[-1] == v.shape[-1]
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )


def fused_block_grads(ring: RingCall, q, k, v, call: SubCall, dout, out, lse):
    """The block's gradients from ``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` called with the
    *global* output and log-sum-exp of the rows (its ``p = exp(s - lse)`` and ``delta = rowsum(dO · O)`` are then
    exactly the ring's), in float32."""
    (a, b), (c, d) = call.q, call.kv
    batch, heads, kv_heads = q.shape[:-3], q.shape[-3], k.shape[-3]

    def as4(t: Tensor) -> Tensor:  # (B..., X, L, D) -> (B, X, L, D) float32
        return t.reshape(-1, *t.shape[-3:]).float()

    qb, kb, vb = as4(q[..., a:b, :]), as4(k[..., c:d, :]), as4(v[..., c:d, :])
    if kv_heads != heads:  # the CPU kernel has no grouped-query heads: expand, then sum the group's gradients
        kb, vb = kb.repeat_interleave(heads // kv_heads, 1), vb.repeat_interleave(heads // kv_heads, 1)
    lse_b = lse[..., a:b].reshape(-1, heads, b - a).float()
    lse_b = lse_b.masked_fill(torch.isneginf(lse_b), float("inf"))  # rows with no key: p = 0
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        as4(dout[..., a:b, :]),
        qb,
        kb,
        vb,
        as4(out[..., a:b, :]),
        lse_b,
        0.0,
        bool(call.kwargs.get("is_causal", False)),
        scale=ring.opts.scale,
    )
    if kv_heads != heads:
        dk = dk.unflatten(1, (kv_heads, heads // kv_heads)).sum(2)
        dv = dv.unflatten(1, (kv_heads, heads // kv_heads)).sum(2)
    return dq.reshape(*batch, *dq.shape[1:]), dk.reshape(*batch, *dk.shape[1:]), dv.reshape(*batch, *dv.shape[1:])
