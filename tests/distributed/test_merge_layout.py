"""In-process parts of ``attnkit.distributed``: ``merge_attention``, ``shard``/``unshard``, the block plan and
schedule, the size-1 fallback and argument errors (no process group needed)."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnkit
from attnkit import sparse
from attnkit.distributed import merge_attention, ring_attention, shard, unshard
from attnkit.distributed.comm import Schedule
from attnkit.distributed.layout import global_positions, segments
from attnkit.distributed.plan import GlobalOptions, pair_needed, plan_pair


def _parts(q, k, v, cuts, **opts):
    outs, lses = [], []
    for a, b in itertools.pairwise(cuts):
        res = attnkit.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True, backend="math", **opts)
        outs.append(res.output)
        lses.append(res.lse)
    return outs, lses


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_equals_attention_over_the_union(dtype):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=gen, dtype=dtype)
    k, v = torch.randn(2, 3, 23, 8, generator=gen, dtype=dtype), torch.randn(2, 3, 23, 8, generator=gen, dtype=dtype)
    out, lse = merge_attention(*_parts(q, k, v, [0, 4, 11, 23]))
    ref = attnkit.attention(q, k, v, return_lse=True, backend="math")
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(out, ref.output, **tol)
    torch.testing.assert_close(lse, ref.lse, **tol)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_merge_gradients_match_attention():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    outs, lses = [], []
    for a, b in ((0, 1), (1, 4)):
        res = attnkit.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True, backend="math")
        outs.append(res.output)
        lses.append(res.lse)
    g_out, g_lse = torch.randn(1, 2, 4, 8, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    out, lse = merge_attention(outs, lses)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    ref = attnkit.attention(q, k, v, return_lse=True, backend="math")
    want = torch.autograd.grad((ref.output * g_out).sum() + (ref.lse * g_lse).sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    parts = [t.detach().requires_grad_(True) for t in (*outs, *lses)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: merge_attention([a, b], [c, d]), parts)


def test_merge_rows_without_keys_give_zero_not_nan():
    out = [torch.randn(1, 3, 4), torch.randn(1, 3, 4)]
    lse = [torch.tensor([[0.5, float("-inf"), float("-inf")]]), torch.tensor([[float("-inf"), 1.0, float("-inf")]])]
    for t in (*out, *lse):
        t.requires_grad_(True)
    merged, merged_lse = merge_attention(out, lse)
    torch.testing.assert_close(merged[0, 0], out[0][0, 0].detach())
    torch.testing.assert_close(merged[0, 1], out[1][0, 1].detach())
    assert torch.equal(merged[0, 2], torch.zeros(4)) and merged_lse[0, 2] == float("-inf")
    (merged.sum() + merged_lse[torch.isfinite(merged_lse)].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (*out, *lse))


def test_merge_bf16_is_accumulated_in_float32():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 16, 32, generator=gen)
    k, v = torch.randn(1, 2, 512, 32, generator=gen), torch.randn(1, 2, 512, 32, generator=gen)
    ref = attnkit.attention(q.double(), k.double(), v.double(), backend="math")
    outs, lses = _parts(q.bfloat16(), k.bfloat16(), v.bfloat16(), list(range(0, 513, 32)))
    out, _ = merge_attention([o.float() for o in outs], lses)  # bf16 parts, float32 merge
    single = attnkit.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="math")
    assert (out.double() - ref).abs().max() <= 1.5 * (single.double() - ref).abs().max()


def test_merge_errors():
    o, lse = torch.zeros(1, 2, 3), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="as many outputs as lses"):
        merge_attention([o, o], [lse])
    with pytest.raises(ValueError, match="like part 0"):
        merge_attention([o], [torch.zeros(1, 3)])


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_roundtrip(layout, world):
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    parts = [shard(x, 1, layout, rank=r, world_size=world) for r in range(world)]
    assert torch.equal(unshard(parts, 1, layout), x)
    positions = torch.cat([global_positions(layout, r, world, 24 // world) for r in range(world)])
    assert torch.equal(torch.cat(parts, 1)[0, :, 0] // 3, positions)


def test_zigzag_order_and_errors():
    x = torch.arange(8)
    assert shard(x, 0, "zigzag", rank=0, world_size=2).tolist() == [0, 1, 6, 7]
    assert shard(x, 0, "zigzag", rank=1, world_size=2).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="multiple of 4"):
        shard(torch.arange(6), 0, "zigzag", rank=0, world_size=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        shard(torch.arange(6), 0, "contiguous", rank=0, world_size=4)
    with pytest.raises(ValueError, match="unknown layout 'striped'"):
        shard(x, 0, "striped", rank=0, world_size=2)
    with pytest.raises(ValueError, match="must be even"):
        segments("zigzag", 0, 2, 3)


def _offsets(opts: GlobalOptions, layout: str, world: int, local: int) -> list[int]:
    segs = [segments(layout, r, world, local) for r in range(world)]
    return Schedule(0, world, lambda a, b: pair_needed(opts, segs[a], segs[b])).offsets


def test_schedule_skips_blocks_nobody_needs():
    length = 64
    assert _offsets(GlobalOptions(length), "contiguous", 4, 16) == [1, 2, 3]
    assert _offsets(GlobalOptions(length, is_causal=True), "zigzag", 4, 16) == [1, 2, 3]
    # a causal window of 16 keys reaches the previous rank only: one offset instead of three
    assert _offsets(GlobalOptions(length, window_size=(16, 0)), "contiguous", 4, 16) == [1]
    assert _offsets(GlobalOptions(length, window_size=(3, 3)), "contiguous", 4, 16) == [1, 3]
    docs = sparse.document([16, 16, 16, 16], block_size=8)  # documents never cross a rank: no traffic at all
    assert _offsets(GlobalOptions(length, block_mask=docs), "contiguous", 4, 16) == []
    docs = sparse.document([16, 16, 32], block_size=8)  # ranks 2 and 3 share the last document
    assert _offsets(GlobalOptions(length, block_mask=docs), "contiguous", 4, 16) == [1, 3]
    segs = [segments("contiguous", r, 4, 16) for r in range(4)]
    sched = Schedule(3, 4, lambda a, b: pair_needed(GlobalOptions(length, is_causal=True), segs[a], segs[b]))
    assert (sched.send_to(1), sched.recv_from(1), sched.recv_from(3)) == (None, 2, 0)


def test_plan_uses_native_masks_where_positions_align():
    causal = GlobalOptions(64, is_causal=True)
    segs = [segments("zigzag", r, 2, 32) for r in range(2)]
    local = plan_pair(causal, segs[0], segs[0])
    assert [(c.q, c.kv, c.kwargs) for c in local] == [
        ((0, 16), (0, 16), {"is_causal": True}),
        ((16, 32), (0, 16), {}),
        ((16, 32), (16, 32), {"is_causal": True}),
    ]
    # rank 1's queries see both chunks of rank 0's first half only: one fused call without a mask
    assert [(c.q, c.kv, c.kwargs) for c in plan_pair(causal, segs[1], segs[0])] == [((0, 32), (0, 16), {})]
    window = GlobalOptions(64, window_size=(8, 0))
    c_segs = [segments("contiguous", r, 2, 32) for r in range(2)]
    (call,) = plan_pair(window, c_segs[1], c_segs[0])
    assert (call.q, call.kv, call.kwargs) == ((0, 8), (24, 32), {"window_size": (0, -1)})


def test_size_one_falls_back_to_attention():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 12, 8, generator=gen)
    sinks = torch.randn(2, generator=gen)
    got = ring_attention(q, q, q, is_causal=True, sinks=sinks, layout="zigzag", return_lse=True)
    want = attnkit.attention(q, q, q, is_causal=True, sinks=sinks, return_lse=True)
    torch.testing.assert_close(got.output, want.output)
    torch.testing.assert_close(got.lse, want.lse)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attn_mask": torch.ones(4, 4, dtype=torch.bool)}, "attn_mask is not supported"),
        ({"dropout_p": 0.1}, "dropout_p is not supported"),
        ({"return_weights": True}, "return_weights is not supported"),
        ({"layout": "ring"}, "unknown layout"),
        ({"block_mask": sparse.causal(8, block_size=4)}, r"built for \(8, 8\)"),
    ],
)
def test_argument_errors(kwargs, match):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=match):
        ring_attention(q, q, q, **kwargs)


def test_query_and_key_slices_must_have_one_length():
    with pytest.raises(ValueError, match="Lq=4, Lk=6"):
        ring_attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attn_mask": torch.ones(6, 6, dtype=torch.bool)}, "attn_mask"),
        ({"key_padding_mask": torch.zeros(1, 6, dtype=torch.bool)}, "key_padding_mask"),
        ({"need_weights": True}, "need_weights"),
        ({"key": torch.randn(1, 6, 16)}, "cross-attention"),
    ],
)
def test_context_parallel_module_refuses_what_a_shard_cannot_do(kwargs, match):
    mha = attnkit.nn.MultiHeadAttention(16, 2, context_parallel_group=object())
    with pytest.raises(ValueError, match=match):
        mha(torch.randn(1, 6, 16), **kwargs)
    with pytest.raises(ValueError, match="unknown context_parallel_layout 'ring'"):
        attnkit.nn.MultiHeadAttention(16, 2, context_parallel_group=object(), context_parallel_layout="ring")


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_fused_block_backward_equals_the_generic_one(kwargs, num_kv_heads):
    from attnkit.distributed.blocks import RingCall, block_grads, fusable, fused_block_grads
    from attnkit.distributed.plan import SubCall

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 24, 16, generator=gen)
    k, v = (torch.randn(2, num_kv_heads, 24, 16, generator=gen) for _ in range(2))
    ring = RingCall(GlobalOptions(48, scale=0.3), "contiguous", None, 0, 2, 24, "auto")
    # the block's own attention stands in for the merged global result of its rows
    call = SubCall((4, 20), (2, 18), kwargs)
    res = attnkit.attention(q, k, v, scale=0.3, return_lse=True, **kwargs)
    out, lse, dout = res.output, res.lse, torch.randn(res.output.shape, generator=gen)
    block = attnkit.attention(q[..., 4:20, :], k[..., 2:18, :], v[..., 2:18, :], scale=0.3, return_lse=True, **kwargs)
    out[..., 4:20, :], lse[..., 4:20] = block.output, block.lse
    delta = (dout * out).sum(-1)
    assert fusable(ring, q, v, call, None) and not fusable(ring, q, v, call, torch.zeros(1))
    fused = fused_block_grads(ring, q, k, v, call, dout, out, lse)
    generic = block_grads(ring, q, k, v, call, dout, lse, delta)
    for a, b in zip(fused, generic):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
