"""The deletion curve against Quantus' PixelFlipping (Bach et al. 2015; Quantus 0.6) on identical inputs."""

import numpy as np
import pytest
import torch
from torch import nn

from attnkit.explain.metrics import deletion

quantus = pytest.importorskip("quantus")


def test_deletion_curve_equals_quantus_pixel_flipping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 5)).eval()  # Quantus runs float32
    x = torch.rand(6, 1, 8, 8)
    saliency = torch.rand(6, 8, 8, dtype=torch.float64)  # no ties: both sorts give one order
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    steps, per_step = 16, 4  # 64 pixels, 4 removed per step
    ours = deletion(model, x, saliency, steps=steps, baseline=0.0, target=target).curve
    theirs = quantus.PixelFlipping(
        features_in_step=per_step, perturb_baseline=0.0, normalise=False, disable_warnings=True
    )(
        model=model,
        x_batch=x.numpy(),
        y_batch=target.numpy(),
        a_batch=saliency[:, None].numpy(),
        softmax=True,
        device="cpu",
        channel_first=True,
    )
    # Quantus reports the curve after each step; attnkit's starts at the unperturbed input (fraction 0).
    np.testing.assert_allclose(ours[:, 1:].numpy(), np.asarray(theirs), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(ours[:, 0], model(x).softmax(-1).gather(1, target[:, None])[:, 0].double())
