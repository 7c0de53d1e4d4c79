"""The token-by-token matrix: the report's shaded table (labels escaped, one cell per score) and the terminal
lines."""

from html.parser import HTMLParser

import pytest
import torch

from attnkit.explain.report import Section, report
from attnkit.explain.token_matrix import TokenMatrix, visible_token

HOSTILE = ["<!--", "<script>", "</table>", "&lt;", "\"'"]


class _Table(HTMLParser):
    """Collects the token table: header labels, row labels, the cells' titles and background colours."""

    def __init__(self):
        super().__init__()
        self.th, self.cells, self.caption, self._in = [], [], "", None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("th", "caption"):
            self._in = tag
            if tag == "th":
                self.th.append("")
        if tag == "td":
            self.cells.append((attrs["title"], attrs["style"]))

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "th":
            self.th[-1] += data
        elif self._in == "caption":
            self.caption += data


def test_report_draws_the_matrix_with_every_label_escaped(tmp_path):
    scores = torch.tensor([[0.5, -0.25, 0.0, 0.0, 1.0], [1.0, 0.5, 0.25, -1.0, 0.0]])
    tm = TokenMatrix(scores, ["a b", "\n"], HOSTILE, caption="<script>alert(1)</script>")
    path = report(tmp_path / "r.html", [Section("gen", token_matrix=tm)])
    html = path.read_text()
    assert "<script>alert" not in html and "<!--<" not in html
    table = _Table()
    table.feed(html[html.index('<table class="tokens">') :])
    assert table.caption == "<script>alert(1)</script>"
    # header: an empty corner, the column labels; then one label per row (whitespace made visible)
    assert table.th == ["", *HOSTILE, "a\u2423b", "\u21b5"]
    assert [float(t) for t, _ in table.cells] == scores.flatten().tolist()
    styles = [s for _, s in table.cells]
    assert styles[4] == "background:rgb(0,102,217)"  # the row's largest positive score: full blue
    assert styles[8] == "background:rgb(217,77,77)"  # the row's largest negative score: full red
    assert styles[2] == "background:rgb(255,255,255)"


def test_terminal_lines_list_the_strongest_sources():
    tm = TokenMatrix(torch.tensor([[0.1, -0.7, 0.3, 0.0]]), ["x"], ["a", " ", "c", "d"])
    assert tm.lines(top=3) == ["       x <- \u2423@1 -0.700  c@2 +0.300  a@0 +0.100"]
    assert visible_token("a\tb\r") == "a\u21e5b\u240d"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": torch.zeros(3)}, "must be an \\(N, S\\) tensor"),
        ({"row_tokens": ["a"]}, "row_tokens has 1 labels"),
        ({"column_tokens": ["a"]}, "column_tokens has 1 labels"),
    ],
)
def test_bad_matrices_are_refused(kwargs, match, tmp_path):
    tm = TokenMatrix(**{"scores": torch.zeros(2, 3), "row_tokens": ["a", "b"], "column_tokens": list("abc"), **kwargs})
    with pytest.raises(ValueError, match=match):
        report(tmp_path / "r.html", [Section("gen", token_matrix=tm)])
    with pytest.raises(TypeError, match="must be a TokenMatrix"):
        report(tmp_path / "r.html", [Section("gen", token_matrix=torch.zeros(2, 2))])
