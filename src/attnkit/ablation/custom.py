"""Does attention help *your* model? The ablation of a user's classifier with attention inserted into it.

:func:`ablate` builds the user's model (``model_fn()``), makes one variant per attention kind with
:func:`attnkit.vision.insert_attention` after the modules ``where`` names, trains every variant with every seed
under one budget (:class:`~attnkit.ablation.train.TrainConfig`, by default until the validation accuracy plateaus),
and returns an :class:`~attnkit.ablation.results.AblationResult` with accuracy, learning curves, convergence,
parameters, MACs, latency at batch 1 and 64, and the roll-out verdict (:mod:`attnkit.ablation.verdict`).

The model maps a batch of inputs ``x`` (images ``(B, C, H, W)``, token ids ``(B, L)``, features ...) to class
logits ``(B, K)``; training minimises cross-entropy and the score is top-1 accuracy on a held-out test split that
neither training nor early stopping sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.ablation.cost import count_macs, count_parameters, interleaved_latency
from attnkit.ablation.images import DataError, ImageData, load_image_data, stratified_split
from attnkit.ablation.results import AblationResult, VariantResult
from attnkit.ablation.train import TrainConfig, fit, is_main_process, predict, run_summary, seeded
from attnkit.ablation.verdict import DEFAULT_THRESHOLD

__all__ = ["CUSTOM_VARIANTS", "Splits", "ablate", "default_where", "load_arrays", "split"]

#: Variant name -> ``(insert_attention kind, constructor kwargs)``; ``None`` is the model as given (the baseline).
#: ``single_head`` is included by default: the first experiment is one attention layer of one head.
CUSTOM_VARIANTS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "none": None,
    "se": ("se", {"reduction": 8}),
    "eca": ("eca", {}),
    "cbam": ("cbam", {"reduction": 8}),
    "nonlocal": ("nonlocal", {}),
    "single_head": ("self_attention", {"num_heads": 1}),
    "multi_head": ("self_attention", {"num_heads": 4}),
}
_SEQUENCE_VARIANTS = ("none", "single_head", "multi_head")

Variant = Callable[[nn.Module], nn.Module] | None


@dataclass
class Splits:
    """Train / validation / test tensors of a classification task.

    Attributes:
        train, val, test: ``(x, y)`` pairs: inputs of any shape ``(N, ...)`` and int64 labels ``(N,)``.
        classes: class names, index = label.
        source: where the data came from (for the report).
    """

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    classes: list[str]
    source: str


def load_arrays(path: str | Path) -> tuple[Tensor, Tensor, list[str]]:
    """``(x, y, classes)`` from an image folder or an ``.npz`` with ``x`` and ``y``.

    Images (a folder, or an ``x`` of rank 3 or 4) follow :func:`attnkit.ablation.images.load_image_data`
    (float32 ``(N, C, H, W)`` in ``[0, 1]``). An ``x`` of rank 2 is kept as it is: integer arrays become int64
    (token ids ``(N, L)``), floating ones float32 (features).

    Raises:
        DataError: unreadable data (the message names the file and the fix).
    """
    import numpy as np

    path = Path(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                x = npz["x"] if "x" in npz.files else None
                y = npz["y"] if "y" in npz.files else None
        except Exception as err:
            raise DataError(f"{path}: cannot read it as .npz ({type(err).__name__}: {err})") from None
        if x is not None and x.ndim == 2:
            if y is None or y.ndim != 1 or len(y) != len(x):
                raise DataError(f"{path}: expected y of shape ({len(x)},) (one label per row of x)")
            if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
                raise DataError(f"{path}: expected numeric x, got dtype {x.dtype}")
            classes, labels = np.unique(y, return_inverse=True)
            if len(classes) < 2:
                raise DataError(f"{path}: expected at least two classes in y, got {len(classes)}")
            xt = torch.from_numpy(x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float32))
            return xt, torch.from_numpy(labels.astype(np.int64)), [str(c) for c in classes]
    data = load_image_data(path)
    return data.images, data.labels, data.classes


def split(
    x: Tensor, y: Tensor, *, test_fraction: float = 0.2, val_fraction: float = 0.15, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], ...]:
    """Stratified ``(train, val, test)`` split: ``test_fraction`` of each class to test, then ``val_fraction`` of
    the rest to validation (:func:`attnkit.ablation.images.stratified_split`)."""
    rest, test = stratified_split(y, test_fraction=test_fraction, seed=seed)
    train, val = stratified_split(y[rest], test_fraction=val_fraction, seed=seed)
    train, val = rest[train], rest[val]
    return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])


def _as_splits(data: Any) -> Splits:
    if isinstance(data, Splits):
        return data
    if isinstance(data, str | Path):
        x, y, classes = load_arrays(data)
        return Splits(*split(x, y), classes, str(data))
    if isinstance(data, ImageData):
        return Splits(*split(data.images, data.labels), data.classes, data.source)
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        classes = [str(int(c)) for c in torch.unique(y)]
        return Splits(*split(x, y), classes, f"{len(y)} examples")
    raise TypeError(
        f"ablate: expected data to be a path (image folder or .npz), an ImageData, an (x, y) pair of tensors or "
        f"a Splits, got {type(data).__name__}"
    )


def default_where(model: nn.Module) -> str:
    """The name of the model's last convolution or recurrent layer (module order): where the first experiment
    puts one attention layer (on the richest feature map, or over the encoder's states).

    Raises:
        ValueError: the model has no Conv1d/Conv2d/RNN/GRU/LSTM; pass ``where=``.
    """
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.RNNBase)]
    if not found:
        raise ValueError(
            f"ablate: {type(model).__name__} has no Conv1d/Conv2d/RNN layer to put attention after; pass where= "
            f"(module names with wildcards, or types)"
        )
    return found[-1]


def _resolve_variants(
    variants: Sequence[str] | Mapping[str, Variant] | None, base: nn.Module, where: Any, example: Tensor
) -> tuple[dict[str, Variant], dict[str, str], list[str]]:
    """``name -> transform(model) -> model``, ``name -> description`` and the insertion summaries' texts."""
    from attnkit.vision.insert import insert_attention

    if isinstance(variants, Mapping):
        if "none" not in variants:
            raise ValueError("ablate: the variants mapping needs a 'none' entry (the baseline: usually None)")
        return dict(variants), {name: "user-defined variant" for name in variants}, []
    if variants is None:
        _, probe = insert_attention(base, "self_attention", where=where, example_input=example)
        maps = all(i.layout == "BCHW" for i in probe.insertions)
        variants = tuple(CUSTOM_VARIANTS) if maps else _SEQUENCE_VARIANTS
    unknown = [v for v in variants if v not in CUSTOM_VARIANTS]
    if unknown or "none" not in variants:
        raise ValueError(
            f"ablate: unknown variants {unknown} or no 'none' baseline; valid: {', '.join(CUSTOM_VARIANTS)}"
        )
    transforms: dict[str, Variant] = {}
    summaries: list[str] = []
    descriptions = {"none": f"{type(base).__name__} as built by model_fn, no attention added"}
    for name in variants:
        spec = CUSTOM_VARIANTS[name]
        if spec is None:
            transforms[name] = None
            continue
        kind, kwargs = spec

        def transform(model: nn.Module, kind=kind, kwargs=kwargs) -> nn.Module:
            return insert_attention(model, kind, where=where, example_input=example, **kwargs)[0]

        _, summary = insert_attention(base, kind, where=where, example_input=example, **kwargs)
        places = ", ".join(f"`{i.where}` ({i.module_type})" for i in summary.insertions)
        extra = "".join(f", {k}={v}" for k, v in kwargs.items())
        descriptions[name] = (
            f"{summary.insertions[0].block}({kind}{extra}) after {places}: +{summary.added_params:,} params, "
            f"+{summary.added_macs:,} MACs per example"
        )
        transforms[name] = transform
        summaries.append(f"{name}: {summary}")
    return transforms, descriptions, summaries


def ablate(
    model_fn: Callable[[], nn.Module],
    data: Any,
    variants: Sequence[str] | Mapping[str, Variant] | None = None,
    budget: TrainConfig | str | None = None,
    *,
    where: Any = None,
    seeds: Sequence[int] = (0, 1, 2),
    threshold: float = DEFAULT_THRESHOLD,
    augment: Callable[[list[Tensor], torch.Generator], list[Tensor]] | None = None,
    latency_batches: Sequence[int] = (1, 64),
    latency_rounds: int = 20,
    progress: Callable[[str], None] | None = None,
) -> AblationResult | None:
    """Train the user's model with and without attention under one budget; report accuracy, cost and the verdict.

    Args:
        model_fn: builds the model without attention (called once per run, under the run's seed); the model maps
            ``x`` ``(B, ...)`` to logits ``(B, K)``.
        data: an image folder or ``.npz`` path (:func:`load_arrays`; split 65/15/20 stratified, seed 0), an
            :class:`~attnkit.ablation.images.ImageData` or ``(x, y)`` tensors (split the same way), or
            :class:`Splits`.
        variants: names from :data:`CUSTOM_VARIANTS` (must include ``"none"``); default: all of them when the
            attention goes on feature maps, ``none, single_head, multi_head`` on sequences. Or a mapping
            ``name -> transform(model) -> model`` (``None`` = unchanged) with a ``"none"`` entry.
        budget: a :class:`~attnkit.ablation.train.TrainConfig`, or ``"plateau"`` / ``"epochs"`` for its
            defaults with that rule; default ``TrainConfig(budget="plateau", epochs=30)``.
        where: passed to :func:`attnkit.vision.insert_attention`; default :func:`default_where` (the last
            convolution or recurrent layer).
        seeds: one run per seed and variant (initialisation, batch order, augmentation).
        threshold: relative lift that justifies rolling out (0.10 = +10% of the baseline's accuracy).
        augment: optional ``augment(batch, generator) -> batch`` applied to every training batch.
        latency_batches: batch sizes timed on test rows (median of interleaved rounds).
        latency_rounds: interleaved timing rounds per batch size.
        progress: called with one line of text per finished run and with each variant's insertion summary.

    Returns:
        an :class:`~attnkit.ablation.results.AblationResult` (its ``verdict()`` is the decision) on the main
        process, ``None`` on the other ranks of a distributed run.

    Raises:
        ValueError: unknown variants, no seed, no place to insert attention, a model that fails on the data or
            whose output is not ``(B, K)`` logits for the data's ``K`` classes, or data too small to split.
        TypeError: ``data`` of an unsupported type.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> def model_fn():
        ...     return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                          nn.Flatten(), nn.Linear(8, 2))
        >>> x, y = torch.rand(64, 1, 8, 8), torch.arange(64) % 2
        >>> result = ablate(model_fn, (x, y), ["none", "single_head"], TrainConfig(epochs=2, batch_size=16),
        ...                 seeds=[0], latency_rounds=1)
        >>> [v.name for v in result.variants], result.variant("single_head").params > result.variant("none").params
        (['none', 'single_head'], True)
    """
    if not seeds:
        raise ValueError("ablate: expected at least one seed")
    if isinstance(budget, str):
        budget = TrainConfig(budget=budget, epochs=30)
    config = budget or TrainConfig(budget="plateau", epochs=30)
    start = time.perf_counter()
    splits = _as_splits(data)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits.train, splits.val, splits.test
    if len(x_train) < config.batch_size:
        raise ValueError(f"ablate: {len(x_train)} training rows are fewer than one batch of {config.batch_size}")
    base = seeded(model_fn, seeds[0])
    example = x_train[:1]
    try:
        with torch.no_grad():
            out = base.eval()(x_train[:2])
    except Exception as err:
        raise ValueError(
            f"ablate: the model failed on x of shape {tuple(x_train[:2].shape)} ({x_train.dtype}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    num_classes = len(splits.classes)
    if not isinstance(out, Tensor) or out.shape != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"ablate: expected the model to map x of shape {tuple(x_train[:2].shape)} to logits (2, {num_classes}) "
            f"for the data's {num_classes} classes, got {got}"
        )
    where = default_where(base) if where is None else where
    transforms, descriptions, summaries = _resolve_variants(variants, base, where, example)
    if progress is not None and is_main_process():
        for text in summaries:
            progress(text)

    def build(name: str) -> nn.Module:
        model = model_fn()
        return model if transforms[name] is None else transforms[name](model)

    def loss_fn(model: nn.Module, batch: list[Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
        return float((predict(model, [x]).argmax(-1) == y).float().mean())

    results = {name: VariantResult(name, [], description=descriptions[name]) for name in transforms}
    first_models: dict[str, nn.Module] = {}
    for seed in seeds:
        run_config = TrainConfig(**{**config.__dict__, "seed": seed})
        for name in transforms:
            t0 = time.perf_counter()
            model = seeded(lambda name=name: build(name), seed)
            history = fit(
                model,
                [x_train, y_train],
                loss_fn,
                run_config,
                augment=augment,
                validate=lambda m: accuracy(m, x_val, y_val),
            )
            if not is_main_process():
                continue
            score = accuracy(model, x_test, y_test)
            results[name].scores.append(score)
            results[name].runs.append(history)
            first_models.setdefault(name, model)
            if progress is not None:
                progress(f"{name} seed {seed}: accuracy {100 * score:.2f}%, {run_summary(history)} "
                         f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    if not is_main_process():
        return None
    for name, model in first_models.items():
        results[name].params = count_parameters(model)
        results[name].macs = count_macs(lambda model=model: model(x_test[:1]))
    for batch in latency_batches:
        xb = x_test[torch.arange(batch) % len(x_test)]
        medians = interleaved_latency(
            {name: (lambda model=model, xb=xb: model(xb)) for name, model in first_models.items()},
            rounds=latency_rounds,
        )
        for name, seconds in medians.items():
            results[name].latency[batch] = seconds
    shape = "x".join(map(str, x_train.shape[1:]))
    return AblationResult(
        task="custom",
        title=f"{type(base).__name__} on {splits.source}: {len(y_train)} train / {len(y_val)} validation / "
        f"{len(y_test)} test examples of shape {shape}, {num_classes} classes",
        baseline="none",
        seeds=list(seeds),
        variants=[results[name] for name in transforms],
        budget={**config.describe(), "attention after": str(where)},
        wall_time_s=time.perf_counter() - start,
        threshold=threshold,
    )
