#!/usr/bin/env python
"""Train the character-level decoder shipped in ``attnkit/data`` on Python's language reference.

Trains :class:`attnkit.models.char_decoder.CharDecoder` (config :data:`CHAR_DECODER_CONFIG`) on the training topics
of ``pydoc_data.topics`` (:func:`attnkit.datasets.language_reference.language_reference_text`), random windows of
``--context`` characters, AdamW with a linear warm-up and cosine decay, then measures bits per character on the
held-out ``val`` and ``test`` topics (:func:`attnkit.models.char_decoder.bits_per_char`). Writes, atomically:

* ``char_decoder.safetensors`` — weights only (float32);
* ``char_decoder.json`` — config, seed, recipe, training time and load, and the held-out bits per character
  (also on the first 2,048 test characters, which the test suite re-measures).

Usage::

    flock /tmp/attnkit-heavy.lock python scripts/train_char_decoder.py --overwrite   # the shipped files
    python scripts/train_char_decoder.py --out /tmp/c --steps 3                     # a smoke run

Existing files are only replaced with ``--overwrite``. Reproducible for a given ``--seed`` and thread count.
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
from torch.nn import functional as F

from attnkit.datasets.language_reference import language_reference_text
from attnkit.io.atomic import atomic_write
from attnkit.models.char_decoder import (
    CHAR_DECODER_CONFIG,
    CHAR_DECODER_METADATA,
    DATA_DIR,
    CharDecoder,
    bits_per_char,
    encode_chars,
)

WEIGHTS_NAME = "char_decoder.safetensors"
SLICE_CHARS = 2048  # the test slice the test suite re-measures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=DATA_DIR, help=f"output directory (default: {DATA_DIR})")
    p.add_argument("--overwrite", action="store_true", help="replace existing weights / metadata")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches (default 0)")
    p.add_argument("--steps", type=int, default=600, help="optimisation steps (default 600)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--context", type=int, default=128, help="characters per training window (default 128)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.0, help="residual dropout while training (default 0)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    p.add_argument("--val-every", type=int, default=200, help="print held-out bits per char every N steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "context", "val_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(args: argparse.Namespace, val_text: str) -> tuple[CharDecoder, dict]:
    torch.manual_seed(args.seed)
    model = CharDecoder(**CHAR_DECODER_CONFIG, dropout=args.dropout)
    ids = torch.tensor(encode_chars(language_reference_text("train")), dtype=torch.long)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, args.steps, args.warmup))
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.context + 1)
    curve, losses = [], []
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, args.steps + 1):
        model.train()
        starts = torch.randint(0, len(ids) - args.context - 1, (args.batch_size,), generator=gen)
        batch = ids[starts[:, None] + offsets]  # (B, context + 1)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % args.val_every == 0 or step == args.steps:
            model.eval()
            bpc = bits_per_char(model, val_text, context=args.context)
            curve.append([step, bpc])
            recent = sum(losses[-50:]) / len(losses[-50:]) / math.log(2)
            print(
                f"step {step}: train {recent:.3f} bits/char, val {bpc:.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    record = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "context": args.context,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "dropout": args.dropout,
        "warmup": args.warmup,
        "optimizer": "AdamW, linear warm-up then cosine decay, gradient norm clipped at 1",
        "train_characters": len(ids),
        "final_train_bits_per_char": sum(losses[-50:]) / len(losses[-50:]) / math.log(2),
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "val_curve": curve,
    }
    return model.eval(), record


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save

    args = parse_args(argv)
    targets = [args.out / WEIGHTS_NAME, args.out / CHAR_DECODER_METADATA]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.overwrite:
        print(f"train_char_decoder: refusing to overwrite {', '.join(existing)}; pass --overwrite", file=sys.stderr)
        return 2
    if not args.out.is_dir():
        print(f"train_char_decoder: --out {args.out} is not a directory", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    val_text, test_text = language_reference_text("val"), language_reference_text("test")
    model, record = train(args, val_text)
    start = time.perf_counter()
    scores = {
        "val_bits_per_char": bits_per_char(model, val_text, context=args.context),
        "test_bits_per_char": bits_per_char(model, test_text, context=args.context),
        "test_slice_characters": SLICE_CHARS,
        "test_slice_bits_per_char": bits_per_char(model, test_text[:SLICE_CHARS], context=args.context),
        "val_characters": len(val_text),
        "test_characters": len(test_text),
        "context": args.context,
        "seconds": round(time.perf_counter() - start, 1),
    }
    load_after = os.getloadavg()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = args.out / WEIGHTS_NAME
    atomic_write(path, save(state, metadata={"format": "pt"}), overwrite=True)
    meta = {
        "format": 1,
        "description": "Character-level decoder trained by scripts/train_char_decoder.py on pydoc_data.topics",
        "seed": args.seed,
        "dataset": {
            "source": "pydoc_data.topics (the Python language reference shipped with Python)",
            "split": "topics sorted by name; index % 10 == 9 test, index % 10 == 4 val, the rest train",
            "python": platform.python_version(),
        },
        "environment": {
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "class": "CharDecoder",
        "config": dict(CHAR_DECODER_CONFIG),
        "weights": WEIGHTS_NAME,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "training": record,
        "evaluation": scores,
    }
    atomic_write(args.out / CHAR_DECODER_METADATA, json.dumps(meta, indent=2) + "\n", overwrite=True)
    print(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
