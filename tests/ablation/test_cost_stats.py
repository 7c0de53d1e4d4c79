"""Cost counting (parameters, MACs, interleaved latency) and the paired statistics over seeds."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

import attnkit
from attnkit.ablation.cost import count_macs, count_parameters, interleaved_latency
from attnkit.ablation.stats import mean_std, paired_lift


def test_macs_of_linear_conv_and_attention():
    linear = nn.Linear(8, 4)
    assert count_macs(lambda: linear(torch.zeros(3, 8))) == 3 * 8 * 4
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=False)
    assert count_macs(lambda: conv(torch.zeros(1, 2, 6, 7))) == 5 * 6 * 7 * 2 * 9
    b, h, lq, s, d = 2, 3, 5, 7, 8
    q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    # attnkit.attention reaches the CPU flash kernel that torch's counter does not know; counted here
    assert count_macs(lambda: attnkit.attention(q, k, v)) == b * h * lq * s * (d + d)
    assert count_macs(lambda: attnkit.attention(q, k, v, backend="math")) == b * h * lq * s * (d + d)


def test_parameters_counted_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared, nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    assert count_parameters(model) == 20 + 8


def test_interleaved_latency():
    calls = []
    times = interleaved_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == ["a", "b"] * 4  # round-robin
    with pytest.raises(ValueError, match="rounds"):
        interleaved_latency({"a": lambda: None}, rounds=0)


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_paired_lift_matches_scipy():
    variant, baseline = [0.91, 0.95, 0.90, 0.97], [0.90, 0.91, 0.89, 0.92]
    lift = paired_lift(variant, baseline)
    assert lift.mean == pytest.approx(0.0275) and lift.n == 4
    assert lift.p_value == pytest.approx(stats.ttest_rel(variant, baseline).pvalue)
    assert lift.note().startswith(f"p={lift.p_value:.2g} (paired t, n=4)")


def test_paired_lift_verdicts():
    assert paired_lift([0.9, 0.92, 0.91], [0.8, 0.83, 0.8]).note().endswith(": better")
    assert paired_lift([0.8, 0.83, 0.8], [0.9, 0.92, 0.91]).note().endswith(": worse")
    assert paired_lift([0.8, 0.9, 0.7], [0.85, 0.8, 0.8]).note().endswith("no significant difference")
    same = paired_lift([0.5, 0.6], [0.5, 0.6])
    assert math.isnan(same.p_value) and "identical" in same.note()
    shifted = paired_lift([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # the same non-zero difference on every seed
    assert shifted.p_value == 0.0
    assert "untestable" in paired_lift([0.9], [0.8]).note()
    with pytest.raises(ValueError, match="equal"):
        paired_lift([0.1], [0.1, 0.2])
