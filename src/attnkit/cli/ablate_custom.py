"""``attnkit ablate custom``: the user's own model (``package.module:factory``) with attention inserted into it.

The factory is imported with the current directory on ``sys.path`` (as ``uvicorn``/``gunicorn`` do, so
``examples.user_cnn:build`` works from a checkout) and called with ``num_classes=K`` when it has that parameter.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Callable

from attnkit.cli.registry import UserError

__all__ = ["add_custom", "custom_job"]


def add_custom(sub, common: Callable[[argparse.ArgumentParser, int], None], epochs: int) -> None:
    """Add the ``custom`` task parser to ``sub`` (with the options shared by every task from ``common``)."""
    from attnkit.ablation.custom import CUSTOM_VARIANTS

    c = sub.add_parser(
        "custom",
        help="your model: attention inserted after the layers you name, trained with and without it",
        description="Import your classifier from package.module:factory, insert SE / ECA / CBAM / non-local / "
        "single- or multi-head self-attention after the modules --where names (default: the last conv or "
        "recurrent layer), train every variant under one budget on --data, and report accuracy, learning curves, "
        "convergence, cost and the roll-out verdict.",
    )
    c.add_argument("--model", required=True, help="package.module:factory returning an nn.Module (logits (B, K))")
    c.add_argument(
        "--data",
        required=True,
        help="'digits' (built-in 64x64 cluttered digits), an image folder, or an .npz with x (images, or (N, L) "
        "token ids / features) and y; split 65/15/20 train/val/test, stratified",
    )
    c.add_argument(
        "--where",
        default=None,
        help="comma-separated module names with fnmatch wildcards, or nn.<Type> (e.g. 'features.3,nn.GRU'); "
        "default: the last Conv1d/Conv2d/RNN layer",
    )
    c.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, from {','.join(CUSTOM_VARIANTS)} (default: all on feature maps, "
        "none,single_head,multi_head on sequences)",
    )
    common(c, epochs)


def _factory(spec: str) -> Callable:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--model: expected package.module:factory, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:
        raise UserError(f"--model: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--model: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--model: {spec} is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def _where(text: str | None):
    if text is None:
        return None
    from torch import nn

    items = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token.startswith("nn."):
            kind = getattr(nn, token[3:], None)
            if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
                raise UserError(f"--where: {token!r} is not a torch.nn module type (e.g. nn.Conv2d, nn.GRU)")
            items.append(kind)
        else:
            items.append(token)
    if not items:
        raise UserError("--where: no module name or type given")
    return items


def _data(spec: str):
    from attnkit.ablation.custom import Splits, load_arrays, split
    from attnkit.ablation.images import DataError, load_digits

    if spec == "digits":
        train, val, test = load_digits(splits=("train", "val", "test"))
        pairs = [(d.images, d.labels) for d in (train, val, test)]
        return Splits(*pairs, train.classes, train.source)
    try:
        x, y, classes = load_arrays(spec)
        return Splits(*split(x, y), classes, spec)
    except DataError as err:
        raise UserError(str(err)) from None


def custom_job(args: argparse.Namespace, config, progress: Callable[[str], None]):
    """Validate the command line (import the factory, read the data, build the model once) and return the job."""
    from attnkit.ablation.custom import CUSTOM_VARIANTS, ablate

    factory = _factory(args.model)
    variants = None
    if args.variants is not None:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in CUSTOM_VARIANTS]
        if unknown or not variants:
            raise UserError(f"unknown variant {', '.join(map(repr, unknown)) or '(none given)'}; valid: "
                            f"{','.join(CUSTOM_VARIANTS)}")  # fmt: skip
        if "none" not in variants:
            variants.insert(0, "none")  # the baseline of every lift
    where = _where(args.where)
    splits = _data(args.data)
    try:
        wants_classes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        wants_classes = False
    num_classes = len(splits.classes)

    def model_fn():
        return factory(num_classes=num_classes) if wants_classes else factory()

    try:
        model_fn()
    except Exception as err:
        raise UserError(f"--model: {args.model}() failed ({type(err).__name__}: {err})") from None
    return lambda: ablate(
        model_fn,
        splits,
        variants,
        config,
        where=where,
        seeds=range(args.seeds),
        threshold=args.threshold / 100,
        latency_rounds=2 if args.quick else args.latency_rounds,
        progress=progress,
    )
