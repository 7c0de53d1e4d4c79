"""MHSA2d against BoTNet's content + relative-position logits written per token in float64."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.vision.mhsa import MHSA2d
from vision.vision_helpers import TOL, assert_same_grads, captured, rand, randomize_


def mhsa_reference(m, x, scale_pos=False):
    b, c, h, w = x.shape
    nh, d, big = m.num_heads, c // m.num_heads, m.max_size
    qkv = torch.einsum("oc,bcn->bon", m.qkv.weight[:, :, 0, 0], x.reshape(b, c, h * w))
    q, k, v = (t.reshape(b, nh, d, h * w) for t in qkv.split(c, 1))  # (B, H, D, N)
    pos = [(i // w, i % w) for i in range(h * w)]
    logits = torch.zeros(b, nh, h * w, h * w, dtype=x.dtype)
    for i, (yi, xi) in enumerate(pos):
        for j, (yj, xj) in enumerate(pos):
            content = (q[..., i] * k[..., j]).sum(-1) * d**-0.5
            rel = 0
            if m.pos_embed is not None:
                r = m.pos_embed.height_rel[yj - yi + big - 1] + m.pos_embed.width_rel[xj - xi + big - 1]
                rel = (q[..., i] * r).sum(-1) * (d**-0.5 if scale_pos else 1.0)
            logits[..., i, j] = content + rel
    out = torch.einsum("bhij,bhdj->bhdi", torch.softmax(logits, -1), v)
    return out.reshape(b, c, h, w)


@settings(max_examples=12, deadline=None)
@given(
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    heads=st.sampled_from([1, 2]),
    pos=st.booleans(),
    scale_pos=st.booleans(),
    max_size=st.sampled_from([5, 7]),
)
def test_matches_formula_with_gradients(h, w, heads, pos, scale_pos, max_size):
    m = MHSA2d(
        4 * heads, num_heads=heads, max_size=max_size, pos_embed=pos, scale_pos_embed=scale_pos, dtype=torch.float64
    )
    randomize_(m, std=0.4)
    assert_same_grads(m, lambda t: mhsa_reference(m, t, scale_pos), rand(2, 4 * heads, h, w))


def test_float32_channels_last_events_and_timm_keys():
    m = randomize_(MHSA2d(16, num_heads=4, max_size=6), std=0.4)
    ref = copy.deepcopy(m).double()
    x = rand(2, 16, 6, 5, dtype=torch.float32)
    torch.testing.assert_close(m(x).double(), mhsa_reference(ref, x.double()), **TOL[torch.float32])
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x), **TOL[torch.float32])
    plain = m(x)
    with captured() as events:
        observed = m(x)
    assert torch.equal(plain, observed)
    assert [e.kind for e in events] == ["scaled_dot_product"] and events[0].spec.query.shape == (2, 4, 30, 4)
    assert m.token_layout == {"grid": (6, 5), "num_prefix_tokens": 0}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "qkv.weight": (48, 16, 1, 1),
        "pos_embed.height_rel": (11, 4),
        "pos_embed.width_rel": (11, 4),
    }


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MHSA2d(10, num_heads=4)
    with pytest.raises(ValueError, match="exceeds max_size=4"):
        MHSA2d(8, max_size=4)(torch.randn(1, 8, 5, 2))
    MHSA2d(8, max_size=4, pos_embed=False)(torch.randn(1, 8, 5, 2))  # no position tables, no limit
    with pytest.raises(ValueError, match="8 channels"):
        MHSA2d(8)(torch.randn(1, 4, 3, 3))
