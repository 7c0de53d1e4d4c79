"""Attention sinks (``sinks=``): every backend against the float64 reference, gradients, empty rows."""

import pytest
import torch

import attnkit
from attn_reference import reference_attention

BACKENDS = ["math", "sdpa", "tiled", "blocksparse"]


def _inputs(seed=0, B=2, H=4, Hkv=2, Lq=9, Lk=13, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["heads", "batch"])
@pytest.mark.parametrize("opts", [{}, {"is_causal": True}, {"window_size": (3, 1)}, {"softcap": 5.0}])
def test_sinks_match_the_reference(backend, shape, opts):
    if backend == "sdpa" and "softcap" in opts:
        pytest.skip("sdpa does not serve softcap")
    q, k, v = _inputs()
    sinks = torch.randn(
        4 if shape == "heads" else (2, 4), dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )
    want_out, want_w, want_lse = reference_attention(q, k, v, sinks=sinks, **opts)
    with torch.no_grad():
        got = attnkit.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend, **opts)
    torch.testing.assert_close(got.output, want_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.lse, want_lse, atol=1e-10, rtol=1e-10)
    weights = attnkit.attention(q, k, v, sinks=sinks, return_weights=True, backend="math", **opts).weights
    torch.testing.assert_close(weights, want_w, atol=1e-10, rtol=1e-10)
    sink_mass = torch.exp(sinks.unsqueeze(-1) - want_lse)
    torch.testing.assert_close(weights.sum(-1), 1 - sink_mass, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["math", "tiled", "blocksparse", "auto"])
def test_sink_gradients_match_the_reference(backend):
    q, k, v = (t.requires_grad_() for t in _inputs(1))
    sinks = torch.randn(4, dtype=torch.float64).requires_grad_()
    got = attnkit.attention(q, k, v, sinks=sinks, is_causal=True, return_lse=True, backend=backend)
    (got.output.square().sum() + got.lse.sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v, sinks)]
    for t in (q, k, v, sinks):
        t.grad = None
    out, _, lse = reference_attention(q, k, v, sinks=sinks, is_causal=True)
    (out.square().sum() + lse.sum()).backward()
    for g, t in zip(grads, (q, k, v, sinks)):
        torch.testing.assert_close(g, t.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_with_no_key_puts_its_mass_on_the_sink(backend):
    q, k, v = _inputs(2, dtype=torch.float32)
    mask = torch.ones(9, 13, dtype=torch.bool)
    mask[4] = False
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    got = attnkit.attention(q, k, v, attn_mask=mask, sinks=sinks, return_lse=True, backend=backend)
    assert torch.isfinite(got.output).all()
    assert got.output[:, :, 4].abs().max() == 0
    torch.testing.assert_close(got.lse[:, :, 4], sinks.expand(2, 4))


def test_sinks_shape_is_checked():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=r"sinks of shape \(3,\)"):
        attnkit.attention(q, k, v, sinks=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="sinks must be a floating tensor"):
        attnkit.attention(q, k, v, sinks=torch.zeros(4, dtype=torch.long))
