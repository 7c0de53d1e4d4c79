"""VisionTransformer.from_pretrained against transformers' ViTModel / ViTForImageClassification (random init)."""

import pytest
import torch

from attnkit.models import CheckpointError
from attnkit.vision import VisionTransformer
from vision.vision_helpers import TOL

transformers = pytest.importorskip("transformers")


def _config(**kw):
    base = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 56,
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    return transformers.ViTConfig(**{**base, **kw})


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _save(model, tmp_path):
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("config_kw", "pooler", "image"),
    [
        ({}, True, (32, 32)),
        ({"patch_size": 4, "image_size": 24, "num_channels": 1}, False, (24, 24)),
        ({"patch_size": 16, "image_size": 48, "hidden_size": 48, "num_attention_heads": 3}, True, (48, 48)),
    ],
)
def test_last_hidden_state_and_pooler_match_vit_model(tmp_path, config_kw, pooler, image):
    config = _config(**config_kw)
    ref = _randomize(transformers.ViTModel(config, add_pooling_layer=pooler))
    model = VisionTransformer.from_pretrained(_save(ref, tmp_path))
    assert (model.pooler is not None) == pooler and model.num_classes == 0
    x = torch.randn(2, config.num_channels, *image)
    with torch.no_grad():
        want = ref(pixel_values=x)
        torch.testing.assert_close(model.forward_features(x), want.last_hidden_state, **TOL[torch.float32])
        got = model(x)
    if pooler:
        torch.testing.assert_close(got, want.pooler_output, **TOL[torch.float32])
    else:
        torch.testing.assert_close(got, want.last_hidden_state[:, 0], **TOL[torch.float32])


@pytest.mark.parametrize(
    ("image", "config_kw"), [((32, 32), {}), ((40, 24), {}), ((30, 30), {"patch_size": 6, "image_size": 18})]
)
def test_logits_match_classifier_with_interpolated_positions(tmp_path, image, config_kw):
    config = _config(num_labels=5, **config_kw)
    ref = _randomize(transformers.ViTForImageClassification(config))
    model = VisionTransformer.from_pretrained(_save(ref, tmp_path))
    assert model.num_classes == 5 and model.pooler is None
    x = torch.randn(3, 3, *image)
    with torch.no_grad():
        want = ref(pixel_values=x, interpolate_pos_encoding=image != (config.image_size,) * 2)
        hidden = ref.vit(pixel_values=x, interpolate_pos_encoding=image != (config.image_size,) * 2)
        torch.testing.assert_close(model(x), want.logits, **TOL[torch.float32])
        torch.testing.assert_close(model.forward_features(x), hidden.last_hidden_state, **TOL[torch.float32])
    grid = (image[0] // config.patch_size, image[1] // config.patch_size)
    assert model.token_layout == {"grid": grid, "num_prefix_tokens": 1, "patch_size": (config.patch_size,) * 2}


def test_dtype_and_backend_pass_through(tmp_path):
    ref = _randomize(transformers.ViTModel(_config(), add_pooling_layer=False))
    model = VisionTransformer.from_pretrained(_save(ref, tmp_path), dtype=torch.float64, backend="math")
    assert model.pos_embed.dtype == torch.float64 and not model.training
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = ref.double()(pixel_values=x).last_hidden_state
    torch.testing.assert_close(model.forward_features(x), want, atol=1e-10, rtol=1e-10)


def test_bad_checkpoints(tmp_path):
    ref = _randomize(transformers.ViTModel(_config(), add_pooling_layer=False))
    path = _save(ref, tmp_path / "ok")
    config = (path / "config.json").read_text()
    (path / "config.json").write_text(config.replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    with pytest.raises(CheckpointError, match="hidden_act 'relu'"):
        VisionTransformer.from_pretrained(path)
    (path / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(CheckpointError, match="num_hidden_layers=3, the weights hold 2"):
        VisionTransformer.from_pretrained(path)
    (path / "config.json").write_text(config.replace('"model_type": "vit"', '"model_type": "bert"'))
    with pytest.raises(CheckpointError, match="expected a ViT checkpoint"):
        VisionTransformer.from_pretrained(path)
    with pytest.raises(FileNotFoundError):
        VisionTransformer.from_pretrained(tmp_path / "nowhere")
