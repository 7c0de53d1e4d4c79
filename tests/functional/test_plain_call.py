"""The plain call (``attnkit.attention(q, k, v[, is_causal, scale])``) answered without building a spec: equal to
what ``auto`` runs for it, and taken only when it is exactly that call."""

from __future__ import annotations

import importlib

import pytest
import torch

import attnkit
from attnkit.functional import observe

attention_module = importlib.import_module("attnkit.functional.attention")  # the package exports the function


@pytest.fixture
def spy(monkeypatch):
    """Records every call that takes the full path (builds a spec)."""
    seen = []
    real = attention_module.make_spec

    def make_spec(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "make_spec", make_spec)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_plain_calls_equal_the_sdpa_backend_without_a_spec(spy, dtype, is_causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g).to(dtype).requires_grad_(True) for _ in range(3))
    out = attnkit.attention(q, k, v, is_causal=is_causal, scale=0.3)
    assert spy == []  # no spec was built
    ref = attnkit.attention(q, k, v, is_causal=is_causal, scale=0.3, backend="sdpa")
    assert torch.equal(out, ref)
    w = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (lambda: [torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)], {}),  # grouped heads
        (lambda: [torch.randn(1, 2, 3, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)], {"is_causal": True}),
        (lambda: [torch.randn(2, 1, 2, 6, 8)] * 3, {}),  # two batch dims
        (lambda: [torch.randn(1, 2, 8, 6).transpose(-1, -2)] * 3, {}),  # strided head_dim
        (lambda: [torch.randn(1, 2, 6, 8, dtype=torch.float64)] * 3, {}),
        (lambda: [torch.randn(1, 2, 6, 8)] * 3, {"scale": 1}),  # an int scale: validated on the full path
        (lambda: [torch.randn(1, 2, 0, 8)] * 3, {}),  # empty
    ],
    ids=["gqa", "causal-lq-lk", "5d", "strided", "float64", "int-scale", "empty"],
)
def test_other_calls_take_the_full_path(spy, make, kwargs):
    q, k, v = make()
    attnkit.attention(q, k, v, **kwargs)
    assert len(spy) == 1


def test_bad_input_gets_the_full_paths_errors(spy):
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(TypeError, match="dtype"):
        attnkit.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="head_dim"):
        attnkit.attention(q, torch.randn(1, 2, 6, 4), q)
    with pytest.raises(ValueError, match="scale"):
        attnkit.attention(q, q, q, scale=float("nan"))


def test_observed_calls_are_dispatched_with_make_specs_spec(spy):
    """Capture and LRP install observers/interceptors: their plain calls are dispatched (and seen) with a spec
    built directly, field for field what make_spec builds."""
    import dataclasses

    q = torch.randn(1, 2, 6, 8)
    events = []
    with observe.observer(events.append):
        out = attnkit.attention(q, q, q, is_causal=True)
    assert spy == [] and len(events) == 1
    got, want = events[0].spec, attention_module.make_spec(q, q, q, is_causal=True)
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        assert a is b or a == b, field.name
    torch.testing.assert_close(out, attnkit.attention(q, q, q, is_causal=True, backend="sdpa"))
