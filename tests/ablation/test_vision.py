"""Vision ablation: variant construction and placement, augmentation, and a tiny reproducible end-to-end run."""

from __future__ import annotations

import pytest
import torch

from attnkit.ablation.images import ImageData
from attnkit.ablation.train import TrainConfig
from attnkit.ablation.vision import VISION_VARIANTS, build_vision_model, random_translate, run_vision_ablation
from attnkit.nn.residual_self_attention import ResidualSelfAttention
from attnkit.vision import ECA, MHSA2d, NonLocal2d, VisionTransformer


@pytest.mark.parametrize("name", VISION_VARIANTS)
@pytest.mark.parametrize(("chans", "size"), [(1, (32, 32)), (3, (24, 20))])
def test_variants_build_and_run(name, chans, size):
    model = build_vision_model(name, in_chans=chans, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(2, chans, *size)).shape == (2, 7)


def test_placement():
    kinds = {}
    for name in ("eca", "nonlocal", "single_head", "mhsa", "vit"):
        model = build_vision_model(name, in_chans=1, num_classes=10, image_size=(64, 64))
        kinds[name] = model
    assert sum(isinstance(m, ECA) for m in kinds["eca"].modules()) == 4  # every block
    nonlocal_stages = [s for s, stage in enumerate(kinds["nonlocal"].stages) if isinstance(stage[0].attn, NonLocal2d)]
    assert nonlocal_stages == [1, 2]
    assert [isinstance(stage[0].conv2, MHSA2d) for stage in kinds["mhsa"].stages] == [False, False, False, True]
    assert isinstance(kinds["vit"], VisionTransformer)
    heads = [m.attn.num_heads for m in kinds["single_head"].modules() if isinstance(m, ResidualSelfAttention)]
    assert heads == [1] and isinstance(kinds["single_head"].stages[2][1], ResidualSelfAttention)  # after stage 3
    with pytest.raises(ValueError, match="unknown variant 'sk'"):
        build_vision_model("sk", in_chans=1, num_classes=2, image_size=(8, 8))


def test_random_translate():
    images = torch.zeros(5, 1, 9, 9)
    images[:, 0, 4, 4] = 1.0
    out = random_translate(images, torch.Generator().manual_seed(0), 2)
    again = random_translate(images, torch.Generator().manual_seed(0), 2)
    assert torch.equal(out, again) and out.shape == images.shape
    for img in out:
        (y, x), *_ = torch.nonzero(img[0]).tolist()
        assert abs(y - 4) <= 2 and abs(x - 4) <= 2 and float(img.sum()) == 1.0
    assert random_translate(images, torch.Generator(), 0) is images


def _toy(n, seed):
    """Bright 4x4 square top-left (class 0) or bottom-right (class 1) on 16x16 noise."""
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(n, 1, 16, 16, generator=g)
    labels = torch.arange(n) % 2
    for i, y in enumerate(labels.tolist()):
        o = 2 if y == 0 else 10
        images[i, 0, o : o + 4, o : o + 4] = 1.0
    return ImageData(images, labels, ["tl", "br"], "toy")


def test_run_vision_ablation_tiny_and_reproducible():
    kwargs = {
        "variants": ("none", "eca"),
        "seeds": (0, 1),
        "config": TrainConfig(epochs=1, batch_size=16),
        "max_shift": 1,
        "latency_batches": (1, 4),
        "latency_rounds": 2,
    }
    lines = []
    first = run_vision_ablation(_toy(32, 0), _toy(8, 1), progress=lines.append, **kwargs)
    second = run_vision_ablation(_toy(32, 0), _toy(8, 1), **kwargs)
    assert [v.scores for v in first.variants] == [v.scores for v in second.variants]
    assert len(lines) == 4 and lines[0].startswith("none seed 0: accuracy")
    none, eca = first.variants
    assert none.name == "none" and len(none.scores) == 2 and all(0 <= s <= 1 for s in none.scores)
    assert eca.params > none.params and eca.macs >= none.macs > 0
    assert set(none.latency) == {1, 4} and all(t > 0 for t in none.latency.values())
    assert first.lift("eca") is not None and first.lift("none") is None
    with pytest.raises(ValueError, match="unknown variants"):
        run_vision_ablation(_toy(48, 0), _toy(16, 1), variants=("bogus",))
