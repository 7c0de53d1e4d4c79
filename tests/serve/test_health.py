"""Attention-health statistics on maps with known answers, and drift detection."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.serve.health import STATISTICS, drift, request_stats


def test_uniform_maps():
    layers, heads, n = 3, 2, 5
    maps = torch.full((layers, heads, n, n), 1.0 / n)
    stats = request_stats(maps, sinks=[0], summary_row=0, confidence=0.7)
    assert set(stats) == set(STATISTICS)
    assert stats["head_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert stats["sink_mass"] == pytest.approx(1.0 / n, abs=1e-6)
    assert stats["rollout_concentration"] == pytest.approx(0.0, abs=1e-6)  # the product of uniform maps is uniform
    assert stats["confidence"] == 0.7


def test_one_hot_maps_on_a_sink():
    layers, heads, n = 2, 3, 6
    maps = torch.zeros(layers, heads, n, n)
    maps[..., 0] = 1.0  # every query on token 0
    stats = request_stats(maps, sinks=[0], summary_row=0, confidence=0.9)
    assert stats["head_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert stats["sink_mass"] == pytest.approx(1.0, abs=1e-6)


def test_concentrated_rollout():
    n = 4
    maps = torch.zeros(1, 1, n, n)
    maps[0, 0, :, 2] = 1.0  # all attention on content token 2
    stats = request_stats(maps, sinks=[0], summary_row=0, confidence=0.5)
    # rollout row of token 0: 0.5 on itself (residual), 0.5 on token 2; over content tokens {1, 2, 3} all on 2
    assert stats["rollout_concentration"] == pytest.approx(1.0, abs=1e-6)


def test_drift_flags_a_shift_and_not_the_same_distribution():
    gen = torch.Generator().manual_seed(0)
    ref = {name: torch.rand(200, generator=gen).tolist() for name in STATISTICS}
    same = {name: torch.rand(200, generator=gen).tolist() for name in STATISTICS}
    shifted = {name: (torch.rand(200, generator=gen) * 0.5 + 0.5).tolist() for name in STATISTICS}
    assert not any(d.flagged for d in drift(ref, same))
    flagged = drift(ref, shifted)
    assert all(d.flagged for d in flagged)
    assert all(d.shift > 0.5 and d.p_value < 1e-6 for d in flagged)
    few = drift(ref, {k: v[:5] for k, v in shifted.items()})
    assert not any(d.flagged for d in few) and all(math.isnan(d.p_value) for d in few)


def test_a_given_rollout_row_is_used_as_is():
    gen = torch.Generator().manual_seed(1)
    maps = torch.rand(2, 3, 5, 5, generator=gen).softmax(-1)
    from attnkit.explain import rollout

    row = rollout(maps[:, None])[0, 0]
    assert request_stats(maps, [0], 0, 0.5, rollout_row=row) == request_stats(maps, [0], 0, 0.5)
