"""CLI fault suite: hostile or careless command lines exit 2 with one line on stderr, no traceback, no partial files.

Most cases run in-process (``main([...])``); the ones that need a real process (bytes that are not UTF-8 in
``argv``, a decompression bomb, a FIFO, SIGTERM from outside) run as subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.cli.main import main

SRC = str(Path(attnkit.__file__).parents[1])


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(capsys, tmp_path: Path, *argv: str, expected: str) -> str:
    """Run ``attnkit argv`` in-process: exit 2, one stderr line containing ``expected``, nothing written."""
    before = _files(tmp_path)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert _files(tmp_path) == before, "partial files left behind"
    return err


def _png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` pixels (no pixel data needed to trip Pillow's bomb check)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one row; never decoded
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def digit_png(tmp_path):
    from PIL import Image

    image = Image.new("L", (64, 64), 255)
    for x in range(20, 44):
        image.putpixel((x, 32), 0)
    path = tmp_path / "in" / "digit.png"
    path.parent.mkdir()
    image.save(path)
    return path


# ------------------------------------------------------------------------------------------------ output paths
@pytest.mark.parametrize(
    "argv,expected",
    [
        (["explain-text", "hi", "--out", "{tmp}/missing/r.html"], "does not exist"),
        (["explain-text", "hi", "--out", "{tmp}/folder"], "is a directory"),
        (["explain-text", "hi", "--out", "{tmp}/file.txt/r.html"], "is not a directory"),
        (["explain-image", "{png}", "--out", "{tmp}/folder"], "is a directory"),
        (["explain-image", "{png}", "--out", "{tmp}/missing/r.html"], "does not exist"),
        (["demo", "--out", "{tmp}/file.txt"], "is not a directory"),
        (["ablate", "vision", "--quick", "--out", "{tmp}/file.txt"], "is not a directory"),
        (["ablate", "seq2seq", "--quick", "--out", "{tmp}/file.txt/sub"], "is not a directory"),
    ],
)
def test_output_paths_are_checked_before_any_work(capsys, tmp_path, digit_png, argv, expected):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("mine")
    argv = [a.format(tmp=tmp_path, png=digit_png) for a in argv]
    start = time.perf_counter()
    refused(capsys, tmp_path, *argv, expected=expected)
    assert time.perf_counter() - start < 60  # ablate would train for minutes before writing


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused(capsys, tmp_path, "explain-text", "hi", "--out", locked / "r.html", expected="not writable")


# ------------------------------------------------------------------------------------------------ inputs
def test_summarize_refuses_what_is_not_a_regular_file(capsys, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(capsys, tmp_path, "summarize", fifo, expected="not a regular file")
    refused(capsys, tmp_path, "summarize", "/dev/zero", expected="not a regular file")
    refused(capsys, tmp_path, "summarize", tmp_path, expected="not a regular file")


def test_summarize_caps_the_input_size(capsys, tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(10_000_001)  # sparse: the size is what is checked, nothing is read
    refused(capsys, tmp_path, "summarize", big, expected="above --max-bytes 10,000,000")
    small = tmp_path / "small.txt"
    small.write_text("One sentence. Another one here.")
    refused(capsys, tmp_path, "summarize", small, "--max-bytes", "10", expected="above --max-bytes 10")
    refused(capsys, tmp_path, "summarize", small, "--max-bytes", "0", expected="--max-bytes must be at least 1")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait.")
    refused(capsys, tmp_path, "summarize", tmp_path / "latin1.txt", expected="cannot read it as UTF-8")


def test_summarize_shows_progress(capsys, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Sentence number {i} talks about rivers and banks." for i in range(40)))
    assert main(["summarize", str(doc), "--window", "32"]) == 0
    out, err = capsys.readouterr()
    assert "model window(s)" in out
    assert "window" in err  # tqdm bar (or plain progress lines) on stderr


def test_text_arguments_must_be_utf8(capsys, tmp_path):
    # What Python makes of argv bytes that are not UTF-8 (os.fsdecode: surrogateescape).
    refused(capsys, tmp_path, "explain-text", os.fsdecode(b"caf\xe9 \xff"), expected="is not valid UTF-8 text")


def test_bench_length_zero_is_refused(capsys, tmp_path):
    refused(capsys, tmp_path, "bench", "--length", "0", expected="--length must be at least 16, got 0")


def test_images_that_are_not_images(capsys, tmp_path, digit_png):
    (tmp_path / "fake.png").write_text("not a png")
    refused(capsys, tmp_path, "explain-image", tmp_path / "fake.png", expected="not a readable PNG/JPEG")
    refused(capsys, tmp_path, "explain-image", tmp_path, expected="not a regular file")
    bomb = _png(tmp_path / "bomb.png", 20000, 20000)
    refused(capsys, tmp_path, "explain-image", bomb, expected="refused, too many pixels")


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit")
    transformers.ViTForImageClassification(config).save_pretrained(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_checkpoint_problems_are_one_line(capsys, tmp_path, tiny_vit_dir, digit_png):
    from safetensors.torch import load_file, save_file

    bad = _copy(tiny_vit_dir, tmp_path / "bad")
    (bad / "preprocessor_config.json").write_text(json.dumps({"image_mean": "grey", "image_std": [0.5] * 3}))
    refused(capsys, tmp_path, "explain-image", digit_png, "--checkpoint", bad, expected="image_mean must be a list")
    (bad / "preprocessor_config.json").write_text("[" * 100_000)
    refused(capsys, tmp_path, "explain-image", digit_png, "--checkpoint", bad, expected="nested too deeply")
    (bad / "preprocessor_config.json").unlink()
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "image_size": [16, 16]}))
    refused(capsys, tmp_path, "explain-image", digit_png, "--checkpoint", bad, expected="'image_size' as an integer")
    (bad / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["classifier.bias"][0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"))
    refused(capsys, tmp_path, "explain-image", digit_png, "--checkpoint", bad, "--strict", expected="NaN or inf")
    with pytest.warns(UserWarning, match="NaN or inf"):
        assert main(["explain-image", str(digit_png), "--checkpoint", str(bad)]) == 0
    capsys.readouterr()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    refused(capsys, tmp_path, "explain-text", "hi", "--model", pickled, expected="only safetensors")


# ------------------------------------------------------------------------------------------------ reports
def test_same_file_names_get_their_own_overlays(capsys, tmp_path, digit_png):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "same.png").write_bytes(digit_png.read_bytes())
    (b / "same.png").write_bytes(digit_png.read_bytes())
    out = tmp_path / "same.html"
    assert main(["explain-image", str(a / "same.png"), str(b / "same.png"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "same_files").iterdir()) == ["1_same_rollout.png", "2_same_rollout.png"]
    assert out.read_text().count("data:image/png;base64,") == 2


def test_a_failed_run_removes_what_it_created(capsys, tmp_path, digit_png, monkeypatch):
    from attnkit.cli import reports
    from attnkit.cli.registry import UserError

    def racing_report(path, sections, *, title, overwrite):  # someone created the report meanwhile
        raise UserError(f"{path} exists; pass --overwrite to replace it")

    monkeypatch.setattr(reports, "write_report", racing_report)
    refused(capsys, tmp_path, "explain-image", digit_png, "--out", tmp_path / "r.html", expected="exists")
    assert not (tmp_path / "r_files").exists()


def test_dollar_signs_are_plain_text(capsys, tmp_path, digit_png):
    named = tmp_path / "in" / "$5 and $6 $.png"
    named.write_bytes(digit_png.read_bytes())
    out = tmp_path / "$.html"
    assert main(["explain-image", str(named), "--out", str(out)]) == 0, capsys.readouterr().err
    assert "$5 and $6 $.png" in out.read_text()


def test_sigterm_during_a_write_leaves_no_temporary_file(capsys, tmp_path, digit_png, monkeypatch):
    from attnkit.io import atomic

    real_fsync = os.fsync

    def terminated_fsync(fd):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` while the data is being flushed
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", terminated_fsync)
    before, handler = _files(tmp_path), signal.getsignal(signal.SIGTERM)
    assert main(["explain-image", str(digit_png), "--out", str(tmp_path / "r.html")]) == 143
    assert "terminated" in capsys.readouterr().err
    assert _files(tmp_path) == before  # no .tmp file, no half-written overlay folder
    assert signal.getsignal(signal.SIGTERM) == handler  # main() put the previous handler back


# ------------------------------------------------------------------------------------------------ real processes
def _attnkit(*argv: bytes | str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable.encode(), b"-m", b"attnkit.cli.main"] + [os.fsencode(a) for a in argv]
    return subprocess.run(command, capture_output=True, env=env, timeout=timeout)


@pytest.mark.parametrize("case", ["non_utf8", "fifo", "bomb"])
def test_real_process_faults(tmp_path, case):
    if case == "non_utf8":
        argv = [b"explain-text", b"caf\xe9 \xff"]
    elif case == "fifo":
        os.mkfifo(tmp_path / "fifo")
        argv = ["summarize", str(tmp_path / "fifo")]
    else:
        argv = ["explain-image", str(_png(tmp_path / "bomb.png", 20000, 20000))]
    before = _files(tmp_path)
    done = _attnkit(*argv)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("attnkit ") and "Traceback" not in err, err
    assert _files(tmp_path) == before
