"""AdditiveAttention (Bahdanau 2015) and LuongAttention (Luong 2015) against loops over their equations in
float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.functional import observe
from attnkit.nn import AdditiveAttention, LuongAttention

F64_TOL = {"atol": 1e-12, "rtol": 1e-10}


def loop_reference(score_fn, query, key, value, keep):
    """``a_ij = softmax_j(score(q_i, k_j))`` over the allowed keys, one pair at a time; empty rows give 0."""
    b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
    weights = torch.zeros(b, lq, lk, dtype=torch.float64)
    for n in range(b):
        for i in range(lq):
            allowed = [j for j in range(lk) if keep is None or bool(keep[n, i, j])]
            if not allowed:
                continue
            scores = torch.stack([score_fn(query[n, i], key[n, j]) for j in allowed])
            weights[n, i, allowed] = torch.softmax(scores, dim=0)
    return weights @ value, weights


def additive_score(m: AdditiveAttention):
    w, u, v = m.query_proj.weight, m.key_proj.weight, m.score_proj.weight[0]
    bias = m.key_proj.bias if m.key_proj.bias is not None else 0.0
    return lambda s, h: v @ torch.tanh(w @ s + u @ h + bias)  # Bahdanau et al. 2015, Eq. 6 / A.1.2


def luong_score(m: LuongAttention):
    if m.score == "dot":
        return lambda ht, hs: ht @ hs  # Luong et al. 2015, Eq. 8
    if m.score == "general":
        return lambda ht, hs: ht @ m.w_a.weight @ hs
    return lambda ht, hs: m.v_a.weight[0] @ torch.tanh(m.w_a.weight @ torch.cat([ht, hs]))


def make(kind: str, query_dim: int, key_dim: int):
    torch.manual_seed(0)
    if kind == "additive":
        m = AdditiveAttention(query_dim, key_dim, 7, bias=True, dtype=torch.float64)
        return m, additive_score(m)
    m = LuongAttention(query_dim, key_dim, score=kind, hidden_dim=5, dtype=torch.float64)
    return m, luong_score(m)


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(["additive", "dot", "general", "concat"]),
    batch=st.integers(1, 3),
    q_len=st.integers(1, 5),
    k_len=st.integers(1, 6),
    value_dim=st.integers(1, 4),
    mask_seed=st.one_of(st.none(), st.integers(0, 1000)),
)
def test_matches_equations(kind, batch, q_len, k_len, value_dim, mask_seed):
    query_dim, key_dim = 6, (6 if kind == "dot" else 4)
    m, score = make(kind, query_dim, key_dim)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(batch, q_len, query_dim, generator=g, dtype=torch.float64)
    key = torch.randn(batch, k_len, key_dim, generator=g, dtype=torch.float64)
    value = torch.randn(batch, k_len, value_dim, generator=g, dtype=torch.float64)
    keep = None
    if mask_seed is not None:
        keep = torch.rand(batch, q_len, k_len, generator=torch.Generator().manual_seed(mask_seed)) < 0.6
    with torch.no_grad():
        context, weights = m(query, key, value, attn_mask=keep)
        expected_context, expected_weights = loop_reference(score, query, key, value, keep)
    torch.testing.assert_close(weights, expected_weights, **F64_TOL)
    torch.testing.assert_close(context, expected_context, **F64_TOL)
    sums = weights.sum(-1)
    nonempty = keep.any(-1) if keep is not None else torch.ones_like(sums, dtype=torch.bool)
    torch.testing.assert_close(sums[nonempty], torch.ones_like(sums[nonempty]))
    assert sums[~nonempty].eq(0).all() and context[~nonempty].eq(0).all()


@pytest.mark.parametrize("kind", ["additive", "dot", "general", "concat"])
def test_key_mask_float_equals_bool_and_value_defaults_to_key(kind):
    m, _ = make(kind, 6, 6)
    query, key = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    lengths_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, :]  # (B, 1, Lk)
    float_mask = torch.zeros(2, 1, 5, dtype=torch.float64).masked_fill(~lengths_mask, float("-inf"))
    with torch.no_grad():
        c_bool, w_bool = m(query, key, attn_mask=lengths_mask)
        c_float, w_float = m(query, key, key, attn_mask=float_mask)
    torch.testing.assert_close(c_bool, c_float, **F64_TOL)
    torch.testing.assert_close(w_bool, w_float, **F64_TOL)
    assert w_bool[0, :, 3:].eq(0).all()


@pytest.mark.parametrize(
    ("kind", "event_kind"), [("additive", "token"), ("concat", "token"), ("general", "scaled_dot_product")]
)
def test_alignment_is_announced_to_observers(kind, event_kind):
    m, _ = make(kind, 6, 6)
    events = []
    with observe.observer(events.append), torch.no_grad():
        _, weights = m(torch.randn(1, 2, 6, dtype=torch.float64), torch.randn(1, 3, 6, dtype=torch.float64))
    assert [e.kind for e in events] == [event_kind]
    if event_kind == "token":
        torch.testing.assert_close(events[0].weights, weights.unsqueeze(1))


def test_errors():
    with pytest.raises(ValueError, match="unknown score 'bilinear'; valid: 'dot', 'general', 'concat'"):
        LuongAttention(4, score="bilinear")
    with pytest.raises(ValueError, match="score='dot' needs query_dim == key_dim, got 4 and 3"):
        LuongAttention(4, 3, score="dot")
    with pytest.raises(ValueError, match="hidden_dim to be a positive int"):
        AdditiveAttention(4, 3, 0)
    m = AdditiveAttention(4, 3)
    with pytest.raises(ValueError, match=r"expected query \(B, Lq, 4\) and key \(B, Lk, 3\)"):
        m(torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="expected value of shape"):
        m(torch.randn(1, 2, 4), torch.randn(1, 2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        m(torch.randn(1, 2, 4), torch.randn(1, 5, 3), attn_mask=torch.ones(1, 2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be a bool"):
        m(torch.randn(1, 2, 4), torch.randn(1, 5, 3), attn_mask=torch.ones(1, 2, 5, dtype=torch.int64))
