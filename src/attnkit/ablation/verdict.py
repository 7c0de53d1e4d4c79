"""The decision an ablation is run for: roll attention out, or not, against a lift threshold the user sets.

For every variant against the baseline: the lift (mean over seeds of the paired difference, as
:func:`attnkit.ablation.stats.paired_lift`) with its Student-t confidence interval (:meth:`Lift.ci`), the same as a
*relative* lift (divided by the baseline's mean score, taken as fixed), and the latency cost at each timed batch
size (ratio to the baseline). Decision rule: **roll out** when the relative lift reaches the threshold (default 10%)
*and* the confidence interval of the lift lies above 0 (the lift is not seed noise); otherwise **do not roll out**.
With one seed there is no interval, and with a baseline scoring 0 no relative lift, so the rule cannot say roll out.

Runs that had not converged (:mod:`attnkit.ablation.convergence`) do not change the arithmetic but are named in the
verdict: a difference between runs that were still improving may be one of speed of learning, not of final
accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from attnkit.ablation.stats import mean_std

if TYPE_CHECKING:
    from attnkit.ablation.results import AblationResult

__all__ = ["DEFAULT_THRESHOLD", "VariantVerdict", "Verdict", "decide"]

#: The relative lift (fraction of the baseline's score) that justifies rolling attention out, by default.
DEFAULT_THRESHOLD = 0.10


@dataclass(frozen=True)
class VariantVerdict:
    """One variant against the baseline.

    Attributes:
        name: the variant.
        lift: mean paired difference to the baseline (score units, e.g. accuracy fraction).
        ci: ``(low, high)`` confidence interval of ``lift`` (``nan`` with one seed).
        relative: ``lift / baseline mean``.
        relative_ci: ``ci / baseline mean``.
        latency_ratio: batch size -> variant latency / baseline latency.
        latency_ms: batch size -> variant latency in milliseconds.
        roll_out: the decision.
        reason: why, in one sentence.
        not_converged: seeds of this variant whose runs had not converged.
        stalled: seeds of this variant whose runs never improved on their first epoch (did not learn).
    """

    name: str
    lift: float
    ci: tuple[float, float]
    relative: float
    relative_ci: tuple[float, float]
    latency_ratio: dict[int, float]
    latency_ms: dict[int, float]
    roll_out: bool
    reason: str
    not_converged: list[int] = field(default_factory=list)
    stalled: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """The ablation's decision.

    Attributes:
        baseline: the variant without attention.
        threshold: the relative lift required.
        confidence: the confidence level of the intervals.
        variants: one :class:`VariantVerdict` per other variant, in report order.
        baseline_not_converged: seeds whose baseline run had not converged.
        baseline_stalled: seeds whose baseline run never improved on its first epoch.
        recommended: the variant to roll out (largest lift among those that pass), or ``None``.
    """

    baseline: str
    threshold: float
    confidence: float
    variants: list[VariantVerdict]
    baseline_not_converged: list[int] = field(default_factory=list)
    baseline_stalled: list[int] = field(default_factory=list)
    recommended: str | None = None

    def title(self) -> str:
        """``"Verdict: roll out attention? (threshold: ...)"``."""
        return (
            f"Verdict: roll out attention? (threshold: +{100 * self.threshold:g}% relative lift over "
            f"`{self.baseline}`, {100 * self.confidence:g}% CI above 0)"
        )

    def decision(self) -> str:
        """The one-line decision."""
        if self.recommended is None:
            return f"**Do not roll out**: no variant reached +{100 * self.threshold:g}% with its CI above 0."
        return f"**Roll out `{self.recommended}`** (the largest lift among the variants that pass)."

    def cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the per-variant table: lift and CI (points and relative), latency, decision."""
        conf = f"{100 * self.confidence:g}%"
        batches = sorted({b for v in self.variants for b in v.latency_ratio})
        head = ["variant", "lift (pp)", f"{conf} CI (pp)", "relative lift", f"{conf} CI (relative)"]
        head += [f"latency b{b}" for b in batches] + ["decision"]
        rows = []
        for v in self.variants:
            cells = [
                v.name + (" (not converged)" if v.not_converged else "") + (" (stalled)" if v.stalled else ""),
                f"{100 * v.lift:+.2f}",
                _interval(v.ci, 100, "{:+.2f}"),
                "n/a" if math.isnan(v.relative) else f"{100 * v.relative:+.1f}%",
                _interval(v.relative_ci, 100, "{:+.1f}%"),
            ]
            cells += [
                f"{v.latency_ms[b]:.2f} ms (x{v.latency_ratio[b]:.2f})" if b in v.latency_ratio else "" for b in batches
            ]
            cells.append(("roll out" if v.roll_out else "do not roll out") + f": {v.reason}")
            rows.append(cells)
        return head, rows

    def to_markdown(self) -> str:
        """The verdict section: the decision, one row per variant, and the convergence caveats."""
        head, rows = self.cells()
        lines = [f"### {self.title()}", "", self.decision(), ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([f"`{r[0]}`", *r[1:]]) + " |" for r in rows]
        caveats = self.caveats()
        if caveats:
            lines += ["", *[f"- {c}" for c in caveats]]
        return "\n".join(lines) + "\n"

    def caveats(self) -> list[str]:
        """Sentences naming the runs that had not converged or did not learn, and what that means for the lifts."""
        out = []
        if self.baseline_not_converged:
            out.append(
                f"The baseline `{self.baseline}` had not converged in seed(s) {_seeds(self.baseline_not_converged)}: "
                "it was still improving at its last epoch, so every lift may shrink with more training."
            )
        if self.baseline_stalled:
            out.append(
                f"The baseline `{self.baseline}` did not learn in seed(s) {_seeds(self.baseline_stalled)} (its "
                "validation score never rose above its first epoch's): every lift against it measures that failure."
            )
        for v in self.variants:
            if v.stalled:
                out.append(
                    f"`{v.name}` did not learn in seed(s) {_seeds(v.stalled)}: its validation score never rose above "
                    f"its first epoch's, so its {100 * v.lift:+.2f} pp measures a failed training run (often a "
                    "learning rate or schedule that does not suit the architecture), not what the variant can reach; "
                    "tune its training before reading its lift."
                )
            if v.not_converged:
                out.append(
                    f"`{v.name}` had not converged in seed(s) {_seeds(v.not_converged)} (validation score still "
                    f"improving at the last epoch): its {100 * v.lift:+.2f} pp may be a speed-of-learning effect "
                    "rather than a difference in what the model can reach; train longer (budget 'plateau' with a "
                    "larger maximum of epochs) before deciding."
                )
        return out


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def _interval(ci: tuple[float, float], scale: float, fmt: str) -> str:
    if any(math.isnan(x) for x in ci):
        return "n/a"
    return f"[{fmt.format(scale * ci[0])}, {fmt.format(scale * ci[1])}]"


def _not_converged(result: AblationResult, name: str) -> list[int]:
    runs = result.variant(name).runs
    return [seed for seed, run in zip(result.seeds, runs) if run.converged is False]


def _stalled(result: AblationResult, name: str) -> list[int]:
    return [seed for seed, run in zip(result.seeds, result.variant(name).runs) if run.stalled]


def decide(result: AblationResult, *, threshold: float | None = None, confidence: float = 0.95) -> Verdict:
    """The roll-out decision for every variant of ``result`` against its baseline.

    Args:
        result: a finished ablation with its baseline among the variants.
        threshold: relative lift required (fraction: 0.10 = +10% of the baseline's score); default
            ``result.threshold``.
        confidence: level of the Student-t intervals; default 0.95.

    Returns:
        a :class:`Verdict`.

    Raises:
        ValueError: the baseline was not run, or ``threshold < 0``.

    Example:
        >>> from attnkit.ablation.results import AblationResult, VariantResult
        >>> r = AblationResult("vision", "toy", "none", [0, 1, 2],
        ...     [VariantResult("none", [0.80, 0.82, 0.81]), VariantResult("se", [0.90, 0.91, 0.92])])
        >>> v = decide(r)
        >>> v.recommended, round(v.variants[0].relative, 3)
        ('se', 0.123)
    """
    threshold = result.threshold if threshold is None else threshold
    if not threshold >= 0:
        raise ValueError(f"decide: expected threshold >= 0, got {threshold!r}")
    names = [v.name for v in result.variants]
    if result.baseline not in names:
        raise ValueError(f"decide: the baseline {result.baseline!r} is not among the variants {names}")
    base = result.variant(result.baseline)
    base_mean = mean_std(base.scores)[0]
    verdicts = []
    for v in result.variants:
        if v.name == result.baseline:
            continue
        lift = result.lift(v.name)
        ci = lift.ci(confidence)
        relative = lift.mean / base_mean if base_mean else math.nan
        if not base_mean:
            roll_out, reason = False, "the baseline scored 0, so there is no relative lift; train longer"
        elif lift.n < 2:
            roll_out, reason = False, "one seed: no confidence interval; run at least 3 seeds"
        elif relative < threshold:
            roll_out = False
            reason = f"{100 * relative:+.1f}% is below the +{100 * threshold:g}% threshold"
        elif ci[0] <= 0:
            roll_out = False
            reason = f"{100 * relative:+.1f}% reaches the threshold but the CI includes 0 (seed noise); add seeds"
        else:
            roll_out, reason = True, f"{100 * relative:+.1f}% ≥ +{100 * threshold:g}% and the CI is above 0"
        ratio = {b: v.latency[b] / base.latency[b] for b in v.latency if base.latency.get(b)}
        verdicts.append(
            VariantVerdict(
                name=v.name,
                lift=lift.mean,
                ci=ci,
                relative=relative,
                relative_ci=(ci[0] / base_mean, ci[1] / base_mean) if base_mean else (math.nan, math.nan),
                latency_ratio=ratio,
                latency_ms={b: 1000 * v.latency[b] for b in ratio},
                roll_out=roll_out,
                reason=reason,
                not_converged=_not_converged(result, v.name),
                stalled=_stalled(result, v.name),
            )
        )
    passing = [v for v in verdicts if v.roll_out]
    recommended = max(passing, key=lambda v: v.lift).name if passing else None
    return Verdict(
        baseline=result.baseline,
        threshold=threshold,
        confidence=confidence,
        variants=verdicts,
        baseline_not_converged=_not_converged(result, result.baseline),
        baseline_stalled=_stalled(result, result.baseline),
        recommended=recommended,
    )
