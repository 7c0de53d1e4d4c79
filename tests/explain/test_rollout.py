"""rollout() against a direct implementation of Abnar & Zuidema (2020), Sec. 3, on random stochastic matrices."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.explain import rollout


def _stochastic(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(*shape, generator=g, dtype=torch.float64), -1)


def _paper(maps):
    """The formula written out per batch item in numpy: Â_l = norm(0.5·mean_h A_l + 0.5·I); R = Â_L ··· Â_1."""
    layers, batch, _, length, _ = maps.shape
    out = []
    for b in range(batch):
        r = np.eye(length)
        for layer in range(layers):
            a = maps[layer, b].numpy().mean(0)
            a_hat = 0.5 * a + 0.5 * np.eye(length)
            a_hat = a_hat / a_hat.sum(axis=1)[:, None]
            r = a_hat @ r
        out.append(r)
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize(("layers", "batch", "heads", "length"), [(1, 1, 1, 1), (3, 2, 4, 7), (6, 3, 5, 13)])
def test_rollout_equals_the_paper_formula(layers, batch, heads, length):
    maps = _stochastic(layers, batch, heads, length, length)
    got = rollout(list(maps))
    torch.testing.assert_close(got, _paper(maps), atol=1e-12, rtol=0)
    torch.testing.assert_close(rollout(maps), got)  # the stacked tensor form


def test_rows_that_do_not_sum_to_a_positive_total_are_left_as_the_paper_leaves_them():
    # signed maps (e.g. gradient-weighted): some rows of 0.5 mean + 0.5 I sum to 0 or less and are not normalised
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 2, 4, 6, 6, generator=g, dtype=torch.float64) - 0.6
    maps[1, 0, :, 2] = -1.0  # a row whose total is exactly 0 after the identity: 0.5 * -6 + 0.5 = -2.5 <= 0
    want = []
    for b in range(2):
        r = np.eye(6)
        for layer in range(3):
            a_hat = 0.5 * maps[layer, b].numpy().mean(0) + 0.5 * np.eye(6)
            total = a_hat.sum(axis=1)[:, None]
            r = (a_hat / np.where(total > 0, total, 1.0)) @ r
        want.append(r)
    assert (maps.mean(2) * 0.5 + 0.5 * torch.eye(6)).sum(-1).le(0).any()  # the case is exercised
    torch.testing.assert_close(rollout(maps), torch.from_numpy(np.stack(want)), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rollout(list(maps)), rollout(maps))


def test_layers_with_different_head_counts():
    maps = [_stochastic(2, h, 6, 6, seed=h) for h in (3, 1, 4)]
    fused = torch.stack([m.mean(1, keepdim=True) for m in maps])  # (layers, B, 1, L, L): the same rollout
    torch.testing.assert_close(rollout(maps), _paper(fused), atol=1e-12, rtol=0)


def test_layer_order_and_keepdim_normalisation_matter():
    maps = _stochastic(2, 1, 2, 5, 5, seed=1)
    got = rollout(maps)
    reversed_order = _paper(maps.flip(0))  # vit-explain issue #6: layers multiplied in the wrong order
    assert not torch.allclose(got, reversed_order, atol=1e-6)
    # Row normalisation without keepdim divides columns instead (vit-explain issue #16). With max fusion the
    # fused rows do not sum to 1, so normalisation matters: ours gives stochastic rows, the wrong one does not.
    got_max = rollout(maps, head_fusion="max")
    torch.testing.assert_close(got_max.sum(-1), torch.ones(1, 5, dtype=torch.float64))
    skewed = 0.5 * maps[0, 0].amax(0) + 0.5 * torch.eye(5, dtype=torch.float64)
    wrong = skewed / skewed.sum(-1)
    assert not torch.allclose(wrong.sum(-1), torch.ones(5, dtype=torch.float64))


def test_fusion_discard_and_no_residual():
    maps = _stochastic(2, 2, 3, 6, 6, seed=2)
    for fusion, op in (("max", lambda a: a.amax(1)), ("min", lambda a: a.amin(1))):
        r = None
        for a in maps:
            f = op(a)
            f = f / f.sum(-1, keepdim=True)
            r = f if r is None else f @ r
        torch.testing.assert_close(rollout(maps, head_fusion=fusion, residual=False), r)
    # discard_ratio=0.5 zeroes the 3 weakest of 6 keys of each fused row before the residual is added.
    fused = maps[0].mean(1)
    kept = fused.scatter(-1, fused.topk(3, -1, largest=False).indices, 0.0)
    a_hat = 0.5 * kept + 0.5 * torch.eye(6, dtype=torch.float64)
    a_hat = a_hat / a_hat.sum(-1, keepdim=True)
    torch.testing.assert_close(rollout(maps[:1], discard_ratio=0.5), a_hat)


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 4), length=st.integers(1, 9), heads=st.integers(1, 3))
def test_identity_maps_roll_out_to_identity_and_rows_sum_to_one(layers, length, heads):
    eye = torch.eye(length).expand(layers, 2, heads, length, length)
    torch.testing.assert_close(rollout(eye), torch.eye(length).expand(2, length, length))
    maps = _stochastic(layers, 2, heads, length, length, seed=length)
    torch.testing.assert_close(rollout(maps).sum(-1), torch.ones(2, length, dtype=torch.float64))


def test_errors():
    with pytest.raises(ValueError, match="mismatched token counts"):
        rollout([_stochastic(1, 2, 5, 5), _stochastic(1, 2, 6, 6)])
    with pytest.raises(ValueError, match="cross-attention"):
        rollout([_stochastic(1, 2, 5, 7)])
    with pytest.raises(ValueError, match="no attention maps"):
        rollout([])
    with pytest.raises(ValueError, match="head_fusion"):
        rollout([_stochastic(1, 1, 2, 2)], head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        rollout([_stochastic(1, 1, 2, 2)], discard_ratio=1.0)
    with pytest.raises(TypeError, match="tensors or AttentionRecords"):
        rollout([np.eye(2)])


def test_augment_adds_the_identity_at_each_row_s_own_position():
    from attnkit.explain.rollout import augment

    fused = torch.rand(2, 5, 5, dtype=torch.float64)
    eye = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    want = (0.5 * fused + 0.5 * eye) / (0.5 * fused + 0.5 * eye).sum(-1, keepdim=True)
    assert torch.equal(augment(fused), want)  # every row in order: exactly the paper's formula
    assert torch.equal(augment(fused, torch.arange(5)), want)
    rows = torch.tensor([3, 1])  # two rows of the map, at positions 3 and 1
    torch.testing.assert_close(augment(fused[:, [3, 1]], rows), want[:, [3, 1]], atol=1e-15, rtol=0)
    torch.testing.assert_close(augment(fused, residual=False), fused / fused.sum(-1, keepdim=True))
