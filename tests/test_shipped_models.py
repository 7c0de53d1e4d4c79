"""The SHIPPED digit models (attnkit/data): load them and measure, on held-out canvases, accuracy and pointing game.

Targets (issue 6): at least 90% test accuracy for both models, and a ViT attention-rollout pointing-game score of
at least 0.8. The canvases here are drawn from the test scans with a seed the training script never used, and
the pointing game is computed below from its definition, independently of :func:`attnkit.explain.metrics.pointing_game`.
"""

import hashlib

import pytest
import torch

from attnkit.datasets import DigitCanvases, split_scans
from attnkit.explain import capture, rollout
from attnkit.explain import saliency as ev
from attnkit.explain.metrics import pointing_game, random_saliency
from attnkit.vision.digits import DATA_DIR, load_metadata, load_model

NUM_CANVASES = 300
SEED = 31337  # not the script's evaluation seed: fresh canvases of the held-out scans


@pytest.fixture(scope="module")
def meta():
    return load_metadata()


@pytest.fixture(scope="module")
def test_canvases():
    return DigitCanvases("test", num_canvases=NUM_CANVASES, seed=SEED)


@pytest.fixture(scope="module")
def models():
    return {name: load_model(name) for name in ("vit", "cnn")}


def _pointing_game(maps, boxes):
    """Zhang et al. 2018: a hit when the maximum of the saliency map lies in the object's box (no tolerance)."""
    hits = 0
    for m, (x0, y0, x1, y1) in zip(maps, boxes.tolist()):
        y, x = divmod(int(m.argmax()), m.shape[-1])
        hits += x0 <= x < x1 and y0 <= y < y1
    return hits / len(maps)


def test_shipped_files_match_the_metadata(meta):
    assert set(meta["models"]) == {"vit", "cnn"}
    for entry in meta["models"].values():
        path = DATA_DIR / entry["weights"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert meta["dataset"]["split_sizes"] == {k: len(v) for k, v in split_scans().items()}


def test_test_canvases_never_show_training_scans(test_canvases):
    train = set(split_scans()["train"].tolist())
    assert not train & set(test_canvases.scan_ids.tolist())
    assert not train & set(test_canvases.distractor_ids.flatten().tolist())


@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_held_out_accuracy(models, test_canvases, name):
    with torch.no_grad():
        logits = torch.cat([models[name](test_canvases.images[i : i + 150]) for i in range(0, NUM_CANVASES, 150)])
    acc = (logits.argmax(-1) == test_canvases.labels).float().mean().item()
    assert acc >= 0.90, f"{name}: held-out accuracy {acc:.3f} < 0.90"


def test_vit_rollout_pointing_game(models, test_canvases):
    vit = models["vit"]
    rows = []
    with torch.no_grad():
        for i in range(0, NUM_CANVASES, 150):
            with capture(vit) as rec:
                vit(test_canvases.images[i : i + 150])
            layout = rec.layout
            assert layout.num_prefix_tokens == 1 and layout.grid == (8, 8)
            rows.append(rollout(rec.maps)[:, 0, 1:].reshape(-1, 8, 8))  # class-token row over the patch grid
    grid = torch.cat(rows)
    maps = torch.nn.functional.interpolate(grid[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    score = _pointing_game(maps, test_canvases.boxes)
    noise = torch.rand(NUM_CANVASES, 64, 64, generator=torch.Generator().manual_seed(0))
    chance = _pointing_game(noise, test_canvases.boxes)
    ink = _pointing_game(ev.ink_maps(test_canvases.images), test_canvases.boxes)  # "where is the most ink"
    assert score >= 0.80, f"rollout pointing game {score:.3f} < 0.80 (random maps: {chance:.3f}, ink: {ink:.3f})"
    assert chance < 0.2 and ink < 0.4
    assert score == pytest.approx(pointing_game(maps, test_canvases.boxes).float().mean().item())  # boxes
    box_masks = torch.zeros(NUM_CANVASES, 64, 64, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(box_masks, test_canvases.boxes.tolist()):
        mask[y0:y1, x0:x1] = True
    assert score == pytest.approx(pointing_game(maps, box_masks).float().mean().item())  # masks


def test_cnn_cbam_maps_point_better_than_the_baselines(models, test_canvases):
    maps = ev.saliency("cbam", models["cnn"], test_canvases.images)
    chance = pointing_game(random_saliency(test_canvases.images[:, 0]), test_canvases.boxes).float().mean().item()
    ink = _pointing_game(ev.ink_maps(test_canvases.images), test_canvases.boxes)
    assert _pointing_game(maps, test_canvases.boxes) > max(chance, ink)
