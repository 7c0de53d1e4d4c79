"""Attention health: per-request statistics of a model's attention, and drift against a reference window.

Per request (all in ``[0, 1]``, comparable across input lengths):

* ``head_entropy``: mean over layers, heads and query rows of the row entropy ``-Σ_j A_ij log A_ij`` divided by
  ``log Lk`` (:func:`attnkit.explain.head_entropy`); 1 = uniform heads, 0 = every head on one key;
* ``sink_mass``: mean attention mass that query rows put on special or sink tokens ([CLS]/[SEP], a ViT's class
  token), the "no-op" heads of Clark et al. 2019 ("What Does BERT Look At?", Sec. 3.2) and the attention sinks of
  Xiao et al. 2024 ("Efficient Streaming Language Models with Attention Sinks");
* ``rollout_concentration``: ``1 - H(p) / log n`` of the summarising token's rollout row ``p`` (Abnar & Zuidema
  2020) over the ``n`` content tokens; 0 = spread evenly, 1 = all on one token;
* ``confidence``: the prediction's ``score`` as stored: the top class's softmax probability for image classifiers,
  but for text models (sentence embedding -> nearest label) the cosine similarity to the nearest label, in
  ``[-1, 1]`` and not a probability. The name is kept for stored data and the API; pages label it per model kind.

Drift: the two-sample Kolmogorov-Smirnov test (:func:`scipy.stats.ks_2samp`) between the recent window and the
reference window (a recorded baseline, else the model's first requests) flags a statistic when ``p < alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["STATISTICS", "Drift", "HealthInputs", "drift", "request_stats"]

STATISTICS = ("head_entropy", "sink_mass", "rollout_concentration", "confidence")


def request_stats(
    maps: Tensor, sinks: Sequence[int], summary_row: int, confidence: float, *, rollout_row: Tensor | None = None
) -> dict[str, float]:
    """The health statistics of one request.

    Args:
        maps: ``(layers, H, L, L)`` attention probabilities of one input (real tokens only).
        sinks: positions of the special/sink tokens.
        summary_row: the token whose rollout row summarises the input (BERT's [CLS]: 0).
        confidence: the prediction's score (top-class probability, or a text model's cosine similarity to the
            nearest label), stored as it is.
        rollout_row: ``(L,)`` the summarising token's rollout row when already computed (else computed here).

    Returns:
        ``{name: value}`` (Python floats) for every name in :data:`STATISTICS`.
    """
    from attnkit.explain import head_entropy, rollout

    maps = maps.float()
    length = maps.shape[-1]
    sink_set = {i % length for i in sinks}
    sink_idx = sorted(sink_set)
    row = rollout(maps[:, None])[0, summary_row] if rollout_row is None else rollout_row.float()  # (L,)
    content = [i for i in range(length) if i not in sink_set]
    p = row[content] if len(content) < length else row
    p = p / p.sum().clamp_min(1e-30)
    parts = [
        head_entropy(maps[:, None]).mean(),
        maps[..., sink_idx].sum(-1).mean() if sink_idx else maps.new_zeros(()),
        -(p * torch.log(p.clamp_min(1e-30))).sum(),
        p.sum(),
    ]
    entropy, sink_mass, h, total = torch.stack(parts).tolist()  # one conversion for the four numbers
    entropy = entropy / math.log(length) if length > 1 else 0.0
    concentration = 1.0 - h / math.log(len(content)) if len(content) > 1 and total > 0 else 0.0
    return {
        "head_entropy": float(entropy),
        "sink_mass": float(sink_mass),
        "rollout_concentration": float(min(max(concentration, 0.0), 1.0)),
        "confidence": float(confidence),
    }


@dataclass(frozen=True)
class HealthInputs:
    """What :func:`request_stats` needs about one request, kept by an endpoint for the statistics writer.

    Attributes:
        maps: ``(layers, H, L, L)`` attention probabilities of the input's real tokens.
        sinks: positions of the special/sink tokens.
        summary_row: the token whose rollout row summarises the input.
        confidence: the prediction's confidence.
        rollout_row: ``(L,)`` the summarising token's rollout row when the explanation computed it, else ``None``.
    """

    maps: Tensor
    sinks: tuple[int, ...]
    summary_row: int
    confidence: float
    rollout_row: Tensor | None = None

    def stats(self) -> dict[str, float]:
        """:func:`request_stats` of these inputs."""
        return request_stats(self.maps, self.sinks, self.summary_row, self.confidence, rollout_row=self.rollout_row)


@dataclass(frozen=True)
class Drift:
    """One statistic compared between the reference and the recent window.

    Attributes:
        statistic: the name (one of :data:`STATISTICS`).
        reference_mean, recent_mean: window means (``nan`` for an empty window).
        shift: the standardised mean difference ``(recent_mean - reference_mean) / reference_sd``, with the
            reference's sample standard deviation (``n - 1``); 0 when the reference has no spread or a window is
            empty. The field keeps its name for API compatibility; pages call it "standardised mean difference".
        ks: the two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs, in ``[0, 1]``).
        p_value: its two-sided p-value (``nan`` when a window has fewer than ``min_records`` values).
        flagged: ``p_value < alpha`` with at least ``min_records`` values in both windows.
    """

    statistic: str
    reference_mean: float
    recent_mean: float
    shift: float
    ks: float
    p_value: float
    flagged: bool


def drift(
    reference: dict[str, Sequence[float]],
    recent: dict[str, Sequence[float]],
    *,
    alpha: float = 0.01,
    min_records: int = 10,
) -> list[Drift]:
    """Compare every statistic of ``recent`` against ``reference`` with a two-sample Kolmogorov-Smirnov test.

    Each statistic is tested on its own at level ``alpha``, as the univariate KS tests per feature of Rabanser et
    al. 2019 ("Failing Loudly: An Empirical Study of Methods for Detecting Dataset Shift"), but without their
    Bonferroni correction: a recent window drawn from the reference distribution gets some flag with probability
    at most ``len(STATISTICS) * alpha`` (union bound). The test (Kolmogorov 1933, Smirnov 1948) is
    :func:`scipy.stats.ks_2samp`: two-sided, ``method="auto"`` (exact p-values for small windows, the asymptotic
    Kolmogorov distribution for large ones).

    Args:
        reference: ``{statistic: values}`` of the reference window (a recorded baseline or the first requests);
            a missing statistic counts as an empty window.
        recent: ``{statistic: values}`` of the recent window.
        alpha: significance level of each test, in ``(0, 1)`` (default 0.01).
        min_records: fewest values each window needs before it is tested (default 10); smaller windows get
            ``ks = p_value = nan`` and are never flagged.

    Returns:
        one :class:`Drift` per name in :data:`STATISTICS`, in that order.
    """
    from scipy.stats import ks_2samp

    out = []
    for name in STATISTICS:
        ref = [float(v) for v in reference.get(name, [])]
        new = [float(v) for v in recent.get(name, [])]
        ref_mean = sum(ref) / len(ref) if ref else math.nan
        new_mean = sum(new) / len(new) if new else math.nan
        ref_std = math.sqrt(sum((v - ref_mean) ** 2 for v in ref) / (len(ref) - 1)) if len(ref) > 1 else 0.0
        shift = (new_mean - ref_mean) / ref_std if ref_std > 0 and ref and new else 0.0
        ks, p = math.nan, math.nan
        enough = len(ref) >= min_records and len(new) >= min_records
        if enough:
            result = ks_2samp(ref, new)
            ks, p = float(result.statistic), float(result.pvalue)
        out.append(Drift(name, ref_mean, new_mean, float(shift), ks, p, bool(enough and p < alpha)))
    return out
