"""ECA against Wang et al. 2020 Eq. 9 and 12 written out in float64."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.vision import ECA, eca_kernel_size
from vision.vision_helpers import TOL, assert_same_grads, captured, rand, randomize_


def eca_reference(module, x):
    """Eq. 9: w_c = sigmoid(sum_j kernel_j * y_{c + j - (k-1)/2}), zero outside [0, C); out = w * x."""
    kernel = module.conv.weight[0, 0]  # (k,)
    k = kernel.numel()
    y = x.sum((2, 3)) / (x.shape[2] * x.shape[3])  # (B, C)
    c = y.shape[1]
    logits = torch.zeros_like(y)
    for j in range(k):
        off = j - (k - 1) // 2
        lo, hi = max(0, -off), min(c, c - off)
        if lo < hi:
            shifted = torch.zeros_like(y)
            shifted[:, lo:hi] = y[:, lo + off : hi + off]
            logits = logits + kernel[j] * shifted
    w = 1 / (1 + torch.exp(-logits))
    return x * w[:, :, None, None], w


def nearest_odd(t):
    """The odd integer closest to t; the upper one on a tie."""
    below = 2 * math.floor((t - 1) / 2) + 1  # largest odd <= t
    return below if t - below < below + 2 - t else below + 2


@pytest.mark.parametrize("c", [1, 2, 3, 4, 8, 16, 32, 64, 100, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize(("gamma", "b"), [(2, 1), (1, 1), (3, 2)])
def test_kernel_size_is_nearest_odd_of_eq12(c, gamma, b):
    assert eca_kernel_size(c, gamma, b) == nearest_odd(abs(math.log2(c) / gamma + b / gamma))


def test_kernel_sizes_paper_official_and_timm():
    assert [eca_kernel_size(c) for c in (64, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 7]
    # timm clamps to >= 3: its value for C=4 is 3 where the formula gives 1.
    assert eca_kernel_size(4) == 1
    assert eca_kernel_size(4, min_kernel_size=3) == 3
    assert ECA(256, kernel_size=3).kernel_size == 3  # released ECA-Net50 stage-1 kernel


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 70),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    k=st.sampled_from([None, 1, 3, 5, 9]),
)
def test_matches_paper_formula_with_gradients(b, c, h, w, k):
    eca = randomize_(ECA(c, kernel_size=k, dtype=torch.float64))
    assert_same_grads(eca, lambda t: eca_reference(eca, t)[0], rand(b, c, h, w))


def test_float32_and_channels_last():
    eca = randomize_(ECA(64))
    ref = randomize_(ECA(64, dtype=torch.float64))
    x = rand(2, 64, 5, 6, dtype=torch.float32)
    torch.testing.assert_close(eca(x).double(), eca_reference(ref, x.double())[0], **TOL[torch.float32])
    out = eca(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, eca(x), **TOL[torch.float32])


def test_parameters_are_k_and_timm_keys():
    eca = ECA(2048)
    assert {k: tuple(v.shape) for k, v in eca.state_dict().items()} == {"conv.weight": (1, 1, 7)}


def test_reports_channel_map_without_changing_output():
    eca = randomize_(ECA(24, dtype=torch.float64))
    x = rand(2, 24, 3, 3)
    plain = eca(x)
    with captured() as events:
        observed = eca(x)
    assert torch.equal(plain, observed)
    assert [e.kind for e in events] == ["channel"]
    torch.testing.assert_close(events[0].weights, eca_reference(eca, x)[1])


def test_errors():
    with pytest.raises(ValueError, match="odd kernel_size"):
        ECA(16, kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size >= 1"):
        ECA(16, kernel_size=-1)
    with pytest.raises(ValueError, match="channels >= 1"):
        ECA(0)
    with pytest.raises(ValueError, match="gamma > 0"):
        ECA(16, gamma=0)
    with pytest.raises(ValueError, match="odd min_kernel_size"):
        eca_kernel_size(16, min_kernel_size=2)
    with pytest.raises(ValueError, match="rank 4"):
        ECA(16)(torch.randn(16, 4, 4))
    with pytest.raises(ValueError, match="16 channels"):
        ECA(16)(torch.randn(1, 15, 4, 4))
