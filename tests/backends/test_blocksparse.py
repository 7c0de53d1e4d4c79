"""The "blocksparse" backend over random layouts, against float64 math with the equivalent dense mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attn_reference import reference_attention
from attnkit import sparse
from attnkit.backends import blocksparse, flash_core, flash_fused, tiled
from attnkit.functional.spec import make_spec

FLOAT64 = {"atol": 1e-10, "rtol": 1e-9}


@pytest.fixture(params=["fused", "explicit"])
def small_tiles(monkeypatch, request):
    """At most 2 key blocks per chunk and few query blocks per step: exercises chunking and sub-batching, on
    the fused step (where a call allows it) and on the explicit online softmax."""
    monkeypatch.setattr(blocksparse, "MAX_TILE_COLS", 8)
    monkeypatch.setattr(tiled, "BLOCK_Q", 3)  # calls without a block_mask run the tiled band schedule
    monkeypatch.setattr(tiled, "WINDOW_BLOCK_Q", 3)
    monkeypatch.setattr(flash_core, "STEP_SCORES", 256)
    monkeypatch.setattr(flash_core, "FUSED_STEP_BYTES", 2 * 8 * 12 * 8 * 8)
    monkeypatch.setattr(flash_fused, "enabled", request.param == "fused")


def _loss_grads(out, lse, inputs):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    loss = (out * w).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    return torch.autograd.grad(loss, inputs, retain_graph=True)


def _check_against_dense(q, k, v, mask, **kwargs):
    got = attnkit.attention(q, k, v, block_mask=mask, backend="blocksparse", return_lse=True, **kwargs)
    ref = attnkit.attention(q, k, v, attn_mask=mask.to_dense(), backend="math", return_lse=True, **kwargs)
    torch.testing.assert_close(got.output, ref.output, **FLOAT64)
    torch.testing.assert_close(got.lse, ref.lse, **FLOAT64)
    for a, b in zip(_loss_grads(got.output, got.lse, (q, k, v)), _loss_grads(ref.output, ref.lse, (q, k, v))):
        torch.testing.assert_close(a, b, **FLOAT64)
    return got


@st.composite
def layouts(draw):
    bs = draw(st.integers(1, 6))
    lq, lk = draw(st.integers(1, 30)), draw(st.integers(1, 30))
    nq, nk = -(-lq // bs), -(-lk // bs)
    seed = draw(st.integers(0, 2**16))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    table = torch.rand(nq, nk, generator=torch.Generator().manual_seed(seed)) < density
    kind = draw(st.sampled_from(["layout", "mask_mod", "window"]))
    if kind == "layout":
        return sparse.BlockMask.from_layout(table, lq, lk, block_size=bs)
    if kind == "window":
        w = (draw(st.integers(-1, 8)), draw(st.integers(-1, 8)))
        return sparse.sliding_window(lq, lk, w, block_size=bs)
    period = draw(st.integers(2, 5))
    return sparse.BlockMask.from_mask_mod(lambda b, h, i, j: (i * j) % period != 1, lq, lk, block_size=bs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mask=layouts(),
    heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
    causal=st.booleans(),
    extras=st.sampled_from(["none", "softcap", "alibi", "score_mod"]),
)
def test_random_layouts_match_dense_math(small_tiles, mask, heads, causal, extras):
    H, Hkv = heads
    g = torch.Generator().manual_seed(mask.q_len * 31 + mask.kv_len)
    q = torch.randn(2, H, mask.q_len, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, mask.kv_len, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, mask.kv_len, 3, generator=g, dtype=torch.float64, requires_grad=True)
    kwargs = {"is_causal": causal}
    if extras == "softcap":
        kwargs["softcap"] = 2.0
    elif extras == "alibi":
        kwargs["alibi_slopes"] = torch.rand(H, generator=g, dtype=torch.float64)
    elif extras == "score_mod":
        kwargs["score_mod"] = lambda s, b, h, i, j: s + 0.1 * (h + 1) * (i - j).abs()
    _check_against_dense(q, k, v, mask, **kwargs)


@pytest.mark.parametrize(
    "make",
    [
        lambda L: sparse.sliding_window(L, window_size=5, block_size=4),
        lambda L: sparse.longformer(L, 3, [0, 17], block_size=4),
        lambda L: sparse.bigbird(L, block_size=4, num_random_blocks=1, seed=3),
        lambda L: sparse.document([10, 0, 20, L - 30], is_causal=True, block_size=8),
    ],
    ids=["window", "longformer", "bigbird", "document"],
)
def test_named_layouts_with_gqa_match_dense_math(small_tiles, make):
    L = 45
    mask = make(L)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, L, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, L, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, L, 8, generator=g, dtype=torch.float64, requires_grad=True)
    got = _check_against_dense(q, k, v, mask)
    # ... and the independent float64 reference (not attnkit's math backend).
    ref, _, _ = reference_attention(q, k, v, attn_mask=mask.to_dense())
    torch.testing.assert_close(got.output, ref, **FLOAT64)


def test_fully_masked_query_blocks_give_zeros_and_no_nan(small_tiles):
    mask = sparse.BlockMask.from_layout([[0], [], [2, 1], []], 14, 11, block_size=4)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 14, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 11, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    got = _check_against_dense(q, k, v, mask)
    assert torch.all(got.output[:, :, 4:8] == 0) and torch.all(got.output[:, :, 12:] == 0)
    assert torch.all(torch.isneginf(got.lse[:, :, 4:8]))
    (dq,) = torch.autograd.grad(got.output.sum(), q)
    assert torch.all(dq[:, :, 4:8] == 0) and torch.isfinite(dq).all()


def test_only_visited_blocks_are_computed():
    """The schedule's tiles cover exactly the visited blocks: work is proportional to density."""
    L, bs = 1000, 64
    mask = sparse.sliding_window(L, window_size=100, block_size=bs)
    q = torch.randn(1, 1, L, 4)
    sched = blocksparse.BlockSparseSchedule(make_spec(q, q, q, block_mask=mask), mask)
    pairs = sum(ch.index.q_idx.numel() * ch.index.kv_idx.shape[1] for st in sched.steps() for ch in st.chunks)
    assert pairs == int(mask.visited.sum()) * bs * bs
    assert pairs < 0.35 * (16 * bs) ** 2
    assert abs(mask.density() - pairs / L**2) < 0.05  # density counts the real (unpadded) area


def test_auto_selection_explains_itself():
    long_q = torch.randn(1, 2, 4096, 8)
    short = torch.randn(1, 2, 256, 8)
    sel = attnkit.backends.select(short, short, short, block_mask=sparse.causal(256))
    assert sel.backend == "blocksparse"
    sel = attnkit.backends.select(long_q, long_q, long_q, window_size=256)
    assert sel.backend == "blocksparse"
    sel = attnkit.backends.select(short, short, short, window_size=16)
    assert sel.backend == "sdpa" and "skipping blocks pays off" in sel.reasons["blocksparse"]
    sel = attnkit.backends.select(long_q, long_q, long_q, is_causal=True)
    assert sel.backend == "sdpa" and "fused dense kernels are faster" in sel.reasons["blocksparse"]


def test_block_mask_for_other_lengths_is_rejected():
    q = torch.randn(1, 2, 20, 4)
    with pytest.raises(ValueError, match=r"block_mask was built for \(Lq, Lk\) = \(16, 16\)"):
        attnkit.attention(q, q, q, block_mask=sparse.causal(16))
    with pytest.raises(TypeError, match=r"expected block_mask to be an attnkit.sparse.BlockMask"):
        attnkit.attention(q, q, q, block_mask=torch.ones(20, 20, dtype=torch.bool))


def test_a_reused_mask_keeps_its_schedule_but_not_the_call(small_tiles):
    """A block mask reused over calls (layers, training steps) builds its schedule once, in ``mask.derived``; the
    schedule holds no reference to a call's tensors, and another head count or dtype gets its own schedule."""
    import gc
    import weakref

    from op_count import count_ops

    mask = sparse.bigbird(40, block_size=4, num_window_blocks=3, num_global_blocks=1, num_random_blocks=1, seed=0)
    q = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    first = count_ops(lambda: attnkit.attention(q, q, q, block_mask=mask, backend="blocksparse"))
    again = count_ops(lambda: attnkit.attention(q, q, q, block_mask=mask, backend="blocksparse"))
    assert again < first, (first, again)
    ref = weakref.ref(q)
    del q
    gc.collect()
    assert ref() is None
    for heads, dtype in ((3, torch.float64), (2, torch.float32)):
        q = torch.randn(1, heads, 40, 8, dtype=dtype)
        got = attnkit.attention(q, q, q, block_mask=mask, backend="blocksparse")
        want = attnkit.attention(q, q, q, attn_mask=mask.to_dense(), backend="math")
        torch.testing.assert_close(got, want, **(FLOAT64 if dtype == torch.float64 else {}))
    assert sum(1 for key in mask.derived if key[0] == "schedule") == 3
