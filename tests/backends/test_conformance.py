"""Every registered backend against the float64 math reference: forward, weights, lse, gradients, edge cases.

Backends are enumerated from the registry, so a new backend is held to the same bar as soon as it registers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import attnkit
from attn_reference import TOLERANCES, assert_close_to_reference, naive_low_precision, reference_attention
from attn_strategies import attention_case
from attnkit.backends import sdpa as sdpa_module
from attnkit.functional.spec import make_spec

BACKENDS = list(attnkit.backends.available())
FAST = [name for name in BACKENDS if name != "math"]


@pytest.fixture(params=[*BACKENDS, "sdpa[F.sdpa]"])
def backend(request, monkeypatch):
    """Each registered backend; ``sdpa[F.sdpa]`` refuses return_lse, so lse-requesting draws also cover F.sdpa."""
    if request.param == "sdpa[F.sdpa]":
        monkeypatch.setattr(sdpa_module, "use_cpu_flash_op", False)
        return "sdpa"
    return request.param


def _served(backend, q, k, v, **kwargs):
    spec = make_spec(q, k, v, **kwargs)
    return attnkit.backends.get(backend).why_not(spec) is None


def _options(backend):
    return attnkit.backends.get(backend).options


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=attention_case())
def test_forward_float32_matches_float64_math(backend, data):
    """>= 200 drawn calls per backend (restricted to its options): output, weights and lse vs float64 math."""
    q, k, v, kwargs = data.tensors(torch.float32)
    extras = {}
    if "return_lse" in _options(backend):
        extras["return_lse"] = True
    if "return_weights" in _options(backend):
        extras["return_weights"] = True
    if not _served(backend, q, k, v, **kwargs, **extras):
        extras = {}
        if not _served(backend, q, k, v, **kwargs):
            return
    q64, k64, v64, kw64 = data.tensors(torch.float64)
    ref = attnkit.attention(q64, k64, v64, backend="math", return_weights=True, return_lse=True, **kw64)
    got = attnkit.attention(q, k, v, backend=backend, **kwargs, **extras)
    out = got if isinstance(got, torch.Tensor) else got.output
    assert out.dtype == torch.float32 and out.shape == ref.output.shape
    assert_close_to_reference(out, ref.output, dtype=torch.float32, msg=f"{backend} output")
    if extras.get("return_lse"):
        finite = torch.isfinite(ref.lse)
        assert torch.equal(torch.isfinite(got.lse), finite), "lse must be -inf exactly on rows with no key"
        assert_close_to_reference(got.lse[finite], ref.lse[finite], dtype=torch.float32, msg=f"{backend} lse")
    if extras.get("return_weights"):
        assert_close_to_reference(got.weights, ref.weights, dtype=torch.float32, msg=f"{backend} weights")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=attention_case(max_len=9))
def test_gradients_match_math(backend, data):
    q, k, v, kwargs = data.tensors(torch.float64, requires_grad=True)
    if not _served(backend, q, k, v, **kwargs):
        return
    bias = kwargs.get("attn_bias")
    if bias is not None:
        kwargs["attn_bias"] = bias = bias.clone().requires_grad_()
    inputs = [t for t in (q, k, v, bias) if t is not None]
    g = torch.Generator().manual_seed(0)
    out = attnkit.attention(q, k, v, backend=backend, **kwargs)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_out = attnkit.attention(q, k, v, backend="math", **kwargs)
    ref_grads = torch.autograd.grad(ref_out, inputs, grad_out)
    for name, got, exp in zip(["q", "k", "v", "bias"], grads, ref_grads):
        assert torch.isfinite(got).all(), f"{backend}: non-finite d{name}"
        torch.testing.assert_close(got, exp, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"d{n}: {m}")


CASES = {
    "dense": {},
    "causal": {"is_causal": True},
    "causal-decode": {"is_causal": True, "_lq": 1},
    "window": {"window_size": (4, 0), "is_causal": True},
    "padding": {"attn_mask": "padding"},
    "alibi": {"alibi_slopes": True},
}


def _case_tensors(name, dtype, *, L=67, S=67, H=4, Hkv=2, D=40, seed=0, magnitude=1.0):
    spec = dict(CASES[name])
    L = spec.pop("_lq", L)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, L, D, generator=g, dtype=torch.float64) * magnitude
    k = torch.randn(2, Hkv, S, D, generator=g, dtype=torch.float64) * magnitude
    v = torch.randn(2, Hkv, S, D, generator=g, dtype=torch.float64)
    if spec.get("attn_mask") == "padding":
        spec["attn_mask"] = attnkit.masks.padding(torch.tensor([S, S // 2]), S)
    if spec.get("alibi_slopes") is True:
        spec["alibi_slopes"] = attnkit.masks.alibi_slopes(H)
    return q.to(dtype), k.to(dtype), v.to(dtype), spec


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_low_precision_within_twice_naive_error(backend, dtype, case):
    q, k, v, kwargs = _case_tensors(case, dtype)
    if not _served(backend, q, k, v, **kwargs):
        pytest.skip(f"{backend} does not serve {case} in {dtype}")
    ref, _, _ = reference_attention(q, k, v, **kwargs)
    naive, _, _ = naive_low_precision(q, k, v, **kwargs)
    got = attnkit.attention(q, k, v, backend=backend, **kwargs)
    assert got.dtype == dtype
    assert_close_to_reference(got, ref, dtype=dtype, baseline=naive, msg=f"{backend} {case}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_extreme_logits_give_no_inf_or_nan(backend, dtype):
    # Scores of magnitude ~1e4 (scale = 1): exp would overflow without the max subtraction.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 16, 8, generator=g).sign() * 35
    k = torch.randn(1, 2, 16, 8, generator=g).sign() * 35
    v = torch.randn(1, 2, 16, 8, generator=g)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = attnkit.attention(q, k, v, scale=1.0, backend=backend)
    assert torch.isfinite(out).all()
    ref, _, _ = reference_attention(q, k, v, scale=1.0)
    torch.testing.assert_close(out.double(), ref, atol=TOLERANCES[dtype][0] * 10 + 1e-2, rtol=0)


@pytest.mark.parametrize("how", ["bool-mask", "float-mask", "causal-lq>lk", "window", "padding-row"])
def test_rows_with_no_key_give_zero_and_finite_gradients(backend, how):
    g = torch.Generator().manual_seed(2)
    Lq, Lk = (6, 3) if how == "causal-lq>lk" else (5, 7)
    q = torch.randn(2, 2, Lq, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, Lk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, Lk, 8, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 1, Lq, Lk, dtype=torch.bool)
    kwargs = {}
    if how in ("bool-mask", "float-mask"):
        keep[:, :, 1] = False
        keep[1, :, 3] = False
        kwargs["attn_mask"] = (
            keep if how == "bool-mask" else torch.zeros(keep.shape).double().masked_fill(~keep, -torch.inf)
        )
    elif how == "causal-lq>lk":
        kwargs["is_causal"] = True  # bottom-right: queries 0..2 sit before the first key
        keep = attnkit.masks.causal(Lq, Lk).expand(2, 1, Lq, Lk)
    elif how == "window":
        kwargs["window_size"] = (-1, 0)  # with Lq < Lk every row keeps keys: combine with a mask
        kwargs["attn_mask"] = torch.ones(Lq, Lk, dtype=torch.bool).triu(diagonal=Lk - Lq + 1)
        keep = attnkit.masks.sliding_window(Lq, Lk, (-1, 0)) & kwargs["attn_mask"]
        keep = keep.expand(2, 1, Lq, Lk)
    else:
        kwargs["attn_mask"] = torch.zeros(2, 1, 1, Lk, dtype=torch.bool)
        kwargs["attn_mask"][0] = True  # batch 1 has no real key at all
        keep = kwargs["attn_mask"].expand(2, 1, Lq, Lk)
    empty = ~keep.any(-1)  # (2, 1, Lq)
    assert empty.any()
    extras = {n: True for n in ("return_lse", "return_weights") if n in _options(backend)}
    if not _served(backend, q, k, v, **kwargs, **extras):
        extras = {}
    res = attnkit.attention(q, k, v, backend=backend, **kwargs, **extras)
    out = res.output if extras else res
    empty_rows = empty.expand(2, 2, Lq)
    assert not out.isnan().any()
    assert (out[empty_rows] == 0).all()
    if extras.get("return_lse"):
        assert torch.isneginf(res.lse[empty_rows]).all() and torch.isfinite(res.lse[~empty_rows]).all()
    if extras.get("return_weights"):
        assert (res.weights[empty_rows] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[empty_rows] == 0).all()
    ref, _, _ = reference_attention(q.detach(), k.detach(), v.detach(), **kwargs)
    torch.testing.assert_close(out.detach(), ref)


def test_forcing_a_backend_names_the_missing_option():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap"):
        attnkit.attention(q, q, q, softcap=5.0, backend="sdpa")
    with pytest.raises(ValueError, match="return_weights"):
        attnkit.attention(q, q, q, return_weights=True, backend="sdpa")


@pytest.mark.parametrize("name", FAST)
def test_auto_prefers_fused_backends_for_plain_calls(name):
    q = torch.randn(1, 2, 16, 8)
    sel = attnkit.backends.select(q, q, q, is_causal=True)
    assert sel.backend != "math", str(sel)
