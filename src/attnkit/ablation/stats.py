"""Summaries over seeds and the paired significance test of a variant against the baseline.

Variants are trained with the same seeds, and a seed fixes the batch order and the augmentation draws of every
variant (:func:`attnkit.ablation.train.fit`), so the runs pair up by seed. The lift of a variant is the mean over
seeds of ``accuracy(variant, seed) - accuracy(baseline, seed)``; its significance is the two-sided paired t-test
``scipy.stats.ttest_rel`` (Student 1908) over seeds. With 3 seeds the test has 2 degrees of freedom, so only large,
consistent lifts reach p < 0.05; a Wilcoxon signed-rank test cannot go below p = 0.25 with 3 pairs, which is why
the t-test is used. Treat p-values from so few seeds as a screen, not a proof.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Lift", "mean_std", "paired_lift"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("mean_std: no values")
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass(frozen=True)
class Lift:
    """Paired difference ``variant - baseline`` over seeds.

    Attributes:
        mean: mean difference (accuracy points, same unit as the inputs).
        std: sample standard deviation of the differences.
        p_value: two-sided paired t-test p-value; ``nan`` with fewer than 2 pairs or when every difference is 0
            (the test is undefined); 0 when every difference is the same non-zero value (t is infinite).
        n: number of pairs.
    """

    mean: float
    std: float
    p_value: float
    n: int

    def note(self, alpha: float = 0.05) -> str:
        """A short verdict, e.g. ``"p=0.012 (paired t, n=3): better"`` or ``"p=0.41 (...): no significant
        difference"``."""
        if math.isnan(self.p_value):
            return f"n={self.n}: untestable" if self.n < 2 else f"identical on every seed (n={self.n})"
        verdict = "no significant difference"
        if self.p_value < alpha:
            verdict = "better" if self.mean > 0 else "worse"
        return f"p={self.p_value:.2g} (paired t, n={self.n}): {verdict}"

    def ci(self, confidence: float = 0.95) -> tuple[float, float]:
        """Two-sided Student-t confidence interval of the mean difference: ``mean ± t_{(1+c)/2, n-1} · std / √n``
        (the interval that goes with the paired t-test); ``(nan, nan)`` with fewer than 2 pairs.

        Raises:
            ValueError: ``confidence`` outside ``(0, 1)``.
            ImportError: scipy is missing (``pip install 'attnkit[demo]'``).

        Example:
            >>> lo, hi = Lift(mean=0.1, std=0.02, p_value=0.01, n=3).ci()
            >>> round(lo, 4), round(hi, 4)  # t_{0.975, 2} = 4.303
            (0.0503, 0.1497)
        """
        if not 0 < confidence < 1:
            raise ValueError(f"Lift.ci: expected confidence in (0, 1), got {confidence!r}")
        if self.n < 2:
            return math.nan, math.nan
        try:
            from scipy.stats import t
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("the ablation confidence interval needs scipy: pip install 'attnkit[demo]'") from err
        half = float(t.ppf((1 + confidence) / 2, self.n - 1)) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half


def paired_lift(variant: Sequence[float], baseline: Sequence[float]) -> Lift:
    """Lift of ``variant`` over ``baseline``, paired by position (seed), with a paired t-test.

    Args:
        variant: per-seed scores of the variant.
        baseline: per-seed scores of the baseline, in the same seed order.

    Returns:
        a :class:`Lift`.

    Raises:
        ValueError: sequences of different lengths or empty.
        ImportError: scipy is missing (``pip install 'attnkit[demo]'``).

    Example:
        >>> lift = paired_lift([0.9, 0.92, 0.91], [0.8, 0.83, 0.8])
        >>> round(lift.mean, 3), lift.p_value < 0.05
        (0.1, True)
    """
    if len(variant) != len(baseline) or not variant:
        raise ValueError(
            f"paired_lift: expected two equal, non-empty sequences, got {len(variant)} and {len(baseline)}"
        )
    diffs = [float(a) - float(b) for a, b in zip(variant, baseline)]
    mean, std = mean_std(diffs)
    p = math.nan
    if std < 1e-12 * max(1.0, abs(mean)):  # rounding noise of equal differences (scores are multiples of 1/N)
        std = 0.0
    if len(diffs) > 1 and std > 0:
        try:
            from scipy.stats import ttest_rel
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("the ablation significance test needs scipy: pip install 'attnkit[demo]'") from err
        p = float(ttest_rel(variant, baseline).pvalue)
    elif len(diffs) > 1 and mean != 0:  # every seed moved by exactly the same amount
        p = 0.0
    return Lift(mean, std, p, len(diffs))
