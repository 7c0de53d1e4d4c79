"""The "tiled" (FlashAttention) backend with many small tiles, against the float64 references.

The shared conformance suite runs every backend at its default tile sizes, where small inputs fit in one tile;
here tiles are shrunk to a few rows/columns so the online softmax, the band skipping and the recomputing backward
cross many tile boundaries (lengths deliberately not multiples of the tile sizes).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attn_reference import assert_close_to_reference, naive_low_precision, reference_attention
from attn_strategies import attention_case
from attnkit.backends import flash_core, flash_fused, tiled

FLOAT64 = {"atol": 1e-10, "rtol": 1e-9}


@pytest.fixture(params=["fused", "explicit"])
def small_tiles(monkeypatch, request):
    """Query blocks of 3 rows, key chunks of 4 columns, steps of a few blocks; the fused step (where a call
    allows it) and the explicit online softmax."""
    monkeypatch.setattr(tiled, "MAX_BLOCK_KV", 4)
    monkeypatch.setattr(tiled, "BLOCK_Q", 3)
    monkeypatch.setattr(tiled, "WINDOW_BLOCK_Q", 3)
    monkeypatch.setattr(flash_core, "STEP_SCORES", 3 * 4 * 8)
    monkeypatch.setattr(flash_core, "FUSED_STEP_BYTES", 2 * 8 * 4 * 8 * 8)
    monkeypatch.setattr(flash_fused, "enabled", request.param == "fused")


def _grads(out, lse, inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    loss = (out * w).sum()
    if lse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse, 0.0).sum()
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _compare(q, k, v, *, backend="tiled", **kwargs):
    """Forward, lse and gradients of ``backend`` vs the math backend, all in float64."""
    inputs = [q, k, v] + [t for t in kwargs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    got = attnkit.attention(q, k, v, backend=backend, return_lse=True, **kwargs)
    ref = attnkit.attention(q, k, v, backend="math", return_lse=True, **kwargs)
    torch.testing.assert_close(got.output, ref.output, **FLOAT64)
    torch.testing.assert_close(got.lse, ref.lse, **FLOAT64)  # -inf positions must agree too
    for a, b in zip(_grads(got.output, got.lse, inputs), _grads(ref.output, ref.lse, inputs)):
        torch.testing.assert_close(a, b, **FLOAT64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=attention_case(max_len=23))
def test_random_calls_match_math_with_small_tiles(small_tiles, data):
    """Masks, causal/window (Lq != Lk), biases, ALiBi, softcap, GQA: output, lse and all gradients."""
    q, k, v, kwargs = data.tensors(torch.float64, requires_grad=True)
    for name in ("attn_bias", "attn_mask"):
        t = kwargs.get(name)
        if t is not None and t.dtype.is_floating_point:
            kwargs[name] = t.detach().requires_grad_(True)
    _compare(q, k, v, **kwargs)


def _rel_bias(h, q_idx, kv_idx):
    return 0.1 * (h + 1) * torch.sin(0.3 * (q_idx - kv_idx).to(torch.float64))


@pytest.mark.parametrize("Lq,Lk,H,Hkv", [(13, 13, 4, 2), (7, 19, 2, 1), (19, 7, 3, 3)])
def test_score_mod_and_mask_mod_equal_their_dense_tensors(small_tiles, Lq, Lk, H, Hkv):
    """A relative-position score_mod and a document mask_mod equal the dense bias/mask (independent reference)."""
    g = torch.Generator().manual_seed(Lq * Lk)
    q = torch.randn(2, H, Lq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, Lk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, Lk, 5, generator=g, dtype=torch.float64, requires_grad=True)
    doc_q, doc_k = torch.arange(Lq) // 5, torch.arange(Lk) // 4

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * (1.0 + 0.5 * b) + _rel_bias(h, q_idx, kv_idx)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_q[q_idx] == doc_k[kv_idx]) | (h == 0)

    kwargs = {"score_mod": score_mod, "mask_mod": mask_mod, "is_causal": True}
    got = attnkit.attention(q, k, v, backend="tiled", return_lse=True, **kwargs)
    _compare(q, k, v, **kwargs)
    # Independent check: the same call written as dense tensors for the standalone float64 reference.
    i, j = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)
    hh = torch.arange(H).view(-1, 1, 1)
    bias = _rel_bias(hh, i, j)  # (H, Lq, Lk)
    mask = (doc_q[i] == doc_k[j]) | (hh == 0)
    for b in range(2):  # score_mod scales batch b by (1 + 0.5 b): fold that into the scale
        ref, _, lse = reference_attention(
            q[b], k[b], v[b], attn_bias=bias, attn_mask=mask, is_causal=True, scale=8**-0.5 * (1 + 0.5 * b)
        )
        torch.testing.assert_close(got.output[b], ref, **FLOAT64)
        torch.testing.assert_close(got.lse[b], lse, **FLOAT64)


def test_fully_masked_tiles_give_zero_output_minus_inf_lse_and_zero_grads(small_tiles):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(11, dtype=torch.bool)
    dead[3:9] = True  # spans whole query tiles of 3 rows

    out = attnkit.attention(q, k, v, mask_mod=lambda b, h, i, j: ~dead[i], backend="tiled", return_lse=True)
    assert torch.all(out.output[:, :, 3:9] == 0) and torch.all(torch.isneginf(out.lse[:, :, 3:9]))
    assert torch.isfinite(out.output).all()
    dq, dk, dv = torch.autograd.grad(out.output.sum(), (q, k, v))
    assert torch.all(dq[:, :, 3:9] == 0) and all(torch.isfinite(t).all() for t in (dq, dk, dv))
    # Causal with Lq > Lk: the first Lq - Lk rows see no key, and their tiles are skipped.
    _compare(q, k, v, is_causal=True)


@pytest.mark.parametrize(
    "case",
    [
        dict(B=2, H=4, Hkv=4, L=40, kw={"window_size": (4, 2)}),
        dict(B=2, H=4, Hkv=2, L=37, kw={"window_size": (5, 5)}),  # grouped-query heads: the kernel's own
        dict(B=1, H=2, Hkv=1, L=29, kw={"is_causal": True}),  # causal prefixes: stride 0
        dict(B=2, H=4, Hkv=2, L=40, kw={"window_size": (4, 2)}, layout="BLHD"),  # batch/head strides do not merge
        dict(B=1, H=4, Hkv=2, L=40, kw={"window_size": (4, 2)}, layout="BLHD"),  # one element: any head stride
    ],
    ids=["window", "gqa", "causal", "blhd-batch2", "blhd-batch1"],
)
@pytest.mark.parametrize("step_bytes", [None, 1 << 20], ids=["block-steps", "long-steps"])
def test_strided_key_views_match_math(small_tiles, case, step_bytes, monkeypatch):
    """Steps whose blocks read consecutive keys at a constant stride run on overlapping strided views of the
    inputs (no gather); output, lse and gradients equal math's in float64, and the views are really used unless
    the layout cannot be viewed that way (then the gathered copy serves)."""
    if not flash_fused.enabled:
        pytest.skip("strided views are a property of the fused step")
    if step_bytes is not None:  # many blocks per step: strides > 0, gradients added in c / stride slices
        monkeypatch.setattr(flash_core, "FUSED_STEP_BYTES", step_bytes)
    used = []
    real = flash_fused._slide_step
    monkeypatch.setattr(flash_fused, "_slide_step", lambda *a: used.append(real(*a)) or used[-1])
    g = torch.Generator().manual_seed(11)
    B, H, Hkv, L = case["B"], case["H"], case["Hkv"], case["L"]

    def make(h):
        if case.get("layout") == "BLHD":  # (B, L, H, D) memory seen as (B, H, L, D), as Hugging Face passes it
            return torch.randn(B, L, h, 4, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
        return torch.randn(B, h, L, 4, generator=g, dtype=torch.float64, requires_grad=True)

    q, k, v = make(H), make(Hkv), make(Hkv)
    got = attnkit.attention(q, k, v, backend="tiled", **case["kw"])  # no lse: its gradient needs the explicit path
    ref = attnkit.attention(q, k, v, backend="math", **case["kw"])
    torch.testing.assert_close(got, ref, **FLOAT64)
    for a, b in zip(_grads(got, None, [q, k, v]), _grads(ref, None, [q, k, v])):
        torch.testing.assert_close(a, b, **FLOAT64)
    with torch.no_grad():
        lse = attnkit.attention(q, k, v, backend="tiled", return_lse=True, **case["kw"]).lse
        ref_lse = attnkit.attention(q, k, v, backend="math", return_lse=True, **case["kw"]).lse
    torch.testing.assert_close(lse, ref_lse, **FLOAT64)
    expect_views = not (case.get("layout") == "BLHD" and B > 1)
    assert any(used) == expect_views, used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_error_at_most_twice_naive(small_tiles, dtype, monkeypatch):
    monkeypatch.setattr(tiled, "MAX_BLOCK_KV", 16)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 45, 16, generator=g).to(dtype) for _ in range(3))
    kwargs = {"is_causal": True, "window_size": (20, 3)}
    ref, _, _ = reference_attention(q, k, v, **kwargs)
    naive, _, _ = naive_low_precision(q, k, v, **kwargs)
    got = attnkit.attention(q, k, v, backend="tiled", **kwargs)
    assert got.dtype == dtype
    assert_close_to_reference(got, ref, dtype=dtype, baseline=naive, msg="tiled")


def test_dropout_is_unbiased_and_its_backward_is_exact(small_tiles):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 1, 10, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        torch.manual_seed(123)  # the same dropout pattern on every evaluation
        return attnkit.attention(q, k, v, dropout_p=0.3, is_causal=True, backend="tiled")

    assert torch.equal(fn(q, k, v), fn(q, k, v))
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)
    # Averaged over many patterns the output approaches the dropout-free one.
    with torch.no_grad():
        mean = torch.stack([attnkit.attention(q, k, v, dropout_p=0.3, backend="tiled") for _ in range(400)]).mean(0)
        exact = attnkit.attention(q, k, v, backend="math")
    assert (mean - exact).abs().max() < 0.15


def test_float_bias_gradient_flows(small_tiles):
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(9, 1, generator=g, dtype=torch.float64, requires_grad=True)
    _compare(q, k, v, attn_bias=bias, attn_mask=mask, window_size=(2, 5))


def test_errors_name_the_problem():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(TypeError, match=r"mask_mod must take 4 positional arguments"):
        attnkit.attention(q, q, q, mask_mod=lambda b, h, i: i > 0)
    with pytest.raises(TypeError, match=r"score_mod must take 5 positional arguments"):
        attnkit.attention(q, q, q, score_mod=lambda s, i, j: s)
    with pytest.raises(TypeError, match=r"must return a bool tensor"):
        attnkit.attention(q, q, q, mask_mod=lambda b, h, i, j: (i - j).float(), backend="tiled")
    with pytest.raises(TypeError, match=r"expected mask_mod to be a callable"):
        attnkit.attention(q, q, q, mask_mod=3)
    with pytest.raises(ValueError, match=r"'tiled' does not support return_weights"):
        attnkit.attention(q, q, q, return_weights=True, backend="tiled")
    with pytest.raises(ValueError, match=r"'sdpa' does not support score_mod"):
        attnkit.attention(q, q, q, score_mod=lambda s, b, h, i, j: s, backend="sdpa")


@given(st.integers(1, 3))
@settings(max_examples=3, deadline=None)
def test_auto_picks_tiled_only_when_the_scores_would_be_large(heads):
    small = torch.randn(1, heads, 64, 8)
    long_q = torch.randn(1, heads, 4096, 8)
    mod = {"score_mod": lambda s, b, h, i, j: s - (i - j).abs()}
    assert attnkit.backends.select(small, small, small, **mod).backend == "math"
    sel = attnkit.backends.select(small, small, small, **mod)
    assert "materializing it (math) is faster" in sel.reasons["tiled"]
    assert "does not support score_mod" in sel.reasons["sdpa"]
    sel = attnkit.backends.select(long_q, long_q, long_q, **mod)
    assert sel.backend == "tiled" and sel.reasons["math"] == "lower priority than 'tiled'"
    # Plain dense and causal calls stay on the fused SDPA kernel.
    assert attnkit.backends.select(long_q, long_q, long_q, is_causal=True).backend == "sdpa"
    assert attnkit.backends.select(long_q, long_q, long_q).backend == "sdpa"


def test_schedules_are_cached_per_geometry_without_holding_the_call(monkeypatch):
    """A repeated call reuses its schedule and step masks (far fewer operations), keeps no reference to the
    call's tensors, and a mask argument is never taken from the cache (a new mask gives a new, exact result)."""
    import gc
    import weakref

    from op_count import count_ops as _count

    monkeypatch.setattr(tiled, "_SCHEDULES", type(tiled._SCHEDULES)())
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 600, 8, generator=g)
    first = _count(lambda: attnkit.attention(q, q, q, window_size=(40, 40), backend="tiled"))
    again = _count(lambda: attnkit.attention(q, q, q, window_size=(40, 40), backend="tiled"))
    assert again < first / 2, (first, again)
    assert len(tiled._SCHEDULES) == 1
    ref = weakref.ref(q)
    del q
    gc.collect()
    assert ref() is None  # the cached schedule does not keep the call's tensors alive
    q = torch.randn(1, 2, 600, 8, generator=g, dtype=torch.float64)
    for seed in (0, 1):  # same geometry, different masks
        keep = torch.rand(600, 600, generator=torch.Generator().manual_seed(seed)) > 0.3
        got = attnkit.attention(q, q, q, window_size=(40, 40), attn_mask=keep, backend="tiled")
        want = attnkit.attention(q, q, q, window_size=(40, 40), attn_mask=keep, backend="math")
        torch.testing.assert_close(got, want, **FLOAT64)


def _alibi_like(score, b, h, q_idx, kv_idx):
    return score - 0.1 * (h + 1) * (q_idx - kv_idx).abs().to(score.dtype)


@pytest.mark.parametrize("kwargs", [{"softcap": 5.0}, {"score_mod": _alibi_like}, {}], ids=["softcap", "mod", "plain"])
def test_causal_blocks_sharing_their_keys_match_math(small_tiles, monkeypatch, kwargs):
    """Causal steps of many blocks read one key prefix: the explicit path multiplies all their rows by it at once
    (no gathered copies; key/value gradients summed by the same matmul). Output, lse and gradients equal math's."""
    monkeypatch.setattr(flash_core, "STEP_SCORES", 1 << 16)  # many query blocks per step
    monkeypatch.setattr(flash_core, "FUSED_STEP_BYTES", 1 << 20)
    seen = []
    real = flash_core.shared_keys
    monkeypatch.setattr(flash_core, "shared_keys", lambda ch: seen.append(real(ch)) or seen[-1])
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    if flash_fused.enabled and not kwargs:  # the fused step reads shared keys as views instead (tested above)
        pytest.skip("the explicit path is what shares keys by matmul")
    _compare(q, k, v, is_causal=True, **kwargs)
    assert any(seen)
