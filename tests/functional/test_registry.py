import pytest
import torch

import attnkit
from attnkit.backends import Backend, register
from attnkit.functional.registry import _ORDER, _REGISTRY


def test_available_lists_backends_with_their_options():
    info = attnkit.backends.available()
    assert {"math", "sdpa"} <= set(info)
    assert "softcap" in info["math"].options and "softcap" not in info["sdpa"].options
    priorities = [b.priority for b in info.values()]
    assert priorities == sorted(priorities)


def test_select_explains_the_choice():
    q = torch.randn(1, 2, 8, 16)
    plain = attnkit.backends.select(q, q, q, is_causal=True)
    assert plain.backend == "sdpa"
    capped = attnkit.backends.select(q, q, q, softcap=30.0)
    assert capped.backend == "math"
    assert "softcap" in capped.reasons["sdpa"]
    assert "selected backend: math" in str(capped)
    weights = attnkit.backends.select(q, q, q, return_weights=True)
    assert weights.backend == "math" and "return_weights" in weights.reasons["sdpa"]


def test_low_precision_alibi_falls_back_with_a_reason():
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    sel = attnkit.backends.select(q, q, q, alibi_slopes=attnkit.masks.alibi_slopes(2))
    assert sel.backend != "sdpa" and "rounded" in sel.reasons["sdpa"]


def test_unknown_backend_lists_valid_names():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*'auto'.*'math'"):
        attnkit.attention(q, q, q, backend="fast")


def test_register_twice_raises_and_new_backends_plug_in():
    calls = []

    def forward(spec):
        calls.append(spec)
        return attnkit.backends.get("math").forward(spec)

    b = Backend(name="test-echo", forward=forward, options=frozenset({"is_causal"}), priority=1, description="t")
    register(b)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(b)
        q = torch.randn(1, 1, 3, 4)
        out = attnkit.attention(q, q, q, is_causal=True)  # auto now prefers it
        assert len(calls) == 1
        torch.testing.assert_close(out, attnkit.attention(q, q, q, is_causal=True, backend="math"))
        attnkit.attention(q, q, q, window_size=1)  # an option it lacks: auto skips it
        assert len(calls) == 1
        with pytest.raises(ValueError, match="window_size"):
            attnkit.attention(q, q, q, window_size=1, backend="test-echo")
    finally:
        del _REGISTRY["test-echo"]
        _ORDER.remove(b)
    with pytest.raises(ValueError, match="unknown options"):
        register(Backend("bad", forward, frozenset({"warp_drive"}), 1, "x"))
