"""Checkpoint reading: bad directories and files written to tmp_path are refused with errors naming them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from attnkit.models import BertModel, CheckpointError, load_state, read_config, read_tensors

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny transformers BertModel checkpoint (config.json + model.safetensors), randomised."""
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    )
    torch.manual_seed(0)
    ref = transformers.BertModel(config).eval()
    with torch.no_grad():
        for param in ref.parameters():
            param.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("tiny_bert")
    ref.save_pretrained(path)
    return path, ref


def copy_with(tmp_path, source, tensors=None, config=None):
    """Copy checkpoint ``source`` to ``tmp_path/ckpt``, optionally replacing its tensors or config."""
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    if tensors is not None:
        safetensors_torch.save_file(tensors, str(target / "model.safetensors"))
    if config is not None:
        (target / "config.json").write_text(config)
    return target


def test_loads_and_matches(tiny_dir):
    path, ref = tiny_dir
    model = BertModel.from_pretrained(path)
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert not model.training


def test_not_a_directory(tiny_dir, tmp_path):
    path, _ = tiny_dir
    with pytest.raises(NotADirectoryError, match=r"model\.safetensors' is a file; expected the directory"):
        BertModel.from_pretrained(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        BertModel.from_pretrained(tmp_path)


def test_truncated_file(tiny_dir, tmp_path):
    target = copy_with(tmp_path, tiny_dir[0])
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors.* as safetensors"):
        BertModel.from_pretrained(target)


def test_garbage_file_and_bad_config(tiny_dir, tmp_path):
    target = copy_with(tmp_path, tiny_dir[0], config="{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        read_config(target)
    (target / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_tensors(target)


def test_pickle_checkpoints_are_not_read(tiny_dir, tmp_path):
    target = copy_with(tmp_path, tiny_dir[0])
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pickle checkpoints such as pytorch_model\.bin are not read"):
        BertModel.from_pretrained(target)


def test_every_problem_is_listed(tiny_dir, tmp_path):
    path, _ = tiny_dir
    tensors = safetensors_torch.load_file(str(path / "model.safetensors"))
    del tensors["encoder.layer.1.output.dense.bias"]
    del tensors["embeddings.token_type_embeddings.weight"]
    tensors["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    tensors["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(25, 16)
    tensors["encoder.layer.1.attention.self.query.weight"] = torch.zeros(16, 16, dtype=torch.int32)
    target = copy_with(tmp_path, path, tensors=tensors)
    with pytest.raises(CheckpointError) as info:
        BertModel.from_pretrained(target)
    message = str(info.value)
    assert "does not fit BertModel" in message
    assert "missing (2): embeddings.token_type_embeddings.weight, layers.1.linear2.bias" in message
    assert "unexpected (1): encoder.layer.0.attention.self.rotary.weight" in message
    assert "mis-shaped (1): encoder.layer.0.intermediate.dense.weight: checkpoint (25, 16), model (24, 16)" in message
    assert "wrong dtype (1): encoder.layer.1.attention.self.query.weight: checkpoint torch.int32" in message


def test_half_precision_checkpoint_is_cast(tiny_dir, tmp_path):
    path, ref = tiny_dir
    tensors = {
        k: (v.half() if v.is_floating_point() else v)
        for k, v in safetensors_torch.load_file(str(path / "model.safetensors")).items()
    }
    model = BertModel.from_pretrained(copy_with(tmp_path, path, tensors=tensors))
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32
    expected = ref.embeddings.word_embeddings.weight.half().float()
    torch.testing.assert_close(model.embeddings.word_embeddings.weight, expected, atol=0, rtol=0)


def test_task_checkpoint_with_prefix_and_legacy_names(tiny_dir, tmp_path):
    """``bert.``-prefixed keys of task models (heads skipped); TF-era ``gamma``/``beta`` LayerNorm names."""
    path, ref = tiny_dir
    tensors = {}
    for name, value in safetensors_torch.load_file(str(path / "model.safetensors")).items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        tensors["bert." + name] = value
    tensors["cls.predictions.bias"] = torch.zeros(40)
    model = BertModel.from_pretrained(copy_with(tmp_path, path, tensors=tensors))
    ids = torch.randint(0, 40, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint(tiny_dir, tmp_path):
    path, ref = tiny_dir
    tensors = safetensors_torch.load_file(str(path / "model.safetensors"))
    target = copy_with(tmp_path, path)
    (target / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        safetensors_torch.save_file({k: tensors[k] for k in keys}, str(target / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    model = BertModel.from_pretrained(target)
    ids = torch.randint(0, 40, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_load_state_refuses_two_names_for_one_entry():
    module = torch.nn.Linear(2, 2)
    tensors = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"mapped twice \(1\): a.weight and b.weight -> weight"):
        load_state(module, tensors, lambda name: name.split(".")[-1])
