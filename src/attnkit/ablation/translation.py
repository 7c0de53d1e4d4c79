"""The seq2seq ablation: date normalisation (:mod:`attnkit.ablation.dates`) with a GRU encoder-decoder without
attention, with Bahdanau or Luong attention, and a small Transformer (:mod:`attnkit.ablation.seq2seq`), under one
budget, scored by exact match overall and per input-length bucket (including lengths longer than any training
input)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.ablation.cost import count_macs, count_parameters, interleaved_latency
from attnkit.ablation.dates import TARGET_LENGTH, DateTask, bucket_label, encode_sources, encode_targets
from attnkit.ablation.results import AblationResult, Alignment, VariantResult
from attnkit.ablation.seq2seq import SEQ2SEQ_MODELS, build_seq2seq
from attnkit.ablation.train import TrainConfig, fit, is_main_process, predict, run_summary, seeded

__all__ = ["run_seq2seq_ablation"]

STEPS = TARGET_LENGTH + 1  # ten characters and EOS

_DESCRIPTIONS = {
    "none": "bi-GRU encoder (64 per direction) + GRU decoder (64) fed a fixed summary vector (Cho et al. 2014)",
    "additive": "same encoder/decoder + additive attention over the encoder states (Bahdanau et al. 2015)",
    "luong": "same encoder/decoder + global 'general' attention with input feeding (Luong et al. 2015)",
    "transformer": "Transformer, 2 encoder + 2 decoder layers, E=48, 4 heads, FFN 96, sinusoidal positions "
    "(Vaswani et al. 2017)",
}


def _alignment_examples(task: DateTask, count: int) -> list[int]:
    """Test indices for heatmaps: the first example of evenly spaced buckets, from different languages."""
    bucket_ids = task.test_bucket_ids().tolist()
    chosen, languages = [], set()
    wanted = sorted({round(i * (len(task.buckets) - 1) / max(1, count - 1)) for i in range(count)})
    for b in wanted:
        candidates = [i for i, bi in enumerate(bucket_ids) if bi == b]
        pick = next(
            (i for i in candidates if task.test[i].language not in languages), candidates[0] if candidates else None
        )
        if pick is not None:
            chosen.append(pick)
            languages.add(task.test[pick].language)
    return chosen


def run_seq2seq_ablation(
    task: DateTask,
    *,
    models: Sequence[str] = SEQ2SEQ_MODELS,
    seeds: Sequence[int] = (0, 1, 2),
    config: TrainConfig | None = None,
    latency_batches: Sequence[int] = (1, 64),
    latency_rounds: int = 20,
    num_alignments: int = 3,
    val_fraction: float = 0.1,
    progress: Callable[[str], None] | None = None,
) -> AblationResult | None:
    """Train every model with every seed under one budget; score exact match overall and per length bucket.

    Args:
        task: the data (:func:`attnkit.ablation.dates.make_date_task`).
        models: names from :data:`attnkit.ablation.seq2seq.SEQ2SEQ_MODELS`; ``"none"`` is the baseline.
        seeds: one run per seed and model (initialisation, batch order).
        config: the budget (its ``seed`` is replaced by each seed); default ``TrainConfig()``.
        latency_batches: batch sizes timed: greedy decoding of that many test sources (11 steps).
        latency_rounds: interleaved rounds per batch size (median reported).
        num_alignments: test examples whose alignment heatmaps are kept per attentive model (seed ``seeds[0]``).
        val_fraction: share of the training pairs held out (seed 0) as the validation set of the learning curves,
            convergence and early stopping (exact match); the test pairs are never used for either.
        progress: called with one line of text per finished run.

    Returns:
        an :class:`AblationResult` (groups = length buckets) on the main process, ``None`` on other ranks.

    Raises:
        ValueError: an unknown model, no seed, or ``val_fraction`` outside ``(0, 1)``.
    """
    unknown = [m for m in models if m not in SEQ2SEQ_MODELS]
    if unknown or not models:
        raise ValueError(f"run_seq2seq_ablation: unknown models {unknown}; valid: {', '.join(SEQ2SEQ_MODELS)}")
    if not seeds:
        raise ValueError("run_seq2seq_ablation: expected at least one seed")
    if not 0 < val_fraction < 1:
        raise ValueError(f"run_seq2seq_ablation: expected val_fraction in (0, 1), got {val_fraction!r}")
    config = config or TrainConfig()
    start = time.perf_counter()
    src_vocab, tgt_vocab = task.source_vocab, task.target_vocab
    all_src, all_len = encode_sources([e.source for e in task.train], src_vocab)
    all_tgt = encode_targets([e.target for e in task.train], tgt_vocab)
    order = torch.randperm(len(all_len), generator=torch.Generator().manual_seed(0))
    n_val = max(1, round(val_fraction * len(order)))
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    train_src, train_len, train_tgt = all_src[train_idx], all_len[train_idx], all_tgt[train_idx]
    val_src, val_len, val_tgt = all_src[val_idx], all_len[val_idx], all_tgt[val_idx]
    test_src, test_len = encode_sources([e.source for e in task.test], src_vocab)
    test_tgt = encode_targets([e.target for e in task.test], tgt_vocab)
    bucket_ids = task.test_bucket_ids()
    labels = [bucket_label(b) for b in task.buckets]

    def loss_fn(model: nn.Module, batch: list[Tensor]) -> Tensor:
        src, lengths, tgt = batch
        width = int(lengths.max())  # trim the padding of this batch
        logits = model(src[:, :width], lengths, tgt[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten())

    def exact_match(model: nn.Module, src: Tensor, lengths: Tensor, tgt: Tensor) -> Tensor:
        tokens = predict(lambda s, n, m=model: m.generate(s[:, : int(n.max())], n, STEPS).tokens, [src, lengths])
        return (tokens == tgt[:, 1:]).all(-1).float()

    def validate(model: nn.Module) -> float:
        return float(exact_match(model, val_src, val_len, val_tgt).mean())

    results = {name: VariantResult(name, [], description=_DESCRIPTIONS[name]) for name in models}
    for name in models:
        results[name].groups = {label: [] for label in labels}
    first_models: dict[str, nn.Module] = {}
    for seed in seeds:
        run_config = TrainConfig(**{**config.__dict__, "seed": seed})
        for name in models:
            t0 = time.perf_counter()
            model = seeded(lambda name=name: build_seq2seq(name, len(src_vocab), len(tgt_vocab)), seed)
            history = fit(model, [train_src, train_len, train_tgt], loss_fn, run_config, validate=validate)
            if not is_main_process():
                continue
            correct = exact_match(model, test_src, test_len, test_tgt)
            results[name].scores.append(float(correct.mean()))
            results[name].runs.append(history)
            for b, label in enumerate(labels):
                results[name].groups[label].append(float(correct[bucket_ids == b].mean()))
            first_models.setdefault(name, model)
            if progress is not None:
                per_bucket = " ".join(f"{label}:{100 * results[name].groups[label][-1]:.0f}" for label in labels)
                progress(
                    f"{name} seed {seed}: exact match {100 * results[name].scores[-1]:.2f}% [{per_bucket}], "
                    f"{run_summary(history)} ({time.perf_counter() - t0:.0f} s)"
                )
    if not is_main_process():
        return None

    # Costs: one source of the median test length for MACs and batch 1; the first `batch` test sources otherwise.
    median = int(test_len.float().median())
    one = int(torch.nonzero(test_len == median)[0]) if (test_len == median).any() else 0
    for name, model in first_models.items():
        results[name].params = count_parameters(model)
        s, n = test_src[one : one + 1, : int(test_len[one])], test_len[one : one + 1]
        results[name].macs = count_macs(lambda model=model, s=s, n=n: model.generate(s, n, STEPS))
    for batch in latency_batches:
        if batch == 1:
            s, n = test_src[one : one + 1, : int(test_len[one])], test_len[one : one + 1]
        else:
            idx = torch.linspace(0, len(test_len) - 1, batch).long()
            s, n = test_src[idx][:, : int(test_len[idx].max())], test_len[idx]
        medians = interleaved_latency(
            {name: (lambda m=m, s=s, n=n: m.generate(s, n, STEPS)) for name, m in first_models.items()},
            rounds=latency_rounds,
        )
        for name, seconds in medians.items():
            results[name].latency[batch] = seconds

    alignments = []
    examples = _alignment_examples(task, num_alignments)
    for name, model in first_models.items():
        if name == "none":
            continue
        for i in examples:
            s, n = test_src[i : i + 1, : int(test_len[i])], test_len[i : i + 1]
            with torch.inference_mode():
                out = model.generate(s, n, STEPS, with_alignments=True)
            target = [tgt_vocab.itos[int(t)] for t in out.tokens[0]]
            correct = bool((out.tokens[0] == test_tgt[i, 1:]).all())
            alignments.append(Alignment(name, task.test[i].source, target, out.alignments[0].tolist(), correct))

    n_long = sum(len(e.source) > task.train_max_length for e in task.test)
    languages = sorted({e.language for e in task.train})
    return AblationResult(
        task="seq2seq",
        title=f"date normalisation ({', '.join(languages)}; CLDR formats via babel) -> ISO 8601: "
        f"{len(train_idx)} train + {n_val} validation pairs (sources <= {task.train_max_length} chars), "
        f"{len(task.test)} test pairs "
        f"on unseen dates ({n_long} longer than any training source)",
        baseline="none",
        seeds=list(seeds),
        variants=[results[name] for name in models],
        budget={**config.describe(), "grad clip": config.grad_clip, "decoding": "greedy, 11 steps"},
        group_title=f"source length in characters (training sources: at most {task.train_max_length})",
        alignments=alignments,
        wall_time_s=time.perf_counter() - start,
        score_name="exact match",
    )
