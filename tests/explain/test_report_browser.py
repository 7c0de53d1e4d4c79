"""The report with hostile labels in a real headless browser: every string shows as written, nothing runs,
nothing swallows the rest of the page (issue: ``"<!--"`` then ``"<script>"`` used to hide everything after)."""

from __future__ import annotations

import torch

from attnkit.explain.report import HeadMaps, Section, report
from report_browser import browser_page

HOSTILE = ["<!--", "<script>", "</script>", "<img src=x onerror=alert(1)>", "&lt;", "$5 and $6", "\u2028", "\"'"]
TITLE = "<!--<script>alert('title')</script>"


def _page(tmp_path):
    torch.manual_seed(0)
    n = len(HOSTILE)
    maps = torch.rand(2, 2, n, n).softmax(-1)
    sections = [
        Section(
            "<script>alert('section')</script>",
            text="<!-- not a comment\n\n<b>not bold</b> & $5",
            table=[["<script>", "</td></tr></table><script>alert(2)</script>"]],
            table_header=["<th>", "&amp;"],
            head_maps=HeadMaps(maps, query_tokens=HOSTILE, layer_names=["<script>alert(3)</script>", "<!--"]),
        ),
        Section("second", head_maps=HeadMaps(maps[:, :, :3, :3], query_tokens=HOSTILE[:3])),
        Section("the end", text="still here"),
    ]
    return report(tmp_path / "hostile.html", sections, title=TITLE)


def test_hostile_labels_in_a_real_browser(tmp_path):
    path = _page(tmp_path)
    with browser_page() as (page, errors):
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.resolve().as_uri())
        page.wait_for_load_state("load")
        assert errors == [] and dialogs == []
        assert page.locator("h1").text_content() == TITLE
        assert page.locator("section").count() == 3
        assert page.locator("section h2").nth(2).text_content() == "the end"
        assert page.locator("section p").nth(0).text_content() == "<!-- not a comment"
        cells = page.locator("section td").evaluate_all("cs => cs.map(c => c.textContent)")
        assert cells == ["<script>", "</td></tr></table><script>alert(2)</script>"]
        assert page.locator("img").count() == 0  # the onerror label stayed text
        layers = page.locator("select.layer option").evaluate_all("os => os.map(o => o.textContent)")
        assert layers[:2] == ["<script>alert(3)</script>", "<!--"]
        boxes = page.locator(".headmaps")
        assert boxes.count() == 2
        for i in range(2):
            assert boxes.nth(i).get_attribute("data-drawn") == "0:mean"  # the script ran for every map
        labels = boxes.nth(0).evaluate(
            "b => JSON.parse(b.querySelector('script[type=\"application/json\"]').textContent).qtok"
        )
        assert labels == HOSTILE


def test_no_label_reaches_the_html_unescaped(tmp_path):
    html = _page(tmp_path).read_text()
    assert html.count("<script") == 3  # two JSON payloads and the page's own script
    assert "<!--" not in html and "<img" not in html and "\u2028" not in html
