"""WindowAttention against a per-token float64 formula of Swin's Eq. 4 and against transformers' SwinLayer."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.vision.window import WindowAttention, relative_position_index
from vision.vision_helpers import TOL, assert_same_grads, captured, rand, randomize_


def window_reference(m, x):
    """For every token: its window and region in the cyclically shifted, zero-padded map; softmax over the keys
    of the same window and region of scale·q·k + table[(dy + w - 1)(2w - 1) + dx + w - 1, h]; then proj."""
    b, h, w, c = x.shape
    ws, s, nh = m.window_size, m.shift_size, m.num_heads
    d = c // nh
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    xp = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    xp[:, :h, :w] = x
    qkv = xp @ m.qkv.weight.T + (m.qkv.bias if m.qkv.bias is not None else 0)
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]

    def region(i, n):  # region of shifted coordinate i along an axis of length n
        return int(i >= n - ws) + int(i >= n - s) if s else 0

    # shifted coordinate of original (padded) position p: (p - s) mod n
    info = {}
    for i in range(hp):
        for j in range(wp):
            si, sj = (i - s) % hp, (j - s) % wp
            info[i, j] = (si // ws, sj // ws, region(si, hp) * 3 + region(sj, wp), si % ws, sj % ws)
    out = torch.zeros(b, hp, wp, c, dtype=x.dtype)
    for i in range(hp):
        for j in range(wp):
            wi, wj, reg, yi, xi = info[i, j]
            keys = [p for p, t in info.items() if t[0] == wi and t[1] == wj and t[2] == reg]
            kk = torch.stack([k[:, p[0], p[1]] for p in keys], 1)  # (B, S, C)
            vv = torch.stack([v[:, p[0], p[1]] for p in keys], 1)
            for head in range(nh):
                sl = slice(head * d, (head + 1) * d)
                scores = (kk[..., sl] @ q[:, i, j, sl].unsqueeze(-1)).squeeze(-1) * d**-0.5  # (B, S)
                bias = torch.stack(
                    [
                        m.relative_position_bias_table[
                            (yi - info[p][3] + ws - 1) * (2 * ws - 1) + (xi - info[p][4] + ws - 1), head
                        ]
                        for p in keys
                    ]
                )
                p_attn = torch.softmax(scores + bias, -1)
                out[:, i, j, sl] = (p_attn.unsqueeze(-1) * vv[..., sl]).sum(1)
    return (out @ m.proj.weight.T + m.proj.bias)[:, :h, :w]


@settings(max_examples=8, deadline=None)
@given(
    ws=st.integers(2, 4),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    heads=st.sampled_from([1, 2]),
    shift_frac=st.sampled_from([0, 0.5, 0.99]),
)
def test_matches_per_token_formula_with_gradients(ws, h, w, heads, shift_frac):
    shift = int(ws * shift_frac)
    wa = randomize_(WindowAttention(4 * heads, heads, window_size=ws, shift_size=shift, dtype=torch.float64))
    assert_same_grads(wa, lambda t: window_reference(wa, t), rand(2, h, w, 4 * heads))


def test_relative_position_index_formula():
    idx = relative_position_index(3)
    assert idx.shape == (9, 9)
    # token 0 at (0, 0), token 8 at (2, 2): dy = -2, dx = -2 -> (0)(5) + 0 = 0; reversed -> 4*5 + 4 = 24
    assert idx[0, 8] == 0 and idx[8, 0] == 24 and (idx.diagonal() == 12).all()


def _hf_swin_layer(dim, heads, ws, shift, resolution):
    transformers = pytest.importorskip("transformers")
    from transformers.models.swin.modeling_swin import SwinLayer

    config = transformers.SwinConfig(embed_dim=dim, window_size=ws, num_heads=[heads], depths=[1], qkv_bias=True)
    config._attn_implementation = "eager"
    layer = SwinLayer(config, dim, resolution, heads, shift_size=shift).eval()
    randomize_(layer, std=0.3)
    return layer


def _load_from_hf(wa, hf_attn):
    with torch.no_grad():
        wa.qkv.weight.copy_(torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight]))
        wa.qkv.bias.copy_(torch.cat([hf_attn.q_proj.bias, hf_attn.k_proj.bias, hf_attn.v_proj.bias]))
        wa.proj.load_state_dict(hf_attn.o_proj.state_dict())
        wa.relative_position_bias_table.copy_(hf_attn.relative_position_bias.relative_position_bias_table)


@pytest.mark.parametrize(
    ("resolution", "ws", "shift", "heads"),
    [((8, 8), 4, 0, 2), ((8, 8), 4, 2, 2), ((9, 11), 4, 2, 4), ((14, 13), 7, 3, 3), ((6, 10), 5, 1, 1)],
)
def test_matches_transformers_swin_layer(resolution, ws, shift, heads):
    dim = 12 * heads
    layer = _hf_swin_layer(dim, heads, ws, shift, resolution)
    wa = WindowAttention(dim, heads, window_size=ws, shift_size=shift).eval()
    _load_from_hf(wa, layer.attention)
    x = torch.randn(2, resolution[0] * resolution[1], dim)
    with torch.no_grad():
        want = layer(x, resolution)[0]
        h = x + wa(layer.layernorm_before(x), grid=resolution)
        got = h + layer.mlp(layer.layernorm_after(h))
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_float32_layout_and_events():
    wa = randomize_(WindowAttention(8, 2, window_size=3, shift_size=1)).eval()
    ref = copy.deepcopy(wa).double()
    x = rand(2, 5, 4, 8, dtype=torch.float32)
    torch.testing.assert_close(wa(x).double(), window_reference(ref, x.double()), **TOL[torch.float32])
    plain = wa(x)
    with captured() as events:
        observed = wa(x)
    assert torch.equal(plain, observed)
    assert [e.kind for e in events] == ["scaled_dot_product"]
    assert events[0].spec.query.shape == (2, 4, 2, 9, 4)  # (B, nW, H, N, D)
    assert wa.token_layout == {
        "grid": (6, 6),
        "input_grid": (5, 4),
        "window_size": 3,
        "shift_size": 1,
        "windows": (2, 2),
        "num_prefix_tokens": 0,
    }
    keys = set(wa.state_dict())
    assert keys == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "relative_position_bias_table"}


def test_errors():
    with pytest.raises(ValueError, match="shift_size in"):
        WindowAttention(8, 2, window_size=4, shift_size=4)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        WindowAttention(10, 4)
    with pytest.raises(ValueError, match="attn_drop"):
        WindowAttention(8, 2, attn_drop=1.0)
    wa = WindowAttention(8, 2, window_size=2)
    with pytest.raises(ValueError, match="grid"):
        wa(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="grid"):
        wa(torch.randn(1, 6, 8), grid=(2, 2))
    with pytest.raises(ValueError, match="embed_dim 8"):
        wa(torch.randn(1, 2, 3, 7))
    with pytest.raises(ValueError, match=r"\(B, Hi, Wi, C\)"):
        wa(torch.randn(8))
