"""MultiHeadAttention against torch.nn.MultiheadAttention (copied weights) and a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnkit
from attnkit.functional import observe
from attnkit.nn import MultiHeadAttention, RotaryEmbedding

# float32 vs nn.MultiheadAttention: the bound. float64 vs the float64 reference: rounding only.
TORCH_TOL = {"atol": 1e-6, "rtol": 1e-6}
F64_TOL = {"atol": 1e-10, "rtol": 1e-10}
BACKENDS = list(attnkit.backends.available())


def complex_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE as a complex product ``(x_{2i} + i x_{2i+1}) · e^{i m θ_i}`` (Su et al. 2021, Eqs. 13-16)."""
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones_like(theta), positions.to(torch.float64)[:, None] * theta)  # (L, D/2)
    xc = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (d // 2, 2)).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2)


def reference_mha(m: MultiHeadAttention, query, key, value, *, keep=None, is_causal=False):
    """Multi-head attention written from the definitions in float64: per-head projections, repeat_interleave
    for GQA, LayerNorm / RoPE / ALiBi as in the papers, an explicit softmax. ``keep``: bool (B, H, Lq, Lk)."""
    p = {k: v.detach().to(torch.float64) for k, v in m.state_dict().items()}
    query, key, value = (t.to(torch.float64) for t in (query, key, value))

    def proj(x, name, heads):
        y = x @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)
        return y.unflatten(-1, (heads, m.head_dim)).transpose(1, 2)

    q = proj(query, "q_proj", m.num_heads)
    k = proj(key, "k_proj", m.num_kv_heads)
    v = proj(value, "v_proj", m.num_kv_heads)
    if m.q_norm is not None:
        q = nn.functional.layer_norm(q, (m.head_dim,), p["q_norm.weight"], p["q_norm.bias"], m.q_norm.eps)
        k = nn.functional.layer_norm(k, (m.head_dim,), p["k_norm.weight"], p["k_norm.bias"], m.k_norm.eps)
    lq, lk = q.shape[-2], k.shape[-2]
    if m.rope is not None:
        q = complex_rope(q, torch.arange(lk - lq, lk), m.rope.base)
        k = complex_rope(k, torch.arange(lk), m.rope.base)
    group = m.num_heads // m.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.mT / math.sqrt(m.head_dim)
    i = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    if m.alibi_slopes is not None:
        scores = scores - m.alibi_slopes.to(torch.float64)[:, None, None] * (i - j).abs()
    allowed = torch.ones(scores.shape, dtype=torch.bool)
    if keep is not None:
        allowed = allowed & keep
    if is_causal:
        allowed = allowed & (j <= i)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty rows -> 0
    out = (probs @ v).transpose(1, 2).flatten(-2)
    out = out @ p["out_proj.weight"].T + p.get("out_proj.bias", 0.0)
    return out, probs


def torch_pair(embed_dim=24, num_heads=4, kdim=None, vdim=None, bias=True, batch_first=True):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(embed_dim, num_heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
    with torch.no_grad():  # non-zero biases so that a lost bias is detected
        for param in ref.parameters():
            param.normal_(0.0, 0.3)
    return ref.eval(), MultiHeadAttention.from_torch(ref).eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", [(None, None), (10, 14)])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "kpm", "bool+kpm", "per_head"])
def test_matches_nn_multihead_attention(batch_first, bias, dims, mask):
    kdim, vdim = dims
    ref, ours = torch_pair(kdim=kdim, vdim=vdim, bias=bias, batch_first=batch_first)
    b, lq, lk, h = 3, 5, 7, 4
    g = torch.Generator().manual_seed(1)
    query = torch.randn(b, lq, 24, generator=g)
    key = torch.randn(b, lk, kdim or 24, generator=g)
    value = torch.randn(b, lk, vdim or 24, generator=g)
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    disallow = torch.rand(lq, lk, generator=g) < 0.3
    disallow[:, 0] = False  # keep every row non-empty: nn.MultiheadAttention gives NaN for empty rows
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2, 1:3] = True
    torch_kwargs, our_kwargs = {}, {}
    if mask in ("bool", "bool+kpm"):
        torch_kwargs["attn_mask"], our_kwargs["attn_mask"] = disallow, ~disallow  # opposite bool conventions
    if mask == "float":
        float_mask = torch.randn(lq, lk, generator=g)
        torch_kwargs["attn_mask"] = our_kwargs["attn_mask"] = float_mask
    if mask == "per_head":
        float_mask = torch.randn(b * h, lq, lk, generator=g)
        torch_kwargs["attn_mask"] = our_kwargs["attn_mask"] = float_mask
    if mask in ("kpm", "bool+kpm"):
        torch_kwargs["key_padding_mask"] = our_kwargs["key_padding_mask"] = kpm
    with torch.no_grad():
        expected, expected_w = ref(query, key, value, need_weights=True, **torch_kwargs)
        out, weights = ours(query, key, value, need_weights=True, **our_kwargs)
        out_only, none = ours(query, key, value, **our_kwargs)
    torch.testing.assert_close(out, expected, **TORCH_TOL)
    torch.testing.assert_close(weights.mean(1), expected_w, **TORCH_TOL)  # torch averages over heads
    torch.testing.assert_close(out_only, expected, **TORCH_TOL)
    assert none is None


def test_unbatched_input_matches_batched():
    ref, ours = torch_pair()
    x = torch.randn(6, 24)
    kpm = torch.tensor([False, False, True, False, True, False])
    with torch.no_grad():
        out, w = ours(x, key_padding_mask=kpm, need_weights=True)
        expected, expected_w = ref(x, x, x, key_padding_mask=kpm)
        batched, _ = ours(x[None], key_padding_mask=kpm[None])
    torch.testing.assert_close(out, expected, **TORCH_TOL)
    torch.testing.assert_close(w.mean(0), expected_w, **TORCH_TOL)
    torch.testing.assert_close(out, batched[0], **TORCH_TOL)


@pytest.mark.parametrize("dims", [(None, None), (10, 14)])
def test_to_torch_round_trip(dims):
    torch.manual_seed(3)
    ours = MultiHeadAttention(24, 3, kdim=dims[0], vdim=dims[1], dropout=0.25).eval()
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0.0, 0.3)
    ref = ours.to_torch()
    assert ref.dropout == 0.25 and ref.batch_first and not ref.training
    back = MultiHeadAttention.from_torch(ref)
    query, key, value = (
        torch.randn(2, 4, 24),
        torch.randn(2, 5, dims[0] or 24),
        torch.randn(2, 5, dims[1] or 24),
    )
    with torch.no_grad():
        expected, _ = ref(query, key, value)
        torch.testing.assert_close(ours(query, key, value)[0], expected, **TORCH_TOL)
        torch.testing.assert_close(back(query, key, value)[0], expected, **TORCH_TOL)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = MultiHeadAttention(32, 8, num_kv_heads=2, qk_norm=True, alibi=True).eval()
    b = MultiHeadAttention(32, 8, num_kv_heads=2, qk_norm=True, alibi=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x)[0], b(x)[0], atol=0, rtol=0)
    assert "alibi_slopes" not in a.state_dict()  # derived from num_heads, not a checkpoint entry


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    q_len=st.integers(1, 9),
    extra_keys=st.integers(0, 6),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1), (6, 3)]),
    head_dim=st.sampled_from([2, 6, 8]),
    qk_norm=st.booleans(),
    rope=st.booleans(),
    alibi=st.booleans(),
    is_causal=st.booleans(),
    mask_seed=st.one_of(st.none(), st.integers(0, 2**16)),
    backend=st.sampled_from(BACKENDS),
)
def test_float64_reference_fuzzed(
    batch, q_len, extra_keys, heads, head_dim, qk_norm, rope, alibi, is_causal, mask_seed, backend
):
    num_heads, num_kv_heads = heads
    embed_dim = num_heads * head_dim
    kv_len = q_len + extra_keys
    torch.manual_seed(0)
    m = MultiHeadAttention(
        embed_dim,
        num_heads,
        num_kv_heads=num_kv_heads,
        qk_norm=qk_norm,
        rope=RotaryEmbedding(head_dim) if rope else None,
        alibi=alibi,
        backend=backend,
        dtype=torch.float64,
    ).eval()
    with torch.no_grad():
        for param in m.parameters():
            param.normal_(0.0, 0.5)
    query = torch.randn(batch, q_len, embed_dim, dtype=torch.float64)
    key = torch.randn(batch, kv_len, embed_dim, dtype=torch.float64)
    value = torch.randn(batch, kv_len, embed_dim, dtype=torch.float64)
    keep = None
    if mask_seed is not None:
        g = torch.Generator().manual_seed(mask_seed)
        keep = torch.rand(batch, 1, q_len, kv_len, generator=g) < 0.6  # some rows may be empty
    expected, expected_p = reference_mha(m, query, key, value, keep=keep, is_causal=is_causal)
    with torch.no_grad():
        out, _ = m(query, key, value, attn_mask=keep, is_causal=is_causal)
        m.backend = backend if "return_weights" in attnkit.backends.available()[backend].options else "auto"
        out_w, weights = m(query, key, value, attn_mask=keep, is_causal=is_causal, need_weights=True)
    torch.testing.assert_close(out, expected, **F64_TOL)
    torch.testing.assert_close(out_w, expected, **F64_TOL)
    torch.testing.assert_close(weights, expected_p, **F64_TOL)


def test_gqa_equals_repeated_kv_heads():
    """GQA with Hkv heads == full MHA whose key/value projections repeat each kv head H/Hkv times."""
    torch.manual_seed(0)
    gqa = MultiHeadAttention(24, 6, num_kv_heads=2).eval()
    full = MultiHeadAttention(24, 6).eval()
    with torch.no_grad():
        full.q_proj.load_state_dict(gqa.q_proj.state_dict())
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            src, dst = getattr(gqa, name), getattr(full, name)
            dst.weight.copy_(src.weight.unflatten(0, (2, 4)).repeat_interleave(3, dim=0).flatten(0, 1))
            dst.bias.copy_(src.bias.unflatten(0, (2, 4)).repeat_interleave(3, dim=0).flatten())
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x, is_causal=True)[0], full(x, is_causal=True)[0], atol=1e-6, rtol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 9, 16)
    m.eval()
    with torch.no_grad():
        a, b = m(x)[0], m(x)[0]
        m.dropout = 0.0
        no_drop = m(x)[0]
        m.dropout = 0.5
        m.train()
        torch.manual_seed(1)
        dropped = m(x)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, no_drop, atol=0, rtol=0)
    assert (dropped - a).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_call_goes_through_attnkit_attention(backend):
    m = MultiHeadAttention(16, 4, num_kv_heads=2, backend=backend).eval()
    events = []
    with observe.observer(events.append), torch.no_grad():
        m(torch.randn(2, 3, 16), torch.randn(2, 5, 16))
    assert len(events) == 1 and events[0].kind == "scaled_dot_product"
    assert events[0].spec.query.shape == (2, 4, 3, 4) and events[0].spec.key.shape == (2, 2, 5, 4)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"embed_dim \(E=30\) to be a multiple of num_heads \(H=4\).*1, 2, 3, 5"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match=r"num_heads \(H=6\) to be a multiple of num_kv_heads \(Hkv=4\)"):
        MultiHeadAttention(24, 6, num_kv_heads=4)
    with pytest.raises(ValueError, match="num_heads to be a positive int, got 0"):
        MultiHeadAttention(24, 0)
    with pytest.raises(ValueError, match="dropout in"):
        MultiHeadAttention(24, 4, dropout=1.0)
    with pytest.raises(ValueError, match=r"rope\.head_dim=8 must equal head_dim"):
        MultiHeadAttention(24, 4, rope=RotaryEmbedding(8))
    with pytest.raises(TypeError, match="RotaryEmbedding"):
        MultiHeadAttention(24, 4, rope=object())


def test_forward_errors():
    m = MultiHeadAttention(24, 4, kdim=10)
    with pytest.raises(ValueError, match=r"expected query of shape \(B, L, width\) with width=24, got \(2, 3, 20\)"):
        m(torch.randn(2, 3, 20), torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match="expected key"):
        m(torch.randn(2, 3, 24), torch.randn(2, 3, 24))
    with pytest.raises(ValueError, match="share the batch size"):
        m(torch.randn(2, 3, 24), torch.randn(3, 3, 10), torch.randn(3, 3, 24))
    with pytest.raises(TypeError, match="expected query to be a tensor"):
        m([1.0, 2.0])
    with pytest.raises(ValueError, match="does not broadcast"):
        m(
            torch.randn(2, 3, 24),
            torch.randn(2, 5, 10),
            torch.randn(2, 5, 24),
            attn_mask=torch.ones(3, 4).bool(),
        )


def test_conversion_errors():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(TypeError, match=r"expected an nn\.MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_kv_heads != num_heads, qk_norm"):
        MultiHeadAttention(8, 2, num_kv_heads=1, qk_norm=True).to_torch()
