"""The tasks of ``benchmarks/explanations.py``: the shipped digit ViT, MiniLM sentence pairs, the date models.

Sentence pairs (task b): consecutive sentences of 6 to 20 words from the same topic of Python's language
reference (``pydoc_data``, real English shipped with Python), encoded by the shipped all-MiniLM-L6-v2 loaded
into :class:`attnkit.models.BertModel`; the explained score is the cosine similarity of the two mean-pooled
sentence embeddings (the model's sentence-transformers use). Inputs are ``(P, 2, L)`` token ids, padded with
the pad id; a removed token becomes padding (``removal="pad"``: masked out of attention and of the pooling, as
ERASER removes tokens) or ``[UNK]`` (``removal="unk"``: both sentences then share ``[UNK]`` tokens, which raises
their similarity), while padding and ``[CLS]``/``[SEP]`` never change (their baseline is themselves) and rank
last in every map.

The date models are not shipped: :func:`date_models` trains the Bahdanau, Luong and Transformer models of
``attnkit ablate seq2seq`` (same task, sizes and training loop; a fixed budget of ``epochs`` epochs, seed 0) and
keeps their weights as safetensors in ``cache_dir`` so a second run reuses them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.ablation.dates import DateTask, encode_sources, encode_targets, make_date_task
from attnkit.ablation.seq2seq import build_seq2seq
from attnkit.ablation.train import TrainConfig, fit, predict, seeded

DATE_MODELS = ("additive", "luong", "transformer")


def _markup(sentence: str) -> bool:
    return any(mark in sentence for mark in ("::", "|", "+--", "==", ">>>", "***"))


def sentence_pairs(count: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` pairs of consecutive sentences (6-20 words each) from one topic of the language reference."""
    import random
    import re
    from pydoc_data.topics import topics

    pairs = []
    for _, body in sorted(topics.items()):
        text = " ".join(line for line in body.splitlines() if line and not line.startswith(" "))
        sents = [s for s in re.split(r"(?<=[.!?])\s+", text) if 6 <= len(s.split()) <= 20 and not _markup(s)]
        pairs += list(zip(sents[::2], sents[1::2]))
    random.Random(seed).shuffle(pairs)
    return pairs[:count]


@dataclass
class PairTask:
    """``ids`` ``(P, 2, L)``, ``baseline`` like it, ``units`` bool ``(P, 2, L)`` (tokens that can be removed)."""

    model: torch.nn.Module
    ids: torch.Tensor
    baseline: torch.Tensor
    units: torch.Tensor
    pad_id: int


def minilm_pairs(count: int, *, removal: str = "pad") -> PairTask:
    from transformers import AutoTokenizer

    from attnkit.models import BertModel
    from attnkit.text.models import default_model_dir

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    flat = [s for pair in sentence_pairs(count) for s in pair]
    ids = tok(flat, padding=True, truncation=True, max_length=64, return_tensors="pt")["input_ids"]
    ids = ids.reshape(len(flat) // 2, 2, -1)
    special = torch.isin(ids, torch.tensor([tok.pad_token_id, tok.cls_token_id, tok.sep_token_id]))
    fill = tok.pad_token_id if removal == "pad" else tok.unk_token_id
    baseline = torch.where(special, ids, torch.full_like(ids, fill))
    model = BertModel.from_pretrained(path).eval()
    return PairTask(model, ids, baseline, ~special, tok.pad_token_id)


def pair_embeddings(model, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``(P, 2, E)`` mean-pooled embeddings of ``(P, 2, L)`` ids."""
    flat = ids.reshape(-1, ids.shape[-1])
    mask = (flat != pad_id).long()
    hidden = model(flat, attention_mask=mask)
    m = mask[..., None].to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1)).reshape(*ids.shape[:2], -1)


def pair_cosine(model, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``(P,)`` cosine similarity of each pair's sentence embeddings (the explained score)."""
    e = pair_embeddings(model, ids, pad_id)
    return F.cosine_similarity(e[:, 0], e[:, 1], dim=-1)


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
