"""Date normalisation as a small "translation" task: dates written in words in several languages -> ISO 8601.

Sources are real CLDR date formats (month and weekday names, word order, punctuation) rendered by ``babel``:
``format_date(date, fmt, locale=language)`` with ``fmt`` in ``"medium"`` (abbreviated month, e.g.
``"3 sept. 2021"``), ``"long"`` (``"3 de septiembre de 2021"``) and ``"full"`` (with the weekday,
``"sexta-feira, 3 de setembro de 2021"``). Targets are ``date.isoformat()`` (``"2021-09-03"``, 10 characters).
Both sides are sequences of characters.

Splits are by **calendar date**: every date of ``[first_year, last_year]`` belongs to exactly one of ``"train"``
or ``"test"`` (from ``split_seed``), so no test date is seen in training in any language or format. The training
set keeps only sources of at most ``train_max_length`` characters; the test set is filled per input-length bucket
(:func:`length_buckets`), including buckets longer than any training input, which measures how a model copes with
longer inputs than it was trained on (the degradation Cho et al. 2014 and Bahdanau et al. 2015, Fig. 2, report for
attention-free encoder-decoders).

Needs ``babel`` (``pip install 'attnkit[demo]'``).
"""

from __future__ import annotations

import datetime
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FORMATS",
    "LANGUAGES",
    "CharVocab",
    "DateExample",
    "DateTask",
    "bucket_label",
    "encode_sources",
    "encode_targets",
    "format_date_example",
    "length_buckets",
    "make_date_task",
    "split_dates",
]

#: Latin-script CLDR locales whose ``medium``/``long``/``full`` formats spell the month in words (German's
#: ``medium`` is numeric, ``03.09.2021``, which is kept: real inputs mix both).
LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "pl", "da")
FORMATS = ("medium", "long", "full")
#: Special tokens, at these indices in every :class:`CharVocab`.
PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
TARGET_LENGTH = 10  # "YYYY-MM-DD"


def _babel_format_date():
    try:
        from babel.dates import format_date
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the date task needs babel (CLDR data): pip install 'attnkit[demo]'") from err
    return format_date


@dataclass(frozen=True)
class DateExample:
    """One pair: ``source`` (the date in words), ``target`` (ISO 8601), and how the source was made."""

    source: str
    target: str
    language: str
    format: str


def format_date_example(date: datetime.date, language: str, fmt: str) -> DateExample:
    """``date`` written with the CLDR ``fmt`` pattern of ``language``, paired with its ISO 8601 form.

    Example:
        >>> format_date_example(datetime.date(2021, 9, 3), "pt", "full").source
        'sexta-feira, 3 de setembro de 2021'
    """
    text = _babel_format_date()(date, fmt, locale=language)
    return DateExample(text, date.isoformat(), language, fmt)


def split_dates(
    first_year: int = 1900, last_year: int = 2099, *, test_fraction: float = 0.2, split_seed: int = 0
) -> dict[str, list[datetime.date]]:
    """Partition the calendar dates of ``[first_year, last_year]`` into ``{"train": [...], "test": [...]}``.

    Raises:
        ValueError: an empty year range or ``test_fraction`` outside ``(0, 1)``.
    """
    if not 1 <= first_year <= last_year <= 9999:
        raise ValueError(f"split_dates: expected 1 <= first_year <= last_year <= 9999, got {first_year}, {last_year}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"split_dates: expected test_fraction in (0, 1), got {test_fraction}")
    start, stop = datetime.date(first_year, 1, 1), datetime.date(last_year, 12, 31)
    days = [start + datetime.timedelta(days=i) for i in range((stop - start).days + 1)]
    random.Random(split_seed).shuffle(days)
    n_test = max(1, round(test_fraction * len(days)))
    return {"train": sorted(days[n_test:]), "test": sorted(days[:n_test])}


def length_buckets(edges: Sequence[int]) -> list[tuple[int, int | None]]:
    """Inclusive ``(low, high)`` character-length ranges from ascending upper edges; the last is open.

    Example:
        >>> length_buckets((12, 20))
        [(1, 12), (13, 20), (21, None)]
    """
    edges = [int(e) for e in edges]
    if not edges or any(b <= a for a, b in itertools.pairwise(edges)) or edges[0] < 1:
        raise ValueError(f"length_buckets: expected ascending positive edges, got {list(edges)}")
    lows = [1, *(e + 1 for e in edges)]
    return [(lo, hi) for lo, hi in zip(lows, [*edges, None])]


def bucket_label(bucket: tuple[int, int | None]) -> str:
    """``"13-20"`` or ``"37+"``."""
    lo, hi = bucket
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


def _in_bucket(length: int, bucket: tuple[int, int | None]) -> bool:
    return bucket[0] <= length and (bucket[1] is None or length <= bucket[1])


class CharVocab:
    """Characters <-> ids, with ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3 first.

    Args:
        chars: the characters, in any order (sorted and de-duplicated here, so the ids are reproducible).
    """

    def __init__(self, chars: str | Sequence[str]) -> None:
        self.itos = [*_SPECIALS, *sorted(set(chars) - set(_SPECIALS))]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (unknown ones give ``UNK``), without ``BOS``/``EOS``."""
        return [self.stoi.get(c, UNK) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Characters up to the first ``EOS`` (``PAD`` and ``BOS`` skipped, ``UNK`` as ``"?"``)."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append("?" if i == UNK or i >= len(self.itos) else self.itos[i])
        return "".join(out)


def encode_sources(texts: Sequence[str], vocab: CharVocab) -> tuple[Tensor, Tensor]:
    """Right-padded source ids ``(N, S)`` int64 (``S`` = longest text) and lengths ``(N,)`` int64."""
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.int64)
    ids = torch.full((len(texts), int(lengths.max()) if len(texts) else 0), PAD, dtype=torch.int64)
    for n, text in enumerate(texts):
        ids[n, : len(text)] = torch.tensor(vocab.encode(text), dtype=torch.int64)
    return ids, lengths


def encode_targets(texts: Sequence[str], vocab: CharVocab) -> Tensor:
    """``(N, T + 2)`` int64 rows ``[BOS, c_1, ..., c_T, EOS]`` (all targets have the same length ``T``)."""
    return torch.tensor([[BOS, *vocab.encode(t), EOS] for t in texts], dtype=torch.int64)


@dataclass
class DateTask:
    """Train/test pairs, vocabularies and length buckets of the date-normalisation task (:func:`make_date_task`)."""

    train: list[DateExample]
    test: list[DateExample]
    source_vocab: CharVocab
    target_vocab: CharVocab
    buckets: list[tuple[int, int | None]]
    train_max_length: int

    def test_bucket_ids(self) -> Tensor:
        """``(N_test,)`` int64: the index in :attr:`buckets` of each test source's length."""
        return torch.tensor(
            [next(b for b, bucket in enumerate(self.buckets) if _in_bucket(len(e.source), bucket)) for e in self.test]
        )


def make_date_task(
    *,
    num_train: int = 6000,
    num_test_per_bucket: int = 300,
    train_max_length: int = 28,
    bucket_edges: Sequence[int] = (12, 20, 28, 34),
    languages: Sequence[str] = LANGUAGES,
    formats: Sequence[str] = FORMATS,
    first_year: int = 1900,
    last_year: int = 2099,
    seed: int = 0,
    split_seed: int = 0,
) -> DateTask:
    """Generate the task: ``(date, language, format)`` drawn uniformly; dates from disjoint train/test splits.

    Args:
        num_train: training pairs, all with sources of at most ``train_max_length`` characters.
        num_test_per_bucket: test pairs per input-length bucket (fewer when a bucket is rare: at most
            ``200 · num_test_per_bucket`` draws are made).
        train_max_length: longest training source, in characters (test buckets above it are "longer than
            training").
        bucket_edges: ascending upper edges of the test length buckets (:func:`length_buckets`).
        languages: CLDR locale codes; default :data:`LANGUAGES`.
        formats: CLDR date format names among ``"short"``, ``"medium"``, ``"long"``, ``"full"``; default
            :data:`FORMATS`.
        first_year, last_year: the calendar range.
        seed: seed of the draws (the same arguments give the same pairs).
        split_seed: seed of the train/test date split.

    Returns:
        a :class:`DateTask`; the source vocabulary holds the characters of the training sources (test-only
        characters map to ``<unk>``), the target vocabulary ``0-9`` and ``-``.

    Raises:
        ValueError: non-positive sizes, an unknown language (babel's message) or format, no test pair at all.
        ImportError: babel is missing.
    """
    for name, value in (("num_train", num_train), ("num_test_per_bucket", num_test_per_bucket)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"make_date_task: expected {name} to be a positive int, got {value!r}")
    bad = [f for f in formats if f not in ("short", "medium", "long", "full")]
    if bad or not formats:
        raise ValueError(f"make_date_task: unknown formats {bad}; valid: short, medium, long, full")
    if not languages:
        raise ValueError("make_date_task: expected at least one language")
    try:
        for lang in languages:
            format_date_example(datetime.date(2000, 1, 1), lang, formats[0])
    except Exception as err:  # babel raises UnknownLocaleError (a plain Exception) or ValueError
        raise ValueError(f"make_date_task: unknown language {lang!r} ({err}); e.g. {', '.join(LANGUAGES)}") from None
    split = split_dates(first_year, last_year, split_seed=split_seed)
    rng = random.Random(seed)
    buckets = length_buckets(bucket_edges)

    def draw(dates: list[datetime.date]) -> DateExample:
        return format_date_example(rng.choice(dates), rng.choice(languages), rng.choice(formats))

    train: list[DateExample] = []
    for _ in range(200 * num_train):
        if len(train) == num_train:
            break
        example = draw(split["train"])
        if len(example.source) <= train_max_length:
            train.append(example)
    per_bucket: list[list[DateExample]] = [[] for _ in buckets]
    for _ in range(200 * num_test_per_bucket):
        if all(len(b) == num_test_per_bucket for b in per_bucket):
            break
        example = draw(split["test"])
        b = next(i for i, bucket in enumerate(buckets) if _in_bucket(len(example.source), bucket))
        if len(per_bucket[b]) < num_test_per_bucket:
            per_bucket[b].append(example)
    test = [e for b in per_bucket for e in b]
    if not train or not test:
        raise ValueError(
            f"make_date_task: no {'training' if not train else 'test'} pair; train_max_length={train_max_length} "
            f"may be shorter than every source"
        )
    source_vocab = CharVocab("".join(e.source for e in train))
    target_vocab = CharVocab("0123456789-")
    return DateTask(train, test, source_vocab, target_vocab, buckets, train_max_length)
