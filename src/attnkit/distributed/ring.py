"""``ring_attention``: exact attention over a sequence sharded across the ranks of a process group.

Forward (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers", Alg. 1): each rank keeps
its queries and, step by step, receives the key/value block of another rank (:mod:`.comm`) while it computes
attention of its queries over the block it already has; partial outputs are merged exactly through their
log-sum-exp in float32, in place (:func:`attnkit.functional.merge.merge_into`); attention sinks join the merged
softmax once, at the end (:func:`attnkit.functional.merge.add_sinks`). Backward (Dao 2023, "FlashAttention-2",
Alg. 2, applied per block): the key/value blocks travel again; for each block the rank computes its gradients
with the *global* log-sum-exp and ``delta = rowsum(dO · O) - dlse`` (:mod:`.blocks`); the query gradient stays
local and the key/value gradient of the block is sent back to its owner. Only two key/value blocks and one
gradient block are held at a time, so memory per rank is ``O(L / P)``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from attnkit.distributed.blocks import RingCall, block_grads, fusable, fused_block_grads
from attnkit.distributed.comm import Exchange
from attnkit.distributed.layout import check_layout, segments
from attnkit.distributed.plan import GlobalOptions
from attnkit.functional.attention import attention
from attnkit.functional.merge import add_sinks, merge_into
from attnkit.functional.spec import AttentionOutput, lse_dtype, make_spec

__all__ = ["ring_attention"]

_KV_TAG, _GRAD_TAG = 0, 1 << 20


def _forward(ring: RingCall, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    acc = lse_dtype(q.dtype)
    k, v = k.contiguous(), v.contiguous()  # sent as they are, once per step
    out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    sched, ex = ring.schedule, Exchange(ring.group)

    def post(i: int):
        if i >= len(sched.offsets):
            return None
        t = sched.offsets[i]
        return ex.post((k, v), sched.send_to(t), (k, v), sched.recv_from(t), _KV_TAG + 2 * t)

    def compute(src: int, kb: Tensor, vb: Tensor) -> None:
        for call in ring.calls(src):
            part = ring.attend(q, kb, vb, call, ring.forward_backend(call))
            a, b = call.q
            merge_into(out[..., a:b, :], lse[..., a:b], part.output, part.lse)  # in place: one accumulator

    pending = post(0)
    if sched.local_needed():
        compute(ring.rank, k, v)
    for i, t in enumerate(sched.offsets):
        received = ex.wait(pending)
        pending = post(i + 1)
        if received is not None:
            compute((ring.rank - t) % ring.size, *received)
    ex.finish()
    if sinks is not None:  # a sink is one more part of every row's softmax: merged once, not once per block
        out, lse, _ = add_sinks(out, lse, sinks)
    return out.to(v.dtype), lse


def _backward(ring: RingCall, q, k, v, out, lse, dout, dlse):
    acc = lse.dtype
    k, v = k.contiguous(), v.contiguous()
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    sched, ex = ring.schedule, Exchange(ring.group)

    def post(i: int):
        if i >= len(sched.offsets):
            return None
        t = sched.offsets[i]
        return ex.post((k, v), sched.send_to(t), (k, v), sched.recv_from(t), _KV_TAG + 2 * t)

    def compute(src: int, kb: Tensor, vb: Tensor, dkb: Tensor, dvb: Tensor) -> None:
        for call in ring.calls(src):
            if fusable(ring, q, vb, call, dlse):
                gq, gk, gv = fused_block_grads(ring, q, kb, vb, call, dout, out, lse)
            else:
                gq, gk, gv = block_grads(ring, q, kb, vb, call, dout, lse, delta)
            (a, b), (c, d) = call.q, call.kv
            dq[..., a:b, :] += gq
            dkb[..., c:d, :] += gk
            dvb[..., c:d, :] += gv

    pending = post(0)
    if sched.local_needed():
        compute(ring.rank, k, v, dk, dv)
    for i, t in enumerate(sched.offsets):
        received = ex.wait(pending)
        pending = post(i + 1)
        # my own block's gradient comes back from the rank that used it at this offset
        src_back = sched.send_to(t)
        back = ex.post(None, None, (dk, dv), src_back, _GRAD_TAG + 2 * t)
        if received is not None:
            src = (ring.rank - t) % ring.size
            dkb, dvb = torch.zeros_like(dk), torch.zeros_like(dv)
            compute(src, *received, dkb, dvb)
            ex.post((dkb, dvb), src, (), None, _GRAD_TAG + 2 * t)
        got = ex.wait(back)
        if got is not None:
            dk += got[0]
            dv += got[1]
    ex.finish()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), delta


def _sinks_grad(sinks: Tensor, lse: Tensor, delta: Tensor) -> Tensor:
    """``dL/dsink_h = -Σ_rows exp(sink_h - lse) · delta`` over this rank's rows (the sink's value is 0)."""
    p_sink = torch.exp(sinks.to(lse.dtype).unsqueeze(-1) - lse)  # lse >= sink: finite
    grad = -(p_sink * delta).sum(-1)  # (B..., H)
    return grad.sum_to_size(sinks.shape).to(sinks.dtype)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ring, q, k, v, sinks):
        out, lse = _forward(ring, q, k, v, sinks)
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient (None), which keeps the fused backward
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, delta = _backward(ctx.ring, q, k, v, out, lse, dout, dlse)
        dsinks = _sinks_grad(sinks, lse, delta) if sinks is not None and ctx.needs_input_grad[4] else None
        return None, dq, dk, dv, dsinks


def _fingerprint(parts: tuple) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=7).digest(), "little")


def _check_across_ranks(group, description: tuple) -> None:
    """One all-reduce of two int64s: the max and min of every rank's fingerprint of the call must agree."""
    import torch.distributed as dist

    fp = _fingerprint(description)
    t = torch.tensor([fp, -fp], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != fp or -int(t[1]) != fp:
        raise ValueError(
            "ring_attention: the ranks of the group called with different options or slice shapes; every rank "
            f"must pass the same options and equally shaped slices (this rank: {description})"
        )


def _reject(name: str, value, default, hint: str) -> None:
    if value is not default and value != default:
        raise ValueError(f"ring_attention: {name} is not supported under context parallelism, got {value!r}; {hint}")


def _group_rank_size(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("ring_attention: a group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def ring_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    group=None,
    layout: str = "contiguous",
    is_causal: bool = False,
    window_size: int | tuple[int, int] | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    mask_mod=None,
    score_mod=None,
    block_mask=None,
    sinks: Tensor | None = None,
    attn_mask: Tensor | None = None,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | AttentionOutput:
    r"""Context-parallel :func:`attnkit.attention`: each rank of ``group`` holds a slice of the sequence.

    Every rank passes its own slice of query, key and value (made with :func:`attnkit.distributed.shard` in
    ``layout``) and gets back its slice of the output, equal to the matching rows of ``attnkit.attention`` on the
    whole sequence. Positions in ``is_causal``, ``window_size``, ALiBi, ``mask_mod``, ``score_mod`` and
    ``block_mask`` are **global** (``0 .. L-1`` with ``L = P · L_local``). Key/value blocks are exchanged with
    asynchronous point-to-point sends overlapped with the computation of the block at hand (:mod:`.comm`);
    blocks that no query may attend to (outside the causal/window band or the ``block_mask`` layout) are neither
    computed nor sent. Partial results (and ``sinks``) are merged in float32 (float64 for float64 inputs)
    whatever the input dtype. Differentiable with respect to query, key, value and ``sinks`` (the backward
    exchanges the blocks again and returns each block's key/value gradient to its owner). A group of size 1, or
    no initialized process group, runs :func:`attnkit.attention` directly.

    Traffic per step: each rank sends and receives one key/value block, ``2 · B · Hkv · (L/P) · D`` elements
    (forward), plus the block's key/value gradient in float32 (backward); ``P - 1`` steps at most.

    Args:
        query: ``(B..., H, L/P, D)``, this rank's slice.
        key: ``(B..., Hkv, L/P, D)``; grouped-query attention when ``Hkv < H``.
        value: ``(B..., Hkv, L/P, Dv)``.
        group: a ``torch.distributed`` process group (default: the world). Every rank of it must call with the
            same options and equally shaped slices (checked once per call with one 16-byte all-reduce).
        layout: ``"contiguous"`` (rank ``r`` holds positions ``[r·L/P, (r+1)·L/P)``) or ``"zigzag"`` (chunks
            ``r`` and ``2P-1-r`` of ``2P``: balanced work under a causal mask).
        is_causal, window_size, alibi_slopes, softcap, scale, mask_mod, score_mod: as
            :func:`attnkit.attention`, in global positions (``Lq == Lk == L``, so no alignment question).
        block_mask: an :class:`attnkit.sparse.BlockMask` built for the **global** ``(L, L)``.
        sinks: ``(H,)`` or ``(B..., H)`` attention-sink logits (as :func:`attnkit.attention`): they join every
            row's softmax once, after the blocks are merged. Differentiable; the gradient on each rank covers its
            own rows, so sum it across ranks like any replicated parameter's gradient.
        attn_mask, attn_bias, dropout_p, return_weights: not supported (dense ``(L, L)`` tensors and
            probability matrices defeat sharding; express masks as ``mask_mod``/``block_mask``); raise ValueError.
        return_lse: also return this rank's rows of the log-sum-exp ``(B..., H, L/P)``, float32 (float64 for
            float64 inputs), differentiable.
        backend: :func:`attnkit.attention` backend for each block (``"auto"`` picks per block).

    Returns:
        ``(B..., H, L/P, Dv)`` in the dtype of ``value``, or an :class:`attnkit.AttentionOutput`
        ``(output, None, lse)`` when ``return_lse``. Rows with no key to attend to give 0 and lse ``-inf``.

    Raises:
        TypeError, ValueError: the errors of :func:`attnkit.attention` for the local slices; an unknown layout;
            local query and key lengths that differ; a zigzag slice of odd length; a ``block_mask`` not built
            for ``(L, L)``; an unsupported option (see above); options or shapes that differ across ranks.

    References:
        Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context";
        Brandon et al. 2023, "Striped Attention" (causal load balancing); Dao 2023, "FlashAttention-2", Alg. 2
        (the per-block backward); Milakov & Gimelshein 2018 (log-sum-exp merge).

    Example (under ``torchrun --nproc-per-node 2``)::

        q = shard(full_q, dim=-2, layout="zigzag")   # likewise k, v
        out = ring_attention(q, k, v, is_causal=True, layout="zigzag")
        full_out = unshard(out, dim=-2, layout="zigzag")
    """
    check_layout(layout, "ring_attention")
    _reject("attn_mask", attn_mask, None, "pass the mask as mask_mod or block_mask in global positions")
    _reject("attn_bias", attn_bias, None, "pass position-dependent terms as score_mod in global positions")
    _reject("dropout_p", dropout_p, 0.0, "use 0.0 (attention-probability dropout is not implemented for rings)")
    _reject("return_weights", return_weights, False, "the (L, L) weights of a sharded sequence are not formed")
    spec = make_spec(
        query,
        key,
        value,
        is_causal=is_causal,
        window_size=window_size,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        scale=scale,
        mask_mod=mask_mod,
        score_mod=score_mod,
        sinks=sinks,
    )
    if spec.q_len != spec.kv_len:
        raise ValueError(
            f"ring_attention: expected query and key slices of the same length (self-attention over one sharded "
            f"sequence), got Lq={spec.q_len}, Lk={spec.kv_len}"
        )
    rank, size = _group_rank_size(group)
    seq_len = spec.q_len * size
    if block_mask is not None:
        from attnkit.sparse import BlockMask

        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"ring_attention: expected block_mask to be a BlockMask, got {type(block_mask).__name__}")
        if block_mask.shape != (seq_len, seq_len):
            raise ValueError(
                f"ring_attention: block_mask was built for {block_mask.shape}, but the global sequence has "
                f"L = P · L_local = {size} · {spec.q_len} = {seq_len}; build it for ({seq_len}, {seq_len})"
            )
    if size == 1:
        return attention(
            query,
            key,
            value,
            is_causal=is_causal,
            window_size=window_size,
            alibi_slopes=alibi_slopes,
            softcap=softcap,
            scale=scale,
            mask_mod=mask_mod,
            score_mod=score_mod,
            block_mask=block_mask,
            sinks=sinks,
            return_lse=return_lse,
            backend=backend,
        )
    segments(layout, rank, size, spec.q_len)  # raises for an odd zigzag slice
    description = (
        layout,
        tuple(query.shape),
        tuple(key.shape),
        tuple(value.shape),
        str(query.dtype),
        spec.is_causal,
        spec.window_size,
        spec.softcap,
        spec.scale,
        None if alibi_slopes is None else (tuple(alibi_slopes.shape), round(float(alibi_slopes.double().sum()), 9)),
        mask_mod is None,
        score_mod is None,
        None if block_mask is None else (block_mask.block_size, int(block_mask.visited.sum())),
        None if sinks is None else (tuple(sinks.shape), round(float(sinks.detach().double().sum()), 9)),
        return_lse,
        backend,
    )
    _check_across_ranks(group, description)
    opts = GlobalOptions(
        seq_len=seq_len,
        is_causal=spec.is_causal,
        window_size=spec.window_size,
        alibi_slopes=alibi_slopes,
        softcap=spec.softcap,
        scale=spec.scale,
        mask_mod=mask_mod,
        score_mod=score_mod,
        block_mask=block_mask,
    )
    ring = RingCall(opts, layout, group, rank, size, spec.q_len, backend)
    out, lse = _RingFunction.apply(ring, query, key, value, sinks)
    return AttentionOutput(out, None, lse) if return_lse else out
