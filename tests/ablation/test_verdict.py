"""The verdict's arithmetic: lift, Student-t interval, relative lift, latency ratios and the roll-out rule."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from attnkit.ablation.convergence import History
from attnkit.ablation.results import AblationResult, VariantResult
from attnkit.ablation.verdict import decide


def _result(variants, threshold=0.10, seeds=(0, 1, 2)):
    return AblationResult("vision", "toy", "none", list(seeds), variants, threshold=threshold)


def test_arithmetic_against_scipy():
    base = VariantResult("none", [0.60, 0.62, 0.61], latency={1: 0.002, 64: 0.040})
    se = VariantResult("se", [0.70, 0.75, 0.69], latency={1: 0.003, 64: 0.050})
    (v,) = decide(_result([base, se])).variants
    diffs = [0.10, 0.13, 0.08]
    mean, sem = sum(diffs) / 3, stats.sem(diffs)
    lo, hi = stats.t.interval(0.95, 2, loc=mean, scale=sem)
    assert v.lift == pytest.approx(mean) and v.ci == pytest.approx((lo, hi))
    assert v.relative == pytest.approx(mean / 0.61) and v.relative_ci == pytest.approx((lo / 0.61, hi / 0.61))
    assert v.latency_ratio == pytest.approx({1: 1.5, 64: 1.25}) and v.latency_ms == pytest.approx({1: 3.0, 64: 50.0})
    assert v.roll_out and lo > 0  # +17.5% relative, CI [+0.04, +0.17] pp above 0


@pytest.mark.parametrize(
    ("scores", "threshold", "roll_out", "reason"),
    [
        ([0.84, 0.86, 0.85], 0.10, False, "+4.9% is below the +10% threshold"),  # 0.04 / 0.81
        ([0.84, 0.86, 0.85], 0.04, True, "+4.9% ≥ +4% and the CI is above 0"),
        ([0.70, 1.00, 0.98], 0.10, False, "+10.3% reaches the threshold but the CI includes 0"),  # one seed lost
        ([0.70, 0.71, 0.72], 0.0, False, "below the +0% threshold"),  # worse than the baseline
    ],
)
def test_rule(scores, threshold, roll_out, reason):
    base = VariantResult("none", [0.80, 0.81, 0.82])
    verdict = decide(_result([base, VariantResult("eca", scores)], threshold=threshold))
    (v,) = verdict.variants
    assert v.roll_out is roll_out and reason in v.reason
    assert verdict.recommended == ("eca" if roll_out else None)


def test_recommends_the_largest_passing_lift_and_names_unconverged_runs():
    def runs(*flags):
        return [History(train_loss=[1.0], val_score=[0.5], converged=f) for f in flags]

    variants = [
        VariantResult("none", [0.50, 0.52, 0.51], runs=runs(True, True, True)),
        VariantResult("se", [0.60, 0.63, 0.61], runs=runs(True, False, False)),
        VariantResult("single_head", [0.70, 0.71, 0.73], runs=runs(True, True, True)),
    ]
    result = _result(variants)
    verdict = result.verdict()
    assert verdict.recommended == "single_head" and [v.roll_out for v in verdict.variants] == [True, True]
    assert verdict.variants[0].not_converged == [1, 2] and variants[1].converged is False
    md = result.to_markdown()
    assert "**Roll out `single_head`**" in md and "**NOT converged** (seed 1, 2)" in md
    assert "`se` had not converged in seed(s) 1, 2" in md and "speed-of-learning effect" in md


def test_names_variants_that_did_not_learn():
    def runs(*stalled):
        return [History(train_loss=[1.0], val_score=[0.1], converged=True, stalled=s) for s in stalled]

    variants = [
        VariantResult("none", [0.90, 0.92, 0.91], runs=runs(False, False, False)),
        VariantResult("vit", [0.10, 0.10, 0.11], runs=runs(True, True, False)),
    ]
    result = _result(variants)
    (v,) = result.verdict().variants
    assert v.stalled == [0, 1] and not v.not_converged and not v.roll_out
    md = result.to_markdown()
    assert "**STALLED: did not learn** (seed 0, 1)" in md and "| `vit (stalled)` |" in md
    assert "`vit` did not learn in seed(s) 0, 1" in md and "failed training run" in md
    stuck = VariantResult("none", [0.1, 0.1, 0.1], runs=runs(True, True, True))
    base = _result([stuck, VariantResult("se", [0.9] * 3)])
    assert "The baseline `none` did not learn in seed(s) 0, 1, 2" in base.to_markdown()


def test_one_seed_and_errors():
    one = _result([VariantResult("none", [0.5]), VariantResult("se", [0.9])], seeds=(0,))
    (v,) = decide(one).variants
    assert not v.roll_out and "one seed" in v.reason and all(math.isnan(x) for x in v.ci)
    assert "| +40.00 | n/a | +80.0% | n/a |" in one.verdict().to_markdown()
    with pytest.raises(ValueError, match="baseline 'none' is not among the variants"):
        decide(AblationResult("vision", "t", "none", [0], [VariantResult("se", [0.5])]))
    (zero,) = decide(_result([VariantResult("none", [0.0, 0.0, 0.0]), VariantResult("se", [0.1, 0.2, 0.1])])).variants
    assert not zero.roll_out and "baseline scored 0" in zero.reason and math.isnan(zero.relative)
    with pytest.raises(ValueError, match="threshold >= 0"):
        decide(one, threshold=-1)
