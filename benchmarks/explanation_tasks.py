"""The tasks of ``benchmarks/explanations.py``: the shipped digit ViT, and the date seq2seq models.

The date models are not shipped: :func:`date_models` trains the Bahdanau, Luong and Transformer models of
``attnkit ablate seq2seq`` (same task, sizes and training loop; a fixed budget of ``epochs`` epochs, seed 0) and
keeps their weights as safetensors in ``cache_dir`` so a second run reuses them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.ablation.dates import DateTask, encode_sources, encode_targets, make_date_task
from attnkit.ablation.seq2seq import build_seq2seq
from attnkit.ablation.train import TrainConfig, fit, predict, seeded

DATE_MODELS = ("additive", "luong", "transformer")


def date_task() -> DateTask:
    return make_date_task(num_train=4000, num_test_per_bucket=100)


def date_models(task: DateTask, cache_dir: Path, *, epochs: int = 8, log=print) -> dict[str, torch.nn.Module]:
    """``{name: model in eval mode}`` for :data:`DATE_MODELS`, trained here or read from ``cache_dir``."""
    from safetensors.torch import load_file, save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    sv, tv = task.source_vocab, task.target_vocab
    src, lengths = encode_sources([e.source for e in task.train], sv)
    tgt = encode_targets([e.target for e in task.train], tv)

    def loss_fn(model, batch):
        s, n, t = batch
        logits = model(s[:, : int(n.max())], n, t[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten())

    models = {}
    for name in DATE_MODELS:
        model = seeded(lambda name=name: build_seq2seq(name, len(sv), len(tv)), 0)
        path = cache_dir / f"date-{name}-e{epochs}.safetensors"
        if path.exists():
            model.load_state_dict(load_file(path))
        else:
            t0 = time.perf_counter()
            fit(model, [src, lengths, tgt], loss_fn, TrainConfig(epochs=epochs, budget="epochs", seed=0))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
            log(f"trained {name} in {time.perf_counter() - t0:.0f} s")
        models[name] = model.eval()
    return models


def date_exact_match(model, task: DateTask) -> float:
    src, lengths = encode_sources([e.source for e in task.test], task.source_vocab)
    tgt = encode_targets([e.target for e in task.test], task.target_vocab)
    tokens = predict(lambda s, n: model.generate(s[:, : int(n.max())], n, tgt.shape[1] - 1).tokens, [src, lengths])
    return float((tokens == tgt[:, 1:]).all(-1).float().mean())


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="train (or load) the date models and print their exact match")
    p.add_argument("--cache", type=Path, default=Path("/tmp/attnkit-explanations"))
    args = p.parse_args()
    torch.set_num_threads(1)
    task = date_task()
    for name, model in date_models(task, args.cache).items():
        print(name, f"exact match {100 * date_exact_match(model, task):.1f}%")
