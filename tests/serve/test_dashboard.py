"""The dashboard's attention health on a real SQLite store (no model): drift flagged against the first N requests
and against a baseline recorded by ``attnkit serve baseline``, per-kind labels, and the image overlay's size."""

from __future__ import annotations

import pytest
import torch

from attnkit.serve.dashboard import health_figure, health_report, health_windows
from attnkit.serve.health import STATISTICS
from attnkit.serve.service import ServeConfig, Service
from attnkit.serve.store import Store
from serve_helpers import record

T0 = 1_700_000_000.0
SIZE = 30  # reference and recent windows


def _stats(gen: torch.Generator, entropy_low: float) -> dict[str, float]:
    """Statistics drawn at random: head entropy uniform on [entropy_low, entropy_low + 0.1], the rest on fixed
    ranges (the same distribution in every window)."""
    u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
    return {
        "head_entropy": entropy_low + 0.1 * u[0],
        "sink_mass": 0.2 + 0.2 * u[1],
        "rollout_concentration": 0.1 + 0.3 * u[2],
        "confidence": 0.4 + 0.3 * u[3],
    }


def _add(store: Store, gen: torch.Generator, entropy_lows: list[float], *, model="minilm", start=0, **over):
    for i, low in enumerate(entropy_lows):
        store.add(
            record(model=model, text=f"sentence {start + i}", created=T0 + start + i, stats=_stats(gen, low), **over)
        )


@pytest.fixture
def service(tmp_path):
    store = Store(str(tmp_path / "audit.db"))
    svc = Service({}, store, ServeConfig(reference_size=SIZE, recent_size=SIZE))  # no model is loaded
    yield svc
    svc.shutdown()


def _flags(report) -> dict[str, bool]:
    return {s["statistic"]: s["flagged"] for s in report["statistics"]}


def test_entropy_shift_is_flagged_against_the_first_n_requests(service):
    gen = torch.Generator().manual_seed(0)
    _add(service.store, gen, [0.6] * SIZE + [0.3] * SIZE)  # the entropy drops after the first 30 requests
    windows = health_windows(service, "minilm")
    assert windows.source == f"the first {SIZE} requests" and len(windows.reference["head_entropy"]) == SIZE
    assert all(0.6 <= v <= 0.7 for v in windows.reference["head_entropy"])
    assert len(windows.recent) == SIZE and all(0.3 <= r["stats"]["head_entropy"] <= 0.4 for r in windows.recent)
    assert windows.reference_seqs.isdisjoint(r["seq"] for r in windows.recent)
    report = health_report(service, "minilm")
    assert report["drift"] is True
    assert _flags(report) == {
        "head_entropy": True,
        "sink_mass": False,
        "rollout_concentration": False,
        "confidence": False,
    }
    entropy = report["statistics"][0]
    assert entropy["p_value"] < 1e-6 and entropy["ks"] == 1.0 and entropy["shift"] < -5  # 0.3 lower, sd about 0.03


def test_an_unshifted_window_is_not_flagged(service):
    gen = torch.Generator().manual_seed(0)
    _add(service.store, gen, [0.6] * (2 * SIZE))
    report = health_report(service, "minilm")
    assert report["reference"]["num_records"] == SIZE and report["recent"]["num_records"] == SIZE
    assert report["drift"] is False and not any(_flags(report).values())
    assert all(s["p_value"] is not None and s["p_value"] > 0.01 for s in report["statistics"])


def test_drift_against_a_baseline_recorded_by_the_cli(service, tmp_path, capsys):
    from attnkit.cli.main import main

    gen = torch.Generator().manual_seed(1)
    _add(service.store, gen, [0.3] * SIZE + [0.6] * 40)  # a low-entropy start, then 40 records of normal traffic
    assert health_report(service, "minilm")["drift"] is True  # against the first 30 requests (lower entropy)
    # the baseline: the 40 normal records (from the 31st request on), through the real command
    argv = ["serve", "baseline", "--model", "minilm", "--db", service.store.url, "--since", str(T0 + SIZE)]
    assert main(argv) == 0
    assert "40 records" in capsys.readouterr().out
    baseline = service.store.latest_baseline("minilm")
    assert baseline["num_records"] == 40 and min(baseline["stats"]["head_entropy"]) >= 0.6
    # recent window = the last 30 records, all inside the baseline's distribution: no drift any more
    report = health_report(service, "minilm")
    assert report["reference"]["source"].startswith(f"baseline #{baseline['id']} (40 records")
    assert report["drift"] is False
    _add(service.store, gen, [0.3] * SIZE, start=70)  # the entropy drops again
    report = health_report(service, "minilm")
    assert report["reference"]["source"].startswith("baseline") and report["reference"]["num_records"] == 40
    assert _flags(report) == {
        "head_entropy": True,
        "sink_mass": False,
        "rollout_concentration": False,
        "confidence": False,
    }
    png = health_figure(service, "minilm")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_confidence_is_labelled_by_what_it_measures(service):
    gen = torch.Generator().manual_seed(2)
    _add(service.store, gen, [0.6] * 3)
    _add(service.store, gen, [0.6] * 3, model="vit", start=3, model_kind="image", input_kind="image", input_text=None)
    text, image = health_report(service, "minilm"), health_report(service, "vit")
    assert text["model_kind"] == "text" and image["model_kind"] == "image"
    assert text["statistics"][3]["label"] == "confidence (cosine similarity to the nearest label)"
    assert image["statistics"][3]["label"] == "confidence (top-class probability)"
    assert [s["statistic"] for s in text["statistics"]] == list(STATISTICS)  # stored keys unchanged


def test_health_page_labels(service):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from attnkit.serve.dashboard import add_dashboard

    gen = torch.Generator().manual_seed(3)
    _add(service.store, gen, [0.6] * SIZE + [0.3] * SIZE)
    app = FastAPI()
    add_dashboard(app, service)
    page = TestClient(app).get("/attention-health", params={"model": "minilm"})
    assert page.status_code == 200
    assert "standardised mean difference" in page.text and "shift (ref sd)" not in page.text
    assert "confidence (cosine similarity to the nearest label)" in page.text and "not a probability" in page.text
    assert 'id="drift-status" class="flag"' in page.text
    service.store.add(record(model="vit", model_kind="image", input_kind="image", input_text=None, attention=None))
    image_id = service.store.list(page_size=1)[0]["id"]
    service.store.add(record(attention=None))
    text_id = service.store.list(page_size=1)[0]["id"]
    text_detail = TestClient(app).get(f"/explanations/{text_id}").text
    image_detail = TestClient(app).get(f"/explanations/{image_id}").text
    assert "<th>cosine similarity (sentence embedding to label)</th>" in text_detail
    assert "<th>probability</th>" in image_detail


def test_the_overlay_of_a_large_image_is_drawn_from_a_downscaled_copy(service, monkeypatch):
    import io

    import numpy as np
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from PIL import Image

    from attnkit.explain import plots
    from attnkit.serve.dashboard import OVERLAY_MAX_SIDE, add_dashboard, overlay_pixels

    width, height = 4096, 2048  # 8.4 M pixels: within the default --max-image-pixels
    ramp = np.broadcast_to((np.arange(width) % 256).astype(np.uint8), (height, width))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    heatmap = torch.rand(4, 4, generator=torch.Generator().manual_seed(4)).tolist()
    row = record(
        model="vit",
        model_kind="image",
        input_kind="image",
        input_text=None,
        input_image=buf.getvalue(),
        input_filename="big.png",
        prediction={"label": "3", "class": 3, "score": 0.9, "top": [{"label": "3", "score": 0.9, "class": 3}]},
        explanation={"grid": [4, 4], "heatmap": heatmap, "image_size": [64, 64]},
    )
    service.store.add(row)
    pixels = overlay_pixels(buf.getvalue())
    assert pixels.shape == (OVERLAY_MAX_SIDE // 2, OVERLAY_MAX_SIDE, 3) and pixels.dtype == torch.uint8  # aspect kept
    assert torch.equal(pixels[0], pixels[-1])  # rows of the ramp stay alike after resampling
    drawn = []
    real = plots.image_overlays
    monkeypatch.setattr(
        plots, "image_overlays", lambda images, *a, **k: drawn.append(images.shape) or real(images, *a, **k)
    )
    app = FastAPI()
    add_dashboard(app, service)
    png = TestClient(app).get(f"/explanations/{row['id']}/overlay.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == [(1, OVERLAY_MAX_SIDE // 2, OVERLAY_MAX_SIDE, 3)]  # not (1, 2048, 4096, 3) floats
    small = io.BytesIO()
    Image.fromarray(ramp[:64, :48]).save(small, format="PNG")
    assert overlay_pixels(small.getvalue()).shape == (64, 48, 3)  # never enlarged
