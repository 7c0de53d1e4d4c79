"""Result tables and report files: Markdown, CSV, plot, alignment heatmaps, HTML; atomic, no clobbering."""

from __future__ import annotations

import csv
import io

import pytest

from attnkit.ablation.report import planned_files, write_report
from attnkit.ablation.results import AblationResult, Alignment, VariantResult
from attnkit.io.atomic import atomic_write


def _result(with_groups=True):
    groups = {"1-12": [1.0, 0.9, 0.95], "13+": [0.5, 0.4, 0.45]} if with_groups else {}
    up = {"1-12": [1.0, 1.0, 1.0], "13+": [0.9, 0.95, 0.9]} if with_groups else {}
    variants = [
        VariantResult("none", [0.80, 0.82, 0.81], 1000, 2_000_000, {1: 0.001, 64: 0.01}, groups, "baseline model"),
        VariantResult("additive", [0.95, 0.96, 0.97], 1200, 3_500_000, {1: 0.002, 64: 0.02}, up, "with attention"),
    ]
    alignments = [
        Alignment("additive", "3 mai 2001", ["2", "0", "0", "1", "<eos>"], [[0.1] * 10] * 5, True),
        Alignment("additive", "12 juin 1999", ["1", "9", "<eos>"], [[1 / 12] * 12] * 3, False),
    ]
    return AblationResult(
        "seq2seq",
        "toy dates",
        "none",
        [0, 1, 2],
        variants,
        {"epochs": 2},
        "source length",
        alignments if with_groups else [],
        12.0,
    )


def test_tables():
    result = _result()
    md = result.to_markdown()
    assert "| `none` | 81.00 ± 1.00 |  | n/a | 1,000 | 2.00 M | 1.00 | 10.00 | — | baseline |" in md
    assert "| `additive` | 96.00 ± 1.00 |  | n/a | 1,200 | 3.50 M | 2.00 | 20.00 | +15.00 ± 1.00 | p=" in md
    assert "**Roll out `additive`**" in md  # +18.5% relative lift, CI above 0
    assert "better" in md and "Accuracy % by source length" in md and "(Δ +46.7, p=0.0088)" in md
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert rows[1]["variant"] == "additive" and float(rows[1]["lift_pct"]) == 15.0
    assert rows[0]["lift_pct"] == "" and rows[1]["latency_b64_ms"] == "20.0"
    assert rows[1]["accuracy_per_seed_pct"] == "95.00 96.00 97.00"
    assert _result(with_groups=False).group_table() == ""


def test_write_report_files_and_no_clobber(tmp_path):
    out = tmp_path / "run"
    paths = write_report(_result(), out)
    names = sorted(p.name for p in paths)
    assert names == sorted(p.name for p in planned_files(out, ["additive"]))
    assert "alignments_additive.png" in names
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary files left
    html = (out / "report.html").read_text()
    assert "Alignments: additive" in html and html.count("data:image/png;base64,") == 3
    assert "Learning curves" in html and "Verdict: roll out attention?" in html
    assert (out / "accuracy_vs_latency.png").read_bytes().startswith(b"\x89PNG")
    before = (out / "results.md").read_text()
    with pytest.raises(FileExistsError, match=r"results\.md exists"):
        write_report(_result(with_groups=False), out)
    assert (out / "results.md").read_text() == before
    write_report(_result(with_groups=False), out, overwrite=True)
    assert (out / "results.md").read_text() != before


def test_atomic_write(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "é")
    assert path.read_bytes() == "é".encode()
    with pytest.raises(FileExistsError):
        atomic_write(path, b"x")
    atomic_write(path, b"x", overwrite=True)
    assert path.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
