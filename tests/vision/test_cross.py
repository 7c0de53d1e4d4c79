"""CrossAttentionBlock against the pre-norm cross-attention formula (float64) and torch.nn.MultiheadAttention."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.vision import CrossAttentionBlock
from vision.vision_helpers import TOL, captured, rand, randomize_


def layer_norm(t, norm):
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def cross_reference(m, x, ctx, pad=None):
    a = m.cross_attn
    h = a.num_heads
    d = m.embed_dim // h
    q = (layer_norm(x, m.norm1) @ a.q_proj.weight.T + a.q_proj.bias).unflatten(-1, (h, d))  # (B, N, H, D)
    c = layer_norm(ctx, m.norm_context)
    k = (c @ a.k_proj.weight.T + a.k_proj.bias).unflatten(-1, (h, d))
    v = (c @ a.v_proj.weight.T + a.v_proj.bias).unflatten(-1, (h, d))
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], -math.inf)
    o = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(s, -1), v).flatten(-2)
    x = x + o @ a.out_proj.weight.T + a.out_proj.bias
    if m.mlp is not None:
        hid = layer_norm(x, m.norm2) @ m.mlp.fc1.weight.T + m.mlp.fc1.bias
        hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
        x = x + hid @ m.mlp.fc2.weight.T + m.mlp.fc2.bias
    return x


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    heads=st.sampled_from([1, 2, 4]),
    ctx_dim=st.sampled_from([None, 5, 12]),
    mlp_ratio=st.sampled_from([0, 2.0]),
)
def test_matches_formula_with_gradients(b, n, m, heads, ctx_dim, mlp_ratio):
    block = CrossAttentionBlock(4 * heads, heads, context_dim=ctx_dim, mlp_ratio=mlp_ratio, dtype=torch.float64)
    block = randomize_(block, std=0.4)
    x = rand(b, n, 4 * heads, seed=1).requires_grad_(True)
    ctx = rand(b, m, block.context_dim, seed=2).requires_grad_(True)
    out, ref = block(x, ctx), cross_reference(block, x, ctx)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    up = rand(*out.shape, seed=3)
    params = list(block.parameters())
    got = torch.autograd.grad(out, [x, ctx, *params], up)
    want = torch.autograd.grad(ref, [x, ctx, *params], up)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_attention_part_equals_torch_multihead_attention():
    block = randomize_(CrossAttentionBlock(16, 4, context_dim=10, mlp_ratio=0), std=0.4).eval()
    ref = torch.nn.MultiheadAttention(16, 4, kdim=10, vdim=10, batch_first=True).eval()
    a = block.cross_attn
    with torch.no_grad():
        ref.q_proj_weight.copy_(a.q_proj.weight)
        ref.k_proj_weight.copy_(a.k_proj.weight)
        ref.v_proj_weight.copy_(a.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref.out_proj.load_state_dict(a.out_proj.state_dict())
    x, ctx = torch.randn(3, 7, 16), torch.randn(3, 5, 10)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True], [True] + [False] * 4])
    with torch.no_grad():
        want = x + ref(block.norm1(x), *(2 * [block.norm_context(ctx)]), key_padding_mask=pad)[0]
        got = block(x, ctx, context_padding_mask=pad)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_padding_and_events():
    block = randomize_(CrossAttentionBlock(8, 2, dtype=torch.float64), std=0.4)
    x, ctx = rand(2, 3, 8), rand(2, 4, 8, seed=5)
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])
    torch.testing.assert_close(block(x, ctx, context_padding_mask=pad), cross_reference(block, x, ctx, pad))
    plain = block(x, ctx)
    with captured() as events:
        observed = block(x, ctx)
    assert torch.equal(plain, observed)
    assert [e.kind for e in events] == ["scaled_dot_product"]
    assert events[0].spec.query.shape == (2, 2, 3, 4) and events[0].spec.key.shape == (2, 2, 4, 4)


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CrossAttentionBlock(10, 4)
    with pytest.raises(ValueError, match="mlp_ratio"):
        CrossAttentionBlock(8, 2, mlp_ratio=-1)
    block = CrossAttentionBlock(8, 2, context_dim=6)
    with pytest.raises(ValueError, match="context with embed_dim 6"):
        block(torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="rank 3"):
        block(torch.randn(3, 8), torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match="batch size"):
        block(torch.randn(2, 3, 8), torch.randn(1, 3, 6))
