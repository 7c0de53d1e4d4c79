"""The date-normalisation task: CLDR sources, disjoint date splits, length buckets, vocabularies."""

from __future__ import annotations

import datetime

import pytest
import torch

from attnkit.ablation.dates import (
    BOS,
    EOS,
    PAD,
    UNK,
    CharVocab,
    bucket_label,
    encode_sources,
    encode_targets,
    format_date_example,
    length_buckets,
    make_date_task,
    split_dates,
)


@pytest.fixture(scope="module")
def task():
    return make_date_task(num_train=200, num_test_per_bucket=12, bucket_edges=(12, 20, 28, 34), seed=1)


def test_cldr_sources():
    d = datetime.date(2021, 9, 3)
    assert format_date_example(d, "en", "full").source == "Friday, September 3, 2021"
    assert format_date_example(d, "fr", "long").source == "3 septembre 2021"
    assert format_date_example(d, "de", "full").source == "Freitag, 3. September 2021"
    assert format_date_example(d, "pt", "full").target == "2021-09-03"


def test_split_dates_disjoint_cover():
    split = split_dates(2000, 2001, split_seed=4)
    train, test = set(split["train"]), set(split["test"])
    assert not train & test and len(train) + len(test) == 366 + 365
    assert abs(len(test) - 0.2 * 731) <= 1
    assert split == split_dates(2000, 2001, split_seed=4)


def test_task_properties(task):
    assert len(task.train) == 200
    assert all(len(e.source) <= task.train_max_length for e in task.train)
    assert len(task.test) == 12 * len(task.buckets)
    assert any(len(e.source) > task.train_max_length for e in task.test)  # longer than any training input
    train_dates = {e.target for e in task.train}
    assert not train_dates & {e.target for e in task.test}  # split by calendar date
    ids = task.test_bucket_ids()
    for e, b in zip(task.test, ids.tolist()):
        lo, hi = task.buckets[b]
        assert lo <= len(e.source) and (hi is None or len(e.source) <= hi)


def test_task_reproducible(task):
    again = make_date_task(num_train=200, num_test_per_bucket=12, bucket_edges=(12, 20, 28, 34), seed=1)
    assert again.train == task.train and again.test == task.test
    assert again.source_vocab.itos == task.source_vocab.itos


def test_buckets():
    assert length_buckets((12, 20)) == [(1, 12), (13, 20), (21, None)]
    assert [bucket_label(b) for b in length_buckets((12, 20))] == ["1-12", "13-20", "21+"]
    with pytest.raises(ValueError, match="ascending"):
        length_buckets((20, 12))


def test_vocab_and_encoding():
    vocab = CharVocab("bca")
    assert vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and vocab.itos[4:] == ["a", "b", "c"]
    assert vocab.encode("abz") == [4, 5, UNK]
    assert vocab.decode([BOS, 4, 6, UNK, EOS, 5]) == "ac?"
    src, lengths = encode_sources(["ab", "cab"], vocab)
    assert src.tolist() == [[4, 5, PAD], [6, 4, 5]] and lengths.tolist() == [2, 3]
    tgt = encode_targets(["ab", "ba"], vocab)
    assert tgt.tolist() == [[BOS, 4, 5, EOS], [BOS, 5, 4, EOS]] and tgt.dtype == torch.int64


def test_errors():
    with pytest.raises(ValueError, match="unknown language 'xx-nope'"):
        make_date_task(num_train=10, num_test_per_bucket=1, languages=["xx-nope"])
    with pytest.raises(ValueError, match="unknown formats"):
        make_date_task(num_train=10, num_test_per_bucket=1, formats=["huge"])
    with pytest.raises(ValueError, match="num_train"):
        make_date_task(num_train=0)
    with pytest.raises(ValueError, match="no training pair"):
        make_date_task(num_train=10, num_test_per_bucket=1, train_max_length=3)
