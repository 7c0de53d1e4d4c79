import math

import pytest
import torch

from attnkit import masks
from attnkit.functional.masks import normalize_window_size, positional_mask


def loop_mask(Lq, Lk, *, causal=False, left=-1, right=-1):
    out = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        pos = i + Lk - Lq
        for j in range(Lk):
            ok = (not causal or j <= pos) and (left == -1 or j >= pos - left) and (right == -1 or j <= pos + right)
            out[i, j] = ok
    return out


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 5), (5, 1), (4, 4), (3, 7), (7, 3)])
def test_causal_is_bottom_right(Lq, Lk):
    torch.testing.assert_close(masks.causal(Lq, Lk), loop_mask(Lq, Lk, causal=True))


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (4, 4), (3, 9), (9, 3)])
@pytest.mark.parametrize("window", [0, 1, 2, (2, 0), (0, 3), (-1, 1), (1, -1), (-1, -1)])
def test_sliding_window_matches_loops(Lq, Lk, window):
    left, right = (window, window) if isinstance(window, int) else window
    torch.testing.assert_close(masks.sliding_window(Lq, Lk, window), loop_mask(Lq, Lk, left=left, right=right))


@pytest.mark.parametrize("Lq,Lk", [(5, 9), (9, 5), (6, 6)])
def test_positional_mask_tiles_agree_with_full(Lq, Lk):
    full = loop_mask(Lq, Lk, causal=True, left=2)
    for q0, q1, k0, k1 in [(0, 2, 0, 3), (2, Lq, 3, Lk), (1, 4, 0, Lk)]:
        tile = positional_mask(Lq, Lk, is_causal=True, window_size=(2, -1), q_range=(q0, q1), kv_range=(k0, k1))
        expected = full[q0:q1, k0:k1]
        if tile is None:
            assert bool(expected.all())
        else:
            torch.testing.assert_close(tile, expected)


def test_positional_mask_none_when_nothing_masked():
    assert positional_mask(1, 10, is_causal=True) is None  # decoding one token sees the whole cache
    assert positional_mask(4, 4, window_size=(3, 3)) is None
    assert positional_mask(4, 4, window_size=(2, 3)) is not None


@pytest.mark.parametrize("bad", [-2, (1, -3), (1, 2, 3), "2", (1.0, 2), True])
def test_window_size_errors_name_the_argument(bad):
    with pytest.raises((ValueError, TypeError), match="window_size"):
        normalize_window_size(bad)


def test_padding_and_key_padding_conversion():
    keep = masks.padding([2, 4])
    assert keep.shape == (2, 1, 1, 4)
    assert keep.squeeze().tolist() == [[True, True, False, False], [True, True, True, True]]
    torch_style = torch.tensor([[False, False, True, True], [False, False, False, False]])  # True = padding
    torch.testing.assert_close(masks.from_key_padding_mask(torch_style), keep)
    with pytest.raises(ValueError, match="lengths"):
        masks.padding([3, 5], max_len=4)
    with pytest.raises(ValueError, match="key_padding_mask"):
        masks.from_key_padding_mask(torch.zeros(2, 3, 4, dtype=torch.bool))


def test_block_diagonal():
    m = masks.block_diagonal([2, 1, 3])
    doc = [0, 0, 1, 2, 2, 2]
    expected = torch.tensor([[a == b for b in doc] for a in doc])
    torch.testing.assert_close(m, expected)
    causal = masks.block_diagonal([2, 1, 3], is_causal=True)
    torch.testing.assert_close(causal, expected & torch.ones(6, 6, dtype=torch.bool).tril())


def test_alibi_slopes_follow_the_paper():
    # Press et al. 2022: for n a power of two, slopes are 2^(-8i/n), i = 1..n.
    for n in (1, 2, 4, 8, 16):
        expected = torch.tensor([2 ** (-8 * i / n) for i in range(1, n + 1)])
        torch.testing.assert_close(masks.alibi_slopes(n), expected)
    # n = 6: the 4 slopes of n = 4, then every other slope of n = 8 (2^-1, 2^-3).
    expected6 = torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    torch.testing.assert_close(masks.alibi_slopes(6), expected6)
    assert masks.alibi_slopes(12).shape == (12,)
    assert all(math.isfinite(s) and s > 0 for s in masks.alibi_slopes(12).tolist())
    with pytest.raises(ValueError, match="num_heads"):
        masks.alibi_slopes(0)


def test_alibi_bias_bottom_right():
    slopes = torch.tensor([0.5, 0.25])
    bias = masks.alibi_bias(slopes, 2, 4)
    i = torch.arange(2).view(-1, 1) + 2
    j = torch.arange(4)
    expected = -slopes.view(2, 1, 1) * (i - j).abs()
    torch.testing.assert_close(bias, expected)
