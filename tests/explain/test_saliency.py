"""Saliency maps of image classifiers (small random digit models); the pointing game with boxes and the
deletion curve with a classifier target, against their definitions and against the mask / score forms."""

import pytest
import torch
from torch import nn

from attnkit.datasets import DigitCanvases
from attnkit.explain import saliency as ev
from attnkit.explain.metrics import deletion, pointing_game
from attnkit.vision.digits import DEFAULT_CONFIGS, build_model


def test_pointing_game_half_open_boxes_and_tolerance():
    maps = torch.zeros(4, 10, 10)
    for i, (y, x) in enumerate([(2, 3), (5, 5), (4, 6), (9, 0)]):
        maps[i, y, x] = 1.0
    boxes = torch.tensor([[3, 2, 4, 3], [0, 0, 5, 5], [2, 2, 6, 5], [0, 0, 10, 10]])
    assert pointing_game(maps, boxes).tolist() == [True, False, False, True]
    # tolerance is a Euclidean distance to the nearest box pixel: (5, 5) is sqrt(2) from the box [0, 5) x [0, 5)
    assert pointing_game(maps, boxes, tolerance=1).tolist() == [True, False, True, True]
    assert pointing_game(maps, boxes, tolerance=1.5).tolist() == [True, True, True, True]


def test_pointing_game_boxes_equal_box_masks():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(64, 12, 9, generator=gen)
    x0, y0 = torch.randint(0, 8, (64,), generator=gen), torch.randint(0, 11, (64,), generator=gen)
    x1 = x0 + torch.randint(1, 9 - 7, (64,), generator=gen) + (9 - 8 - x0).clamp(min=0)
    y1 = y0 + 1 + torch.randint(0, 2, (64,), generator=gen)
    boxes = torch.stack([x0, y0, x1.clamp(max=9), y1.clamp(max=12)], -1)
    ys, xs = torch.arange(12)[:, None], torch.arange(9)[None, :]
    masks = torch.stack([(xs >= a) & (xs < c) & (ys >= b) & (ys < d) for a, b, c, d in boxes.tolist()])
    for tolerance in (0, 1, 2.5):
        assert torch.equal(
            pointing_game(maps, boxes, tolerance=tolerance), pointing_game(maps, masks, tolerance=tolerance)
        )
    with pytest.raises(ValueError, match="empty box"):
        pointing_game(maps[:1], torch.tensor([[3, 3, 3, 5]]))
    with pytest.raises(TypeError, match="bool mask"):
        pointing_game(maps[:1], torch.zeros(1, 3))


def test_pointing_game_ties_take_the_first_maximum():
    maps = torch.ones(1, 4, 4)
    assert pointing_game(maps, torch.tensor([[0, 0, 1, 1]])).item()
    assert not pointing_game(maps, torch.tensor([[1, 1, 4, 4]])).item()


class _InkModel(nn.Module):
    """Class 0's probability grows with the ink in the left half of the image."""

    def forward(self, x):
        left = x[..., :, : x.shape[-1] // 2].sum((1, 2, 3))
        return torch.stack([left, torch.full_like(left, 2.0)], -1)


def _naive_deletion(model, images, maps, labels, step):
    b, h, w = maps.shape
    order = maps.reshape(b, -1).argsort(dim=-1, descending=True, stable=True)
    curve = []
    for k in range(-(-(h * w) // step) + 1):
        keep = torch.ones(b, h * w)
        keep.scatter_(1, order[:, : k * step], 0.0)
        with torch.no_grad():
            probs = model((images.reshape(b, 1, -1) * keep[:, None]).reshape(images.shape)).softmax(-1)
        curve.append(probs.gather(1, labels[:, None])[:, 0])
    xs = torch.clamp(torch.arange(len(curve)) * step, max=h * w) / (h * w)
    return torch.trapezoid(torch.stack(curve, 1), xs, dim=1)


def test_deletion_auc_matches_the_definition_and_ranks_maps():
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 1, 12, 12, generator=gen) > 0.7).float()
    labels = torch.zeros(6, dtype=torch.long)
    model = _InkModel()
    good = images[:, 0].clone()
    good[..., 6:] = 0  # the pixels that support class 0 first
    bad = -good
    rand = torch.rand(6, 12, 12, generator=gen)
    for maps in (good, bad, rand):
        for step in (1, 9, 16):  # pixels per step; 144 / step steps
            expected = _naive_deletion(model, images, maps, labels, step).double()
            torch.testing.assert_close(deletion(model, images, maps, target=labels, steps=144 // step).auc, expected)
            scores = deletion(lambda x: model(x).softmax(-1)[:, 0], images, maps, steps=144 // step, batch_size=4)
            torch.testing.assert_close(scores.auc, expected)  # the same curve without target (no skipping)
    auc_good = deletion(model, images, good, target=labels, steps=36).auc
    auc_bad = deletion(model, images, bad, target=labels, steps=36).auc
    assert (auc_good < auc_bad).all()
    blank = deletion(model, torch.zeros(1, 1, 12, 12), rand[:1], target=labels[:1], steps=7).auc
    torch.testing.assert_close(
        blank, torch.tensor([torch.tensor([0.0, 2.0]).softmax(0)[0].item()], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="target must be"):
        deletion(model, images, good, target=labels.float(), steps=4)


@pytest.fixture(scope="module")
def canvases():
    return DigitCanvases("val", num_canvases=6, seed=0)


def test_saliency_maps_of_the_vit(canvases):
    torch.manual_seed(0)
    vit = build_model("vit").eval()
    roll = ev.rollout_maps(vit, canvases.images)
    assert roll.shape == (6, 8, 8) and (roll >= 0).all()
    rel = ev.relevance_maps(vit, canvases.images, canvases.labels)
    assert rel.shape == (6, 8, 8) and (rel >= 0).all()
    up = ev.saliency("rollout", vit, canvases.images, batch_size=4)
    assert up.shape == (6, 64, 64)
    torch.testing.assert_close(up, ev.upsample(roll, (64, 64)))


def test_lrp_saliency_tokens_and_pixels(canvases):
    """The LRP methods are lrp's relevance for the prediction: the patch tokens upsampled, or the pixels of the
    convolutional stem as they are (the default digit ViT's stem is convolutional; the linear one has pixels too)."""
    from attnkit.explain.lrp import lrp

    torch.manual_seed(0)
    vit = build_model("vit").eval()
    images = canvases.images
    pred = ev.predict(vit, images)
    tokens = lrp(vit, images, pred, rule="cp-lrp", pixels=False).relevance[:, 1:].reshape(-1, 8, 8).float()
    torch.testing.assert_close(ev.saliency("cp-lrp", vit, images, batch_size=4), ev.upsample(tokens, (64, 64)))
    pixels = lrp(vit, images, pred, rule="attnlrp").relevance.float()
    torch.testing.assert_close(ev.saliency("attnlrp-pixels", vit, images, batch_size=4), pixels)
    linear = build_model("vit", {**DEFAULT_CONFIGS["vit"], "patch_embed": "linear"}).eval()
    assert ev.saliency("cp-lrp-pixels", linear, images).shape == (6, 64, 64)


def test_saliency_maps_of_the_cnn(canvases):
    torch.manual_seed(0)
    cnn = build_model("cnn").eval()
    sizes = [ev.cbam_maps(cnn, canvases.images, block=b).shape for b in range(len(DEFAULT_CONFIGS["cnn"]["depths"]))]
    assert sizes == [(6, 32, 32), (6, 16, 16), (6, 8, 8)]
    maps = ev.saliency("cbam", cnn, canvases.images)
    assert maps.shape == (6, 64, 64) and ((maps >= 0) & (maps <= 1)).all()
    plain = build_model("cnn", {**DEFAULT_CONFIGS["cnn"], "attention": None, "attention_kwargs": None})
    with pytest.raises((ValueError, RuntimeError)):
        ev.cbam_maps(plain.eval(), canvases.images)


def test_ink_maps_are_local_ink_mass():
    images = torch.zeros(1, 1, 32, 32)
    images[0, 0, 3, 4] = 1.0
    maps = ev.ink_maps(images, size=5)
    assert maps.shape == (1, 32, 32)
    torch.testing.assert_close(maps[0, 1:6, 2:7], torch.full((5, 5), 1 / 25))
    torch.testing.assert_close(maps.sum(), torch.tensor(1.0))
    torch.testing.assert_close(ev.saliency("ink", None, images), ev.ink_maps(images))


def test_conv_patch_embedding_is_centred_on_its_cells(canvases):
    torch.manual_seed(0)
    vit = build_model("vit", {**DEFAULT_CONFIGS["vit"], "patch_embed": "conv"}).eval()
    assert type(vit).__name__ == "VisionTransformer" and type(vit.patch_embed).__name__ == "ConvPatchEmbed"
    assert vit(canvases.images).shape == (6, 10)
    assert vit.token_layout == {"grid": (8, 8), "num_prefix_tokens": 1, "patch_size": (8, 8)}
    # Receptive field of token (row 1, col 1), whose cell is pixels [8, 16): 22 px centred on it.
    x = torch.rand(1, 1, 64, 64, requires_grad=True)
    vit.patch_embed(x)[0, 9].sum().backward()
    ys, xs = (x.grad[0, 0] != 0).nonzero(as_tuple=True)
    span = (ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item())
    assert span == (1, 22, 1, 22)
    assert (span[0] + span[1]) / 2 == (8 + 15) / 2
    linear = build_model("vit", {**DEFAULT_CONFIGS["vit"], "patch_embed": "linear"})
    assert type(linear.patch_embed).__name__ == "PatchEmbed"
    with pytest.raises(ValueError, match="patch_embed"):
        build_model("vit", {**DEFAULT_CONFIGS["vit"], "patch_embed": "mlp"})
    with pytest.raises(ValueError, match="power-of-two"):
        build_model("vit", {**DEFAULT_CONFIGS["vit"], "patch_size": 6})
    with pytest.raises(ValueError, match="multiple"):
        vit(torch.rand(1, 1, 60, 64))


def test_random_maps_and_errors(canvases):
    a = ev.saliency("random", None, canvases.images, generator=torch.Generator().manual_seed(1))
    b = ev.saliency("random", None, canvases.images, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6, 64, 64) and torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown method"):
        ev.saliency("gradcam", None, canvases.images)
    with pytest.raises(ValueError, match="unknown name"):
        build_model("resnet")
