"""AOPC, the randomisation check and the evaluate harness against the papers' formulas on small inputs."""

import pytest
import torch
from torch import nn

from attnkit.explain.evaluate import EvaluationTask, evaluate, randomization_check, reinitialize
from attnkit.explain.metrics import aopc, deletion, insertion, pointing_game


def _linear_score(w):
    return lambda x: x @ w  # (B, U) -> (B,)


def test_aopc_matches_eraser_formula():
    """DeYoung et al. 2020, Eq. 1-3 on a linear score, written with explicit top-k sets."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 10, generator=g, dtype=torch.float64)
    w = torch.randn(10, generator=g, dtype=torch.float64)
    sal = torch.rand(3, 10, generator=g)
    bins = (0.1, 0.3, 0.5)
    got = aopc(_linear_score(w), x, sal, fractions=bins)
    for b in range(3):
        order = sorted(range(10), key=lambda u: -float(sal[b, u]))
        full = float(x[b] @ w)
        comp, suff = [], []
        for k in bins:
            top = set(order[: round(k * 10)])
            without = sum(float(x[b, u] * w[u]) for u in range(10) if u not in top)
            only = sum(float(x[b, u] * w[u]) for u in top)
            comp.append(full - without)
            suff.append(full - only)
        assert float(got.comprehensiveness[b]) == pytest.approx(sum(comp) / 3)
        assert float(got.sufficiency[b]) == pytest.approx(sum(suff) / 3)
        assert float(got.full[b]) == pytest.approx(full)
    with pytest.raises(ValueError, match="fractions"):
        aopc(_linear_score(w), x, sal, fractions=(0.0, 0.5))


def test_aopc_with_target_uses_the_class_probability():
    model = nn.Linear(6, 3).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    target = torch.tensor([0, 2])
    sal = torch.arange(6.0).expand(2, 6)  # the last unit is the most salient
    got = aopc(model, x, sal, fractions=(0.5,), target=target)
    with torch.no_grad():
        p = model(x).softmax(-1).gather(1, target[:, None])[:, 0]
        removed = x.clone()
        removed[:, 3:] = 0
        kept = x.clone()
        kept[:, :3] = 0
        pr = model(removed).softmax(-1).gather(1, target[:, None])[:, 0]
        pk = model(kept).softmax(-1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(got.comprehensiveness, p - pr)
    torch.testing.assert_close(got.sufficiency, p - pk)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.last = nn.Linear(8, 1)

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))[:, 0]


def _gradient_x_input(model, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), [x])
    return (g * x).detach()


def test_randomization_separates_model_dependent_maps_from_input_edges():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(16, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = randomization_check(_gradient_x_input, model, x, ["last", "first"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not changed
    assert good.correlation.shape == (2, 16) and good.passed and good.final < 0.5
    input_only = randomization_check(lambda m, x: x.abs(), model, x, ["last", "first"])
    assert not input_only.passed and input_only.final == pytest.approx(1.0)
    # the correlation is Spearman's rho = 1 - 6 sum d^2 / (n (n^2 - 1)) for maps without ties
    a, b = torch.tensor([[0.1, 0.4, 0.3, 0.9, 0.5]]), torch.tensor([[2.0, 1.0, 4.0, 3.0, 5.0]])
    rank_a, rank_b = a.argsort().argsort().double(), b.argsort().argsort().double()
    rho = 1 - 6 * ((rank_a - rank_b) ** 2).sum() / (5 * 24)
    res = randomization_check(lambda m, x: b if m is not model else a, model, x[:1], ["last"])
    assert float(res.correlation[0, 0]) == pytest.approx(float(rho))
    with pytest.raises(ValueError, match="unknown"):
        randomization_check(_gradient_x_input, model, x, ["middle"])


def test_reinitialize_is_seeded_and_keeps_the_global_rng():
    a, b = Net(), Net()
    state = torch.random.get_rng_state()
    reinitialize(a, generator_seed=3)
    reinitialize(b, generator_seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_evaluate_table_is_the_metrics_on_each_method():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(4, 1, 4, 4)
    target = torch.tensor([0, 1, 2, 0])
    boxes = torch.tensor([[0, 0, 2, 2]] * 4)
    sure = torch.zeros(4, 2, 16, dtype=torch.bool)
    sure[:, 0, 0] = True

    def weights_map(m, x):  # the target class's weights times the input, as an image
        w = m[1].weight[target].reshape(4, 4, 4)
        return (w * x[:, 0]).detach()

    methods = {"weights": weights_map, "input": lambda m, x: x[:, 0].clone()}
    task = EvaluationTask(
        model=model,
        x=x,
        score_fn=lambda m, x: m(x),
        target=target,
        pointing_target=boxes,
        alignment=(sure, sure),
        randomize=["1"],
        steps=4,
    )
    task.to_units = None
    table = evaluate(task, methods, metrics=("deletion", "insertion", "comprehensiveness", "pointing", "randomization"))
    for name, method in methods.items():
        sal = method(model, x)
        assert table[name]["deletion"] == pytest.approx(
            float(deletion(model, x, sal, steps=4, target=target).auc.mean())
        )
        assert table[name]["insertion"] == pytest.approx(
            float(insertion(model, x, sal, steps=4, target=target).auc.mean())
        )
        assert table[name]["comprehensiveness"] == pytest.approx(
            float(aopc(model, x, sal, target=target).comprehensiveness.mean())
        )
        assert table[name]["pointing"] == pytest.approx(float(pointing_game(sal, boxes).float().mean()))
    assert table["weights"]["randomization_passed"] and not table["input"]["randomization_passed"]
    # AER on (B, T, S) maps: a map peaking on the sure link scores 0
    align = {"peak": lambda m, x: sure.float() + 0.01}
    task.alignment_rows = [0]
    got = evaluate(task, align, metrics=("aer",))
    assert got["peak"] == {"aer": 0.0}
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(task, methods, metrics=("accuracy",))


def test_deletion_and_insertion_match_petsiuk_formula_on_a_linear_score():
    """Petsiuk et al. 2018, Sec. 4.1: with f(x) = w·x and baseline 0, the deletion curve after removing the k most
    salient units is f(x) - Σ_top-k w_i x_i, the insertion curve Σ_top-k w_i x_i; AUC = trapezoid over k / n."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 12, generator=g, dtype=torch.float64)
    w, sal = torch.randn(12, generator=g, dtype=torch.float64), torch.rand(3, 12, generator=g)
    steps = 6  # 2 units per step
    top = sal.argsort(-1, descending=True)
    contrib = (x * w).gather(1, top).cumsum(-1)[:, 1::2]  # after removing / inserting 2, 4, ... units
    total = (x * w).sum(-1, keepdim=True)
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    want_del = torch.cat([total, total - contrib], 1)
    want_ins = torch.cat([torch.zeros_like(total), contrib], 1)
    got_del = deletion(lambda v: v @ w, x, sal, steps=steps)
    got_ins = insertion(lambda v: v @ w, x, sal, steps=steps)
    torch.testing.assert_close(got_del.curve, want_del)
    torch.testing.assert_close(got_ins.curve, want_ins)
    torch.testing.assert_close(got_del.auc, torch.trapezoid(want_del, fractions))
    torch.testing.assert_close(got_ins.auc, torch.trapezoid(want_ins, fractions))
