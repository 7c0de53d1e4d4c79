"""When has a run finished learning? The plateau rule shared by early stopping and the *not converged* flag.

A validation curve (one score per epoch, higher is better, e.g. accuracy) *improves* at epoch ``i`` when its score
exceeds the best earlier score by more than ``min_delta``; it has *plateaued* when the last ``patience`` epochs
brought no improvement. This is the rule of Keras' ``EarlyStopping(monitor, min_delta, patience)`` and of
Prechelt 1998 ("Early Stopping — But When?", the "no improvement in a number of epochs" class of criteria).

* Budget ``"plateau"``: training stops at the first plateau (after the allowed learning-rate drops, see
  :class:`attnkit.ablation.train.TrainConfig`), or at the maximum number of epochs.
* Every run, under either budget, is *converged* when its validation curve has plateaued at its last epoch; a run
  still improving at the end is *not converged*, and a difference between such runs may be a difference in how
  fast the variants learn rather than in what they can learn.
* A run whose curve never improved on its first epoch has *stalled*: it plateaued, but at wherever one epoch
  left it (typically chance level: a learning rate or schedule that does not suit the architecture), so its score
  says how its training failed, not what the model can learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["History", "best_epoch", "epochs_since_improvement", "has_plateaued", "has_stalled"]


def _check(curve: Sequence[float], min_delta: float) -> None:
    if not curve:
        raise ValueError("convergence: expected a non-empty validation curve")
    if not min_delta >= 0:
        raise ValueError(f"convergence: expected min_delta >= 0, got {min_delta!r}")


def best_epoch(curve: Sequence[float], min_delta: float = 0.0) -> int:
    """Index of the last improvement of ``curve`` (the epoch early stopping keeps).

    Epoch 0 counts as the first improvement; a later epoch improves when it beats the best so far by more than
    ``min_delta``.

    Raises:
        ValueError: an empty curve or a negative ``min_delta``.

    Example:
        >>> best_epoch([0.5, 0.7, 0.71, 0.69], min_delta=0.02)
        1
    """
    _check(curve, min_delta)
    best, index = curve[0], 0
    for i, score in enumerate(curve):
        if score > best + min_delta:
            best, index = score, i
    return index


def epochs_since_improvement(curve: Sequence[float], min_delta: float = 0.0) -> int:
    """Epochs after the last improvement: ``len(curve) - 1 - best_epoch(curve, min_delta)``."""
    return len(curve) - 1 - best_epoch(curve, min_delta)


def has_plateaued(curve: Sequence[float], patience: int, min_delta: float = 0.0) -> bool:
    """True when the last ``patience`` epochs of ``curve`` brought no improvement larger than ``min_delta``.

    Raises:
        ValueError: an empty curve, a negative ``min_delta`` or ``patience < 1``.

    Example:
        >>> has_plateaued([0.5, 0.8, 0.8, 0.8], patience=2), has_plateaued([0.5, 0.6, 0.7, 0.8], patience=2)
        (True, False)
    """
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"has_plateaued: expected patience to be a positive int, got {patience!r}")
    return epochs_since_improvement(curve, min_delta) >= patience


def has_stalled(curve: Sequence[float], patience: int, min_delta: float = 0.0) -> bool:
    """True when ``curve`` never improved on its first epoch by more than ``min_delta`` over more than ``patience``
    epochs: the run plateaued where one epoch left it, i.e. it did not learn.

    Raises:
        ValueError: an empty curve, a negative ``min_delta`` or ``patience < 1``.

    Example:
        >>> has_stalled([0.10, 0.10, 0.098, 0.101], patience=3, min_delta=0.005), has_stalled([0.1, 0.5], 1)
        (True, False)
    """
    return has_plateaued(curve, patience, min_delta) and best_epoch(curve, min_delta) == 0


@dataclass
class History:
    """What one training run did, epoch by epoch.

    Attributes:
        train_loss: mean training loss of every epoch (this rank's rows).
        val_score: validation score after every epoch (empty without a validation function).
        lr_drops: epochs after which the learning rate was divided (budget ``"plateau"``).
        stopped_early: training stopped at a plateau before the maximum number of epochs.
        converged: the validation curve had plateaued at the end (:func:`has_plateaued`); ``None`` without a
            validation curve (unknown).
        stalled: the validation curve never improved on its first epoch (:func:`has_stalled`): the run did not
            learn; ``None`` without a validation curve.
        best_epoch: the epoch whose weights the model holds at the end (budget ``"plateau"``: the best validation
            score; budget ``"epochs"``: the last epoch).
    """

    train_loss: list[float] = field(default_factory=list)
    val_score: list[float] = field(default_factory=list)
    lr_drops: list[int] = field(default_factory=list)
    stopped_early: bool = False
    converged: bool | None = None
    stalled: bool | None = None
    best_epoch: int = -1

    @property
    def epochs(self) -> int:
        """Epochs trained."""
        return len(self.train_loss)
