"""BlockMask layouts: element masks equal the dense definitions, block tables keep the skip/unmask invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import sparse


def _check_invariants(mask: sparse.BlockMask) -> None:
    """visited ⊇ blocks with an allowed pair; full ⊆ blocks whose (in-range) pairs are all allowed."""
    exact = sparse.BlockMask.from_mask_mod(mask.mask_mod, mask.q_len, mask.kv_len, block_size=mask.block_size)
    assert torch.all(mask.visited | ~exact.visited), "a block with allowed pairs is not visited"
    assert torch.all(exact.full | ~mask.full), "a block marked full has masked pairs"


@settings(max_examples=30, deadline=None)
@given(
    lq=st.integers(1, 40),
    lk=st.integers(1, 40),
    bs=st.integers(1, 9),
    left=st.integers(-1, 12),
    right=st.integers(-1, 12),
    causal=st.booleans(),
)
def test_sliding_window_equals_dense_mask(lq, lk, bs, left, right, causal):
    mask = sparse.sliding_window(lq, lk, (left, right), is_causal=causal, block_size=bs)
    dense = attnkit.masks.sliding_window(lq, lk, (left, right))
    if causal:
        dense = dense & attnkit.masks.causal(lq, lk)
    assert torch.equal(mask.to_dense(), dense)
    _check_invariants(mask)
    exact = sparse.BlockMask.from_mask_mod(mask.mask_mod, lq, lk, block_size=bs)
    assert torch.equal(mask.visited, exact.visited)  # the analytic layout is tight


@settings(max_examples=20, deadline=None)
@given(lens=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda x: sum(x) > 0), bs=st.integers(1, 6))
def test_document_equals_block_diagonal(lens, bs):
    mask = sparse.document(lens, block_size=bs)
    assert torch.equal(mask.to_dense(), attnkit.masks.block_diagonal(lens))
    _check_invariants(mask)
    causal = sparse.document(lens, is_causal=True, block_size=bs)
    assert torch.equal(causal.to_dense(), attnkit.masks.block_diagonal(lens, is_causal=True))


def test_longformer_global_and_bigbird():
    L = 50
    mask = sparse.longformer(L, 4, [0, 30], block_size=8)
    i, j = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    glob = torch.zeros(L, dtype=torch.bool)
    glob[[0, 30]] = True
    expected = ((i - j).abs() <= 4) | glob[i] | glob[j]
    assert torch.equal(mask.to_dense(), expected)
    _check_invariants(mask)
    bb = sparse.bigbird(L, block_size=5, num_window_blocks=3, num_global_blocks=1, num_random_blocks=2, seed=1)
    _check_invariants(bb)
    nb = 10
    assert bb.visited[0].all() and bb.visited[:, 0].all()  # global block
    assert all(bb.visited[r, max(0, r - 1) : r + 2].all() for r in range(nb))  # window blocks
    assert int(bb.visited[1:].sum(1).min()) >= 1 + 3 + 2 - 1  # global + window + random (edges have 2 window)
    again = sparse.bigbird(L, block_size=5, num_window_blocks=3, num_global_blocks=1, num_random_blocks=2, seed=1)
    assert torch.equal(bb.visited, again.visited)  # reproducible


def test_density_combination_and_repr():
    mask = sparse.causal(256, block_size=64)
    assert mask.density() == pytest.approx(10 / 16)
    both = mask & sparse.sliding_window(256, window_size=64, block_size=64)
    assert torch.equal(both.to_dense(), attnkit.masks.causal(256) & attnkit.masks.sliding_window(256, 256, 64))
    either = sparse.causal(256, block_size=64) | sparse.global_tokens(256, 1, block_size=64)
    assert either.to_dense()[0].all() and either.density() > mask.density()
    assert "density=0.6250" in repr(mask)
    dense = torch.rand(37, 23, generator=torch.Generator().manual_seed(0)) < 0.1
    assert torch.equal(sparse.BlockMask.from_dense(dense, block_size=8).to_dense(), dense)


def test_bad_layouts_raise_clear_errors():
    with pytest.raises(ValueError, match=r"query block 1 lists key blocks \[4\] outside \[0, 3\)"):
        sparse.BlockMask.from_layout([[0], [4], [1]], 10, 10, block_size=4)
    with pytest.raises(ValueError, match=r"expected 3 rows of key blocks"):
        sparse.BlockMask.from_layout([[0]], 10, 10, block_size=4)
    with pytest.raises(ValueError, match=r"bool layout of shape \(3, 3\)"):
        sparse.BlockMask.from_layout(torch.ones(2, 3, dtype=torch.bool), 10, 10, block_size=4)
    with pytest.raises(ValueError, match=r"differ in \(Lq, Lk, block_size\)"):
        sparse.causal(16) & sparse.causal(32)
    with pytest.raises(ValueError, match=r"positive int"):
        sparse.causal(16, block_size=0)
    with pytest.raises(TypeError, match=r"mask_mod must take 4 positional arguments"):
        sparse.BlockMask.from_mask_mod(lambda q, k: q >= k, 8, 8)
    with pytest.raises(TypeError, match=r"must return a bool tensor"):
        sparse.BlockMask.from_mask_mod(lambda b, h, q, k: q - k, 8, 8)
    with pytest.raises(ValueError, match=r"outside \[0, 8\)"):
        sparse.global_tokens(8, [9])
