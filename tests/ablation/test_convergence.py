"""The plateau rule on synthetic curves, and fit's two budgets driven by a scripted validation curve."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnkit.ablation.convergence import best_epoch, epochs_since_improvement, has_plateaued, has_stalled
from attnkit.ablation.train import TrainConfig, fit


@pytest.mark.parametrize(
    ("curve", "min_delta", "best", "plateau"),
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4, False),  # still improving: not converged
        ([0.1, 0.5, 0.5, 0.5, 0.5], 0.0, 1, True),  # flat for 3 epochs
        ([0.1, 0.5, 0.49, 0.51, 0.5], 0.0, 3, False),  # a new best 1 epoch before the end
        ([0.1, 0.5, 0.49, 0.51, 0.5], 0.02, 1, True),  # ... that min_delta does not count
        ([0.1, 0.5, 0.515, 0.53, 0.545], 0.02, 3, False),  # a slow creep counts once it sums to > min_delta
        ([0.1, 0.5, 0.53, 0.4, 0.3], 0.02, 2, False),  # falling after the best: 2 epochs since it
        ([0.7], 0.0, 0, False),
    ],
)
def test_plateau_rule_on_synthetic_curves(curve, min_delta, best, plateau):
    assert best_epoch(curve, min_delta) == best
    assert epochs_since_improvement(curve, min_delta) == len(curve) - 1 - best
    assert has_plateaued(curve, 3, min_delta) is plateau


@pytest.mark.parametrize(
    ("curve", "stalled"),
    [
        ([0.100, 0.098, 0.100, 0.099], True),  # at chance from the first epoch on (a ViT at lr 3e-3 on 1k images)
        ([0.100, 0.098, 0.100], False),  # too short to tell (patience 3)
        ([0.100, 0.100, 0.100, 0.100, 0.200], False),  # learns late: not stalled (and not converged)
        ([0.500, 0.800, 0.800, 0.800, 0.800], False),  # learned, then plateaued: converged
        ([0.900, 0.903, 0.901, 0.904], True),  # gains below min_delta never count
    ],
)
def test_stall_rule_on_synthetic_curves(curve, stalled):
    assert has_stalled(curve, 3, 0.005) is stalled


def test_plateau_rule_errors():
    with pytest.raises(ValueError, match="non-empty validation curve"):
        best_epoch([])
    with pytest.raises(ValueError, match="min_delta >= 0"):
        best_epoch([1.0], -0.1)
    with pytest.raises(ValueError, match="patience to be a positive int, got 0"):
        has_plateaued([1.0], 0)


def _scripted(curve):
    """A tiny regression problem and a validate() that returns the next score of `curve`, recording the weights
    it was called with (so the test can check which epoch's weights fit keeps)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    data = [x, x @ torch.tensor([1.0, -2.0, 0.5])]
    model = torch.nn.Linear(3, 1)
    seen = []

    def validate(m):
        assert not m.training
        seen.append(m.weight.detach().clone())
        return curve[len(seen) - 1]

    def loss_fn(m, batch):
        return F.mse_loss(m(batch[0]).squeeze(-1), batch[1])

    return model, data, loss_fn, validate, seen


def _config(**kw):
    kw = {"epochs": 12, "batch_size": 8, "lr": 1e-2, "patience": 2, "min_delta": 0.0, "min_epochs": 1, **kw}
    return TrainConfig(**kw)


def test_plateau_budget_drops_the_rate_then_stops_and_keeps_the_best_epoch():
    curve = [0.1, 0.3, 0.5, 0.5, 0.4, 0.6, 0.6, 0.55, 0.7, 0.8, 0.9, 1.0]
    model, data, loss_fn, validate, seen = _scripted(curve)
    history = fit(model, data, loss_fn, _config(budget="plateau", lr_drops=1), validate=validate)
    # epochs 3-4 (0-based) bring nothing after the best at 2 -> lr drop after epoch 4; best again at 5;
    # epochs 6-7 bring nothing -> no drop left -> stop after epoch 7 (8 epochs of 12)
    assert history.lr_drops == [4] and history.epochs == 8 and history.stopped_early
    assert history.val_score == curve[:8] and history.converged is True and history.best_epoch == 5
    torch.testing.assert_close(model.weight, seen[5], rtol=0, atol=0)  # best epoch's weights restored


def test_plateau_budget_waits_min_epochs():
    curve = [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]  # takes off late, as exact match does
    model, data, loss_fn, validate, _ = _scripted(curve)
    history = fit(model, data, loss_fn, _config(budget="plateau", min_epochs=6), validate=validate)
    assert history.lr_drops == [8] and history.epochs == 11 and history.best_epoch == 6 and history.converged


def test_plateau_budget_at_the_maximum_while_improving_is_not_converged():
    curve = [0.1 * i for i in range(1, 7)]
    model, data, loss_fn, validate, _ = _scripted(curve)
    history = fit(model, data, loss_fn, _config(budget="plateau", epochs=6), validate=validate)
    assert history.epochs == 6 and not history.stopped_early and history.converged is False
    assert history.best_epoch == 5 and history.lr_drops == []


@pytest.mark.parametrize(
    ("curve", "converged"), [([0.2, 0.5, 0.6, 0.6, 0.6], True), ([0.2, 0.3, 0.4, 0.5, 0.6], False)]
)
def test_epochs_budget_trains_every_epoch_and_flags_convergence(curve, converged):
    model, data, loss_fn, validate, seen = _scripted(curve)
    history = fit(model, data, loss_fn, _config(epochs=5), validate=validate)
    assert history.epochs == 5 and history.converged is converged and history.best_epoch == 4
    torch.testing.assert_close(model.weight, seen[-1], rtol=0, atol=0)  # the last epoch's weights


def test_budget_errors():
    with pytest.raises(ValueError, match="unknown budget 'forever'; valid: epochs, plateau"):
        TrainConfig(budget="forever")
    model, data, loss_fn, _, _ = _scripted([0.0])
    with pytest.raises(ValueError, match="budget 'plateau' needs a validate function"):
        fit(model, data, loss_fn, _config(budget="plateau"))
    assert fit(model, data, loss_fn, _config(epochs=1)).converged is None  # no validation: unknown
