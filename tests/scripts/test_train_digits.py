"""scripts/train_digits.py: a few steps run end to end, write loadable weights + metadata, refuse to overwrite."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit.vision.digits import DEFAULT_CONFIGS, load_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_digits.py"
SMOKE = ["--steps", "2", "--eval-canvases", "12", "--deletion-canvases", "3", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert script.main(["--out", str(out), *SMOKE]) == 0
    return out


def test_writes_weights_and_metadata(trained):
    names = sorted(p.name for p in trained.iterdir())
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in trained.iterdir())
    assert names == ["digits.json", "digits_cnn.safetensors", "digits_vit.safetensors"]  # no temporary files left
    meta = json.loads((trained / "digits.json").read_text())
    assert meta["seed"] == 0
    assert meta["dataset"]["split_sizes"] == {"train": 1078, "val": 359, "test": 360}
    assert meta["evaluation"]["num_canvases"] == 12 and meta["evaluation"]["deletion_canvases"] == 3
    for name in ("vit", "cnn"):
        entry = meta["models"][name]
        assert entry["config"] == DEFAULT_CONFIGS[name]
        assert entry["weights"] == f"digits_{name}.safetensors"
        assert entry["training"]["steps"] == 2 and entry["training"]["seconds"] >= 0
        test = entry["test"]
        assert 0 <= test["accuracy"] <= 1
        methods = {"rollout", "relevance", "random", "ink"} if name == "vit" else {"cbam", "random", "ink"}
        assert set(test["pointing_game"]) == methods
        assert set(test["deletion_auc"]) == set(test["pointing_game"])
    assert len(meta["models"]["cnn"]["test"]["pointing_game_cbam_per_block"]) == 3


def test_weights_load_into_the_recorded_config(trained):
    from safetensors.torch import load_file

    for name in ("vit", "cnn"):
        model = load_model(name, directory=trained)
        assert not model.training
        state = load_file(str(trained / f"digits_{name}.safetensors"))
        assert state.keys() == model.state_dict().keys()
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 10)


def test_refuses_to_overwrite_in_process(script, trained, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    assert script.main(["--out", str(trained), *SMOKE]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_overwrite_replaces_and_is_reproducible(script, trained, tmp_path):
    """A second run with the same seed gives the same weights; --overwrite replaces the files."""
    vit_only = [*SMOKE, "--models", "vit"]
    assert script.main(["--out", str(tmp_path), *vit_only]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.json", "digits_vit.safetensors"]
    assert (tmp_path / "digits_vit.safetensors").read_bytes() == (trained / "digits_vit.safetensors").read_bytes()
    assert script.main(["--out", str(tmp_path), *vit_only, "--seed", "1", "--overwrite"]) == 0
    assert json.loads((tmp_path / "digits.json").read_text())["seed"] == 1
    assert (tmp_path / "digits_vit.safetensors").read_bytes() != (trained / "digits_vit.safetensors").read_bytes()


def test_subprocess_help_and_refusal(trained):
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "--overwrite" in done.stdout and "--steps" in done.stdout
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(trained), *SMOKE], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "refusing to overwrite" in done.stderr


def test_bad_arguments(script):
    with pytest.raises(SystemExit) as err:
        script.main(["--steps", "0"])
    assert err.value.code == 2
