"""attnkit.attention's semantics, checked on the math backend against the independent float64 reference."""

import pytest
import torch
from hypothesis import given, settings

import attnkit
from attn_reference import reference_attention
from attn_strategies import attention_case
from attnkit import AttentionOutput


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


@settings(max_examples=150, deadline=None)
@given(case=attention_case())
def test_math_backend_matches_independent_reference(case):
    q, k, v, kwargs = case.tensors(torch.float64)
    got = attnkit.attention(q, k, v, backend="math", return_weights=True, return_lse=True, **kwargs)
    out, p, lse = reference_attention(q, k, v, **kwargs)
    torch.testing.assert_close(got.output, out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.weights, p.expand_as(got.weights), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.lse, lse.expand_as(got.lse), atol=1e-12, rtol=1e-12)
    assert not got.output.isnan().any() and not got.weights.isnan().any()
    # Rows with at least one key sum to one, the others are all zero.
    sums = got.weights.sum(-1)
    nonempty = torch.isfinite(got.lse)
    torch.testing.assert_close(sums[nonempty], torch.ones_like(sums[nonempty]))
    assert (sums[~nonempty] == 0).all()


def test_return_types():
    q = k = v = rand(1, 2, 3, 4)
    assert isinstance(attnkit.attention(q, k, v), torch.Tensor)
    res = attnkit.attention(q, k, v, return_lse=True)
    assert isinstance(res, AttentionOutput) and res.weights is None and res.lse.dtype == torch.float64
    assert attnkit.attention(q.float(), k.float(), v.float(), return_lse=True).lse.dtype == torch.float32
    res = attnkit.attention(q, k, v, return_weights=True)
    assert res.lse is None and res.weights.shape == (1, 2, 3, 3)
    out, _weights, _lse = res  # unpacks as a tuple
    assert out.shape == (1, 2, 3, 4)


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
def test_any_number_of_batch_dims(batch):
    q = rand(*batch, 4, 5, 8, seed=1)
    k = rand(*batch, 2, 7, 8, seed=2)
    v = rand(*batch, 2, 7, 3, seed=3)
    mask = rand(*batch, 1, 5, 7, seed=4) > 0
    for backend in ("math", "sdpa"):
        got = attnkit.attention(q, k, v, attn_mask=mask, is_causal=True, backend=backend)
        expected, _, _ = reference_attention(q, k, v, attn_mask=mask, is_causal=True)
        torch.testing.assert_close(got, expected)


def test_gqa_equals_repeated_kv():
    q, k, v = rand(2, 6, 5, 8), rand(2, 2, 9, 8, seed=1), rand(2, 2, 9, 8, seed=2)
    rep = dict(key=k.repeat_interleave(3, 1), value=v.repeat_interleave(3, 1))
    for backend in ("math", "sdpa"):
        torch.testing.assert_close(
            attnkit.attention(q, k, v, backend=backend),
            attnkit.attention(q, rep["key"], rep["value"], backend=backend),
        )


def test_bool_mask_equals_neg_inf_float_mask():
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 6, 8, seed=1), rand(2, 3, 6, 8, seed=2)
    keep = rand(2, 1, 5, 6, seed=3) > -0.5
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    for backend in ("math", "sdpa"):
        torch.testing.assert_close(
            attnkit.attention(q, k, v, attn_mask=keep, backend=backend),
            attnkit.attention(q, k, v, attn_mask=additive, backend=backend),
        )


def test_causal_alignment_differs_from_torch_top_left():
    q, k, v = rand(1, 1, 2, 4), rand(1, 1, 5, 4, seed=1), rand(1, 1, 5, 4, seed=2)
    ours = attnkit.attention(q, k, v, is_causal=True, return_weights=True).weights[0, 0]
    # Bottom-right: query 0 sees keys 0..3, query 1 sees all 5 (diagram in the docstring).
    assert (ours > 0).tolist() == [[True, True, True, True, False], [True] * 5]
    from torch.nn.attention.bias import causal_lower_right

    torch_br = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(2, 5))
    torch.testing.assert_close(attnkit.attention(q, k, v, is_causal=True), torch_br)


def test_dropout_applies_after_weights_and_preserves_expectation():
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 6, 8, seed=1), rand(1, 2, 6, 8, seed=2)
    clean = attnkit.attention(q, k, v, return_weights=True)
    torch.manual_seed(0)
    noisy = attnkit.attention(q, k, v, dropout_p=0.5, return_weights=True, backend="math")
    torch.testing.assert_close(noisy.weights, clean.weights)  # weights are reported before dropout
    assert not torch.allclose(noisy.output, clean.output)
    torch.manual_seed(0)
    mean = torch.stack([attnkit.attention(q, k, v, dropout_p=0.5, backend="math") for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, clean.output, atol=0.1, rtol=0.0)


def test_softcap_bounds_the_scores():
    q, k, v = rand(1, 1, 3, 4) * 100, rand(1, 1, 3, 4, seed=1) * 100, rand(1, 1, 3, 4, seed=2)
    res = attnkit.attention(q, k, v, softcap=2.0, return_lse=True)
    # |score| <= softcap, so the lse lies within log(Lk) +- softcap.
    assert (res.lse.abs() <= 2.0 + torch.log(torch.tensor(3.0))).all()


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(is_causal=True),
        dict(window_size=(1, 0), alibi_slopes=torch.tensor([0.5, 0.25], dtype=torch.float64)),
        dict(softcap=1.5, attn_mask="rowmasked"),
    ],
    ids=["plain", "causal", "window-alibi", "softcap-fully-masked-row"],
)
def test_gradcheck_math_float64(case):
    case = dict(case)
    if case.get("attn_mask") == "rowmasked":
        mask = torch.ones(3, 4, dtype=torch.bool)
        mask[1] = False
        case["attn_mask"] = mask
    q = rand(1, 2, 3, 5).requires_grad_()
    k = rand(1, 2, 4, 5, seed=1).requires_grad_()
    v = rand(1, 2, 4, 3, seed=2).requires_grad_()
    bias = rand(2, 3, 4, seed=3).requires_grad_()

    def fn(q, k, v, bias):
        res = attnkit.attention(q, k, v, attn_bias=bias, return_lse=True, backend="math", **case)
        finite_lse = torch.where(torch.isfinite(res.lse), res.lse, torch.zeros_like(res.lse))
        return res.output, finite_lse.double()

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


def test_a_window_that_removes_no_key_is_dropped_from_the_call():
    from attnkit.functional.spec import make_spec

    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8)
    assert make_spec(q, k, k, window_size=(8, 4)).window_size is None  # left >= Lk - 1, right >= Lq - 1
    assert make_spec(q, k, k, window_size=(8, 0), is_causal=True).window_size is None  # causal bounds the right
    assert make_spec(q, k, k, window_size=(7, 4)).window_size == (7, 4)  # row Lq-1 at position 8 loses key 0
    assert make_spec(q, k, k, window_size=(8, 3)).window_size == (8, 3)  # row 0 at position 4 loses key 8
    for w in ((8, 4), (7, 4), (8, 3), (2, 0)):
        want = attnkit.attention(q, k, k, window_size=w, backend="math")
        ref = attnkit.attention(q, k, k, attn_mask=attnkit.masks.sliding_window(5, 9, w), backend="math")
        torch.testing.assert_close(want, ref)
