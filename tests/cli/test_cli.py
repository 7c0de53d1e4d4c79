"""The attnkit command in-process (main([...])) and once as a real subprocess; user errors exit 2 in one line."""

import os
import subprocess
import sys

import pytest

from attnkit.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_text_prints_top_tokens(capsys):
    code, out, err = run(capsys, "explain-text", "I deposited cash at the bank", "--method", "raw", "--top", "3")
    assert code == 0, err
    assert "deposited" in out and "cash" in out


def test_explain_image_lrp_pixels_writes_overlays(capsys, tmp_path):
    from PIL import Image

    image = Image.new("L", (64, 64), 255)
    for y in range(16, 48):
        image.putpixel((30, y), 0)
    image.save(tmp_path / "one.png")
    report = tmp_path / "r.html"
    code, out, err = run(
        capsys, "explain-image", str(tmp_path / "one.png"), "--method", "cp-lrp-pixels", "--out", str(report)
    )
    assert code == 0, err
    assert "cp-lrp-pixels peak at" in out and report.exists()
    assert (tmp_path / "r_files" / "1_one_cp-lrp-pixels.png").exists()
    code, _, err = run(capsys, "explain-image", str(tmp_path / "one.png"), "--method", "lrp")
    assert code == 2 and "--method for digits-vit must be one of" in err and "cp-lrp-pixels" in err


def test_summarize_prints_the_kept_sentences(capsys, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The river rose. Farmers moved cattle. A bank closed. Water fell by Friday.")
    code, out, err = run(capsys, "summarize", str(doc), "--ratio", "0.5")
    assert code == 0, err
    assert "[2 of 4 sentences" in out


def test_bench_quick_prints_a_table(capsys):
    code, out, err = run(capsys, "bench", "--quick", "--length", "64")
    assert code == 0, err
    assert "torch SDPA (direct)" in out and "attnkit auto" in out and "window" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["explain-text", "hi", "--method", "gradcam"], "--method must be one of"),
        (["explain-text", "hi", "--model", "/nonexistent/dir"], "not a directory"),
        (["explain-text", "hi", "--top", "0"], "--top must be at least 1"),
        (["explain-text", "hi", "--method", "raw", "--layer", "9"], "layer must be in [0, 6)"),
        (["summarize", "/nonexistent.txt"], "no such file"),
        (["summarize", "EMPTY"], "the file is empty"),
        (["summarize", "EMPTY", "--ratio", "2"], "--ratio must lie in (0, 1]"),
        (["bench", "--length", "4"], "--length must be at least 16"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_existing_report_needs_overwrite(capsys, tmp_path):
    report = tmp_path / "r.html"
    report.write_text("mine")
    code, _, err = run(capsys, "explain-text", "hi", "--out", str(report))
    assert code == 2 and "--overwrite" in err
    assert report.read_text() == "mine"


def test_real_subprocess_help_and_error():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "attnkit.cli.main", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "explain-text" in ok.stdout and "summarize" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "attnkit.cli.main", "summarize", "/nonexistent.txt"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("attnkit summarize: error:")
