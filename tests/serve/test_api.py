"""Every route of the HTTP API and every documented error, through FastAPI's test client (real shipped models)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
import time

import pytest
import torch

from serve_helpers import Gate, record

fastapi_testclient = pytest.importorskip("fastapi.testclient")


def make_client(endpoints, tmp_path, *, db=None, retention_period_s=3600.0, **config):
    from attnkit.serve.app import create_app
    from attnkit.serve.service import ServeConfig, Service
    from attnkit.serve.store import Store

    service = Service(endpoints, Store(db or str(tmp_path / "api.db")), ServeConfig(**config))
    app = create_app(service, retention_period_s=retention_period_s)
    return fastapi_testclient.TestClient(app), service


@pytest.fixture(scope="module")
def client(endpoints, tmp_path_factory):
    c, _ = make_client(endpoints, tmp_path_factory.mktemp("api"), max_body_bytes=2_000_000)
    with c:
        yield c


def explain(client, **body):
    return client.post("/v1/explain", json=body)


def post_raw(client, body, **headers):
    """POST ``body`` (bytes, or an object serialised with ASCII escapes, so lone surrogates survive) as JSON."""
    content = body if isinstance(body, bytes) or callable(getattr(body, "__next__", None)) else json.dumps(body)
    return client.post("/v1/explain", content=content, headers={"content-type": "application/json", **headers})


def error(response, status, field):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


@pytest.mark.parametrize("method", ["raw", "rollout", "relevance", "flow"])
def test_explain_text_matches_the_library(client, endpoints, method):
    from attnkit.text import token_scores

    text = "The striker scored twice and the team won the football match."
    r = explain(client, model="minilm", text=text, method=method, options={"labels": ["sports", "cooking", "tax law"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prediction"]["label"] == "sports"  # the real MiniLM embedding is nearest to the right label
    tm = endpoints["minilm"].tm
    batch = tm.encode([text], max_length=128)
    expected = token_scores(tm, batch, method=method)[0]
    assert body["explanation"]["tokens"] == tm.tokens(batch["input_ids"][0])
    torch.testing.assert_close(torch.tensor(body["explanation"]["scores"]), expected, atol=2e-6, rtol=0)
    assert set(body["timings"]) >= {"queue_ms", "forward_ms", "explain_ms", "store_ms", "total_ms"}
    record = client.get(f"/v1/explanations/{body['id']}").json()
    assert record["input"]["text"] == text and record["input"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert record["method"] == method and record["model"] == "minilm"
    assert record["weights_sha256"] == endpoints["minilm"].weights_sha256 and len(record["weights_sha256"]) == 64
    assert record["attnkit_version"] and record["options"]["labels"] == ["sports", "cooking", "tax law"]
    assert record["explanation"] == body["explanation"]


@pytest.mark.parametrize("method", ["raw", "rollout", "relevance", "flow"])
def test_explain_image_matches_the_library(client, endpoints, digit_png, method):
    from attnkit.explain.saliency import relevance_maps, rollout_maps
    from attnkit.serve.inputs import decode_image

    png, _ = digit_png
    r = explain(client, model="digits-vit", image=png, method=method, filename="digit.png")
    assert r.status_code == 200, r.text
    body = r.json()
    model = endpoints["digits-vit"].model
    x, _ = decode_image(png, size=64, channels=1, invert_light=True)
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    assert body["prediction"]["class"] == int(probs.argmax())
    assert body["prediction"]["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    grid = torch.tensor(body["explanation"]["heatmap"])
    assert grid.shape == (8, 8) and body["explanation"]["image_size"] == [64, 64]
    if method in ("rollout", "relevance"):  # the digits evaluation's own maps are the reference
        ref = (rollout_maps if method == "rollout" else relevance_maps)(model, x[None])[0]
        torch.testing.assert_close(grid, ref.float(), atol=2e-6, rtol=1e-4)
    record = client.get(f"/v1/explanations/{body['id']}").json()
    assert base64.b64decode(record["input"]["image"]) == base64.b64decode(png)
    assert record["input"]["filename"] == "digit.png"


def test_health_statistics_are_written_after_the_answer(client, endpoints, digit_png):
    from attnkit.explain import capture
    from attnkit.serve.health import request_stats
    from attnkit.serve.inputs import decode_image

    png, _ = digit_png
    body = explain(client, model="digits-vit", image=png, method="raw").json()
    assert "stats" not in body  # not part of the answer: computed by the stats writer
    client.app.state.service.stats_writer.flush()
    stats = client.get(f"/v1/explanations/{body['id']}").json()["stats"]
    model = endpoints["digits-vit"].model
    x, _ = decode_image(png, size=64, channels=1, invert_light=True)
    with torch.no_grad(), capture(model) as rec:  # the model's own kernels, probabilities recomputed
        probs = model(x[None]).softmax(-1)[0]
    want = request_stats(rec.stack()[:, 0], [0], 0, float(probs.max()))
    assert stats == pytest.approx(want, abs=2e-6)


def test_list_filters_paging_and_search(client):
    ids = [explain(client, model="minilm", text=f"paging probe number {i}").json()["id"] for i in range(3)]
    page = client.get("/v1/explanations", params={"q": "paging probe", "page_size": 2}).json()
    assert page["total"] == 3 and [i["id"] for i in page["items"]] == ids[::-1][:2] and page["next_page"] == 2
    page2 = client.get("/v1/explanations", params={"q": "paging probe", "page_size": 2, "page": 2}).json()
    assert [i["id"] for i in page2["items"]] == ids[:1] and page2["next_page"] is None
    assert client.get("/v1/explanations", params={"model": "digits-vit", "q": "paging probe"}).json()["total"] == 0
    first = client.get(f"/v1/explanations/{ids[0]}").json()
    since = client.get("/v1/explanations", params={"q": "paging", "since": first["created_at"]}).json()
    assert since["total"] == 3
    until = client.get("/v1/explanations", params={"q": "paging", "until": first["created_at"]}).json()
    assert until["total"] == 0
    cursor = page["items"][-1]["seq"]
    assert [i["id"] for i in client.get("/v1/explanations", params={"after": cursor}).json()["items"]] == [ids[2]]
    error(client.get("/v1/explanations", params={"since": "yesterday"}), 422, "since")
    error(client.get("/v1/explanations", params={"page": 0}), 422, "page")
    error(client.get("/v1/explanations", params={"page_size": 10_000}), 422, "page_size")


def test_health_openapi_and_missing_records(client):
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["store"]["backend"] == "sqlite"
    assert {m["name"]: m["kind"] for m in health["models"]} == {"minilm": "text", "digits-vit": "image"}
    schema = client.get("/openapi.json").json()
    assert {"/v1/explain", "/v1/explanations", "/v1/explanations/{record_id}", "/v1/health"} <= set(schema["paths"])
    missing = client.get("/v1/explanations/0123")
    assert missing.status_code == 404 and missing.json() == {"detail": "no explanation with id '0123'"}
    assert client.get("/v1/models/nope/health").json() == {"detail": "unknown model 'nope'"}
    assert client.get("/v1/no-such-route").json() == {"detail": "Not Found"}
    assert client.get("/v1/explanations/bad%00id").status_code == 404  # no id holds a NUL (PostgreSQL refuses it)


def test_bad_input_is_a_4xx_naming_the_field(client, digit_png):
    png, _ = digit_png
    post = client.post
    r = post("/v1/explain", content=b'{"model": "minilm", "text": ', headers={"content-type": "application/json"})
    assert "malformed JSON" in error(r, 400, "body")
    error(post("/v1/explain", json=["not", "an", "object"]), 422, "body")
    error(post("/v1/explain", json={"text": "hi"}), 422, "model")
    error(explain(client, model="gpt-9", text="hi"), 422, "model")
    error(explain(client, model="minilm", text="hi", method="gradcam"), 422, "method")
    error(explain(client, model="minilm", text=123), 422, "text")
    error(explain(client, model="minilm", text="hi", colour="red"), 422, "colour")
    error(explain(client, model="minilm"), 422, "text")
    error(explain(client, model="minilm", text="hi", image=png), 422, "image")
    error(explain(client, model="minilm", image=png), 422, "image")
    error(explain(client, model="minilm", text="   "), 422, "text")
    error(explain(client, model="digits-vit", text="a digit"), 422, "text")
    error(explain(client, model="minilm", text="hi", options={"layer": 6, "method": "raw"}), 422, "options.method")
    error(explain(client, model="minilm", text="hi", method="raw", options={"layer": 6}), 422, "options.layer")
    error(explain(client, model="minilm", text="hi", method="raw", options={"head": 12}), 422, "options.head")
    error(explain(client, model="minilm", text="hi", options={"head": -1}), 422, "options.head")
    error(explain(client, model="minilm", text="hi", options={"top_k": 0}), 422, "options.top_k")
    error(explain(client, model="digits-vit", image=png, options={"labels": ["a"]}), 422, "options.labels")
    error(explain(client, model="digits-vit", image="not base64!"), 422, "image")
    error(explain(client, model="digits-vit", image=base64.b64encode(b"plain text, no image").decode()), 422, "image")
    gif = io.BytesIO()
    __import__("PIL.Image", fromlist=["Image"]).new("L", (8, 8)).save(gif, format="GIF")
    assert "PNG or JPEG" in error(
        explain(client, model="digits-vit", image=base64.b64encode(gif.getvalue()).decode()), 422, "image"
    )
    truncated = base64.b64encode(base64.b64decode(png)[:60]).decode()
    error(explain(client, model="digits-vit", image=truncated), 422, "image")
    error(explain(client, model="minilm", text="x" * 5001), 413, "text")
    error(post("/v1/explain", content=b"x" * 2_000_001, headers={"content-type": "application/json"}), 413, "body")


def test_jpeg_and_data_urls_are_accepted(client, digit_png):
    from PIL import Image

    png = base64.b64decode(digit_png[0])
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="JPEG", quality=95)
    jpeg = base64.b64encode(buf.getvalue()).decode()
    by_png = explain(client, model="digits-vit", image=digit_png[0]).json()
    by_jpeg = explain(client, model="digits-vit", image=jpeg).json()
    by_url = explain(client, model="digits-vit", image="data:image/png;base64," + digit_png[0]).json()
    assert by_jpeg["prediction"]["class"] == by_png["prediction"]["class"] == by_url["prediction"]["class"]
    assert by_url["explanation"] == by_png["explanation"]


def test_decompression_bomb_is_refused_before_decoding(client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (5_000, 5_000)).save(buf, format="PNG")  # 25 M pixels (over the 16.8 M limit) in a few kB
    assert len(buf.getvalue()) < 200_000
    r = explain(client, model="digits-vit", image=base64.b64encode(buf.getvalue()).decode())
    assert "decompression bomb" in error(r, 413, "image")


def test_dashboard_escapes_user_input(client, digit_png):
    png, _ = digit_png
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    text_id = explain(client, model="minilm", text=evil).json()["id"]
    image_id = explain(client, model="digits-vit", image=png, filename=evil + ".png").json()["id"]
    for url in ("/", f"/explanations/{text_id}", f"/explanations/{image_id}", "/?q=%3Cscript%3E"):
        html = client.get(url).text
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;" in html or (url.startswith("/explanations/") and "&lt;img" in html)
    detail = client.get(f"/explanations/{image_id}")
    assert detail.status_code == 200 and "/overlay.png" in detail.text
    overlay = client.get(f"/explanations/{image_id}/overlay.png")
    assert overlay.headers["content-type"] == "image/png" and overlay.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'class="headmaps"' in client.get(f"/explanations/{text_id}").text


def test_attention_health_page_and_baseline(client):
    for i in range(12):
        assert (
            explain(client, model="minilm", text=f"A calm sentence about the weather, number {i}.").status_code == 200
        )
    client.app.state.service.stats_writer.flush()  # the statistics are written off the request path
    report = client.get("/v1/models/minilm/health").json()
    assert report["reference"]["num_records"] > 0
    assert [s["statistic"] for s in report["statistics"]] == [
        "head_entropy",
        "sink_mass",
        "rollout_concentration",
        "confidence",
    ]
    page = client.get("/attention-health", params={"model": "minilm"})
    assert page.status_code == 200 and "Kolmogorov" in page.text
    png = client.get("/attention-health/minilm.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    from attnkit.serve.health import STATISTICS

    service = client.app.state.service
    service.store.add_baseline("minilm", 0.0, 1.0, {name: [0.0] * 20 for name in STATISTICS})  # a baseline far off
    drifted = client.get("/v1/models/minilm/health").json()
    assert drifted["reference"]["source"].startswith("baseline") and drifted["drift"] is True


def test_full_queue_answers_503_and_keeps_accepted_work(endpoints, tmp_path):
    gate = Gate(endpoints["minilm"])
    c, service = make_client({"minilm": gate}, tmp_path, queue_size=1, retry_after_s=3)
    results = []
    with c:
        worker = threading.Thread(target=lambda: results.append(explain(c, model="minilm", text="first in")))
        worker.start()
        assert gate.entered.wait(30)
        busy = explain(c, model="minilm", text="one too many")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "3"
        assert busy.json()["detail"].startswith("the explanation queue is full")
        gate.release.set()
        worker.join(30)
        assert results[0].status_code == 200
        assert c.get(f"/v1/explanations/{results[0].json()['id']}").status_code == 200
        assert service.store.count() == 1  # the refused request left no record
        assert c.get("/v1/health").json()["queue"] == {"pending": 0, "capacity": 1}


def test_no_store_inputs_keeps_only_the_hash(endpoints, tmp_path, digit_png):
    c, service = make_client(endpoints, tmp_path, store_inputs=False)
    with c:
        rid = explain(c, model="minilm", text="a private sentence").json()["id"]
        record = c.get(f"/v1/explanations/{rid}").json()
        assert record["input"]["text"] is None and record["input"]["stored"] is False
        assert record["input"]["sha256"] == hashlib.sha256(b"a private sentence").hexdigest()
        iid = explain(c, model="digits-vit", image=digit_png[0], filename="secret.png").json()["id"]
        rec = c.get(f"/v1/explanations/{iid}").json()
        assert rec["input"]["image"] is None and rec["input"]["filename"] is None
        assert "a private sentence" not in c.get("/").text
        assert c.get(f"/explanations/{iid}").status_code == 200
        answer = explain(c, model="minilm", text="my secret diagnosis", method="raw").json()
        assert answer["explanation"]["tokens"] == ["[CLS]", "my", "secret", "diagnosis", "[SEP]"]  # the requester's
        stored = c.get(f"/v1/explanations/{answer['id']}").json()
        assert stored["explanation"]["tokens"] == ["[CLS]", "#1", "#2", "#3", "[SEP]"]  # special tokens kept
        assert stored["explanation"]["scores"] == answer["explanation"]["scores"]
        page = c.get(f"/explanations/{answer['id']}")
        assert page.status_code == 200 and "#3" in page.text
        row = service.store.get(answer["id"])
        assert row["attention_meta"]["tokens"] == stored["explanation"]["tokens"]
        typed = explain(c, model="minilm", text="patient [MASK] has \U0001f910 hiv", method="raw").json()
        assert "[MASK]" in typed["explanation"]["tokens"] and "[UNK]" in typed["explanation"]["tokens"]
        kept = c.get(f"/v1/explanations/{typed['id']}").json()["explanation"]["tokens"]
        assert kept == ["[CLS]"] + [f"#{i}" for i in range(1, len(kept) - 1)] + ["[SEP]"]  # typed specials: input
        row = service.store.get(typed["id"])
        assert row["attention_meta"]["tokens"] == kept
    from attnkit.serve.export import export
    from attnkit.serve.store import Store

    store = Store(str(tmp_path / "api.db"))
    try:
        export(store, tmp_path / "audit.jsonl")
        export(store, tmp_path / "audit.parquet")
    finally:
        store.close()
    import pyarrow.parquet as pq

    exported = (tmp_path / "audit.jsonl").read_text() + json.dumps(
        pq.read_table(tmp_path / "audit.parquet").to_pylist(), default=str
    )
    assert "#2" in exported
    for word in ("private", "secret", "diagnosis", "secret.png"):
        assert word not in exported and word not in json.dumps(stored) and word not in page.text


def test_retention_applies_at_start(endpoints, tmp_path):
    from attnkit.serve.store import Store

    store = Store(str(tmp_path / "api.db"))
    store.add(record(created=time.time() - 30 * 86400))
    store.add(record(created=time.time()))
    store.close()
    c, service = make_client(endpoints, tmp_path, retention_days=7)
    with c:
        deadline = time.time() + 10
        while service.store.count() != 1 and time.time() < deadline:
            time.sleep(0.05)
        assert service.store.count() == 1


def test_default_labels_classify_news_sentences(client):
    cases = {
        "The striker scored twice and the home team won the cup final in extra time.": "sports",
        "Interest rates rose again and the bank tightened its lending to small businesses.": "business and finance",
        "Simmer the onions in butter until golden, then add the rice and stir for a minute.": "food and cooking",
        "Parliament passed the budget after a long debate over defence spending.": "politics",
    }
    for text, label in cases.items():
        assert explain(client, model="minilm", text=text).json()["prediction"]["label"] == label


def test_strings_no_store_can_keep_are_a_422_naming_the_field(client, digit_png):
    lone = "\ud800"
    for bad in (lone, "a\x00b"):
        error(post_raw(client, {"model": "minilm", "text": f"fine {bad} text"}), 422, "text")
        labels = {"labels": ["sports", f"tax{bad}law"]}
        assert "options.labels[1]" in error(
            post_raw(client, {"model": "minilm", "text": "hi", "options": labels}), 422, "options.labels"
        )
        body = {"model": "digits-vit", "image": digit_png[0], "filename": f"d{bad}.png"}
        error(post_raw(client, body), 422, "filename")
    assert "surrogate U+D800 at character 5" in error(
        post_raw(client, {"model": "minilm", "text": "fine \ud800"}), 422, "text"
    )
    for param in ("q", "model", "method"):
        error(client.get("/v1/explanations", params={param: "a\x00b"}), 422, param)
    error(client.get("/v1/explanations", params={"after": 2**63}), 422, "after")
    error(client.get("/v1/explanations", params={"after": 2**31}), 422, "after")  # seq is 32-bit on PostgreSQL
    error(client.get("/v1/explanations", params={"page": 10**18}), 422, "page")
    assert client.get("/v1/explanations", params={"after": 2**31 - 1, "page": 2**40}).json()["items"] == []


def test_unreadable_bodies_are_a_4xx_naming_the_body(client):
    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(3):
            yield b" " * 1_000_000

    r = client.post("/v1/explain", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert "over 2000000 bytes" in error(r, 413, "body")
    assert "not UTF-8" in error(post_raw(client, b'{"model": "minilm", "text": "caf\xe9"}'), 400, "body")
    assert "nested too deeply" in error(post_raw(client, b'{"model": "minilm", "text": ' + b"[" * 100_000), 400, "body")
    assert "options must be a JSON object" in error(
        post_raw(client, {"model": "minilm", "text": "hi", "options": None}), 422, "options"
    )
    assert error(post_raw(client, b"null"), 422, "body") == "the body must be a JSON object"


def test_dashboard_errors_are_html_pages(client):
    for url, status, message in [
        ("/attention-health?model=%3Cb%3Enope", 404, "unknown model &#x27;&lt;b&gt;nope&#x27;"),
        ("/?since=%3Cb%3Ebad", 422, "since must be ISO 8601"),
        ("/explanations/nope", 404, "no explanation with id &#x27;nope&#x27;"),
        ("/no-such-page", 404, "Not Found"),
        ("/?q=a%00b", 422, "q contains a NUL character"),
    ]:
        r = client.get(url)
        assert r.status_code == status and r.headers["content-type"].startswith("text/html"), (url, r.text)
        assert message in r.text and "<b>" not in r.text, r.text
    assert client.get("/v1/explanations", params={"since": "bad"}).headers["content-type"] == "application/json"


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e400"])
def test_times_must_be_finite(client, value):
    assert "finite" in error(client.get("/v1/explanations", params={"until": value}), 422, "until")
    assert client.get("/", params={"since": value}).status_code == 422


def test_retention_survives_a_failing_purge(endpoints, tmp_path, caplog):
    c, service = make_client(endpoints, tmp_path, retention_days=7, retention_period_s=0.01)
    calls = []
    real = service.store.purge

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return real(*args, **kwargs)

    service.store.purge = flaky
    with caplog.at_level(logging.ERROR, logger="attnkit.serve"), c:
        deadline = time.time() + 30
        while len(calls) < 3 and time.time() < deadline:
            time.sleep(0.01)
    assert len(calls) >= 3  # the loop went on after the failure
    failed = [r for r in caplog.records if r.name == "attnkit.serve" and "purging expired records failed" in r.message]
    assert len(failed) == 1 and "database went away" in failed[0].exc_text


def test_the_server_binds_loopback_by_default():
    import argparse

    from attnkit.cli.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"


def test_shutdown_waits_for_a_purge_in_progress(endpoints, tmp_path):
    from attnkit.serve.service import ServeConfig, Service
    from attnkit.serve.store import Store

    store = Store(str(tmp_path / "w.db"))
    service = Service(endpoints, store, ServeConfig(retention_days=1))
    purging, release, events = threading.Event(), threading.Event(), []
    real_purge, real_close = store.purge, store.close

    def slow_purge(older_than_s):
        purging.set()
        release.wait(10)
        events.append("purged")
        return real_purge(older_than_s)

    store.purge = slow_purge
    store.close = lambda: (events.append("closed"), real_close())
    purger = threading.Thread(target=service.purge_expired)
    purger.start()
    assert purging.wait(10)
    closer = threading.Thread(target=service.shutdown)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive() and events == []  # the store stays open while the purge runs
    release.set()
    purger.join(10), closer.join(10)
    assert events == ["purged", "closed"]
    assert service.purge_expired() == 0  # after shutdown: nothing, no use of a closed store


def test_a_retention_period_must_be_positive(endpoints, tmp_path):
    from attnkit.serve.app import create_app
    from attnkit.serve.service import Service
    from attnkit.serve.store import Store

    service = Service(endpoints, Store(str(tmp_path / "p.db")))
    try:
        for bad in (0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="retention_period_s must be > 0"):
                create_app(service, retention_period_s=bad)
    finally:
        service.shutdown()


def test_api_round_trip_on_each_store(endpoints, tmp_path, db_url):
    from attnkit.serve.store import Filters

    c, service = make_client(endpoints, tmp_path, db=db_url)
    with c:
        body = explain(c, model="minilm", text="The match ended in a draw.", method="raw").json()
        record = c.get(f"/v1/explanations/{body['id']}").json()
        assert record["input"]["text"] == "The match ended in a draw." and record["explanation"] == body["explanation"]
        assert c.get("/v1/health").json()["store"]["backend"] == service.store.backend
        assert c.get("/v1/explanations", params={"q": "draw"}).json()["total"] == 1
        error(explain(c, model="minilm", text="nul \x00 inside"), 422, "text")
        error(explain(c, model="minilm", text="fine", options={"labels": ["a\x00"]}), 422, "options.labels")
        error(c.get("/v1/explanations", params={"q": "\x00"}), 422, "q")
        assert c.get("/v1/explanations/nul%00id").status_code == 404
        assert c.get("/v1/explanations", params={"after": 2**31 - 1}).json()["items"] == []  # INTEGER's largest
        error(c.get("/v1/explanations", params={"after": 2**31}), 422, "after")
        assert service.store.count(Filters(after=2**40)) == 0  # past any seq: nothing, not an overflow
        assert service.store.stats_series("minilm", after=2**40) == []
        assert service.store.count() == 1
