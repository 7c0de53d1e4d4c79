"""Screenshots of the ``attnkit serve`` dashboard for the README (docs/serve-*.png).

Starts the service in process on a free loopback port with the shipped models and a temporary SQLite store
(reference and recent windows of 20 requests), explains real news sentences, then machine log lines (inputs the
text model was not meant for, so its attention health drifts), and held-out digit canvases; then photographs the
live feed, a detail page, an image page and the attention-health page in headless Chromium (Debian's ``chromium``
+ Playwright).

    python scripts/serve_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

SENTENCES = [
    "The striker scored twice and the home team won the cup final in extra time.",
    "Interest rates rose again and the bank tightened its lending to small businesses.",
    "Heavy rain and strong winds are expected along the coast until Thursday evening.",
    "Simmer the onions in butter until golden, then add the rice and stir for a minute.",
    "The new vaccine reduced hospital admissions by half in the clinical trial.",
    "Parliament passed the budget after a long debate over defence spending.",
]
LOG_LINES = [
    "ERROR 2026-11-30 03:12:{:02d} worker-{} cache miss for key user:{} after 3 retries (timeout=500ms)",
    "WARN  2026-11-30 03:13:{:02d} pool-{} connection reset by peer; reconnecting in {} s",
]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/explain", json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    import uvicorn
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from attnkit.datasets.digits import DigitCanvases
    from attnkit.serve.app import build
    from attnkit.serve.service import ServeConfig

    with tempfile.TemporaryDirectory() as tmp:
        app = build(db=str(Path(tmp) / "shots.db"), config=ServeConfig(reference_size=20, recent_size=20))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        data = DigitCanvases("test", num_canvases=6, seed=3)
        first = None
        for i, text in enumerate(SENTENCES * 4):
            rec = post(url, {"model": "minilm", "text": text, "method": ("rollout", "raw", "relevance")[i % 3]})
            first = first or rec
        for i in range(20):
            post(url, {"model": "minilm", "text": LOG_LINES[i % 2].format(i, i % 4, 1000 + 37 * i)})
        image_rec = None
        for i, img in enumerate(data.images[:, 0]):
            buf = io.BytesIO()
            Image.fromarray((img * 255).round().byte().numpy()).save(buf, format="PNG")
            body = {"model": "digits-vit", "image": base64.b64encode(buf.getvalue()).decode(), "filename": f"c{i}.png"}
            image_rec = post(url, body)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            args.out.mkdir(parents=True, exist_ok=True)
            page.goto(url + "/")
            page.screenshot(path=str(args.out / "serve-feed.png"))
            page.goto(f"{url}/explanations/{first['id']}")
            page.wait_for_selector(".headmaps[data-drawn]")
            page.screenshot(path=str(args.out / "serve-detail.png"), full_page=True)
            page.goto(f"{url}/explanations/{image_rec['id']}")
            page.wait_for_function("document.getElementById('overlay').complete")
            page.screenshot(path=str(args.out / "serve-image.png"))
            page.goto(url + "/attention-health?model=minilm")
            page.wait_for_function("document.getElementById('health-plot').complete")
            page.screenshot(path=str(args.out / "serve-health.png"), full_page=True)
            browser.close()
        server.should_exit = True
        thread.join(60)
    print(f"screenshots in {args.out}/serve-*.png")


if __name__ == "__main__":
    main()
