"""Plots (batched, matplotlib Figures) and the self-contained HTML report: atomic, no clobbering, inline only."""

import base64
import json
import os
from html.parser import HTMLParser

import pytest
import torch

from attnkit.explain import TokenLayout
from attnkit.explain.plots import (
    alignment_plot,
    distance_plot,
    figure_png,
    head_grid,
    image_overlays,
    save_figure,
    token_heatmaps,
)
from attnkit.explain.report import HeadMaps, Section, report
from attnkit.io import atomic


def test_plots_are_batched():
    images = torch.rand(5, 3, 32, 48)
    fig = image_overlays(images, torch.rand(5, 4, 6), ncols=3, titles=list("abcde"))
    assert len(fig.axes) == 6  # 2 rows x 3 columns, one left blank
    layout = TokenLayout(num_prefix_tokens=1, grid=(4, 6))
    assert len(image_overlays(images, torch.rand(5, 25), layout=layout).axes) == 8
    fig = token_heatmaps([["the", "cat"], ["a", "b", "c"]], torch.rand(2, 3))
    assert figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(head_grid(torch.rand(3, 4, 5, 5)).axes) == 12
    fig = alignment_plot(torch.rand(3, 2, 4), query_tokens=[["x", "y"]] * 3, key_tokens=[list("abcd")] * 3)
    assert len(fig.axes) == 4
    assert len(distance_plot(torch.rand(6, 2, 4)).axes) == 1


def test_plot_errors():
    with pytest.raises(ValueError, match="layout"):
        image_overlays(torch.rand(2, 3, 8, 8), torch.rand(2, 5))
    with pytest.raises(ValueError, match="describes"):
        image_overlays(torch.rand(2, 3, 8, 8), torch.rand(2, 5), layout=TokenLayout(num_prefix_tokens=1, grid=(2, 3)))
    with pytest.raises(ValueError, match="3 lists of 4"):
        alignment_plot(torch.rand(3, 2, 4), key_tokens=[list("abc")] * 3)
    with pytest.raises(ValueError, match="layers, H, Lq, Lk"):
        head_grid(torch.rand(4, 5, 5))


def test_save_figure_atomic_no_clobber(tmp_path):
    fig = distance_plot(torch.rand(3, 2))
    path = save_figure(fig, tmp_path / "d.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_figure(fig, tmp_path / "d.png")
    save_figure(fig, tmp_path / "d.svg")
    with pytest.raises(ValueError, match="unsupported"):
        save_figure(fig, tmp_path / "d.bmp")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.json = [], [], []
        self._in_json = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append((tag, dict(attrs)))
        self._in_json = tag == "script" and dict(attrs).get("type") == "application/json"

    def handle_data(self, data):
        if self._in_json:
            self.json.append(data)

    def handle_endtag(self, tag):
        self._in_json = False


def _sections():
    maps = torch.softmax(torch.randn(2, 3, 4, 4), -1)
    return maps, [
        Section(
            "Summary",
            text="First <b>paragraph</b>.\n\nSecond.",
            table=[["layer 0", 0.5], ["layer 1", 0.25]],
            table_header=["layer", "entropy"],
        ),
        Section("Pictures", figures=[head_grid(maps), figure_png(distance_plot(torch.rand(2, 3)))]),
        Section("Browse", head_maps=HeadMaps(maps, query_tokens=["[CLS]", "a", "b", "</script>"])),
    ]


def test_report_is_self_contained_html(tmp_path):
    maps, sections = _sections()
    path = report(tmp_path / "r.html", sections, title="bug 42")
    text = path.read_text()
    parser = _Collect()
    parser.feed(text)
    assert text.startswith("<!DOCTYPE html>") and parser.tags.count("img") == 2 and "canvas" in parser.tags
    for tag, attrs in parser.attrs:
        assert "src" not in attrs or attrs["src"].startswith("data:image/png;base64,"), (tag, attrs)
        assert not (tag == "script" and "src" in attrs)
        assert tag != "link"
    assert "http://" not in text and "https://" not in text
    assert "&lt;b&gt;paragraph&lt;/b&gt;" in text  # text is escaped
    for _, attrs in parser.attrs:
        if "src" in attrs:
            assert base64.b64decode(attrs["src"].split(",", 1)[1])[:4] == b"\x89PNG"
    (payload,) = parser.json
    meta = json.loads(payload)
    assert (meta["layers"], meta["heads"], meta["lq"], meta["lk"]) == (2, 3, 4, 4)
    assert meta["qtok"][3] == "</script>"
    quant = torch.frombuffer(bytearray(base64.b64decode(meta["data"])), dtype=torch.uint8).float()
    decoded = quant.reshape(6, 16) / 255 * torch.tensor(meta["scale"])[:, None]
    torch.testing.assert_close(decoded, maps.reshape(6, 16), atol=1 / 255, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left behind


def test_report_no_clobber_overwrite_and_atomic_failure(tmp_path, monkeypatch):
    _, sections = _sections()
    target = tmp_path / "r.html"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        report(target, sections)
    assert target.read_text() == "keep me"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        report(target, sections, overwrite=True)
    assert target.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["r.html"]
    monkeypatch.undo()
    report(target, sections, overwrite=True)
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_written_files_follow_the_umask_and_never_clobber_a_racing_writer(tmp_path, monkeypatch):
    _, sections = _sections()
    mask = os.umask(0o022)
    try:
        path = report(tmp_path / "p.html", sections)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
    target = tmp_path / "race.html"
    real_fsync = os.fsync

    def racing_fsync(fd):  # another writer creates the file after our existence check
        target.write_text("theirs")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", racing_fsync)
    with pytest.raises(FileExistsError):
        report(target, sections)
    assert target.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.html", "race.html"]


def test_report_errors(tmp_path):
    with pytest.raises(ValueError, match="no sections"):
        report(tmp_path / "a.html", [])
    with pytest.raises(TypeError, match="Section"):
        report(tmp_path / "a.html", ["text"])
    with pytest.raises(ValueError, match="query_tokens has 2 labels"):
        report(tmp_path / "a.html", [Section("x", head_maps=HeadMaps(torch.rand(1, 1, 3, 3), query_tokens=["a", "b"]))])
    with pytest.raises(TypeError, match="PNG bytes"):
        report(tmp_path / "a.html", [Section("x", figures=["not a figure"])])
    assert not (tmp_path / "a.html").exists()


def test_labels_are_plain_text():
    """A lone ``$`` used to crash matplotlib's mathtext, and ``$5 and $6`` was typeset as math."""
    from matplotlib.text import Text

    fig = token_heatmaps([["$", "$5 and $6", "$x^2$"]], torch.rand(1, 3), titles=["cost: $5 and $6 $"])
    fig.axes[0].set_xticks([0, 1], ["$", "a$b"])
    assert figure_png(fig).startswith(b"\x89PNG")
    texts = [t for t in fig.findobj(Text) if "$" in t.get_text()]
    assert texts and not any(t.get_parse_math() for t in texts)
