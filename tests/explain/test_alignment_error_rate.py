"""alignment_error_rate against Och & Ney's formula written over Python sets of links."""

import pytest
import torch

from attnkit.explain.metrics import alignment_error_rate


def _links(pairs, shape=(3, 4)):
    m = torch.zeros(shape, dtype=torch.bool)
    for t, s in pairs:
        m[t, s] = True
    return m


def _aer_sets(a: set, s: set, p: set) -> float:
    """Och & Ney 2003, Eq. 4, on sets of (target, source) pairs."""
    return 1 - (len(a & s) + len(a & p)) / (len(a) + len(s))


def test_hand_computed_example():
    sure = {(0, 0), (1, 1)}
    possible = sure | {(1, 2)}
    hyp = {(0, 0), (1, 2), (2, 0)}  # one sure hit, two possible hits, one miss
    got = alignment_error_rate(_links(hyp), _links(sure), _links(possible))
    assert got.dtype == torch.float64 and got.shape == ()
    assert float(got) == pytest.approx(1 - (1 + 2) / (3 + 2))
    assert float(alignment_error_rate(_links(sure), _links(sure), _links(possible))) == 0.0
    assert float(alignment_error_rate(_links(sure | {(1, 2)}), _links(sure), _links(possible))) == 0.0
    assert float(alignment_error_rate(_links({(2, 3)}), _links(sure), _links(possible))) == 1.0


def test_random_links_match_the_set_formula_per_item_and_corpus():
    g = torch.Generator().manual_seed(0)
    b, t, s = 6, 5, 7
    sure = torch.rand(b, t, s, generator=g) < 0.15
    possible = sure | (torch.rand(b, t, s, generator=g) < 0.2)
    hyp = torch.rand(b, t, s, generator=g) < 0.25
    sets = [tuple({tuple(ix) for ix in m[i].nonzero().tolist()} for m in (hyp, sure, possible)) for i in range(b)]
    want = torch.tensor([_aer_sets(*x) for x in sets], dtype=torch.float64)
    torch.testing.assert_close(alignment_error_rate(hyp, sure, possible), want)
    union = [{(i, *ix) for i, x in enumerate(sets) for ix in x[k]} for k in range(3)]
    assert float(alignment_error_rate(hyp, sure, possible, reduction="corpus")) == pytest.approx(_aer_sets(*union))


def test_soft_maps_link_each_row_to_its_argmax():
    soft = torch.tensor(
        [
            [0.1, 0.7, 0.2, 0.0],  # -> (0, 1)
            [0.5, 0.0, 0.5, 0.0],  # tie -> the first maximum (1, 0)
            [0.0, 0.0, 0.0, 0.0],  # no weight -> no link
        ]
    )
    sure = _links({(0, 1), (1, 2)})
    got = alignment_error_rate(soft, sure)
    assert float(got) == pytest.approx(_aer_sets({(0, 1), (1, 0)}, {(0, 1), (1, 2)}, {(0, 1), (1, 2)}))
    # argmax per row is the same set of links as the bool matrix of those links
    assert float(alignment_error_rate(_links({(0, 1), (1, 0)}), sure)) == float(got)
    # no links and no sure links: nothing to align, scored 0 (not NaN)
    empty = torch.zeros(3, 4, dtype=torch.bool)
    assert float(alignment_error_rate(torch.zeros(3, 4), empty)) == 0.0


def test_bad_input():
    sure = _links({(0, 0)})
    with pytest.raises(ValueError, match="S ⊆ P"):
        alignment_error_rate(sure, sure, _links({(1, 1)}))
    with pytest.raises(TypeError, match="sure to be a bool"):
        alignment_error_rate(sure, sure.float())
    with pytest.raises(ValueError, match="one shape"):
        alignment_error_rate(sure[:2], sure)
    with pytest.raises(ValueError, match="finite"):
        alignment_error_rate(torch.full((3, 4), float("nan")), sure)
    with pytest.raises(ValueError, match="reduction"):
        alignment_error_rate(sure, sure, reduction="mean")
