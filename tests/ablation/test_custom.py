"""ablate(): the user's model with attention inserted, trained under one budget; data loading and splitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attnkit.ablation.custom import CUSTOM_VARIANTS, Splits, _resolve_variants, ablate, default_where, load_arrays
from attnkit.ablation.custom import split as split_data
from attnkit.ablation.train import TrainConfig


def _cnn(num_classes=2):
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )  # fmt: skip


class _GRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(10, 8), nn.GRU(8, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0].mean(1))


def _squares(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 1, 12, 12, generator=g)
    y = torch.arange(n) % 2
    x[y == 0, :, 1:5, 1:5] = 1.0
    x[y == 1, :, 7:11, 7:11] = 1.0
    return x, y


CONFIG = TrainConfig(epochs=2, batch_size=16, min_epochs=1, patience=1)


def test_ablate_user_cnn_end_to_end_and_reproducible():
    kwargs = {"variants": ["none", "se", "single_head"], "budget": CONFIG, "seeds": [0, 1], "latency_rounds": 1}
    lines = []
    first = ablate(_cnn, _squares(), progress=lines.append, **kwargs)
    second = ablate(_cnn, _squares(), **kwargs)
    assert [v.scores for v in first.variants] == [v.scores for v in second.variants]
    none, se, single = first.variants
    assert [v.name for v in first.variants] == ["none", "se", "single_head"] and first.task == "custom"
    assert se.params > none.params and single.params > none.params and single.macs > none.macs
    assert "after `3` (Conv2d)" in single.description and "num_heads=1" in single.description  # default where
    assert all(len(v.runs) == 2 and len(v.runs[0].val_score) == 2 for v in first.variants)
    assert all(v.converged in (True, False) for v in first.variants) and set(none.latency) == {1, 64}
    assert any(line.startswith("single_head: insert_attention('self_attention')") for line in lines)
    assert sum("seed 1: accuracy" in line for line in lines) == 3
    verdict = first.verdict()
    assert [v.name for v in verdict.variants] == ["se", "single_head"]
    assert "### Verdict: roll out attention?" in first.to_markdown()


def test_default_variants_follow_the_layout():
    x, _ = _squares(4)
    names, _, _ = _resolve_variants(None, _cnn(), "3", x[:1])
    assert list(names) == list(CUSTOM_VARIANTS)  # feature maps: every block
    names, _, _ = _resolve_variants(None, _GRU(), "rnn", torch.zeros(1, 5, dtype=torch.long))
    assert list(names) == ["none", "single_head", "multi_head"]  # sequences: self-attention only
    assert default_where(_GRU()) == "rnn" and default_where(_cnn()) == "3"


def test_sequence_model_with_user_variants():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 10, (48, 6), generator=g)
    labels = (tokens == 3).any(1).long()
    result = ablate(
        _GRU,
        (tokens, labels),
        {"none": None, "twice": lambda m: nn.Sequential(m)},
        CONFIG,
        seeds=[0],
        latency_batches=(1,),
        latency_rounds=1,
    )
    assert [v.name for v in result.variants] == ["none", "twice"]
    assert result.variant("twice").scores == result.variant("none").scores  # same model, same seed


def test_errors():
    x, y = _squares(40)
    with pytest.raises(ValueError, match=r"to logits \(2, 2\) for the data's 2 classes, got \(2, 3\)"):
        ablate(lambda: _cnn(3), (x, y), budget=CONFIG)
    with pytest.raises(ValueError, match="matched no module"):
        ablate(_cnn, (x, y), ["none", "se"], CONFIG, where="layer*")
    with pytest.raises(ValueError, match=r"unknown variants \['sk'\]"):
        ablate(_cnn, (x, y), ["none", "sk"], CONFIG)
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/RNN layer"):
        ablate(lambda: nn.Sequential(nn.Flatten(), nn.Linear(144, 2)), (x, y), ["none", "se"], CONFIG)
    with pytest.raises(TypeError, match="expected data to be a path"):
        ablate(_cnn, [1, 2, 3], budget=CONFIG)
    with pytest.raises(ValueError, match="at least one seed"):
        ablate(_cnn, (x, y), budget=CONFIG, seeds=[])


def test_load_arrays_and_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "tokens.npz", x=rng.integers(0, 50, (30, 7)), y=np.array(["a", "b", "c"] * 10))
    x, y, classes = load_arrays(tmp_path / "tokens.npz")
    assert x.dtype == torch.int64 and x.shape == (30, 7) and classes == ["a", "b", "c"] and y.tolist()[:3] == [0, 1, 2]
    np.savez(tmp_path / "images.npz", x=rng.integers(0, 255, (30, 6, 6), dtype=np.uint8), y=np.arange(30) % 2)
    x, _, _ = load_arrays(tmp_path / "images.npz")
    assert x.shape == (30, 1, 6, 6) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    (tr, tr_y), (va, va_y), (te, te_y) = split_data(torch.arange(40)[:, None], torch.arange(40) % 2)
    assert (len(tr), len(va), len(te)) == (28, 4, 8) and te_y.tolist().count(0) == 4
    assert len(set(tr[:, 0].tolist()) | set(va[:, 0].tolist()) | set(te[:, 0].tolist())) == 40  # disjoint, complete
    assert isinstance(Splits((tr, tr_y), (va, va_y), (te, te_y), ["0", "1"], "t"), Splits)
