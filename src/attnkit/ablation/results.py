"""Ablation results: per-variant scores over seeds and costs, and their Markdown / CSV tables."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

from attnkit.ablation.convergence import History
from attnkit.ablation.stats import Lift, mean_std, paired_lift
from attnkit.ablation.verdict import DEFAULT_THRESHOLD, Verdict, decide

__all__ = ["AblationResult", "Alignment", "VariantResult"]


@dataclass
class VariantResult:
    """One variant of an ablation.

    Attributes:
        name: variant name (``"none"``, ``"se"``, ``"additive"``, ...).
        scores: test accuracy (fraction in ``[0, 1]``) per seed, in :attr:`AblationResult.seeds` order.
        params: trainable parameters.
        macs: multiply-accumulates of one inference at batch 1 (:func:`attnkit.ablation.cost.count_macs`).
        latency: batch size -> median seconds per inference call (interleaved across variants).
        groups: extra per-seed accuracies by group, e.g. input-length bucket ``"29-34"`` -> ``[acc per seed]``.
        description: what the variant is (architecture and placement of the attention).
        runs: the training :class:`~attnkit.ablation.convergence.History` (curves, convergence) per seed.
    """

    name: str
    scores: list[float]
    params: int = 0
    macs: int = 0
    latency: dict[int, float] = field(default_factory=dict)
    groups: dict[str, list[float]] = field(default_factory=dict)
    description: str = ""
    runs: list[History] = field(default_factory=list)

    @property
    def converged(self) -> bool | None:
        """False when any run was still improving at its end; None when no run recorded a validation curve."""
        known = [r.converged for r in self.runs if r.converged is not None]
        return all(known) if known else None

    def convergence_note(self, seeds: list[int]) -> str:
        """``"yes"``, ``"NOT converged (seeds 0, 2)"``, ``"STALLED (seed 1)"`` (both when both apply) or ``"n/a"``
        (no validation curve)."""
        if self.converged is None:
            return "n/a"
        notes = []
        if not self.converged:
            bad = [str(seed) for seed, r in zip(seeds, self.runs) if r.converged is False]
            notes.append(f"**NOT converged** (seed {', '.join(bad)})")
        stalled = [str(seed) for seed, r in zip(seeds, self.runs) if r.stalled]
        if stalled:
            notes.append(f"**STALLED: did not learn** (seed {', '.join(stalled)})")
        return "; ".join(notes) or "yes"

    def epochs_note(self) -> str:
        """Epochs trained per run: ``"15"`` or a range ``"9-21"``."""
        epochs = [r.epochs for r in self.runs]
        if not epochs:
            return ""
        return str(epochs[0]) if min(epochs) == max(epochs) else f"{min(epochs)}-{max(epochs)}"


@dataclass
class Alignment:
    """Attention weights of one decoded example: ``weights[t, j]`` for target token ``t`` and source char ``j``."""

    model: str
    source: str
    target: list[str]
    weights: list[list[float]]
    correct: bool


@dataclass
class AblationResult:
    """A whole ablation: variants trained with the same seeds and budget.

    Attributes:
        task: ``"vision"`` or ``"seq2seq"``.
        title: one-line description of the data.
        baseline: the variant lifts are measured against.
        seeds: the seeds, in the order of every ``scores`` list.
        variants: the results, in report order.
        budget: the training budget and data sizes, as ``name -> value`` (shown in the report).
        group_title: the meaning of :attr:`VariantResult.groups` keys (e.g. ``"input length (chars)"``).
        alignments: example alignments of attentive models (seq2seq).
        wall_time_s: seconds the ablation took (training, evaluation, timing).
        threshold: relative lift that justifies rolling attention out (:mod:`attnkit.ablation.verdict`).
        score_name: what the scores are (e.g. ``"accuracy"``), for the report.
    """

    task: str
    title: str
    baseline: str
    seeds: list[int]
    variants: list[VariantResult]
    budget: dict[str, object] = field(default_factory=dict)
    group_title: str = ""
    alignments: list[Alignment] = field(default_factory=list)
    wall_time_s: float = 0.0
    threshold: float = DEFAULT_THRESHOLD
    score_name: str = "accuracy"

    def variant(self, name: str) -> VariantResult:
        """The variant called ``name``; ``KeyError`` if absent."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def lift(self, name: str, group: str | None = None) -> Lift | None:
        """Paired lift of ``name`` over the baseline (overall or in ``group``); ``None`` for the baseline itself or
        when the baseline was not run."""
        if name == self.baseline or self.baseline not in {v.name for v in self.variants}:
            return None
        v, b = self.variant(name), self.variant(self.baseline)
        if group is None:
            return paired_lift(v.scores, b.scores)
        return paired_lift(v.groups[group], b.groups[group])

    def rows(self) -> list[dict[str, object]]:
        """One flat dict per variant (the CSV rows): accuracy mean/std in %, costs, lift and p-value."""
        rows = []
        for v in self.variants:
            mean, std = mean_std(v.scores)
            lift = self.lift(v.name)
            row: dict[str, object] = {
                "variant": v.name,
                "accuracy_mean_pct": round(100 * mean, 2),
                "accuracy_std_pct": round(100 * std, 2),
                "seeds": len(v.scores),
                "params": v.params,
                "macs": v.macs,
            }
            for batch, seconds in sorted(v.latency.items()):
                row[f"latency_b{batch}_ms"] = round(1000 * seconds, 3)
            row["lift_pct"] = "" if lift is None else round(100 * lift.mean, 2)
            row["lift_std_pct"] = "" if lift is None else round(100 * lift.std, 2)
            row["p_value"] = "" if lift is None or math.isnan(lift.p_value) else f"{lift.p_value:.3g}"
            for group, scores in v.groups.items():
                row[f"accuracy_pct[{group}]"] = round(100 * mean_std(scores)[0], 2)
            row["accuracy_per_seed_pct"] = " ".join(f"{100 * s:.2f}" for s in v.scores)
            row["epochs_per_seed"] = " ".join(str(r.epochs) for r in v.runs)
            row["converged_per_seed"] = " ".join({True: "yes", False: "no", None: "n/a"}[r.converged] for r in v.runs)
            row["stalled_per_seed"] = " ".join({True: "yes", False: "no", None: "n/a"}[r.stalled] for r in v.runs)
            rows.append(row)
        return rows

    def to_csv(self) -> str:
        """The :meth:`rows` as CSV text (header first)."""
        rows = self.rows()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def main_cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the main table: accuracy mean ± std, params, MACs, latency, lift and significance."""
        batches = sorted({b for v in self.variants for b in v.latency})
        head = ["variant", f"{self.score_name} % (mean ± std, {len(self.seeds)} seeds)", "epochs", "converged"]
        head += ["params", "MACs"]
        head += [f"latency b{b} (ms)" for b in batches] + [f"lift vs {self.baseline} (pp)", "significance"]
        rows = []
        for v in self.variants:
            mean, std = mean_std(v.scores)
            lift = self.lift(v.name)
            cells = [v.name, f"{100 * mean:.2f} ± {100 * std:.2f}", v.epochs_note(), v.convergence_note(self.seeds)]
            cells += [f"{v.params:,}", _si(v.macs)]
            cells += [f"{1000 * v.latency[b]:.2f}" if b in v.latency else "" for b in batches]
            cells += (
                ["—", "baseline"] if lift is None else [f"{100 * lift.mean:+.2f} ± {100 * lift.std:.2f}", lift.note()]
            )
            rows.append(cells)
        return head, rows

    def group_cells(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the by-group table: accuracy mean ± std per group, with the paired lift (Δ) over the
        baseline and its p-value; empty when there are no groups."""
        groups = list(self.variants[0].groups) if self.variants else []
        if not groups:
            return [], []
        rows = []
        for v in self.variants:
            cells = [v.name]
            for g in groups:
                mean, std = mean_std(v.groups[g])
                lift = self.lift(v.name, g)
                delta = "" if lift is None else f" (Δ {100 * lift.mean:+.1f}, p={_p(lift)})"
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f}{delta}")
            rows.append(cells)
        return ["variant", *groups], rows

    def curve_cells(self, points: int = 8) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the learning-curve table: mean validation score (%) over seeds at up to ``points``
        epochs (runs that stopped earlier contribute their last value); empty without validation curves."""
        curves = {v.name: [r.val_score for r in v.runs if r.val_score] for v in self.variants}
        longest = max((len(c) for cs in curves.values() for c in cs), default=0)
        if not longest:
            return [], []
        step = max(1, -(-longest // points))
        epochs = sorted({*range(step - 1, longest, step), longest - 1})
        rows = []
        for name, cs in curves.items():
            if not cs:
                continue
            cells = [name]
            for e in epochs:
                values = [c[min(e, len(c) - 1)] for c in cs]
                cells.append(f"{100 * sum(values) / len(values):.1f}")
            rows.append(cells)
        return ["variant", *[f"ep {e + 1}" for e in epochs]], rows

    def verdict(self, threshold: float | None = None) -> Verdict:
        """The roll-out decision (:func:`attnkit.ablation.verdict.decide`) at ``threshold`` (default
        :attr:`threshold`)."""
        return decide(self, threshold=threshold)

    def main_table(self) -> str:
        """:meth:`main_cells` as a Markdown table."""
        return _markdown(*self.main_cells())

    def group_table(self) -> str:
        """:meth:`group_cells` as a Markdown table with a caption line; empty string when there are no groups."""
        head, rows = self.group_cells()
        if not head:
            return ""
        caption = f"Accuracy % by {self.group_title} (mean ± std over seeds; Δ = paired lift vs `{self.baseline}`)"
        return caption + "\n\n" + _markdown(head, rows)

    def to_markdown(self) -> str:
        """The whole report as Markdown: title, budget, tables, variant descriptions."""
        parts = [f"## Ablation: {self.task} — {self.title}", ""]
        budget = "; ".join(f"{k}: {v}" for k, v in self.budget.items())
        parts += [f"Identical budget for every variant — {budget}. Seeds: {', '.join(map(str, self.seeds))}.", ""]
        parts += [self.main_table(), ""]
        if self.group_table():
            parts += [self.group_table(), ""]
        head, rows = self.curve_cells()
        if head:
            caption = f"Learning curves: validation {self.score_name} % after each epoch (mean over seeds)"
            parts += [caption, "", _markdown(head, rows), ""]
        parts += ["Variants:", ""] + [f"- `{v.name}`: {v.description}" for v in self.variants if v.description]
        parts += ["", METHOD_NOTE, "", f"Wall time: {self.wall_time_s / 60:.1f} min."]
        if self.baseline in {v.name for v in self.variants} and len(self.variants) > 1:
            parts += ["", self.verdict().to_markdown().rstrip()]  # the report ends with the decision
        return "\n".join(parts) + "\n"


#: How accuracy, MACs, latency, lift and significance are measured (printed under every report).
METHOD_NOTE = (
    "Accuracy: top-1 (vision) or exact match of the whole ISO date (seq2seq) on the held-out test split. "
    "MACs: multiply-accumulates of one batch-1 inference, counted with torch.utils.flop_counter.FlopCounterMode "
    "(matrix products, convolutions, attention; element-wise ops not counted) / 2. Latency: median of interleaved "
    "repeated runs of every variant in one process, on CPU with the torch threads listed above. Lift: mean over "
    "seeds of the per-seed difference to the baseline (runs pair up by seed: same batch order and augmentation draws); "
    "significance: two-sided paired t-test over seeds (scipy.stats.ttest_rel), alpha 0.05; CI: the matching "
    "Student-t interval. Converged: the validation score gained no more than the budget's min_delta in the last "
    "`patience` epochs (a run still improving at its end is NOT converged, and its lift may be a speed-of-learning "
    "effect)."
)


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([f"`{r[0]}`", *r[1:]]) + " |" for r in rows]
    return "\n".join(lines)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _p(lift: Lift) -> str:
    return "n/a" if math.isnan(lift.p_value) else f"{lift.p_value:.2g}"
