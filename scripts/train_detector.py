#!/usr/bin/env python
"""Train the digit detectors shipped in ``attnkit/data`` and score them on held-out scenes.

Trains :class:`attnkit.vision.detection.RTDETR` (the transformer detector) and/or
:class:`attnkit.vision.detection.CenterNet` (the convolutional baseline, same backbone) on
:class:`attnkit.datasets.DigitScenes` (2-5 real scikit-learn digits per canvas, 12-28 px tall, with overlaps and
fragment clutter; fresh scenes from the training scans only, canvases of 96, 64 and 128 pixels in turn), each for
a wall-clock budget (``--minutes``; the learning rate follows a cosine of the elapsed fraction of the budget), then
scores COCO mAP with pycocotools on test scenes (scans never seen in training). Writes, atomically:

* ``digit_rtdetr.safetensors``, ``digit_centernet.safetensors`` — weights only;
* ``digit_detectors.json`` — configs, recipe, seed, training time, steps, load, and the held-out scores (entries of
  models not trained in this run are kept).

Usage::

    python scripts/train_detector.py --models rtdetr --overwrite        # the shipped files (src/attnkit/data)
    python scripts/train_detector.py --out /tmp/d --steps 3 --eval 8    # a smoke run

Existing files are only replaced with ``--overwrite``. Because the schedule follows wall-clock time, two runs
with the same seed differ slightly unless ``--steps`` fixes the length. On a busy machine ``--threads 1`` is
faster than two contended threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from attnkit.datasets import DigitScenes, split_scans
from attnkit.vision.detection.centernet import CenterNetLoss
from attnkit.vision.detection.evaluate import coco_map
from attnkit.vision.detection.losses import SetCriterion
from attnkit.vision.detection.pretrained import (
    DATA_DIR,
    DEFAULT_CONFIGS,
    DETECTOR_NAMES,
    METADATA_NAME,
    build_detector,
)

RECIPES = {
    "rtdetr": {"lr": 5e-4, "weight_decay": 1e-4, "batch_size": 16, "clip": 0.1, "warmup_steps": 100},
    "centernet": {"lr": 1e-3, "weight_decay": 1e-4, "batch_size": 16, "clip": 10.0, "warmup_steps": 100},
}
CANVAS_SIZES = (96, 64, 128)  # training canvases, one size per step in turn
POOL = 512  # scenes generated at a time per canvas size
EVAL_SEED = 4242  # seed of the held-out scenes (test scans)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=DETECTOR_NAMES, default=list(DETECTOR_NAMES))
    p.add_argument("--out", type=Path, default=DATA_DIR, help=f"output directory (default: {DATA_DIR})")
    p.add_argument("--overwrite", action="store_true", help="replace existing weights / metadata")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=20.0, help="training budget per model (default 20)")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps (schedule by step; smoke runs)")
    p.add_argument("--eval", type=int, default=300, help="held-out scenes per canvas size scored (default 300)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--no-pretrained-backbone",
        action="store_true",
        help="start the backbone from scratch instead of the shipped digit classifier (digits_cnn.safetensors)",
    )
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _scenes(split: str, n: int, seed, size: int) -> DigitScenes:
    return DigitScenes(split, num_canvases=n, seed=seed, canvas_size=size)


def init_backbone(model: torch.nn.Module) -> None:
    """Initialise ``model.backbone.net`` from the shipped digit classifier (same HybridResNet config: widths
    16/32/64, stem stride 2, CBAM), trained by scripts/train_digits.py on the same training scans; its classifier
    ``fc`` is dropped. Like ImageNet pre-training for DETRs, at digit scale."""
    from safetensors.torch import load_file

    from attnkit.vision.digits import DATA_DIR as CLASSIFIER_DIR
    from attnkit.vision.digits import load_metadata

    entry = load_metadata(CLASSIFIER_DIR)["models"]["cnn"]
    cfg = entry["config"]
    net = model.backbone.net
    if list(cfg["widths"]) != [m[0].conv1.out_channels for m in net.stages] or cfg["stem_stride"] != 2:
        raise SystemExit(f"train_detector: the backbone does not match the digit classifier config {cfg}")
    state = {k: v for k, v in load_file(str(CLASSIFIER_DIR / entry["weights"])).items() if not k.startswith("fc.")}
    net.load_state_dict(state, strict=True)


def train(name: str, args) -> tuple[torch.nn.Module, dict]:
    recipe = RECIPES[name]
    torch.manual_seed(args.seed)
    model = build_detector(name)
    if not args.no_pretrained_backbone:
        init_backbone(model)
    criterion = SetCriterion(model.num_classes) if name == "rtdetr" else CenterNetLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "level_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "level_embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"],
    )
    budget = args.minutes * 60
    bs = recipe["batch_size"]
    pools: dict[int, tuple[DigitScenes, torch.Tensor, int]] = {}
    epochs = dict.fromkeys(CANVAS_SIZES, 0)
    start = time.perf_counter()
    step, seen, last_log = 0, 0, start
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        size = CANVAS_SIZES[step % len(CANVAS_SIZES)]
        data, order, pos = pools.get(size, (None, None, POOL))
        if pos + bs > POOL:
            data = _scenes("train", POOL, (args.seed, epochs[size], size), size)
            order, pos = torch.randperm(POOL), 0
            epochs[size] += 1
        idx = order[pos : pos + bs].tolist()
        pools[size] = (data, order, pos + bs)
        images = data.images[idx]
        targets = [data.targets[i] for i in idx]
        lr = recipe["lr"] * min(1.0, (step + 1) / recipe["warmup_steps"]) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        losses = criterion(model.forward_raw(images), targets)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip"])
        opt.step()
        step += 1
        seen += len(idx)
        if not args.quiet and (time.perf_counter() - last_log > 30 or step == 1):
            last_log = time.perf_counter()
            parts = " ".join(f"{k}={float(v.detach()):.3f}" for k, v in losses.items())
            print(f"[{name}] step {step} {elapsed / 60:.1f} min lr={lr:.2e} {parts}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    return model.eval(), {"steps": step, "images_seen": seen, "training_seconds": round(seconds, 1)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, args) -> dict:
    scores = {}
    for size in (96, 64, 128):
        data = _scenes("test", args.eval, EVAL_SEED + size, size)
        dets = []
        for i in range(0, len(data), 32):
            dets.extend(model(data.images[i : i + 32]))
        scores[f"canvas_{size}"] = coco_map(dets, data.targets)
    return scores


def main(argv=None) -> int:
    from safetensors.torch import save

    from attnkit.io.atomic import atomic_write

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta_path = args.out / METADATA_NAME
    targets = [args.out / f"digit_{n}.safetensors" for n in args.models]
    existing = [p for p in targets if p.exists()]
    if existing and not args.overwrite:
        print(f"train_detector: {existing[0]} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    sizes = {k: len(v) for k, v in split_scans().items()}
    meta.update(
        {
            "format": 1,
            "description": "Digit detectors trained by scripts/train_detector.py on attnkit.datasets.DigitScenes",
            "dataset": {
                "source": "sklearn.datasets.load_digits (1,797 real 8x8 scans)",
                "train_canvas_sizes": list(CANVAS_SIZES),
                "num_digits": [2, 5],
                "digit_size": [12, 28],
                "split_sizes": sizes,
                "eval_seed": EVAL_SEED,
                "eval_scenes_per_size": args.eval,
            },
        }
    )
    meta.setdefault("models", {})
    for name, path in zip(args.models, targets):
        load_before = os.getloadavg()
        model, stats = train(name, args)
        scores = evaluate(model, args)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, save(state, metadata={"format": "pt"}), overwrite=True)
        meta["models"][name] = {
            "weights": path.name,
            "config": DEFAULT_CONFIGS[name],
            "recipe": {**RECIPES[name], "minutes": args.minutes, "fixed_steps": args.steps, "seed": args.seed},
            "parameters": sum(p.numel() for p in model.parameters()),
            **stats,
            "environment": {
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": args.threads,
                "cpu_count": os.cpu_count(),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            },
            "scores": scores,
        }
        text = json.dumps(meta, indent=2) + "\n"
        atomic_write(meta_path, text, overwrite=True)
        s = scores["canvas_96"]
        print(f"[{name}] {stats} mAP={s['map']:.3f} mAP50={s['map_50']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
