"""``attnkit ablate``: both tasks end to end with tiny budgets, user errors as one line with exit 2, and a real
``torchrun`` launch with 2 processes (DDP, gloo on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from attnkit.cli.main import main

SEQ2SEQ = ["ablate", "seq2seq", "--quick", "--train-size", "128", "--test-per-bucket", "4", "--batch-size", "32"]


def _npz(tmp_path, n=48):
    rng = np.random.default_rng(0)
    x = rng.random((n, 12, 12), dtype=np.float32) * 0.1
    y = np.arange(n) % 2
    x[y == 0, 1:5, 1:5] = 1.0
    x[y == 1, 7:11, 7:11] = 1.0
    path = tmp_path / "toy.npz"
    np.savez(path, x=x, y=y)
    return path


def test_seq2seq_end_to_end(tmp_path, capsys):
    out = tmp_path / "s2s"
    assert main([*SEQ2SEQ, "--seeds", "2", "--models", "none,additive", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| `additive` |" in captured.out and "Accuracy % by source length" in captured.out
    assert "additive seed 1: exact match" in captured.err
    names = {p.name for p in out.iterdir()}
    assert names == {
        "results.md", "results.csv", "accuracy_vs_latency.png", "learning_curves.png", "report.html",
        "alignments_additive.png",
    }  # fmt: skip
    assert "| `additive` | " in captured.out and "converged" in captured.out and "### Verdict" in captured.out
    # a second run refuses before training, in one line
    assert main([*SEQ2SEQ, "--models", "none,additive", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit ablate: error: ") and "exists" in err and err.count("\n") == 1


def test_vision_on_npz(tmp_path, capsys):
    out = tmp_path / "vis"
    args = ["ablate", "vision", "--data", str(_npz(tmp_path)), "--attention", "none,se", "--seeds", "1"]
    assert main([*args, "--epochs", "1", "--batch-size", "16", "--latency-rounds", "1", "--out", str(out)]) == 0
    assert "| `se` |" in capsys.readouterr().out
    assert (out / "results.csv").read_text().startswith("variant,accuracy_mean_pct")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["vision", "--attention", "none,sk"],
            "unknown attention 'sk'; valid: none,se,eca,cbam,nonlocal,single_head,mhsa,vit",
        ),
        (["seq2seq", "--models", "gru"], "unknown model 'gru'"),
        (["vision", "--seeds", "0"], "--seeds must be at least 1"),
        (["seq2seq", "--quick", "--languages", "en,zz-nope"], "unknown language 'zz-nope'"),
        (["vision", "--data", "{tmp}/missing.npz"], "missing.npz: no such file"),
        (["vision", "--data", "{tmp}/empty"], "empty folder: no class sub-folders"),
        (["vision", "--data", "{tmp}/nolabels.npz"], "labels missing: no 'y' array"),
        (["vision", "--data", "{tmp}/toy.npz", "--batch-size", "512"], "fewer than one batch"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 8, 8)))
    _npz(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["ablate", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit ablate: error: ") and message in err and err.count("\n") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path):
    """A real ``torchrun --nproc-per-node 2`` launch: DDP training, rank 0 alone evaluates and writes."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "attnkit.cli.main",
        *SEQ2SEQ, "--seeds", "1", "--models", "none,luong", "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("## Ablation: seq2seq") == 1  # only rank 0 reports
    assert "processes: 2" in (out / "results.md").read_text()
    assert (out / "alignments_luong.png").exists()


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_custom_user_cnn_from_the_example(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # examples.user_cnn is imported from the working directory, as uvicorn does
    out = tmp_path / "custom"
    data = _npz(tmp_path, n=80)
    args = ["ablate", "custom", "--model", "examples.user_cnn:build", "--data", str(data), "--where", "features.11"]
    args += ["--variants", "single_head", "--seeds", "2", "--epochs", "2", "--batch-size", "16"]
    assert main([*args, "--latency-rounds", "1", "--threshold", "5", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "| `none` |" in captured.out and "| `single_head` |" in captured.out
    assert "single_head: insert_attention('self_attention'): 1 block(s)" in captured.err
    assert "+5% relative lift over `none`" in captured.out and "SmallCNN on" in captured.out
    assert (out / "learning_curves.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "examples.user_cnn"], "--model: expected package.module:factory, got 'examples.user_cnn'"),
        (["--model", "nope_pkg.mod:build"], "--model: cannot import 'nope_pkg.mod' (ModuleNotFoundError"),
        (["--model", "examples.user_cnn:nothing"], "--model: 'examples.user_cnn' has no attribute 'nothing'"),
        (["--where", "nn.Nope"], "--where: 'nn.Nope' is not a torch.nn module type"),
        (["--where", "layer*"], "where=['layer*'] matched no module of SmallCNN"),
        (["--variants", "sk"], "unknown variant 'sk'; valid: none,se,eca,cbam,nonlocal,single_head,multi_head"),
        (["--model", "examples.user_cnn:build_gru"], "the model failed on x of shape (2, 1, 12, 12) (torch.float32)"),
    ],
)
def test_custom_user_errors(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(REPO)
    base = ["ablate", "custom", "--model", "examples.user_cnn:build", "--data", str(_npz(tmp_path)), "--quick"]
    base += ["--batch-size", "16"]
    assert main([*base, *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit ablate: error: ") and message in err and err.count("\n") == 1
