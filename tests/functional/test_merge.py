"""``merge_into``: the in-place accumulator form of the log-sum-exp merge, against attention over the union
(float64 math reference) and against ``merge_attention``."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnkit
from attnkit.functional.merge import merge_attention, merge_into


def _parts(q, k, v, mask, cuts):
    for a, b in itertools.pairwise(cuts):
        res = attnkit.attention(
            q, k[..., a:b, :], v[..., a:b, :], attn_mask=mask[..., a:b], return_lse=True, backend="math"
        )
        yield res.output, res.lse


@pytest.mark.parametrize(
    ("dtype", "part_dtype", "tol"),
    [
        (torch.float64, torch.float64, 1e-12),
        (torch.float32, torch.float32, 1e-6),
        (torch.float32, torch.bfloat16, 1e-2),  # parts rounded to bfloat16, accumulated in float32
    ],
)
def test_merge_into_equals_attention_over_the_union(dtype, part_dtype, tol):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64) for n in (5, 23, 23))
    out = torch.zeros(2, 3, 5, 8, dtype=dtype)
    lse = torch.full((2, 3, 5), float("-inf"), dtype=dtype)
    # a bottom-right causal mask: the first parts have rows with no key, which must not become NaN
    mask = torch.ones(5, 23, dtype=torch.bool).tril(18)
    parts = list(_parts(q, k, v, mask, [0, 19, 20, 23]))
    for o, part_lse in parts:
        merge_into(out, lse, o.to(part_dtype), part_lse.to(dtype))
    ref = attnkit.attention(q, k, v, attn_mask=mask, return_lse=True, backend="math")
    torch.testing.assert_close(out, ref.output.to(dtype), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref.lse.to(dtype), atol=tol, rtol=tol)
    if part_dtype == dtype:
        want_out, want_lse = merge_attention([o.to(dtype) for o, _ in parts], [x.to(dtype) for _, x in parts])
        torch.testing.assert_close(out, want_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, want_lse, atol=tol, rtol=tol)


def test_merge_into_keeps_empty_rows_at_zero_and_minus_inf():
    out, lse = torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3), float("-inf"))
    merge_into(out, lse, torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3), float("-inf")))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_merge_into_errors():
    out, lse = torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3), float("-inf"))
    with pytest.raises(ValueError, match="float32/float64 accumulators"):
        merge_into(out.half(), lse.half(), out, lse)
    with pytest.raises(ValueError, match="part output"):
        merge_into(out, lse, torch.zeros(1, 2, 4, 4), lse)
