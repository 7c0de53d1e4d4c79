"""Hostile input to the attention core: zero sizes, extreme and non-finite values, every option and backend.

Forward and backward against the float64 reference: no crash, no NaN where the reference is finite, gradients of
the output and of the lse equal to the reference's.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attn_reference import reference_attention
from attn_strategies import attention_case

BACKENDS = ["math", "sdpa", "tiled", "blocksparse", "auto"]


def _serving(backend, q, k, v, kwargs):
    try:
        attnkit.backends.select(q, k, v, backend=backend, **kwargs)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ regressions
def test_lse_carries_gradients_on_every_backend_including_auto():
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, 6, 8, generator=g) for _ in range(3)]
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    mask[2] = False  # a fully masked row
    grads = {}
    for backend in ["math", "tiled", "blocksparse", "auto"]:
        q, k, v = (t.clone().requires_grad_() for t in base)
        r = attnkit.attention(q, k, v, attn_mask=mask, return_lse=True, backend=backend)
        assert r.lse.requires_grad
        (r.output + r.lse.nan_to_num(neginf=0.0).unsqueeze(-1)).sum().backward()
        grads[backend] = q.grad
    for backend, g_ in grads.items():
        torch.testing.assert_close(g_, grads["math"], atol=1e-5, rtol=1e-5, msg=backend)
    q, k, v = (t.clone().requires_grad_() for t in base)
    with pytest.raises(ValueError, match="lse is not differentiable"):
        attnkit.attention(q, k, v, return_lse=True, backend="sdpa")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_large_logits_stay_finite_and_accurate(backend):
    q = k = v = torch.full((1, 2, 8, 64), 35.4, dtype=torch.float16)
    block_mask = attnkit.sparse.causal(8, block_size=4)
    kwargs = {} if backend == "sdpa" else {"block_mask": block_mask}
    out = attnkit.attention(q, k, v, is_causal=True, backend=backend, **kwargs)
    assert torch.isfinite(out).all()
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 16, 64, generator=g) * 12.5).half()  # logits ~1e4
    k, v = (q + torch.randn(q.shape, generator=g).half() * 0.01), torch.randn(q.shape, generator=g).half()
    ref = reference_attention(q, k, v, is_causal=True)[0]
    err = (attnkit.attention(q, k, v, is_causal=True, backend=backend).double() - ref).abs().max().item()
    assert err < 0.01, err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("lq", "lk", "b", "h"), [(0, 5, 1, 2), (5, 0, 1, 2), (5, 5, 0, 2), (5, 5, 1, 0)])
def test_zero_sizes_give_empty_or_zero_outputs(backend, lq, lk, b, h):
    q = torch.randn(b, h, lq, 8, requires_grad=True)
    k = torch.randn(b, h, lk, 8, requires_grad=True)
    v = torch.randn(b, h, lk, 8, requires_grad=True)
    if not _serving(backend, q, k, v, {"return_lse": True}):
        pytest.skip(f"{backend} does not return an lse here")
    r = attnkit.attention(q, k, v, return_lse=True, is_causal=True, backend=backend)
    assert r.output.shape == (b, h, lq, 8) and r.lse.shape == (b, h, lq)
    assert (r.output == 0).all() and torch.isneginf(r.lse).all()
    r.output.sum().backward()
    assert q.grad is not None and (q.grad == 0).all()


def test_zero_head_dim_is_a_value_error():
    with pytest.raises(ValueError, match="head_dim D >= 1"):
        attnkit.attention(torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 8))


@pytest.mark.parametrize("softcap", [float("inf"), float("nan"), 0.0, -1.0, True])
def test_softcap_must_be_positive_and_finite(softcap):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="softcap must be a positive number"):
        attnkit.attention(q, q, q, softcap=softcap)


# ------------------------------------------------------------------------------------------------ fuzz
@st.composite
def extreme_case(draw):
    case = draw(attention_case(max_len=9, extras=True))
    scale = draw(st.sampled_from([1.0, 1e2, 1e4]))
    return case, scale


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=extreme_case(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fuzz_forward_and_backward_against_float64(backend, data, dtype):
    case, magnitude = data
    q, k, v, kwargs = case.tensors(torch.float64)
    q = q * (magnitude**0.5) / (q.shape[-1] ** 0.25)  # logits up to about `magnitude`
    k = k * (magnitude**0.5) / (k.shape[-1] ** 0.25)
    if dtype == torch.float16:
        q, k = q.clamp(-6e4, 6e4), k.clamp(-6e4, 6e4)
    ql, kl, vl = (t.to(dtype).requires_grad_() for t in (q, k, v))
    low = {n: (t.to(dtype) if n == "attn_mask" and t.dtype.is_floating_point else t) for n, t in kwargs.items()}
    if not _serving(backend, ql, kl, vl, {**low, "return_lse": True}):
        return
    got = attnkit.attention(ql, kl, vl, return_lse=True, backend=backend, **low)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (ql, kl, vl))
    ref_kwargs = {
        n: (t.double() if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t) for n, t in low.items()
    }
    out, _, lse = reference_attention(qd, kd, vd, **ref_kwargs)
    finite = torch.isfinite(out)
    assert torch.isfinite(got.output[finite]).all(), "NaN/inf where the reference is finite"
    assert not torch.isnan(got.lse).any()
    if dtype == torch.float32 and magnitude <= 1e2:
        torch.testing.assert_close(got.output.double(), out, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(got.lse.double(), lse, atol=2e-4, rtol=1e-4)
        w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        lse_w = torch.where(torch.isfinite(lse), 1.0, 0.0)
        ((got.output.double() * w).sum() + (got.lse.double().nan_to_num(neginf=0.0) * lse_w).sum()).backward()
        ((out * w).sum() + (lse.nan_to_num(neginf=0.0) * lse_w).sum()).backward()
        for a, b in ((ql, qd), (kl, kd), (vl, vd)):
            assert torch.isfinite(a.grad).all()
            torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-3, rtol=2e-3)
    else:
        got.output.float().sum().backward()
        for t in (ql, kl, vl):
            assert not torch.isnan(t.grad).any()
