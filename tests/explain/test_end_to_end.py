"""capture -> rollout / relevance -> saliency on the patch grid -> plots -> report, on a transformers ViT."""

import torch
from transformers import ViTConfig, ViTForImageClassification

from attnkit.explain import (
    HeadMaps,
    Section,
    attention_distance,
    capture,
    deletion,
    head_entropy,
    relevance,
    report,
    rollout,
)
from attnkit.explain.plots import distance_plot, image_overlays, token_saliency_grid


def test_vit_classifier_pipeline(tmp_path, hf_pair):
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=(32, 48),
        patch_size=8,
        num_labels=5,
    )
    model, _ = hf_pair(ViTForImageClassification, cfg)
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad(), capture(model) as rec:
        logits = model(pixel_values=x).logits
    layout = rec.layout
    roll = rollout(rec.maps)  # (B, 25, 25)
    cls_row = roll[:, 0]  # the class token's row; the layout says where the patches are
    grid = token_saliency_grid(cls_row, layout)
    assert grid.shape == (3, 4, 6)
    rel = relevance(model, {"pixel_values": x}, target=logits.argmax(-1))
    assert rel.streams == ["vit.layers"]
    rel_grid = token_saliency_grid(rel.get()[:, 0], layout)
    probs = lambda pix: model(pixel_values=pix).logits.softmax(-1)[torch.arange(3), logits.argmax(-1)]  # noqa: E731
    curve = deletion(probs, x, rel_grid, steps=6)  # each of the 4 x 6 patches is one unit
    assert curve.curve.shape == (3, 7) and torch.isfinite(curve.auc).all()
    dist = attention_distance(rec.maps, unit="pixels")
    assert dist.shape == (2, 3, 4) and (dist > 0).all()
    sections = [
        Section(
            "Prediction", table=[[i, int(c)] for i, c in enumerate(logits.argmax(-1))], table_header=["item", "class"]
        ),
        Section("Rollout", figures=[image_overlays(x, grid), distance_plot(dist, unit="pixels")]),
        Section(
            "Heads",
            text="Per-head entropy",
            table=head_entropy(rec.maps).mean(1).tolist(),
            head_maps=HeadMaps(rec.stack()[:, 0], query_tokens=["[CLS]"] + [f"p{i}" for i in range(24)]),
        ),
    ]
    path = report(tmp_path / "vit.html", sections, title="ViT")
    assert path.stat().st_size > 1000
