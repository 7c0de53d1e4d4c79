"""SqueezeExcite against Hu et al. 2018 Eq. 2-4 written out in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.vision import SqueezeExcite
from attnkit.vision.squeeze_excite import reduced_width
from vision.vision_helpers import TOL, assert_same_grads, captured, rand, randomize_


def se_reference(module, x):
    """Eq. 2 (squeeze), Eq. 3 (excitation), Eq. 4 (scale), with W1/W2 as plain matrices."""
    w1 = module.fc1.weight[:, :, 0, 0]  # (C/r, C)
    w2 = module.fc2.weight[:, :, 0, 0]  # (C, C/r)
    z = x.sum((2, 3)) / (x.shape[2] * x.shape[3])  # (B, C)
    hidden = torch.relu(torch.einsum("rc,bc->br", w1, z) + module.fc1.bias)
    s = 1 / (1 + torch.exp(-(torch.einsum("cr,br->bc", w2, hidden) + module.fc2.bias)))
    return x * s[:, :, None, None], s


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3),
    c=st.integers(1, 40),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    r=st.sampled_from([1, 2, 4, 16]),
    round_to=st.sampled_from([1, 8]),
)
def test_matches_paper_formula_with_gradients(b, c, h, w, r, round_to):
    if r > c:
        return
    se = randomize_(SqueezeExcite(c, reduction=r, round_to=round_to, dtype=torch.float64))
    x = rand(b, c, h, w)
    assert_same_grads(se, lambda t: se_reference(se, t)[0], x)


def test_float32_within_tolerance_of_float64_reference():
    se = randomize_(SqueezeExcite(48, reduction=4))
    x = rand(2, 48, 7, 5, dtype=torch.float32)
    ref = se_reference(randomize_(SqueezeExcite(48, reduction=4, dtype=torch.float64)), x.double())[0]
    torch.testing.assert_close(se(x).double(), ref, **TOL[torch.float32])


def test_channels_last_gives_same_values_and_format():
    se = randomize_(SqueezeExcite(32, reduction=4, dtype=torch.float64))
    x = rand(2, 32, 6, 5)
    out = se(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, se(x), **TOL[torch.float64])
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_widths_paper_and_timm():
    # Paper: C // r. timm: C / r rounded half-up to a multiple of 8, at least 8.
    assert SqueezeExcite(64).reduced_channels == 4
    assert SqueezeExcite(64, round_to=8).reduced_channels == 8
    assert SqueezeExcite(256).reduced_channels == 16
    assert reduced_width(200, 16, 8) == 16  # 12.5 -> 16
    assert reduced_width(184, 16, 8) == 8  # 11.5 -> 8
    assert SqueezeExcite(64, reduced_channels=5).reduced_channels == 5


def test_state_dict_keys_and_shapes_match_timm_layout():
    sd = SqueezeExcite(64, round_to=8).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "fc1.weight": (8, 64, 1, 1),
        "fc1.bias": (8,),
        "fc2.weight": (64, 8, 1, 1),
        "fc2.bias": (64,),
    }


def test_reports_channel_map_without_changing_output():
    se = randomize_(SqueezeExcite(16, reduction=4, dtype=torch.float64))
    x = rand(3, 16, 4, 4)
    plain = se(x)
    with captured() as events:
        observed = se(x)
    assert torch.equal(plain, observed)
    assert [e.kind for e in events] == ["channel"]
    assert events[0].weights.shape == (3, 16)
    torch.testing.assert_close(events[0].weights, se_reference(se, x)[1])
    assert events[0].layout["module"] == "SqueezeExcite"


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"channels": 8, "reduction": 16}, ValueError, r"reduction \(16\) is larger than channels \(8\)"),
        ({"channels": 0}, ValueError, "channels >= 1"),
        ({"channels": 8.0}, TypeError, "channels to be an int"),
        ({"channels": 8, "reduction": 0}, ValueError, "reduction >= 1"),
        ({"channels": 8, "reduced_channels": 0}, ValueError, "reduced_channels >= 1"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SqueezeExcite(**kwargs)


def test_forward_errors():
    se = SqueezeExcite(8, reduction=2)
    with pytest.raises(ValueError, match="rank 4"):
        se(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="8 channels"):
        se(torch.randn(2, 7, 5, 5))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        se([1.0])
    with pytest.raises(TypeError, match="floating-point"):
        se(torch.ones(1, 8, 2, 2, dtype=torch.long))
