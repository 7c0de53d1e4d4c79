"""Write an :class:`~attnkit.ablation.results.AblationResult`: Markdown and CSV tables, an accuracy-vs-latency
plot, alignment heatmaps (seq2seq) and a section of the self-contained HTML report (:func:`attnkit.explain.report`).

Every file is written with :func:`attnkit.io.atomic.atomic_write` (temporary file, fsync, link or rename), and
nothing existing is replaced unless
``overwrite=True``: :func:`planned_files` lists the paths up front so a caller can refuse before hours of training.
Needs matplotlib (``pip install 'attnkit[explain]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from attnkit.ablation.results import METHOD_NOTE, AblationResult, Alignment
from attnkit.ablation.stats import mean_std
from attnkit.io.atomic import atomic_write

__all__ = [
    "alignment_figure",
    "check_writable",
    "curves_figure",
    "planned_files",
    "tradeoff_figure",
    "write_report",
]

_FIXED = ("results.md", "results.csv", "accuracy_vs_latency.png", "learning_curves.png", "report.html")


def planned_files(out_dir: str | os.PathLike, alignment_models: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The paths :func:`write_report` writes (``alignments_<model>.png`` for each model with alignments)."""
    out = Path(out_dir)
    return [out / name for name in _FIXED] + [out / f"alignments_{m}.png" for m in alignment_models]


def check_writable(paths: list[Path], *, overwrite: bool) -> None:
    """Raise ``FileExistsError`` naming the first existing path, unless ``overwrite``."""
    if overwrite:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]} exists{more}; pass --overwrite to replace, or choose another --out")


def tradeoff_figure(result: AblationResult):
    """Accuracy (mean ± std over seeds, %) against median latency (ms, log scale), one panel per timed batch size,
    one labelled point per variant. Returns a ``matplotlib.figure.Figure``."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogLocator, ScalarFormatter
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ablation plots need matplotlib: pip install 'attnkit[explain]'") from err
    batches = sorted({b for v in result.variants for b in v.latency}) or [1]
    fig = Figure(figsize=(5.0 * len(batches), 4.0), layout="constrained")
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, batch in zip(axes, batches):
        for v in result.variants:
            if batch not in v.latency:
                continue
            mean, std = mean_std(v.scores)
            ms = 1000 * v.latency[batch]
            ax.errorbar(ms, 100 * mean, yerr=100 * std, fmt="o", capsize=3)
            ax.annotate(v.name, (ms, 100 * mean), textcoords="offset points", xytext=(5, 4), fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter("")
        ax.set_xlabel(f"CPU latency at batch {batch} (ms, median)")
        ax.set_ylabel(f"test accuracy (%, mean ± std over {len(result.seeds)} seeds)")
        ax.set_title(f"{result.task}: accuracy vs latency, batch {batch}", fontsize=10)
        ax.grid(True, alpha=0.3)
    return fig


def curves_figure(result: AblationResult):
    """Learning curves: training loss (left) and validation score in % (right) against the epoch, one colour per
    variant, one line per seed; each run ends in a dot when it converged and a cross when it had not (still
    improving), with learning-rate drops marked by a vertical tick. Returns a ``matplotlib.figure.Figure``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ablation plots need matplotlib: pip install 'attnkit[explain]'") from err
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    loss_ax, val_ax = fig.subplots(1, 2)
    for i, v in enumerate(result.variants):
        colour = f"C{i % 10}"  # matplotlib's default colour cycle
        for j, run in enumerate(v.runs):
            label = v.name if j == 0 else None
            epochs = range(1, run.epochs + 1)
            loss_ax.plot(epochs, run.train_loss, color=colour, lw=1.2, alpha=0.8, label=label)
            if not run.val_score:
                continue
            scores = [100 * x for x in run.val_score]
            val_ax.plot(range(1, len(scores) + 1), scores, color=colour, lw=1.2, alpha=0.8, label=label)
            val_ax.plot(len(scores), scores[-1], "x" if run.converged is False else "o", color=colour, ms=6)
            for e in run.lr_drops:
                val_ax.plot(e + 1, scores[e], "|", color=colour, ms=10)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    val_ax.set_xlabel("epoch")
    val_ax.set_ylabel(f"validation {result.score_name} (%)")
    val_ax.set_title("o converged, x NOT converged (still improving), | lr ÷10", fontsize=9)
    for ax in (loss_ax, val_ax):
        ax.grid(True, alpha=0.3)
    if any(v.runs for v in result.variants):
        val_ax.legend(fontsize=8, loc="lower right")
    else:
        val_ax.text(0.5, 0.5, "no curves recorded", ha="center", va="center", transform=val_ax.transAxes)
    fig.suptitle(f"{result.task}: learning curves ({len(result.seeds)} seeds)", fontsize=10)
    return fig


def alignment_figure(alignments: list[Alignment]):
    """Source characters (columns) x emitted target tokens (rows) heatmaps, one panel per example, via
    :func:`attnkit.explain.plots.alignment_plot` (examples padded to a common width with zeros)."""
    import torch

    from attnkit.explain.plots import alignment_plot

    width = max(len(a.source) for a in alignments)
    steps = max(len(a.target) for a in alignments)
    weights = torch.zeros(len(alignments), steps, width)
    for i, a in enumerate(alignments):
        w = torch.tensor(a.weights)
        weights[i, : w.shape[0], : w.shape[1]] = w
    keys = [[*("␣" if c == " " else c for c in a.source), *[""] * (width - len(a.source))] for a in alignments]
    queries = [
        [*(t if t != "<eos>" else "</s>" for t in a.target), *[""] * (steps - len(a.target))] for a in alignments
    ]
    fig = alignment_plot(weights, query_tokens=queries, key_tokens=keys, ncols=1)
    for ax, a in zip(fig.axes, alignments):
        ax.set_title(
            f"{a.model}: {a.source!r} -> {''.join(a.target).replace('<eos>', '')}"
            f" ({'correct' if a.correct else 'wrong'})",
            fontsize=8,
        )
    return fig


def write_report(result: AblationResult, out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """Write ``results.md``, ``results.csv``, ``accuracy_vs_latency.png``, ``alignments_<model>.png`` (attentive
    seq2seq models) and ``report.html`` into ``out_dir`` (created if missing).

    Returns:
        the paths written.

    Raises:
        FileExistsError: one of the files exists and ``overwrite`` is False (checked before writing anything).
        ImportError: matplotlib is missing.
    """
    from attnkit.explain.plots import figure_png
    from attnkit.explain.report import Section, report

    out = Path(out_dir)
    models = list(dict.fromkeys(a.model for a in result.alignments))
    paths = planned_files(out, models)
    check_writable(paths, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        atomic_write(out / "results.md", result.to_markdown(), overwrite=overwrite),
        atomic_write(out / "results.csv", result.to_csv(), overwrite=overwrite),
    ]
    plot_png = figure_png(tradeoff_figure(result))
    written.append(atomic_write(out / "accuracy_vs_latency.png", plot_png, overwrite=overwrite))
    curves_png = figure_png(curves_figure(result))
    written.append(atomic_write(out / "learning_curves.png", curves_png, overwrite=overwrite))
    alignment_pngs = []
    for m in models:
        png = figure_png(alignment_figure([a for a in result.alignments if a.model == m]))
        alignment_pngs.append((m, png))
        written.append(atomic_write(out / f"alignments_{m}.png", png, overwrite=overwrite))

    head, rows = result.main_cells()
    sections = [
        Section(
            title=f"Does attention help? {result.task} ablation",
            text=result.title + "\n\n" + result.to_markdown().split("\n\n", 2)[1],
            table=rows,
            table_header=head,
            figures=[plot_png],
        )
    ]
    head, rows = result.group_cells()
    if head:
        sections.append(
            Section(
                title=f"Accuracy (%) by {result.group_title}",
                text=f"Mean ± std over seeds; Δ = paired lift over {result.baseline!r} in points, paired t-test p.",
                table=rows,
                table_header=head,
            )
        )
    head, rows = result.curve_cells()
    sections.append(
        Section(
            title="Learning curves",
            text="Training loss and validation score per epoch, every seed. A run still improving at its last epoch "
            "is NOT converged: its lift may be a speed-of-learning effect.",
            table=rows or None,
            table_header=head or None,
            figures=[curves_png],
        )
    )
    variants = "\n".join(f"{v.name}: {v.description}" for v in result.variants if v.description)
    sections.append(
        Section(
            title="Variants and method",
            text=f"{variants}\n\n{METHOD_NOTE}\n\nWall time: {result.wall_time_s / 60:.1f} min.",
        )
    )
    for m, png in alignment_pngs:
        sections.append(
            Section(
                title=f"Alignments: {m}",
                text="Rows: emitted target characters; columns: source characters; colour: attention weight "
                "(model trained with the first seed).",
                figures=[png],
            )
        )
    if result.baseline in {v.name for v in result.variants} and len(result.variants) > 1:
        verdict = result.verdict()
        head, rows = verdict.cells()
        text = "\n\n".join([verdict.decision().replace("**", "").replace("`", ""), *verdict.caveats()])
        sections.append(Section(title=verdict.title().replace("`", ""), text=text, table=rows, table_header=head))
    written.append(report(out / "report.html", sections, title=f"attnkit ablate {result.task}", overwrite=overwrite))
    return written
