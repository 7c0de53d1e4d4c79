#!/usr/bin/env python
"""Train the two digit classifiers shipped in ``attnkit/data`` and measure them on held-out canvases.

Trains a :class:`attnkit.vision.VisionTransformer` (an 8x8 grid of 64 patch tokens + a class token, with the
centred convolutional stem :class:`attnkit.vision.ConvPatchEmbed`) and a
:class:`attnkit.vision.HybridResNet` with CBAM on :class:`attnkit.datasets.DigitCanvases` (real scikit-learn
digits among decoys on 64x64 canvases; fresh canvases every epoch, from the training scans only), then measures
on test canvases (scans never seen in training): accuracy; the pointing game of ViT attention rollout, ViT
relevance and CNN CBAM spatial maps against two baselines, random maps and local ink mass; and the deletion AUC
of each. Writes, atomically:

* ``digits_vit.safetensors``, ``digits_cnn.safetensors`` — weights only;
* ``digits.json`` — model configs, seed, split sizes, training time and load, and every measurement.

Usage::

    python scripts/train_digits.py --overwrite             # the shipped files (src/attnkit/data)
    python scripts/train_digits.py --out /tmp/d --steps 3  # a smoke run

Existing files are only replaced with ``--overwrite``. Reproducible for a given ``--seed`` and thread count.
About 6 minutes on 2 idle cores; on a busy machine ``--threads 1`` is much faster than 2 contended threads
(about 13 minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from attnkit.datasets import DigitCanvases, split_scans
from attnkit.explain import saliency as ev
from attnkit.explain.metrics import deletion, pointing_game
from attnkit.io.atomic import atomic_write
from attnkit.vision.digits import DATA_DIR, DEFAULT_CONFIGS, METADATA_NAME, MODEL_NAMES, build_model

#: Optimisation settings per model (the ViT needs more epochs than the CNN on 1,078 training scans).
RECIPES = {
    "vit": {"epochs": 240, "lr": 1e-3, "weight_decay": 0.05, "warmup": 0.05},
    "cnn": {"epochs": 60, "lr": 2e-3, "weight_decay": 0.01, "warmup": 0.05},
}
EVAL_SEED = 20240  # seed of the held-out evaluation canvases (test scans)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=DATA_DIR, help=f"output directory (default: {DATA_DIR})")
    p.add_argument("--overwrite", action="store_true", help="replace existing weights / metadata")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, canvases and shuffling (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default: see RECIPES)")
    p.add_argument("--steps", type=int, default=None, help="stop each model after this many steps (smoke runs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--canvases-per-epoch", type=int, default=None, help="default: one per training scan")
    p.add_argument("--eval-canvases", type=int, default=1000, help="test canvases for accuracy/pointing game")
    p.add_argument("--deletion-canvases", type=int, default=200, help="test canvases for deletion AUC")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--val-every", type=int, default=None, help="print validation accuracy every N steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in (
        "epochs",
        "steps",
        "batch_size",
        "canvases_per_epoch",
        "eval_canvases",
        "deletion_canvases",
        "val_every",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def _targets(out: Path, models: list[str]) -> list[Path]:
    return [out / f"digits_{name}.safetensors" for name in models] + [out / METADATA_NAME]


def _progress(iterable, *, total: int, desc: str, quiet: bool):
    if quiet:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, mininterval=2.0)


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the steps, then cosine decay to 0."""
    w = max(1, round(warmup * total))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def train(name: str, args: argparse.Namespace, val: DigitCanvases) -> tuple[nn.Module, dict]:
    """Train one model; returns it (eval mode) and its training record."""
    recipe = dict(RECIPES[name])
    epochs = args.epochs or recipe["epochs"]
    torch.manual_seed(args.seed * 1000 + MODEL_NAMES.index(name))
    model = build_model(name)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"],
    )
    per_epoch = args.canvases_per_epoch or len(split_scans()["train"])
    steps_per_epoch = -(-per_epoch // args.batch_size)
    total = epochs * steps_per_epoch if args.steps is None else min(args.steps, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, recipe["warmup"]))
    gen = torch.Generator().manual_seed(args.seed)
    start, cpu_start, step, losses, curve = time.perf_counter(), time.process_time(), 0, [], []
    bar = _progress(range(total), total=total, desc=f"train {name}", quiet=args.quiet)
    it = iter(bar)
    model.train()
    for epoch in range(epochs):
        data = DigitCanvases("train", num_canvases=per_epoch, seed=(args.seed, epoch))
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), args.batch_size):
            if step >= total:
                break
            idx = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            next(it, None)
            if args.val_every and step % args.val_every == 0:
                model.eval()
                curve.append([step, ev.accuracy(model, val.images, val.labels)])
                model.train()
                print(f"train_digits: {name}: step {step}, val accuracy {curve[-1][1]:.3f}", file=sys.stderr)
        if step >= total:
            break
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.eval()
    record = {
        **recipe,
        "epochs": epochs,
        "steps": step,
        "batch_size": args.batch_size,
        "canvases_per_epoch": per_epoch,
        "optimizer": "AdamW, linear warm-up then cosine decay",
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "val_accuracy": ev.accuracy(model, val.images, val.labels),
        "val_curve": curve,
    }
    return model, record


def evaluate(models: dict[str, nn.Module], args: argparse.Namespace) -> tuple[dict, dict]:
    """Held-out measurements per model, and the description of the evaluation set."""
    test = DigitCanvases("test", num_canvases=args.eval_canvases, seed=EVAL_SEED)
    n_del = min(args.deletion_canvases, len(test))
    box_area = ((test.boxes[:, 2] - test.boxes[:, 0]) * (test.boxes[:, 3] - test.boxes[:, 1])).float()
    setup = {
        "split": "test",
        "num_canvases": len(test),
        "seed": EVAL_SEED,
        "deletion_canvases": n_del,
        "deletion_step_pixels": 64,
        "pointing_tolerance_pixels": 0,
        "upsampling": "bilinear, align_corners=False",
        "random_expected_pointing": (box_area / test.canvas_size**2).mean().item(),
    }
    methods = {"vit": ("rollout", "relevance", "random", "ink"), "cnn": ("cbam", "random", "ink")}
    results = {}
    for name, model in models.items():
        gen = torch.Generator().manual_seed(EVAL_SEED)
        out: dict = {"accuracy": ev.accuracy(model, test.images, test.labels), "pointing_game": {}, "deletion_auc": {}}
        for method in methods[name]:
            maps = ev.saliency(method, model, test.images, target=test.labels, generator=gen)
            out["pointing_game"][method] = pointing_game(maps, test.boxes).float().mean().item()
            images, labels = test.images[:n_del], test.labels[:n_del]
            auc = deletion(model, images, maps[:n_del], target=labels, steps=64, batch_size=256).auc
            out["deletion_auc"][method] = auc.mean().item()
        if name == "cnn":
            blocks = len(DEFAULT_CONFIGS["cnn"]["depths"])
            out["cbam_block"] = ev.CBAM_BLOCK
            out["pointing_game_cbam_per_block"] = [
                pointing_game(
                    ev.upsample(ev.cbam_maps(model, test.images, block=b), tuple(test.images.shape[-2:])), test.boxes
                )
                .float()
                .mean()
                .item()
                for b in range(blocks)
            ]
        results[name] = out
    return results, setup


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from safetensors.torch import save

    targets = _targets(args.out, args.models)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.overwrite:
        print(f"train_digits: refusing to overwrite {', '.join(existing)}; pass --overwrite", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    splits = split_scans()
    val = DigitCanvases("val", seed=EVAL_SEED)
    models, training = {}, {}
    for name in args.models:
        models[name], training[name] = train(name, args, val)
        print(
            f"train_digits: {name}: {training[name]['steps']} steps in {training[name]['seconds']:.0f} s, "
            f"val accuracy {training[name]['val_accuracy']:.3f}",
            file=sys.stderr,
        )
    load_after = os.getloadavg()
    t0 = time.perf_counter()
    results, setup = evaluate(models, args)
    setup["seconds"] = round(time.perf_counter() - t0, 1)

    meta = {
        "format": 1,
        "description": "Digit classifiers trained by scripts/train_digits.py on attnkit.datasets.DigitCanvases",
        "seed": args.seed,
        "dataset": {
            "source": "sklearn.datasets.load_digits (1,797 real 8x8 scans)",
            "canvas_size": val.canvas_size,
            "scale": val.scale,
            "num_decoys": val.num_decoys,
            "decoy_fragments": val.decoy_fragments,
            "fractions": [0.6, 0.2, 0.2],
            "split_seed": 0,
            "split_sizes": {k: len(v) for k, v in splits.items()},
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "training_seconds_total": round(sum(t["seconds"] for t in training.values()), 1),
        "evaluation": setup,
        "models": {},
    }
    for name, model in models.items():
        path = args.out / f"digits_{name}.safetensors"
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        atomic_write(path, save(state, metadata={"format": "pt"}), overwrite=True)
        meta["models"][name] = {
            "class": type(model).__name__,
            "config": DEFAULT_CONFIGS[name],
            "weights": path.name,
            "sha256": _sha256(path),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "training": training[name],
            "test": results[name],
        }
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(args.out / METADATA_NAME, text, overwrite=True)
    print(json.dumps({k: v["test"] for k, v in meta["models"].items()}, indent=1))
    print(f"train_digits: wrote {', '.join(str(p) for p in targets)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
