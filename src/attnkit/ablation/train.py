"""One training loop for every ablation variant: the same optimizer, schedule, batch order and augmentation draws
for a given seed, on one process or under ``torch.distributed`` (DistributedDataParallel, gloo on CPU).

Two budgets (:class:`TrainConfig`): ``"epochs"`` trains every variant for the same number of epochs under a
one-cycle schedule; ``"plateau"`` trains until the validation score stops improving (early stopping with patience,
after a learning-rate drop, up to a maximum of epochs) and keeps the best epoch's weights. Either way the run's
curves and whether it converged are returned (:class:`attnkit.ablation.convergence.History`).

Distributed runs are launched with ``torchrun`` (e.g. ``torchrun --nproc-per-node 2 -m attnkit.cli.main ablate
seq2seq``): :func:`init_distributed` reads the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) and joins a gloo process group. :func:`fit` then splits every global batch across
the ranks (rank ``r`` takes rows ``r, r + W, ...``) and DDP averages the gradients, so a W-process run takes the
same optimizer steps as a one-process run of the same global batch (exactly in exact arithmetic for models without
batch statistics; BatchNorm statistics are per rank, as usual with DDP).
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from attnkit.ablation.convergence import History, best_epoch, epochs_since_improvement, has_plateaued, has_stalled

__all__ = [
    "BUDGETS",
    "History",
    "TrainConfig",
    "fit",
    "init_distributed",
    "is_main_process",
    "predict",
    "run_summary",
    "seeded",
    "world",
]

Batch = list[Tensor]

#: Budget rules: the same number of epochs for every run, or until the validation score plateaus.
BUDGETS = ("epochs", "plateau")


@dataclass(frozen=True)
class TrainConfig:
    """The budget every variant of an ablation gets.

    Attributes:
        epochs: passes over the training set (the last partial batch is dropped); the maximum under budget
            ``"plateau"``.
        batch_size: global batch size (split across ranks under DDP; must be a multiple of the world size).
        lr: peak learning rate of AdamW. Budget ``"epochs"``: one-cycle schedule (Smith & Topin 2019;
            ``OneCycleLR``, 30% warm-up, cosine annealing); budget ``"plateau"``: linear warm-up over the first
            epoch from ``lr / 25``, then constant until a plateau divides it by 10. Stepped per batch.
        weight_decay: AdamW decoupled weight decay (Loshchilov & Hutter 2019).
        grad_clip: clip the global gradient norm to this value; ``None`` = no clipping.
        seed: seeds the batch order and augmentation draws (a generator of its own, identical for every variant),
            and, through :func:`seeded`, the parameter initialisation.
        budget: ``"epochs"`` (every run trains ``epochs`` epochs) or ``"plateau"`` (early stopping on the
            validation score: ``patience`` epochs without improvement first divide the learning rate by 10, up
            to ``lr_drops`` times, then stop; the best epoch's weights are kept; at most ``epochs`` epochs).
        patience: epochs without improvement that make a plateau (:mod:`attnkit.ablation.convergence`); also
            the rule that marks a run of either budget *not converged*.
        min_delta: the smallest validation-score gain that counts as an improvement (score units: 0.005 = half
            a point of accuracy).
        lr_drops: learning-rate divisions by 10 allowed before stopping (budget ``"plateau"``).
        min_epochs: budget ``"plateau"`` neither drops the rate nor stops before this many epochs (PyTorch
            Lightning's ``min_epochs``; Keras' ``start_from_epoch``): scores such as exact match can sit at 0
            for the first epochs before a model takes off.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    seed: int = 0
    budget: str = "epochs"
    patience: int = 3
    min_delta: float = 0.005
    lr_drops: int = 1
    min_epochs: int = 5

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "min_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: expected {name} to be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: expected lr > 0, got {self.lr!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"TrainConfig: unknown budget {self.budget!r}; valid: {', '.join(BUDGETS)}")
        if not self.min_delta >= 0:
            raise ValueError(f"TrainConfig: expected min_delta >= 0, got {self.min_delta!r}")
        if isinstance(self.lr_drops, bool) or not isinstance(self.lr_drops, int) or self.lr_drops < 0:
            raise ValueError(f"TrainConfig: expected lr_drops to be an int >= 0, got {self.lr_drops!r}")

    def describe(self) -> dict[str, object]:
        """The budget as a report shows it (same for every variant), with the process and thread counts."""
        if self.budget == "epochs":
            rule = {"budget": f"{self.epochs} epochs", "optimizer": f"AdamW lr {self.lr:g} one-cycle"}
        else:
            drops = f", lr ÷10 up to {self.lr_drops}x on a plateau" if self.lr_drops else ""
            rule = {
                "budget": f"until plateau (no val. gain > {self.min_delta:g} in {self.patience} epochs{drops}; "
                f"best epoch kept), at least {min(self.min_epochs, self.epochs)} and at most {self.epochs} epochs",
                "optimizer": f"AdamW lr {self.lr:g}, 1 warm-up epoch, then constant",
            }
        return {
            **rule,
            "batch": self.batch_size,
            "weight decay": self.weight_decay,
            "not converged": f"val. score still gaining > {self.min_delta:g} within the last {self.patience} epochs",
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


def _shared_score(score: float) -> float:
    """Rank 0's validation score on every rank (BatchNorm statistics differ per rank under DDP, and every rank
    must take the same stopping decision)."""
    if world()[1] == 1:
        return score
    value = torch.tensor([score], dtype=torch.float64)
    dist.broadcast(value, src=0)
    return float(value)


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """The per-step learning-rate schedule of ``config.budget`` and a function dividing the rate by 10."""
    if config.budget == "epochs":
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
        )
        return schedule, None
    factor = [1.0]

    def lr_lambda(step: int) -> float:  # linear warm-up over one epoch from lr/25 (OneCycleLR's start), then flat
        warm = min(1.0, (step + 1) / steps_per_epoch)
        return factor[0] * (1 / 25 + (1 - 1 / 25) * warm)

    def drop() -> None:
        factor[0] /= 10

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda), drop


def fit(
    model: nn.Module,
    data: Sequence[Tensor],
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    config: TrainConfig,
    *,
    augment: Callable[[Batch, torch.Generator], Batch] | None = None,
    progress: Callable[[int, float], None] | None = None,
    validate: Callable[[nn.Module], float] | None = None,
) -> History:
    """Train ``model`` in place with AdamW on ``data`` under ``config``'s budget; record the curves.

    Every epoch draws a permutation from a generator seeded with ``config.seed``; each global batch is
    augmented with that generator (``augment(batch, generator)``), then split across ranks under DDP. After every
    epoch ``validate(model)`` (called in eval mode, on every rank; rank 0's score is used) scores the model on
    held-out data, higher is better.

    Args:
        model: the module to train (wrapped in DDP when a process group of more than one rank exists; DDP
            broadcasts rank 0's initial parameters).
        data: tensors sharing their first dimension ``N`` (e.g. ``[images, labels]``).
        loss_fn: ``loss_fn(module, batch) -> scalar`` mean loss over the batch's rows.
        config: the budget.
        augment: optional per-batch augmentation; must draw only from the given generator.
        progress: called with ``(epoch, mean training loss of this rank)`` after every epoch.
        validate: the validation score of the model (e.g. accuracy on a validation split). Required by budget
            ``"plateau"``; without it, the history has no validation curve and ``converged`` is ``None``.

    Returns:
        the run's :class:`~attnkit.ablation.convergence.History`; the model is left in eval mode (budget
        ``"plateau"``: with the weights of its best validation epoch).

    Raises:
        ValueError: tensors of different lengths, fewer rows than one batch, a batch size that the world
            size does not divide, or budget ``"plateau"`` without ``validate``.
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
    if config.budget == "plateau" and validate is None:
        raise ValueError("fit: budget 'plateau' needs a validate function (early stopping on validation)")
    trained = nn.parallel.DistributedDataParallel(model) if size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule, drop_lr = _schedule(optimizer, config, steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    history = History()
    best_state, since_drop = None, 0
    for epoch in range(config.epochs):
        model.train()
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
        history.train_loss.append(total / steps_per_epoch)
        if progress is not None:
            progress(epoch, history.train_loss[-1])
        if validate is None:
            continue
        model.eval()
        history.val_score.append(_shared_score(float(validate(model))))
        if config.budget != "plateau":
            continue
        since_drop += 1
        if epochs_since_improvement(history.val_score, config.min_delta) == 0:
            best_state = copy.deepcopy(model.state_dict())
        elif (
            epoch + 1 >= config.min_epochs
            and min(since_drop, epochs_since_improvement(history.val_score, config.min_delta)) >= config.patience
        ):
            if len(history.lr_drops) < config.lr_drops:
                drop_lr()
                history.lr_drops.append(epoch)
                since_drop = 0
            else:
                history.stopped_early = epoch + 1 < config.epochs
                break
    model.eval()
    history.best_epoch = history.epochs - 1
    if history.val_score:
        history.converged = history.stopped_early or has_plateaued(history.val_score, config.patience, config.min_delta)
        history.stalled = has_stalled(history.val_score, config.patience, config.min_delta)
        if config.budget == "plateau" and best_state is not None:
            model.load_state_dict(best_state)
            history.best_epoch = best_epoch(history.val_score, config.min_delta)
    return history


def run_summary(history: History) -> str:
    """One line for progress output: epochs, best validation score and convergence of a run."""
    if not history.val_score:
        return f"{history.epochs} epochs"
    state = "converged" if history.converged else "NOT converged"
    if history.stalled:
        state = "STALLED (no gain after epoch 1)"
    best = history.val_score[history.best_epoch]
    return f"{history.epochs} epochs, val {100 * best:.2f}% at epoch {history.best_epoch + 1}, {state}"


@torch.inference_mode()
def predict(fn: Callable[..., Tensor], data: Sequence[Tensor], batch_size: int = 256) -> Tensor:
    """``torch.cat`` of ``fn(*rows)`` over consecutive batches of ``data`` (inference mode)."""
    n = len(data[0])
    return torch.cat([fn(*(t[i : i + batch_size] for t in data)) for i in range(0, n, batch_size)])
