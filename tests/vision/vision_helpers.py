"""Shared helpers for the vision tests: tolerances, seeded tensors, event capture, gradient comparison."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from attnkit.functional import observe

#: Tolerances per dtype for a module against a float64 reference computed from the same weights.
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
}


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def randomize_(module, seed=0, std=0.5):
    """Give every parameter and floating buffer random values (so zero-inits cannot hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
        for name, b in module.named_buffers():
            if b.dtype.is_floating_point:
                if name.endswith("running_var"):
                    b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
                else:
                    b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64) * std)
    return module


@contextmanager
def captured():
    """Collect every attention event emitted inside the block."""
    events = []
    with observe.observer(events.append):
        yield events


def assert_same_grads(module, ref_fn, x, *, atol=1e-9, rtol=1e-9):
    """Output and gradients (input and every parameter) of ``module(x)`` equal those of ``ref_fn(x)``."""
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    out = module(x1)
    ref = ref_fn(x2)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    upstream = rand(*out.shape, dtype=out.dtype, seed=123)
    got = torch.autograd.grad(out, [x1, *params], upstream)
    want = torch.autograd.grad(ref, [x2, *params], upstream, allow_unused=True)
    for g, w in zip(got, want):
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
