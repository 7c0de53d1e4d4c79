"""The main job end to end (fast mode, same code path) and its report in a real headless browser."""

import re

import pytest

from attnkit.cli.main import main
from report_browser import browser_page


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--fast", "--out", str(out)])
    assert code == 0
    return out / "report.html"


def test_demo_writes_the_report_and_refuses_to_clobber(demo_report, capsys):
    html = demo_report.read_text()
    for part in ("Language", "Vision", "Detection", "Efficiency", "bank", "pointing game", "relevance of the image"):
        assert part in html
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched
    assert main(["demo", "--fast", "--out", str(demo_report.parent)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_report_in_a_real_browser(demo_report, tmp_path):
    with browser_page(viewport={"width": 1200, "height": 900}) as (page, errors):
        page.goto(demo_report.resolve().as_uri())
        page.wait_for_load_state("load")
        assert errors == []
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        assert images and all(done and width > 0 for done, width in images)
        box = page.locator(".headmaps").first
        canvas = box.locator("canvas")
        before_state, before_pixels = box.get_attribute("data-drawn"), canvas.screenshot()
        heads = box.locator("select.head option").evaluate_all("os => os.map(o => o.value)")
        box.locator("select.head").select_option(heads[-1])
        layers = box.locator("select.layer option").evaluate_all("os => os.map(o => o.value)")
        box.locator("select.layer").select_option(layers[-1])
        assert box.get_attribute("data-drawn") != before_state
        assert canvas.screenshot() != before_pixels  # the displayed map changed
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.std() > 0.05  # not blank
    assert re.search(r"\d+\.\d+%", demo_report.read_text())  # accuracies are reported
