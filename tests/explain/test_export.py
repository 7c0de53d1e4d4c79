"""Export: Recording.save/load round trips, every plot as PNG and SVG, report tables as CSV."""

import csv
import io
import xml.etree.ElementTree as ET

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from attnkit.explain import Recording, TokenLayout, capture
from attnkit.explain.detection_plots import detection_figure
from attnkit.explain.plots import (
    alignment_plot,
    distance_plot,
    head_grid,
    image_overlays,
    save_figure,
    token_heatmaps,
)
from attnkit.explain.report import Section, save_table, table_csv
from attnkit.nn import MultiHeadAttention


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(MultiHeadAttention(8, 2) for _ in range(2))
        self.cross = MultiHeadAttention(8, 2)

    def forward(self, x, memory):
        for block in self.blocks:
            x = x + block(x)[0]
        return self.cross(x, memory)[0]


def _fields(r):
    return (r.name, r.layer, r.call, r.kind, r.source, r.shape, r.heads, r.query_rows, r.head_mean, r.layout)


@pytest.mark.parametrize(
    "options",
    [{}, {"heads": [1], "query_rows": [0, -1]}, {"head_mean": True, "layers": [1, 2]}, {"store": False}],
)
def test_recording_round_trip(tmp_path, options):
    model = Tiny().eval()
    layout = TokenLayout(num_prefix_tokens=1, grid=(2, 2), patch_size=(4, 4), extra={"source": "unit test"})
    with capture(model, layout=layout, **options) as rec:
        model(torch.randn(2, 5, 8), torch.randn(2, 3, 8))
    rec.tokens = [["[CLS]", "a", "b", "c", "d"], ["[CLS]", "é", "$5", "</script>", "🙂"]]
    path = rec.save(tmp_path / "rec.safetensors", model="tiny")
    back = Recording.load(path)
    assert isinstance(back, Recording) and back.num_calls == rec.num_calls == 3
    assert back.tokens == rec.tokens and back.model == "tiny"
    assert [_fields(r) for r in back] == [_fields(r) for r in rec]
    for a, b in zip(rec, back):
        if a.weights is None:
            assert b.weights is None
        else:
            assert b.weights.dtype == a.weights.dtype and torch.equal(b.weights, a.weights)
    assert {r.kind for r in back} <= {"self", "cross"} and back.layout == rec.layout
    if not options:
        torch.testing.assert_close(back.stack("self"), rec.stack("self"), rtol=0, atol=0)


def test_save_refuses_to_clobber_and_bad_input(tmp_path):
    model = Tiny().eval()
    with capture(model) as rec:
        model(torch.randn(1, 4, 8), torch.randn(1, 2, 8))
    path = rec.save(tmp_path / "r.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        rec.save(path)
    assert path.read_bytes() == before
    rec.save(path, overwrite=True, tokens=["a", "b", "c", "d"])
    assert Recording.load(path).tokens == ["a", "b", "c", "d"]
    with pytest.raises(TypeError, match="tokens"):
        rec.save(tmp_path / "t.safetensors", tokens=[1, 2])
    rec.maps[0].layout = TokenLayout(extra={"fn": print})
    with pytest.raises(ValueError, match="JSON"):
        rec.save(tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_load_refuses_other_files(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no attnkit recording"):
        Recording.load(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="cannot read"):
        Recording.load(tmp_path / "junk.safetensors")
    save_file({}, tmp_path / "other.safetensors", metadata={"attnkit.recording": '{"format": "x"}'})
    with pytest.raises(ValueError, match="not an attnkit recording"):
        Recording.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        Recording.load(tmp_path / "missing.safetensors")


def _figures():
    layout = TokenLayout(num_prefix_tokens=1, grid=(2, 2))
    yield "overlay", image_overlays(torch.rand(2, 3, 8, 8), torch.rand(2, 5), layout=layout)
    yield "tokens", token_heatmaps([["a", "$5", "b"]], torch.rand(1, 3))
    yield "heads", head_grid(torch.rand(2, 2, 4, 4))
    yield "alignment", alignment_plot(torch.rand(1, 3, 4), key_tokens=[list("abcd")], query_tokens=[list("xyz")])
    yield "distance", distance_plot(torch.rand(3, 2))
    boxes, labels, scores = torch.tensor([[1.0, 1.0, 8.0, 8.0]]), torch.tensor([2]), torch.tensor([0.9])
    yield "detection", detection_figure(torch.rand(3, 16, 16), boxes, labels, scores, maps=torch.rand(1, 16, 16))


@pytest.mark.parametrize("name", ["overlay", "tokens", "heads", "alignment", "distance", "detection"])
def test_every_plot_saves_as_png_and_svg(tmp_path, name):
    fig = dict(_figures())[name]
    png = save_figure(fig, tmp_path / f"{name}.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = save_figure(fig, tmp_path / f"{name}.svg")
    root = ET.fromstring(svg.read_bytes())
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and len(list(root.iter())) > 10


def test_report_table_as_csv(tmp_path):
    section = Section(
        "scores",
        table=[["rollout", 0.1234567891234, torch.tensor(2.5)], ['a "quoted", cell', 1, "x\ny"]],
        table_header=["method", "auc", "n"],
    )
    text = table_csv(section)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [["method", "auc", "n"], ["rollout", "0.1234567891234", "2.5"], ['a "quoted", cell', "1", "x\ny"]]
    path = save_table(section, tmp_path / "t.csv")
    assert path.read_text() == text
    with pytest.raises(FileExistsError):
        save_table(section, path)
    with pytest.raises(ValueError, match="with a table"):
        table_csv(Section("no table"))
