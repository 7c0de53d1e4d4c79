"""RotaryEmbedding against complex-number RoPE (Su et al. 2021); sinusoidal positions against Vaswani et
al. 2017, Sec. 3.5, computed with Python's math module."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.nn import RotaryEmbedding, SinusoidalPositionalEncoding, sinusoidal_positions


def complex_rope(x, positions, base, pairs):
    """Rotate the complex numbers ``x[a] + i x[b]`` for ``(a, b)`` in ``pairs`` by ``e^{i m θ_k}``."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones_like(theta), positions.to(torch.float64)[..., None] * theta)
    a, b = pairs
    z = torch.complex(x[..., a].double(), x[..., b].double()) * rot
    out = torch.empty(x.shape, dtype=torch.float64)
    out[..., a], out[..., b] = z.real, z.imag
    return out


@settings(max_examples=20, deadline=None)
@given(
    head_dim=st.sampled_from([2, 8, 40, 64]),
    length=st.integers(1, 17),
    start=st.integers(0, 5000),
    interleaved=st.booleans(),
    base=st.sampled_from([10000.0, 500000.0]),
)
def test_rope_matches_complex_multiplication(head_dim, length, start, interleaved, base):
    rope = RotaryEmbedding(head_dim, base=base, interleaved=interleaved)
    x = torch.randn(2, 3, length, head_dim, dtype=torch.float64)
    positions = torch.arange(start, start + length)
    half = head_dim // 2
    pairs = (slice(0, None, 2), slice(1, None, 2)) if interleaved else (slice(0, half), slice(half, None))
    expected = complex_rope(x, positions, base, pairs)
    torch.testing.assert_close(rope(x, positions), expected, atol=1e-12, rtol=1e-12)
    got32 = rope(x.float(), positions)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, expected.float(), atol=2e-3 * max(1.0, start / 1000), rtol=1e-4)


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity


def test_rope_batched_positions():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 4, 8)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    out = rope(x, positions)
    torch.testing.assert_close(out[1], rope(x[1:], positions[1])[0])
    torch.testing.assert_close(out[0], rope(x[:1], positions[0])[0])


def test_sinusoidal_matches_paper_formula():
    length, embed_dim, offset = 11, 12, 3
    pe = sinusoidal_positions(length, embed_dim, offset=offset, dtype=torch.float64)
    for p in range(length):
        pos = p + offset
        for i in range(embed_dim // 2):
            angle = pos / 10000 ** (2 * i / embed_dim)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-14)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-14)


def test_sinusoidal_module_adds_positions():
    enc = SinusoidalPositionalEncoding(8)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(enc(x, offset=2), x + sinusoidal_positions(7, 8)[2:])
    seq_first = SinusoidalPositionalEncoding(8, batch_first=False)
    torch.testing.assert_close(seq_first(x.transpose(0, 1)).transpose(0, 1), enc(x))


def test_position_errors():
    with pytest.raises(ValueError, match="positive even int, got 7"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="base > 1"):
        RotaryEmbedding(8, base=1.0)
    with pytest.raises(ValueError, match=r"expected x of shape \(\.\.\., L, 8\)"):
        RotaryEmbedding(8)(torch.randn(2, 3, 6), torch.arange(3))
    with pytest.raises(ValueError, match="expected positions"):
        RotaryEmbedding(8)(torch.randn(2, 3, 8), torch.arange(4))
    with pytest.raises(ValueError, match="positive even int, got 5"):
        sinusoidal_positions(3, 5)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, L, 8\)"):
        SinusoidalPositionalEncoding(8)(torch.randn(3, 4))
