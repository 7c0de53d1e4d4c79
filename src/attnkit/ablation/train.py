"""One training loop for every ablation variant: the same optimizer, schedule, batch order and augmentation draws
for a given seed, on one process or under ``torch.distributed`` (DistributedDataParallel, gloo on CPU).

Distributed runs are launched with ``torchrun`` (e.g. ``torchrun --nproc-per-node 2 -m attnkit.cli.main ablate
seq2seq``): :func:`init_distributed` reads the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) and joins a gloo process group. :func:`fit` then splits every global batch across
the ranks (rank ``r`` takes rows ``r, r + W, ...``) and DDP averages the gradients, so a W-process run takes the
same optimizer steps as a one-process run of the same global batch (exactly in exact arithmetic for models without
batch statistics; BatchNorm statistics are per rank, as usual with DDP).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["TrainConfig", "fit", "init_distributed", "is_main_process", "predict", "seeded", "world"]

Batch = list[Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """The budget every variant of an ablation gets.

    Attributes:
        epochs: passes over the training set (the last partial batch is dropped).
        batch_size: global batch size (split across ranks under DDP; must be a multiple of the world size).
        lr: peak learning rate of AdamW under a one-cycle schedule (Smith & Topin 2019; ``OneCycleLR``, 30%
            warm-up, cosine annealing), stepped per batch.
        weight_decay: AdamW decoupled weight decay (Loshchilov & Hutter 2019).
        grad_clip: clip the global gradient norm to this value; ``None`` = no clipping.
        seed: seeds the batch order and augmentation draws (a generator of its own, identical for every variant),
            and, through :func:`seeded`, the parameter initialisation.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: expected {name} to be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: expected lr > 0, got {self.lr!r}")

    def describe(self) -> dict[str, object]:
        """The budget as a report shows it (same for every variant), with the process and thread counts."""
        return {
            "epochs": self.epochs,
            "batch": self.batch_size,
            "optimizer": f"AdamW lr {self.lr:g} one-cycle",
            "weight decay": self.weight_decay,
            "processes": world()[1],
            "torch threads per process": torch.get_num_threads(),
        }


def init_distributed() -> tuple[int, int]:
    """Join the gloo process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``; return ``(rank, world)``.

    Without ``torchrun`` (or with one process) nothing is initialised and ``(0, 1)`` is returned.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (or when not distributed): the process that evaluates, times and writes."""
    return world()[0] == 0


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Call ``build()`` with Python, NumPy and torch seeded from ``seed`` (reproducible initialisation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return build()


def fit(
    model: nn.Module,
    data: Sequence[Tensor],
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    config: TrainConfig,
    *,
    augment: Callable[[Batch, torch.Generator], Batch] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place with AdamW + one-cycle on ``data`` for ``config.epochs`` epochs.

    Every epoch draws a permutation from a generator seeded with ``config.seed``; each global batch is
    augmented with that generator (``augment(batch, generator)``), then split across ranks under DDP.

    Args:
        model: the module to train (wrapped in DDP when a process group of more than one rank exists; DDP
            broadcasts rank 0's initial parameters).
        data: tensors sharing their first dimension ``N`` (e.g. ``[images, labels]``).
        loss_fn: ``loss_fn(module, batch) -> scalar`` mean loss over the batch's rows.
        config: the budget.
        augment: optional per-batch augmentation; must draw only from the given generator.
        progress: called with ``(epoch, mean training loss of this rank)`` after every epoch.

    Returns:
        the mean training loss of every epoch (this rank's rows).

    Raises:
        ValueError: tensors of different lengths, fewer rows than one batch, or a batch size that the world
            size does not divide.
    """
    n = len(data[0])
    if any(len(t) != n for t in data):
        raise ValueError(f"fit: expected tensors of the same length, got {[len(t) for t in data]}")
    rank, size = world()
    if config.batch_size % size:
        raise ValueError(f"fit: batch_size {config.batch_size} is not a multiple of the world size {size}")
    steps_per_epoch = n // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"fit: {n} training rows are fewer than one batch of {config.batch_size}")
    trained = nn.parallel.DistributedDataParallel(model) if size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = [t[idx] for t in data]
            if augment is not None:
                batch = augment(batch, generator)
            if size > 1:
                batch = [t[rank::size] for t in batch]
            loss = loss_fn(trained, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        losses.append(total / steps_per_epoch)
        if progress is not None:
            progress(epoch, losses[-1])
    model.eval()
    return losses


@torch.inference_mode()
def predict(fn: Callable[..., Tensor], data: Sequence[Tensor], batch_size: int = 256) -> Tensor:
    """``torch.cat`` of ``fn(*rows)`` over consecutive batches of ``data`` (inference mode)."""
    n = len(data[0])
    return torch.cat([fn(*(t[i : i + batch_size] for t in data)) for i in range(0, n, batch_size)])
