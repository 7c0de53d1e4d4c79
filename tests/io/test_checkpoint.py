"""attnkit.io.checkpoint: header-first loading into an existing module, non-finite weights, symlinked shards."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from attnkit.io import CheckpointError, NonFiniteWeightsWarning, load_checkpoint, read_header

safetensors_torch = pytest.importorskip("safetensors.torch")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))


def _save(path, tensors):
    path.mkdir(exist_ok=True)
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    return path


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_loads_into_a_meta_module(tmp_path):
    source = _model()
    path = _save(tmp_path / "ok", {k: v.contiguous() for k, v in source.state_dict().items()})
    with torch.device("meta"):
        target = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    load_checkpoint(target, path)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, atol=0, rtol=0)
    assert read_header(path)["0.weight"].shape == (3, 4)


@pytest.mark.parametrize(
    "fault,message",
    [
        ("missing", r"missing \(1\): 1.bias"),
        ("shape", r"mis-shaped \(1\): 0.weight: checkpoint \(3, 5\), model \(3, 4\)"),
        ("dtype", r"wrong dtype \(1\): 0.bias: checkpoint torch.int64"),
        ("nan", "NaN or inf"),
        ("truncated", "truncated or corrupt"),
    ],
)
def test_a_refused_checkpoint_leaves_the_module_unchanged(tmp_path, fault, message):
    state = {k: v.clone().contiguous() for k, v in _model().state_dict().items()}
    for v in state.values():
        v.add_(1.0)
    if fault == "missing":
        del state["1.bias"]
    elif fault == "shape":
        state["0.weight"] = torch.zeros(3, 5)
    elif fault == "dtype":
        state["0.bias"] = torch.zeros(3, dtype=torch.int64)
    elif fault == "nan":
        state["1.weight"][1] = float("nan")
    path = _save(tmp_path / fault, state)
    if fault == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:-8])
    module = _model()
    before = _snapshot(module)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(module, path, nonfinite="error")
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)


def test_nonfinite_weights_warn_by_default(tmp_path):
    state = {k: v.clone().contiguous() for k, v in _model().state_dict().items()}
    state["0.bias"][0] = float("inf")
    path = _save(tmp_path / "inf", state)
    with pytest.warns(NonFiniteWeightsWarning, match=r"NaN or inf; tensors \(1\): 0.bias"):
        load_checkpoint(_model(), path)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        load_checkpoint(_model(), path, nonfinite="maybe")


def test_symlinked_shards_inside_the_directory_are_followed(tmp_path):
    """As in the Hugging Face cache, a shard may be a symlink to a regular file stored elsewhere."""
    state = {k: v.contiguous() for k, v in _model().state_dict().items()}
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    safetensors_torch.save_file(state, str(blobs / "abc123"))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    os.symlink(blobs / "abc123", snapshot / "model-00001-of-00001.safetensors")
    index = {"weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    module = load_checkpoint(_model(), snapshot)
    torch.testing.assert_close(module.state_dict()["0.weight"], state["0.weight"])
