"""NonLocal2d against Wang et al. 2018 Eq. 1, 3, 6 written out in float64."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.vision import NonLocal2d
from vision.vision_helpers import TOL, assert_same_grads, captured, rand, randomize_


def conv1x1(conv, x):
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]


def maxpool2(t):
    b, c, h, w = t.shape
    t = t[:, :, : h // 2 * 2, : w // 2 * 2]
    return t.reshape(b, c, h // 2, 2, w // 2, 2).amax((3, 5))


def non_local_reference(m, x, scale, subsample=False):
    """y_i = sum_j exp(s θ_i·φ_j) g_j / sum_j exp(s θ_i·φ_j); z = BN(W_z y) + x (eval-mode BN)."""
    theta, phi, g = conv1x1(m.t, x), conv1x1(m.p, x), conv1x1(m.g, x)
    if subsample:
        phi, g = maxpool2(phi), maxpool2(g)
    b, ci, h, w = theta.shape
    theta, phi, g = theta.reshape(b, ci, -1), phi.reshape(b, ci, -1), g.reshape(b, ci, -1)
    f = torch.exp(scale * torch.einsum("bci,bcj->bij", theta, phi))
    y = torch.einsum("bij,bcj->bci", f / f.sum(-1, keepdim=True), g).reshape(b, ci, h, w)
    z = conv1x1(m.z, y)
    if isinstance(m.norm, torch.nn.BatchNorm2d):
        bn = m.norm
        z = (z - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var + bn.eps)[None, :, None, None]
        z = z * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return z + x


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(2, 12),
    h=st.integers(2, 7),
    w=st.integers(2, 7),
    scale=st.sampled_from([1.0, None, 0.3]),
    subsample=st.booleans(),
    norm=st.booleans(),
)
def test_matches_embedded_gaussian_formula(b, c, h, w, scale, subsample, norm):
    nl = NonLocal2d(c, scale=scale, subsample=subsample, norm=norm, dtype=torch.float64)
    nl = randomize_(nl, std=0.3).eval()
    s = nl.reduced_channels**-0.5 if scale is None else scale
    assert_same_grads(nl, lambda t: non_local_reference(nl, t, s, subsample), rand(b, c, h, w))


def test_defaults_paper_width_and_identity_at_init():
    nl = NonLocal2d(64)
    assert nl.reduced_channels == 32 and nl.scale == 1.0
    x = torch.randn(2, 64, 5, 5)
    # The zero-initialised BN scale makes a fresh block the identity (Sec. 4.1).
    torch.testing.assert_close(nl.eval()(x), x)
    timm_like = NonLocal2d(64, reduction=8, round_to=8, scale=64**-0.5)
    assert {k: tuple(v.shape) for k, v in timm_like.state_dict().items() if "norm" not in k} == {
        "t.weight": (8, 64, 1, 1),
        "t.bias": (8,),
        "p.weight": (8, 64, 1, 1),
        "p.bias": (8,),
        "g.weight": (8, 64, 1, 1),
        "g.bias": (8,),
        "z.weight": (64, 8, 1, 1),
        "z.bias": (64,),
    }


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_float32_backends_and_channels_last(backend):
    nl = randomize_(NonLocal2d(16, backend=backend), std=0.3).eval()
    ref = copy.deepcopy(nl).double()
    x = rand(2, 16, 7, 9, dtype=torch.float32)
    torch.testing.assert_close(nl(x).double(), non_local_reference(ref, x.double(), 1.0), **TOL[torch.float32])
    torch.testing.assert_close(nl(x.to(memory_format=torch.channels_last)), nl(x), **TOL[torch.float32])


def test_token_attention_event_and_layout():
    nl = randomize_(NonLocal2d(8, subsample=True, dtype=torch.float64), std=0.3).eval()
    x = rand(2, 8, 6, 5)
    plain = nl(x)
    with captured() as events:
        observed = nl(x)
    assert torch.equal(plain, observed)
    assert [e.kind for e in events] == ["scaled_dot_product"]
    assert events[0].spec.query.shape == (2, 1, 30, 4)
    assert events[0].spec.key.shape == (2, 1, 6, 4)
    assert nl.token_layout == {"grid": (6, 5), "key_grid": (3, 2), "num_prefix_tokens": 0}


def test_errors():
    with pytest.raises(ValueError, match=r"reduction \(2\) is larger than channels \(1\)"):
        NonLocal2d(1)
    with pytest.raises(TypeError, match="scale"):
        NonLocal2d(8, scale="auto")
    with pytest.raises(ValueError, match="rank 4"):
        NonLocal2d(8)(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="subsample=True needs"):
        NonLocal2d(8, subsample=True)(torch.randn(1, 8, 1, 4))
