"""``attnkit detect``: text and JSON-lines output, the report, PNG/JPEG/.npy input, and one-line user errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from attnkit.cli.main import main
from attnkit.datasets import DigitScenes
from attnkit.vision.detection.pretrained import METADATA_NAME, build_detector


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small random-weight detector saved like the shipped one (the CLI plumbing, not its accuracy)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    cfg = {"num_queries": 6, "num_layers": 1, "embed_dim": 32, "ffn_dim": 32, "widths": [8, 16, 16]}
    torch.manual_seed(0)
    model = build_detector("rtdetr", cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "digit_rtdetr.safetensors"))
    (d / METADATA_NAME).write_text(
        json.dumps({"models": {"rtdetr": {"weights": "digit_rtdetr.safetensors", "config": cfg}}})
    )
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    data = DigitScenes("test", num_canvases=2, seed=7, canvas_size=80)
    np.save(d / "a.npy", data.images[0, 0].numpy())
    Image.fromarray((255 - data.images[1, 0].numpy() * 255).astype("uint8")).save(d / "b.png")  # dark ink on white
    Image.fromarray((data.images[1, 0].numpy() * 255).astype("uint8")).save(d / "c.jpg")
    Image.new("L", (3000, 20)).save(d / "wide.png")
    (d / "bad.png").write_bytes(b"not an image")
    np.save(d / "cube.npy", np.zeros((4, 64, 64)))
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_lines_one_per_image(capsys, weights, images):
    code, out, err = run(
        capsys, "detect", images / "a.npy", images / "b.png", "--json", "--threshold", "0", "--weights", weights
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == [str(images / "a.npy"), str(images / "b.png")]
    det = lines[0]["detections"]
    assert len(det) == 30 and set(det[0]) == {"label", "score", "box"}
    x0, y0, x1, y1 = det[0]["box"]
    assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 80 and 0 <= det[0]["score"] <= 1


def test_png_is_inverted_like_the_npy(capsys, weights, images):
    from attnkit.cli.detect import read_image

    png, jpg = read_image(images / "b.png"), read_image(images / "c.jpg")
    assert png.shape == (1, 80, 80) and float(png.mean()) < 0.5
    assert float((png - jpg).abs().mean()) < 0.02  # JPEG is lossy


def test_report_with_maps(capsys, weights, images, tmp_path):
    out_html = tmp_path / "r.html"
    code, _out, err = run(
        capsys, "detect", images / "a.npy", "--threshold", "0.0", "--out", out_html, "--weights", weights
    )
    assert code == 0, err
    page = out_html.read_text()
    assert "30 detections" in page and "data:image/png;base64" in page
    assert "peak in box (attention)" in page and "peak in box (relevance)" in page  # both maps by default
    assert page.count("data:image/png;base64") == 2
    code, _out, err = run(
        capsys, "detect", images / "a.npy", "--out", out_html, "--overwrite", "--maps", "relevance", "--threshold",
        "0.011", "--weights", weights,
    )  # fmt: skip
    page = out_html.read_text()
    assert code == 0 and "peak in box (relevance)" in page and "(attention)" not in page
    code, _, err = run(capsys, "detect", images / "a.npy", "--out", out_html, "--weights", weights)
    assert code == 2 and "--overwrite" in err


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("missing.png", [], "no such file"),
        ("bad.png", [], "not a readable PNG/JPEG image"),
        ("wide.png", [], "3000x20 pixels; expected 16 to 1024"),
        ("cube.npy", [], "expected a 2-d numeric grey image"),
        ("a.npy", ["--threshold", "2"], "--threshold must be in [0, 1]"),
        ("a.npy", ["--weights", "/nonexistent"], "--weights /nonexistent"),
        ("a.npy", ["--maps", "relevance"], "--maps chooses the maps of the report: give --out too"),
    ],
)
def test_user_errors_are_one_line(capsys, images, name, extra, message):
    code, _, err = run(capsys, "detect", images / name, *extra)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_decompression_bomb_is_refused(capsys, tmp_path):
    from PIL import Image

    path = tmp_path / "bomb.png"
    Image.new("L", (1000, 1000)).save(path)
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 100_000  # 1e6 pixels is then a bomb for Pillow
    try:
        code, _, err = run(capsys, "detect", path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert code == 2 and "too large to decode safely" in err


def test_subprocess(weights, images):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnkit.cli.main",
            "detect",
            str(images / "a.npy"),
            "--json",
            "--weights",
            str(weights),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image"].endswith("a.npy")
