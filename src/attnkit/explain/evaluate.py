"""Which explanation method to trust for a model: one harness that scores every method on a task.

:func:`evaluate` runs each method on the task's inputs and reports, per method:

* ``deletion`` / ``insertion``: AUC of the curves of Petsiuk et al. 2018 (:func:`attnkit.explain.metrics.deletion`);
* ``comprehensiveness`` / ``sufficiency``: ERASER's AOPC (DeYoung et al. 2020, :func:`~attnkit.explain.metrics.aopc`);
* ``pointing``: pointing-game accuracy (Zhang et al. 2016) when the task has ground-truth boxes or masks;
* ``aer``: alignment error rate (Och & Ney 2003) when the task has gold alignments;
* ``randomization``: the model-parameter randomisation test of Adebayo et al. 2018 (:func:`randomization_check`):
  Spearman's rank correlation between the explanation of the trained model and of the model whose layers are
  re-initialised top-down; a method whose maps barely change (correlation at or above ``threshold``) fails.

Methods are callables ``method(model, x) -> map``, so the harness can run them on a re-initialised copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.explain.metrics import aopc, deletion, insertion, pointing_game

__all__ = ["EvaluationTask", "RandomizationResult", "evaluate", "randomization_check", "reinitialize"]

Method = Callable[[nn.Module, Tensor], Tensor]


@dataclass
class EvaluationTask:
    """A model, its inputs and what is known about them.

    Attributes:
        model: the model (in eval mode).
        x: ``(B, ...)`` inputs (images, token ids, ...).
        score_fn: ``(model, x) -> (B, classes)`` logits (with ``target``) or ``(B,)`` scores; the quantity the
            perturbation metrics watch.
        target: ``(B,)`` classes whose softmax probability is the score; ``None`` when ``score_fn`` gives scores.
        baseline: value of removed input units (scalar or shaped like ``x``): black pixels, an unknown-token id.
        to_units: turns a method's map into the ``(B, *S)`` unit saliency the perturbation metrics and the
            pointing game use (e.g. upsample a patch grid to pixels; sum a target x source map over targets);
            default: the map itself.
        pointing_target: ``(B, *S)`` bool masks or ``(B, 4)`` boxes for the pointing game, or ``None``.
        alignment: ``(sure, possible)`` bool ``(B, T, S)`` gold links and ``alignment_rows`` the rows scored,
            for the alignment error rate of ``(B, T, S)`` maps, or ``None``.
        randomize: module names of ``model`` in top-down order (last layer first) for the randomisation test,
            or ``None`` to skip it.
        steps: deletion/insertion steps.
        batch_size: items per ``score_fn`` call in the perturbation metrics.
        units_mask: bool ``(B, *S)``, the units a method may rank (e.g. real tokens, not padding or ``[CLS]``),
            or ``None`` for all: the others rank last in every map (their baseline should leave them unchanged)
            and are left out of the randomisation correlation.
    """

    model: nn.Module
    x: Tensor
    score_fn: Callable[[nn.Module, Tensor], Tensor]
    target: Tensor | None = None
    baseline: Any = 0.0
    to_units: Callable[[Tensor], Tensor] | None = None
    pointing_target: Tensor | None = None
    alignment: tuple[Tensor, Tensor] | None = None
    alignment_rows: Sequence[int] | None = None
    randomize: Sequence[str] | None = None
    steps: int = 20
    batch_size: int | None = None
    units_mask: Tensor | None = None


@dataclass
class RandomizationResult:
    """Cascading model-parameter randomisation (Adebayo et al. 2018, Sec. 3.1).

    Attributes:
        layers: the module names re-initialised, in the order they were added (top-down).
        correlation: ``(len(layers), B)`` Spearman rank correlation between the trained model's map and the map
            after re-initialising ``layers[:k + 1]``.
        threshold: the pass mark on the mean correlation at the last step.
    """

    layers: list[str]
    correlation: Tensor
    threshold: float

    @property
    def final(self) -> float:
        """Mean correlation once every listed layer is re-initialised."""
        return float(self.correlation[-1].mean())

    @property
    def passed(self) -> bool:
        """True when the maps changed: the final mean correlation is below ``threshold``."""
        return self.final < self.threshold


def reinitialize(module: nn.Module, *, generator_seed: int = 0) -> None:
    """Re-initialise every parameter of ``module`` in place, as at construction: ``reset_parameters()`` of each
    submodule that has one (Linear, LayerNorm, Embedding, ...); parameters of submodules without it (class
    tokens, position tables) are drawn from ``N(0, 0.02²)``, the ViT/BERT initialisation. Seeded, and the
    global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                for p in sub.parameters(recurse=False):
                    with torch.no_grad():
                        p.normal_(0.0, 0.02)


def _spearman(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-item Spearman correlation of ``(B, ...)`` maps over the entries of ``mask`` (all when ``None``)
    (scipy); constant maps (undefined) count as 0."""
    from scipy.stats import spearmanr

    keep = torch.ones_like(a, dtype=torch.bool) if mask is None else mask.expand_as(a)
    out = []
    for x, y, k in zip(
        a.reshape(len(a), -1).double().cpu().numpy(),
        b.reshape(len(b), -1).double().cpu().numpy(),
        keep.reshape(len(a), -1).cpu().numpy(),
    ):
        x, y = x[k], y[k]
        rho = spearmanr(x, y).statistic if x.std() > 0 and y.std() > 0 else 0.0
        out.append(float(rho))
    return torch.tensor(out, dtype=torch.float64)


def randomization_check(
    method: Method,
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str],
    *,
    threshold: float = 0.5,
    to_units: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    units_mask: Tensor | None = None,
) -> RandomizationResult:
    """Cascading randomisation: re-initialise ``layers`` one more at a time, top-down, and compare the maps.

    The model is copied (``copy.deepcopy``); ``model`` itself is not changed.

    Args:
        method: ``(model, x) -> (B, ...)`` explanation.
        model: the trained model.
        x: ``(B, ...)`` inputs.
        layers: names of submodules of ``model`` (``dict(model.named_modules())`` keys), last layer first.
        threshold: a method passes when the mean Spearman correlation after re-initialising all ``layers`` is
            below it (Adebayo et al. judge by eye and by rank correlation; 0.5 is attnkit's mark).
        to_units: applied to each map before correlating (e.g. a grid upsampled to pixels); default none.
        seed: seeds the re-initialisation (step ``k`` uses ``seed + k``).
        units_mask: bool, shaped like the maps: the entries correlated (default all).

    Returns:
        :class:`RandomizationResult`.

    Raises:
        ValueError: no layers, or a name that is not a submodule of ``model``.

    References:
        Adebayo et al. 2018, "Sanity Checks for Saliency Maps", NeurIPS, Sec. 3.1 (cascading randomisation,
        Spearman rank correlation).
    """
    names = dict(model.named_modules())
    unknown = [n for n in layers if n not in names]
    if not layers or unknown:
        raise ValueError(f"randomization_check: layers must name submodules of the model; unknown: {unknown}")
    units = to_units or (lambda m: m)
    original = units(method(model, x)).detach()
    randomized = copy.deepcopy(model)
    rows = []
    for k, name in enumerate(layers):
        reinitialize(randomized.get_submodule(name), generator_seed=seed + k)
        rows.append(_spearman(original, units(method(randomized, x)).detach(), units_mask))
    return RandomizationResult(list(layers), torch.stack(rows), float(threshold))


def evaluate(
    task: EvaluationTask,
    methods: Mapping[str, Method],
    *,
    metrics: Sequence[str] = (
        "deletion",
        "insertion",
        "comprehensiveness",
        "sufficiency",
        "pointing",
        "aer",
        "randomization",
    ),
    threshold: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Score every method on ``task``: ``{method: {metric: value}}`` (means over the batch).

    Metrics that need what the task lacks (pointing without ``pointing_target``, ``aer`` without ``alignment``,
    ``randomization`` without ``randomize``) are left out. ``randomization`` gives the final mean correlation
    and ``randomization_passed`` (see :func:`randomization_check`).

    Raises:
        ValueError: an unknown metric, or no methods.
    """
    from attnkit.explain.metrics import alignment_error_rate

    known = ("deletion", "insertion", "comprehensiveness", "sufficiency", "pointing", "aer", "randomization")
    bad = [m for m in metrics if m not in known]
    if bad or not methods:
        raise ValueError(f"evaluate: unknown metrics {bad} (valid: {', '.join(known)}) or no methods")
    to_units = task.to_units or (lambda m: m)
    if task.units_mask is None:
        units = to_units
    else:

        def units(m: Tensor) -> Tensor:
            return to_units(m).masked_fill(~task.units_mask, float("-inf"))

    def model_fn(x: Tensor) -> Tensor:
        return task.score_fn(task.model, x)

    kw = {"baseline": task.baseline, "target": task.target, "batch_size": task.batch_size}
    table: dict[str, dict[str, Any]] = {}
    for name, method in methods.items():
        row: dict[str, Any] = {}
        raw = method(task.model, task.x).detach()
        sal = units(raw)
        if "deletion" in metrics:
            row["deletion"] = float(deletion(model_fn, task.x, sal, steps=task.steps, **kw).auc.mean())
        if "insertion" in metrics:
            row["insertion"] = float(insertion(model_fn, task.x, sal, steps=task.steps, **kw).auc.mean())
        if "comprehensiveness" in metrics or "sufficiency" in metrics:
            res = aopc(model_fn, task.x, sal, **kw)
            row["comprehensiveness"] = float(res.comprehensiveness.mean())
            row["sufficiency"] = float(res.sufficiency.mean())
        if "pointing" in metrics and task.pointing_target is not None:
            row["pointing"] = float(pointing_game(sal, task.pointing_target).float().mean())
        if "aer" in metrics and task.alignment is not None:
            sure, possible = task.alignment
            rows = list(task.alignment_rows) if task.alignment_rows is not None else slice(None)
            row["aer"] = float(alignment_error_rate(raw[:, rows], sure[:, rows], possible[:, rows], reduction="corpus"))
        if "randomization" in metrics and task.randomize:
            check = randomization_check(
                method,
                task.model,
                task.x,
                task.randomize,
                threshold=threshold,
                to_units=to_units,
                units_mask=task.units_mask,
            )
            row["randomization"] = check.final
            row["randomization_passed"] = check.passed
        table[name] = row
    return table
