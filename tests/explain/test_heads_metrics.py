"""Head diagnostics against direct formulas; faithfulness metrics on models whose answer is known."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnkit.explain import TokenLayout
from attnkit.explain.heads import attention_distance, head_entropy, head_importance
from attnkit.explain.metrics import deletion, insertion, pointing_game, random_saliency


def test_entropy_uniform_and_one_hot():
    uniform = torch.full((1, 2, 3, 5), 0.2)
    one_hot = torch.zeros(1, 2, 3, 5)
    one_hot[..., 1] = 1
    ent = head_entropy([uniform, one_hot])
    torch.testing.assert_close(ent, torch.tensor([[[math.log(5)] * 2], [[0.0, 0.0]]]))
    torch.testing.assert_close(head_entropy(torch.stack([uniform, one_hot])), ent)  # the stacked form
    mixed = head_entropy([uniform, one_hot[..., :4]])  # key counts may differ between layers (cross-attention)
    torch.testing.assert_close(mixed, torch.tensor([[[math.log(5)] * 2], [[0.0, 0.0]]]))


def test_attention_distance_tokens_and_pixels():
    # Each query attends to the key 2 to its right (wrapping): token distance is 2 except where it wraps.
    length = 5
    a = torch.zeros(1, 1, length, length)
    for i in range(length):
        a[0, 0, i, (i + 2) % length] = 1
    want = sum(abs(i - (i + 2) % length) for i in range(length)) / length
    torch.testing.assert_close(attention_distance([a]), torch.tensor([[[want]]]))
    # A 2 x 3 grid with one class token; every patch attends to patch (1, 2) only; pixels of 16 x 8.
    layout = TokenLayout(num_prefix_tokens=1, grid=(2, 3), patch_size=(16, 8))
    a = torch.zeros(1, 1, 7, 7)
    a[..., 0, 0] = 1.0  # the class token's own row is excluded
    a[..., 1:, 6] = 1.0
    d = [math.hypot((1 - y) * 16, (2 - x) * 8) for y in range(2) for x in range(3)]
    torch.testing.assert_close(attention_distance([a], layout=layout, unit="pixels"), torch.tensor([[[sum(d) / 6]]]))
    with pytest.raises(ValueError, match="describes"):
        attention_distance([torch.ones(1, 1, 8, 8) / 8], layout=layout, unit="patches")
    with pytest.raises(ValueError, match="needs a TokenLayout"):
        attention_distance([a], unit="pixels")


class TwoHeads(nn.Module):
    """Head 0 reads the evidence feature, head 1 reads a constant: only head 0 matters for the score."""

    def forward(self, x):
        b, length, _ = x.shape
        q = torch.zeros(b, 2, length, 1)
        v = torch.stack([x[..., 0], torch.ones_like(x[..., 0])], 1)[..., None]  # (B, 2, L, 1)
        out = F.scaled_dot_product_attention(q, q, v)  # uniform attention
        return out[:, 0, 0, 0] * 3.0 + 0 * out[:, 1, 0, 0]


def test_head_importance_gradient_and_ablation():
    x = torch.zeros(2, 4, 1)
    x[:, 1, 0] = 1.0
    grad = head_importance(TwoHeads(), x, score=lambda out: out)
    # d score / d gate_0 = 3 * mean(evidence) = 3/4 per item, two items.
    torch.testing.assert_close(grad, torch.tensor([[1.5, 0.0]]))
    abl = head_importance(TwoHeads(), x, score=lambda out: out, method="ablation")
    torch.testing.assert_close(abl, torch.tensor([[1.5, 0.0]]))
    with pytest.raises(RuntimeError, match="no attention"):
        head_importance(nn.Linear(1, 1), x, score=lambda out: out)


def test_pointing_game():
    sal = torch.zeros(3, 4, 4)
    sal[0, 1, 1] = 1
    sal[1, 3, 2] = 1
    sal[2, 0, 3] = 1
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    target[:, 1:3, 1:3] = True
    assert pointing_game(sal, target).tolist() == [True, False, False]
    assert pointing_game(sal, target, tolerance=1.0).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="no target"):
        pointing_game(sal, torch.zeros_like(target))


def _evidence_model(x):
    """Score = mean of the 4 evidence pixels (image (B, 1, 8, 8), evidence in the top-left 2 x 2 patch)."""
    return x[:, 0, :2, :2].mean((-1, -2))


def test_deletion_insertion_beat_random_on_known_evidence():
    x = torch.rand(4, 1, 8, 8) * 0.1
    x[:, :, :2, :2] = 1.0
    truth = torch.zeros(4, 4, 4)  # on a 4 x 4 patch grid: each patch is 2 x 2 pixels
    truth[:, 0, 0] = 1.0
    g = torch.Generator().manual_seed(0)
    rnd = random_saliency(truth, generator=g)
    d_true, d_rand = deletion(_evidence_model, x, truth, steps=16), deletion(_evidence_model, x, rnd, steps=16)
    assert d_true.curve.shape == (4, 17) and torch.all(d_true.curve[:, 1:] == 0)
    assert bool((d_true.auc < d_rand.auc).all())
    i_true, i_rand = insertion(_evidence_model, x, truth, steps=16), insertion(_evidence_model, x, rnd, steps=16)
    assert bool((i_true.auc > i_rand.auc).all())
    torch.testing.assert_close(i_true.curve[:, 1:], torch.ones(4, 16, dtype=torch.float64))
    # Pixel-resolution saliency and token-style (B, L, E) inputs map onto units as well.
    assert deletion(_evidence_model, x, x[:, 0], steps=4).auc.shape == (4,)
    emb = torch.zeros(2, 5, 3)
    emb[:, 2] = 1
    res = deletion(lambda e: e[:, 2].sum(-1), emb, torch.tensor([[0, 0, 9, 0, 0.0]] * 2), steps=5)
    assert torch.all(res.curve[:, 1:] == 0)


def test_metric_errors():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="resample"):
        deletion(_evidence_model, x, torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        deletion(lambda t: t.sum(), x, torch.rand(2, 8, 8))
    with pytest.raises(TypeError, match="bool"):
        pointing_game(torch.rand(2, 3), torch.rand(2, 3))
