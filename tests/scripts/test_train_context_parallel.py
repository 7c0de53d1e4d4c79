"""scripts/train_context_parallel.py: 2 processes under torchrun train exactly as one process does."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_context_parallel.py"
TINY = ["--seq-len", "128", "--steps", "3", "--layers", "1", "--width", "32", "--heads", "2"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_context_parallel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(script, tmp_path):
    threads = torch.get_num_threads()
    try:
        assert script.main([*TINY, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, PYTHONPATH=str(Path(attnkit.__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    proc = subprocess.run(
        [*cmd, str(SCRIPT), *TINY, "--layout", "zigzag", "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (one["processes"], two["processes"], two["tokens_per_process"]) == (1, 2, 64)
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-4)
    assert two["final_eval_loss"] == pytest.approx(one["final_eval_loss"], abs=1e-4)
    assert (tmp_path / "two" / "model.safetensors").exists()


def test_user_errors_exit_2_before_work(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        script.main(["--seq-len", "0"])
    assert err.value.code == 2 and "--seq-len must be >= 1" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as err:
        script.main(["--out", str(tmp_path)])
    assert err.value.code == 2 and "--overwrite" in capsys.readouterr().err
