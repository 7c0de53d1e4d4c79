"""How fast is ``attnkit serve``, and does it lose anything under load or across a restart?

1. Latency target, in process: for each shipped model the plain forward pass (no capture) against the service's
   explanation of the same input (captured forward + method + the answer's data), and against the whole worker
   path (+ decoding the image, packing the maps, committing the record). Interleaved rounds, medians; target:
   explanation p50 <= 1.5x the plain forward. The attention-health statistics are not part of the answer and run
   on the stats writer's thread, off the request path; their cost is reported on its own.
2. Load, over loopback HTTP: ``attnkit serve`` as a real process, N client threads posting text and image
   explanations for D seconds; half-way through the server is stopped with SIGTERM (it finishes accepted work) and
   started again on the same store. Clients retry refused connections and 503s (after ``Retry-After``). Afterwards
   every 2xx response's record must be in the store, and no 5xx other than 503 may have been answered.

Run under the shared lock: ``flock /tmp/attnkit-heavy.lock python benchmarks/serve.py`` (``--quick``: 20 s;
``--latency-only`` / ``--load-only``: one part; ``--breakdown``: the digit ViT's explanation step by step;
``--lengths``: MiniLM at 16-128 tokens).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "The striker scored twice and the home team won the cup final in extra time.",
    "Interest rates rose again and the bank tightened its lending to small businesses.",
    "Heavy rain and strong winds are expected along the coast until Thursday evening.",
    "Simmer the onions in butter until golden, then add the rice and stir for a minute.",
    "The new vaccine reduced hospital admissions by half in the clinical trial.",
    "Parliament passed the budget after a long debate over defence spending.",
]


def digit_pngs(n: int = 16) -> list[str]:
    from PIL import Image

    from attnkit.datasets.digits import DigitCanvases

    data = DigitCanvases("test", num_canvases=n, seed=11)
    out = []
    for img in data.images[:, 0]:
        buf = io.BytesIO()
        Image.fromarray((img * 255).round().byte().numpy()).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def latency_part(rounds: int) -> list[dict]:
    """Forward vs explanation vs the worker path, per model and method, interleaved."""
    from attnkit.serve.inputs import decode_image
    from attnkit.serve.models import load_endpoint
    from attnkit.serve.schemas import ExplainRequest
    from attnkit.serve.service import Service
    from attnkit.serve.store import Store

    rows = []
    pngs = digit_pngs(4)
    with tempfile.TemporaryDirectory() as tmp:
        endpoints = {name: load_endpoint(name) for name in ("minilm", "digits-vit")}
        service = Service(endpoints, Store(str(Path(tmp) / "latency.db")))
        cases = []
        for method in ("rollout", "raw", "relevance", "flow"):
            cases.append(("minilm", method, {"text": TEXTS[1]}, TEXTS[1]))
            image, _ = decode_image(pngs[0], size=64, channels=1, invert_light=True)
            cases.append(("digits-vit", method, {"image": pngs[0]}, image))
        for name, method, body, data in cases:
            ep = endpoints[name]
            req = ExplainRequest(model=name, method=method, **body)
            for _ in range(2):  # warm-up
                ep.forward(data), ep.explain(data, method, {}), service._run(ep, req, time.time())
            fwd, exp, full, stats = [], [], [], []
            for _ in range(rounds):  # interleaved: a load change hits all of them alike
                fwd.append(median_ms(lambda ep=ep, data=data: ep.forward(data), 1))
                exp.append(median_ms(lambda ep=ep, data=data, m=method: ep.explain(data, m, {}), 1))
                full.append(median_ms(lambda ep=ep, req=req: service._run(ep, req, time.time()), 1))
                service.stats_writer.flush()  # the writer's work of the request above, not timed with the next
                health = ep.explain(data, method, {}).health
                stats.append(median_ms(lambda h=health: h.stats(), 1))  # what the writer thread computes
            tokens = len(ep.encode(data)["input_ids"][0]) if name == "minilm" else 65
            f, e, w = statistics.median(fwd), statistics.median(exp), statistics.median(full)
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "tokens": tokens,
                    "forward_ms": f,
                    "explain_ms": e,
                    "worker_ms": w,
                    "stats_ms": statistics.median(stats),
                    "explain_ratio": e / f,
                    "worker_ratio": w / f,
                }
            )
            print(
                f"  {name:10s} {method:9s} L={tokens:3d}  forward {f:7.2f} ms  explain {e:7.2f} ms ({e / f:.2f}x)"
                f"  worker+store {w:7.2f} ms ({w / f:.2f}x)  statistics (writer) {statistics.median(stats):5.2f} ms",
                flush=True,
            )
        service.shutdown()
    return rows


def breakdown_part(rounds: int) -> dict[str, float]:
    """Where the digit ViT's explanation time goes: each step added in turn, called back to back (no store work
    in between, unlike the latency rows), medians in ms."""
    from attnkit.explain import capture, rollout
    from attnkit.serve.inputs import decode_image
    from attnkit.serve.models import load_endpoint

    ep = load_endpoint("digits-vit")
    image, _ = decode_image(digit_pngs(1)[0], size=64, channels=1, invert_light=True)
    x, model = ep.prepare(image), ep.model

    def captured(**kwargs):
        def run():
            with torch.inference_mode(), capture(model, plan=ep.capture_plan, **kwargs):
                model(x)

        return run

    with torch.inference_mode(), capture(model, plan=ep.capture_plan, kernel="math") as rec:
        model(x)
    maps = rec.stack()[:, 0]
    steps = {
        "forward": lambda: ep.forward(image),
        "capture, no probabilities": captured(store=False),
        "capture, fused kernel + recomputation": captured(),
        "capture, kernel='math' (served)": captured(kernel="math"),
        "rollout alone": lambda: rollout(maps[:, None]),
        "explanation raw": lambda: ep.explain(image, "raw", {}),
        "explanation rollout": lambda: ep.explain(image, "rollout", {}),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(median_ms(fn, 1))
    out = {name: statistics.median(v) for name, v in times.items()}
    for name, ms in out.items():
        print(f"  {name:40s} {ms:6.3f} ms  ({ms / out['forward']:.2f}x the forward)", flush=True)
    return out


def lengths_part(rounds: int) -> list[dict]:
    """MiniLM's explanation against its forward at longer inputs (16 to 128 tokens, the served maximum), rollout
    and raw, interleaved; the latency rows above use one short sentence."""
    from attnkit.serve.models import load_endpoint

    ep = load_endpoint("minilm")
    words = " ".join(TEXTS * 8).split()
    rows = []
    for n_words in (12, 48, 100, 200):
        text = " ".join(words[:n_words])
        tokens = len(ep.encode(text)["input_ids"][0])
        for _ in range(2):  # warm-up
            ep.forward(text), ep.explain(text, "rollout", {}), ep.explain(text, "raw", {})
        fwd, roll, raw = [], [], []
        for _ in range(rounds):
            fwd.append(median_ms(lambda t=text: ep.forward(t), 1))
            roll.append(median_ms(lambda t=text: ep.explain(t, "rollout", {}), 1))
            raw.append(median_ms(lambda t=text: ep.explain(t, "raw", {}), 1))
        f, r, w = statistics.median(fwd), statistics.median(roll), statistics.median(raw)
        rows.append({"tokens": tokens, "forward_ms": f, "rollout_ms": r, "raw_ms": w})
        print(
            f"  minilm L={tokens:3d}  forward {f:7.2f} ms  rollout {r:7.2f} ms ({r / f:.2f}x)  raw {w:7.2f} ms"
            f" ({w / f:.2f}x)",
            flush=True,
        )
    return rows


# -- load ---------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "attnkit.cli.main", "serve", "--db", str(db), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=5).read()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def client(url: str, stop: threading.Event, results: list, pngs: list[str], seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        if rng.random() < 0.5:
            body = {"model": "minilm", "text": rng.choice(TEXTS), "method": "rollout"}
        else:
            body = {"model": "digits-vit", "image": rng.choice(pngs), "method": "rollout"}
        data = json.dumps(body).encode()
        req = urllib.request.Request(url + "/v1/explain", data, {"content-type": "application/json"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                results.append(("ok", r.status, (time.perf_counter() - t) * 1e3, json.loads(r.read())["id"]))
        except urllib.error.HTTPError as e:
            results.append(("http", e.code, (time.perf_counter() - t) * 1e3, None))
            e.read()
            time.sleep(float(e.headers.get("Retry-After", "1")) if e.code == 503 else 0.1)
        except OSError:  # refused / reset while the server restarts
            results.append(("down", None, (time.perf_counter() - t) * 1e3, None))
            time.sleep(0.1)


def load_part(duration: float, clients: int, queue_size: int, threads: int) -> dict:
    from attnkit.serve.store import Store

    pngs = digit_pngs()
    with tempfile.TemporaryDirectory() as tmp:
        db, port = Path(tmp) / "load.db", free_port()
        url = f"http://127.0.0.1:{port}"
        args = ["--queue-size", str(queue_size), "--threads", str(threads)]
        with open(Path(tmp) / "server.log", "ab") as log:
            proc = start_server(db, port, args, log)
            results: list = []
            stop = threading.Event()
            workers = [
                threading.Thread(target=client, args=(url, stop, results, pngs, i), daemon=True) for i in range(clients)
            ]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            time.sleep(duration / 2)
            t_stop = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
            proc = start_server(db, port, args, log)
            downtime = time.perf_counter() - t_stop
            time.sleep(max(0.0, duration - (time.perf_counter() - t0)))
            stop.set()
            for w in workers:
                w.join(180)
            elapsed = time.perf_counter() - t0
            proc.send_signal(signal.SIGTERM)
            code2 = proc.wait(120)
        log_text = (Path(tmp) / "server.log").read_text(errors="replace")
        store = Store(str(db))
        records = list(store.iter_records())
        store.close()
    stored = {r["id"] for r in records}
    ok = [r for r in results if r[0] == "ok"]
    ids = [r[3] for r in ok]
    lat = sorted(r[2] for r in ok)
    codes = {}
    for r in results:
        if r[0] == "http":
            codes[r[1]] = codes.get(r[1], 0) + 1
    return {
        "clients": clients,
        "queue_size": queue_size,
        "duration_s": elapsed,
        "ok": len(ok),
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "throughput_per_s": len(ok) / elapsed,
        "http_errors": codes,
        "refused_during_restart": sum(r[0] == "down" for r in results),
        "restart_downtime_s": downtime,
        "lost_records": len(set(ids) - stored),
        "stored_records": len(stored),
        "records_without_stats": sum(not r["stats"] for r in records),
        "exit_codes": [code, code2],
        "tracebacks_in_log": log_text.count("Traceback"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 s of load, fewer latency rounds")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queue-size", type=int, default=4, help="server queue (small so 503s occur; default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--latency-only", action="store_true", help="skip the load part")
    parser.add_argument("--load-only", action="store_true", help="skip the latency part")
    parser.add_argument(
        "--breakdown", action="store_true", help="only: the digit ViT's explanation step by step, back to back"
    )
    parser.add_argument("--lengths", action="store_true", help="only: MiniLM's explanation vs forward at 16-128 tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    duration, rounds = (20.0, 5) if args.quick else (args.duration, args.rounds)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if args.breakdown:
        print(f"digit ViT step by step (medians of {20 * rounds} back-to-back rounds):", flush=True)
        breakdown = breakdown_part(20 * rounds)
        print(f"load average at end: {os.getloadavg()}", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps({"breakdown": breakdown}, indent=1))
        return 0
    if args.lengths:
        print("MiniLM at longer inputs (medians of interleaved rounds):", flush=True)
        lengths = lengths_part(rounds)
        print(f"load average at end: {os.getloadavg()}", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps({"lengths": lengths}, indent=1))
        return 0
    latency = []
    if not args.load_only:
        print("latency (in process, medians of interleaved rounds):", flush=True)
        latency = latency_part(rounds)
    if args.latency_only:
        print(f"load average at end: {os.getloadavg()}", flush=True)
        if args.json is not None:
            args.json.write_text(json.dumps({"latency": latency}, indent=1))
        return 0
    print(f"load ({args.clients} clients, {duration:.0f} s, restart half-way):", flush=True)
    load = load_part(duration, args.clients, args.queue_size, args.threads)
    for k, v in load.items():
        print(f"  {k}: {v if not isinstance(v, float) else round(v, 2)}")
    print(f"load average at end: {os.getloadavg()}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"latency": latency, "load": load}, indent=1))
    ok = (
        load["lost_records"] == 0
        and load["records_without_stats"] == 0
        and not (set(load["http_errors"]) - {503})
        and load["exit_codes"] == [0, 0]
    )
    print("zero lost records, statistics on every record, no 5xx but 503, clean exits:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
