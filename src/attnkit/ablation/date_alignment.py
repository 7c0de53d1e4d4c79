"""Gold alignments of the date task, and the alignment error rate of the seq2seq models' source-target maps.

Every target ``"YYYY-MM-DD"`` character comes from known source characters: the CLDR pattern that rendered the
source (``babel``) says where the day, month and year fields are. :func:`gold_alignment` turns that into Och &
Ney's sure and possible links (target x source characters):

* a digit of a numeric field (year ``2021``, day ``3`` / ``03``, numeric month ``09``) is a **sure** link from the
  target digit to the source digit it copies, fields aligned right (``3`` -> ``03``: the ``3`` is sure); a target
  digit with no source digit (the ``0`` of ``03`` for ``3``) is **possible**-linked to every digit of the field;
* a month written in words (``sept.``, ``września``) gives both month digits **possible** links to every character
  of the month field (no single character is "the" source);
* hyphens, weekdays and punctuation have no links (score only the digit rows: :data:`DIGIT_ROWS`).

:func:`source_target_maps` gives each model's ``(B, T, S)`` maps under teacher forcing on the gold target:
``"raw"`` (the attention the decoder used: Bahdanau/Luong weights, the Transformer's last cross-attention layer
averaged over heads), ``"relevance"`` (Chefer et al. 2021: the gradient-weighted attention of the emitted
token's logit; for the recurrent models, Eq. 5 on the step's alignment), and for the Transformer ``"rollout"``
(the last cross-attention, head mean, times the encoder's attention rollout, Abnar & Zuidema 2020: keys are
encoder outputs, which the rollout maps back to source characters). :func:`alignment_scores` scores them.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnkit.ablation.dates import TARGET_LENGTH, CharVocab, DateExample, encode_sources, encode_targets

__all__ = [
    "DIGIT_ROWS",
    "METHODS",
    "alignment_scores",
    "date_fields",
    "gold_alignment",
    "source_target_maps",
    "teacher_inputs",
]

#: Target positions of the eight digits of ``YYYY-MM-DD`` (the rows with gold links).
DIGIT_ROWS = (0, 1, 2, 3, 5, 6, 8, 9)
#: Map names :func:`source_target_maps` knows.
METHODS = ("raw", "rollout", "relevance")
_FIELD = re.compile(r"%\(([A-Za-z]+)\)s")
_KINDS = {"d": "day", "M": "month", "L": "month", "y": "year", "E": "weekday", "c": "weekday", "e": "weekday"}
_TARGET_SPAN = {"year": (0, 4), "month": (5, 7), "day": (8, 10)}


def date_fields(example: DateExample) -> dict[str, tuple[int, int]]:
    """Half-open character spans ``{"day": (a, b), "month": ..., "year": ..., "weekday": ...}`` of ``example.source``.

    Raises:
        ValueError: the source is not what babel renders for the example's date, language and format, or the
            pattern has a field other than day, month, year and weekday.
        ImportError: babel is missing.
    """
    try:
        from babel.core import Locale
        from babel.dates import DateTimeFormat, get_date_format, parse_pattern
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the date task needs babel (CLDR data): pip install 'attnkit[demo]'") from err
    date = datetime.date.fromisoformat(example.target)
    pattern = parse_pattern(get_date_format(example.format, locale=example.language).pattern).format
    values = DateTimeFormat(date, Locale.parse(example.language))
    spans: dict[str, tuple[int, int]] = {}
    text: list[str] = []
    for i, part in enumerate(_FIELD.split(pattern)):  # literal, field, literal, ...
        if i % 2 == 0:
            text.append(part.replace("%%", "%"))
        else:
            kind = _KINDS.get(part[0])
            if kind is None:
                raise ValueError(f"date_fields: unsupported CLDR field {part!r} in {pattern!r}")
            value = values[part]
            start = sum(map(len, text))
            spans[kind] = (start, start + len(value))
            text.append(value)
    if "".join(text) != example.source:
        raise ValueError(
            f"date_fields: {example.source!r} is not babel's {example.format!r} rendering of {example.target} in "
            f"{example.language!r} ({''.join(text)!r})"
        )
    return spans


def gold_alignment(example: DateExample, *, source_length: int | None = None) -> tuple[Tensor, Tensor]:
    """Sure and possible links ``(T, S)`` bool from the 10 target characters to the source characters.

    Args:
        example: a task pair (:class:`attnkit.ablation.dates.DateExample`).
        source_length: ``S``, at least ``len(example.source)`` (pad to a batch's width); default the source's.

    Returns:
        ``(sure, possible)``, both ``(10, S)`` bool, ``sure ⊆ possible`` (rules in the module docstring).

    Raises:
        ValueError: as :func:`date_fields`, or ``source_length`` shorter than the source.
    """
    length = len(example.source) if source_length is None else source_length
    if length < len(example.source):
        raise ValueError(f"gold_alignment: source_length={length} < the source's {len(example.source)} characters")
    sure = torch.zeros(TARGET_LENGTH, length, dtype=torch.bool)
    possible = torch.zeros_like(sure)
    for kind, (a, b) in date_fields(example).items():
        if kind == "weekday":
            continue
        t0, t1 = _TARGET_SPAN[kind]
        field = example.source[a:b]
        if not field.isdigit():  # a month in words: every character may be the source
            possible[t0:t1, a:b] = True
            continue
        for k in range(t1 - t0):  # right-aligned: the last target digit copies the last source digit
            j = b - (t1 - t0) + k
            if j >= a:
                sure[t0 + k, j] = True
            else:
                possible[t0 + k, a:b] = True
    return sure, possible | sure


def teacher_inputs(examples: Sequence[DateExample], source_vocab: CharVocab, target_vocab: CharVocab):
    """``(src (B, S), src_lengths (B,), tgt_in (B, 10), gold (B, 10))`` int64 for teacher forcing on the gold
    targets: decoder inputs ``BOS, c_1..c_9`` and the characters ``c_1..c_10`` each step emits."""
    src, lengths = encode_sources([e.source for e in examples], source_vocab)
    tgt = encode_targets([e.target for e in examples], target_vocab)  # (B, T + 2): BOS, 10 chars, EOS
    return src, lengths, tgt[:, :-2], tgt[:, 1:-1]  # inputs BOS..c_9, outputs c_1..c_10


def _raw_and_grad(model: nn.Module, src, lengths, tgt_in, gold, *, grads: bool) -> tuple[Tensor, Tensor | None]:
    """Recurrent models: per-step alignments ``(B, T, S)`` and Chefer's ``(∇A ⊙ A)^+`` of each step's logit.

    The attention module returns ``(context, weights)`` once per decoder step, with ``context = weights @ value``
    and the weights used nowhere else, so ``∂score/∂weights = (∂score/∂context) @ valueᵀ`` exactly (the
    chain rule through the one product), whichever kernel computed the weights.
    """
    steps: list[tuple[Tensor, Tensor, Tensor]] = []

    def keep(_module, args, kwargs, out):
        value = kwargs.get("value", args[2] if len(args) > 2 else None)
        steps.append((out[0], out[1], args[1] if value is None else value))

    handle = model.attn.register_forward_hook(keep, with_kwargs=True)
    try:
        with torch.set_grad_enabled(grads):
            logits = model(src, lengths, tgt_in)
    finally:
        handle.remove()
    raw = torch.cat([w.detach() for _, w, _ in steps], 1)  # (B, T, S)
    if not grads:
        return raw, None
    rel = []
    for t, (context, weights, value) in enumerate(steps):
        score = logits[:, t].gather(1, gold[:, t : t + 1]).sum()
        (g_context,) = torch.autograd.grad(score, [context], retain_graph=t + 1 < len(steps))
        g_weights = g_context @ value.detach().mT  # (B, 1, S)
        rel.append((g_weights * weights.detach()).clamp_min(0))
    return raw, torch.cat(rel, 1)


def source_target_maps(
    model: nn.Module, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, gold: Tensor, *, methods=METHODS
) -> dict[str, Tensor]:
    """Each method's ``(B, T, S)`` target x source map of a seq2seq model, teacher-forced on ``gold``.

    Args:
        model: an attentive :mod:`attnkit.ablation.seq2seq` model (``GRUSeq2Seq`` with ``"additive"`` or
            ``"luong"`` attention, or ``TransformerSeq2Seq``), in eval mode.
        src: ``(B, S)`` int64 source ids; src_lengths: ``(B,)`` int64.
        tgt_in: ``(B, T)`` int64 decoder inputs (``BOS`` then the gold characters but the last).
        gold: ``(B, T)`` int64 gold target ids; row ``t`` of a map explains emitting ``gold[:, t]``.
        methods: names among :data:`METHODS`; ``"rollout"`` exists for the Transformer only (others skipped).

    Returns:
        ``{method: (B, T, S) float}`` (0 on padded source positions).

    Raises:
        ValueError: a model without attention, or an unknown method.
    """
    from attnkit.explain import capture, relevance, rollout

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"source_target_maps: unknown methods {unknown}; valid: {', '.join(METHODS)}")
    if getattr(model, "attention_name", None) == "none":
        raise ValueError("source_target_maps: the 'none' model has no attention to explain")
    out: dict[str, Tensor] = {}
    if hasattr(model, "attention_name"):  # recurrent encoder-decoder: one cross-attention per step
        raw, rel = _raw_and_grad(model, src, src_lengths, tgt_in, gold, grads="relevance" in methods)
        out.update({"raw": raw, "relevance": rel})
        return {m: out[m] for m in methods if m in out}
    with torch.no_grad(), capture(model) as rec:
        model(src, src_lengths, tgt_in)
    cross = rec.weights("cross")[-1].float().mean(1)  # (B, T, S)
    out["raw"] = cross
    if "rollout" in methods:
        encoder = [m for m in rec.maps if m.kind == "self" and m.name.startswith("encoder")]
        out["rollout"] = cross @ rollout(encoder).float()
    if "relevance" in methods:
        rows = []
        for t in range(gold.shape[1]):
            res = relevance(
                model, (src, src_lengths, tgt_in), lambda logits, t=t: logits[:, t].gather(1, gold[:, t : t + 1])
            )
            rows.append(res.get("decoder", "encoder")[:, t])
        out["relevance"] = torch.stack(rows, 1).float()
    return {m: out[m] for m in methods if m in out}


def alignment_scores(
    model: nn.Module,
    examples: Sequence[DateExample],
    source_vocab: CharVocab,
    target_vocab: CharVocab,
    *,
    methods=METHODS,
    batch_size: int = 64,
) -> dict[str, float]:
    """Corpus-level alignment error rate (:func:`attnkit.explain.metrics.alignment_error_rate`) of each method's
    map on the digit rows (:data:`DIGIT_ROWS`) of ``examples``; lower is better, 0 = the gold links.

    Raises:
        ValueError: as :func:`source_target_maps`, or no examples.
    """
    from attnkit.explain.metrics import alignment_error_rate

    if not examples:
        raise ValueError("alignment_scores: expected at least one example")
    rows = list(DIGIT_ROWS)
    counts: dict[str, list[Tensor]] = {}
    golds: list[tuple[Tensor, Tensor]] = []
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        src, lengths, tgt_in, gold = teacher_inputs(batch, source_vocab, target_vocab)
        maps = source_target_maps(model, src, lengths, tgt_in, gold, methods=methods)
        links = [gold_alignment(e, source_length=src.shape[1]) for e in batch]
        sure = torch.stack([s for s, _ in links])[:, rows]
        possible = torch.stack([p for _, p in links])[:, rows]
        golds.append((sure, possible))
        for name, m in maps.items():
            counts.setdefault(name, []).append(m[:, rows])
    out = {}
    for name, parts in counts.items():
        width = max(p.shape[-1] for p in parts)
        maps = torch.cat([_pad(p, width) for p in parts])
        sure = torch.cat([_pad(s, width) for s, _ in golds])
        possible = torch.cat([_pad(p, width) for _, p in golds])
        out[name] = float(alignment_error_rate(maps, sure, possible, reduction="corpus"))
    return out


def _pad(t: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))
