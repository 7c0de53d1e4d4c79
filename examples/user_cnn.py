"""Does attention help *my* model? A small CNN written the way a user would write it (plain torch.nn, nothing from
attnkit), and the ablation that inserts attention into it.

Run the ablation from the repository root, either from Python::

    python examples/user_cnn.py --out ablation-user-cnn

or with the command line, which imports the factory below::

    attnkit ablate custom --model examples.user_cnn:build --data digits --where features.11 --out ablation-user-cnn

Both train the CNN as written and with SE, ECA, CBAM, non-local, single-head and 4-head self-attention inserted
after ``features.11`` (the last pooling layer: 64 channels on an 8x8 map for 64x64 inputs) on the built-in cluttered
digits, until the validation accuracy plateaus, and end with the roll-out verdict. ``build_gru`` is a sequence
classifier for the same experiment on token sequences (attention goes over the GRU's states).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool stages (16, 32, 64 channels), global average pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class GRUClassifier(nn.Module):
    """Token ids ``(B, L)`` -> embedding -> bidirectional GRU -> mean over time -> class logits."""

    def __init__(self, num_classes: int = 2, vocab_size: int = 64, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.encoder = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.encoder(self.embed(tokens))  # (B, L, 2 * width)
        return self.head(states.mean(1))


def build(num_classes: int = 10) -> nn.Module:
    """The factory ``attnkit ablate custom --model examples.user_cnn:build`` calls."""
    return SmallCNN(num_classes)


def build_gru(num_classes: int = 2) -> nn.Module:
    """A sequence model for ``--model examples.user_cnn:build_gru`` (attention over the GRU's states)."""
    return GRUClassifier(num_classes)


def main() -> None:
    from attnkit.ablation import TrainConfig, ablate, load_digits, write_report
    from attnkit.ablation.custom import Splits
    from attnkit.ablation.vision import random_translate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ablation-user-cnn"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs (early stopping on a plateau)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train, val, test = load_digits(splits=("train", "val", "test"))
    data = Splits(*[(d.images, d.labels) for d in (train, val, test)], train.classes, train.source)
    result = ablate(
        build,
        data,
        budget=TrainConfig(budget="plateau", epochs=args.epochs),
        where="features.11",
        seeds=range(args.seeds),
        augment=lambda batch, g: [random_translate(batch[0], g, 4), batch[1]],  # the vision ablation's shifts
        progress=lambda line: print("...", line, flush=True),
    )
    result.budget["augmentation"] = "random shift ±4 px"
    print(result.to_markdown())
    write_report(result, args.out, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
