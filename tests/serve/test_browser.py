"""The service over real HTTP (uvicorn on loopback): in a real browser (Playwright + Debian chromium), and a
graceful shutdown with accepted requests still queued."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

import serve_server as sp
from report_browser import browser_page
from serve_helpers import Gate

EVIL_TEXT = 'Injected <script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> text'
EVIL_FILE = '<img src=x onerror="window.__pwned = 3">.png'


def make_app(endpoints, db, **config):
    from attnkit.serve.app import create_app
    from attnkit.serve.service import ServeConfig, Service
    from attnkit.serve.store import Store

    service = Service(endpoints, Store(str(db)), ServeConfig(**config))
    return create_app(service), service


@pytest.fixture(scope="module")
def server(endpoints, tmp_path_factory):
    app, _ = make_app(endpoints, tmp_path_factory.mktemp("browser") / "audit.db")
    with sp.running(app) as (_, url):
        yield url


def test_dashboard_in_a_real_browser(server, digit_png, tmp_path):
    with browser_page(viewport={"width": 1200, "height": 900}) as (page, errors):
        page.goto(server + "/")
        rows = page.locator("#feed-body tr")
        assert rows.count() == 0
        status, text_rec, _ = sp.post(server + "/v1/explain", {"model": "minilm", "text": EVIL_TEXT})
        assert status == 200
        status, image_rec, _ = sp.post(
            server + "/v1/explain", {"model": "digits-vit", "image": digit_png[0], "filename": EVIL_FILE}
        )
        assert status == 200
        page.wait_for_function("document.querySelectorAll('#feed-body tr').length === 2", timeout=20_000)
        assert page.locator("#feed-body").inner_text().count("Injected <script>") == 1  # shown as text
        assert page.evaluate("window.__pwned") is None
        page.locator(f"a[href='/explanations/{text_rec['id']}']").click()
        page.wait_for_selector(".headmaps[data-drawn]")
        assert page.locator("#input-text").inner_text() == EVIL_TEXT
        assert page.locator("#token-heatmap .tok").count() == len(text_rec["explanation"]["tokens"])
        canvas = page.locator(".headmaps canvas")
        before = canvas.screenshot()
        page.locator(".headmaps select.layer").select_option("0")
        page.locator(".headmaps select.head").select_option("3")
        assert canvas.screenshot() != before  # the layer/head browser redraws
        assert page.evaluate("window.__pwned") is None
        page.goto(f"{server}/explanations/{image_rec['id']}")
        page.wait_for_function("document.getElementById('overlay').complete")
        assert page.eval_on_selector("#overlay", "img => img.naturalWidth") > 0
        assert EVIL_FILE in page.locator("body").inner_text()
        assert page.evaluate("window.__pwned") is None
        page.goto(server + "/attention-health?model=minilm")
        page.wait_for_function("document.getElementById('health-plot').complete")
        assert page.eval_on_selector("#health-plot", "img => img.naturalWidth") > 0
        assert errors == []


def test_graceful_shutdown_finishes_accepted_work(endpoints, tmp_path):
    gate = Gate(endpoints["minilm"])
    app, service = make_app({"minilm": gate}, tmp_path / "shutdown.db", queue_size=8)
    with sp.running(app) as (server, url), concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(sp.post, url + "/v1/explain", {"model": "minilm", "text": f"r{i}"}) for i in range(4)]
        deadline = time.monotonic() + 60
        while service.pending < 4 and time.monotonic() < deadline:  # one running (held by the gate), three queued
            time.sleep(0.01)
        assert service.pending == 4
        server.should_exit = True  # what SIGTERM / SIGINT do
        time.sleep(0.3)
        with pytest.raises(OSError):  # no longer listening...
            sp.post(url + "/v1/explain", {"model": "minilm", "text": "too late"}, timeout=5)
        gate.release.set()  # ...but everything accepted completes
        results = [f.result(timeout=120) for f in futures]
    assert [status for status, _, _ in results] == [200] * 4
    assert service.store.engine.pool.checkedout() == 0  # the store was closed after the work finished
    from attnkit.serve.store import Store

    store = Store(str(tmp_path / "shutdown.db"))
    try:
        assert sorted(r["id"] for r in store.iter_records()) == sorted(body["id"] for _, body, _ in results)
    finally:
        store.close()
