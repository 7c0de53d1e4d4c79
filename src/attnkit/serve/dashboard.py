"""The HTML dashboard: live feed, per-record detail (heatmap + layer/head browser), attention health with drift.

Pages are Jinja2 templates with autoescaping on, so text and file names from requests are always escaped; the
feed's JavaScript builds rows with ``textContent`` only. Nothing is loaded from the network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from attnkit.serve.health import STATISTICS, drift
from attnkit.serve.service import Service
from attnkit.serve.store import Filters
from attnkit.serve.views import full_record, parse_time, summary

__all__ = ["add_dashboard", "health_figure", "health_report"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
METHODS = ("raw", "rollout", "relevance", "flow")


def _env():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(default=True))
    return env


def _values(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    return {name: [float(r["stats"].get(name, math.nan)) for r in rows] for name in STATISTICS}


def health_windows(service: Service, model: str):
    """``(reference values, reference description, recent rows, all rows for plotting)`` of ``model``."""
    store, cfg = service.store, service.config
    baseline = store.latest_baseline(model)
    if baseline is not None:
        reference = {k: list(v) for k, v in baseline["stats"].items()}
        source = f"baseline #{baseline['id']} ({baseline['num_records']} records, recorded with attnkit serve baseline)"
        recent = store.stats_series(model, limit=cfg.recent_size)
        ref_seqs: set[int] = set()
    else:
        first = store.stats_series(model, limit=cfg.reference_size, first=True)
        reference = _values(first)
        source = f"the first {len(first)} requests"
        after = first[-1]["seq"] if first else 0
        recent = store.stats_series(model, limit=cfg.recent_size, after=after)
        ref_seqs = {r["seq"] for r in first}
    return reference, source, recent, ref_seqs


def health_report(service: Service, model: str) -> dict[str, Any]:
    """JSON attention-health summary of ``model``; 404 when it is neither served nor in the store."""
    if model not in service.endpoints and model not in service.store.models():
        raise HTTPException(404, detail=f"unknown model {model!r}")
    reference, source, recent, _ = health_windows(service, model)
    results = drift(reference, _values(recent))
    return {
        "model": model,
        "reference": {"source": source, "num_records": len(next(iter(reference.values()), []))},
        "recent": {"num_records": len(recent)},
        "statistics": [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.__dict__.items()} for d in results
        ],
        "drift": any(d.flagged for d in results),
    }


def health_figure(service: Service, model: str, *, max_points: int = 2000) -> bytes:
    """PNG: each statistic over the model's requests; reference window grey with its mean ± 2 sd, recent orange."""
    from attnkit.explain import plots

    reference, _, recent, ref_seqs = health_windows(service, model)
    rows = service.store.stats_series(model, limit=max_points)
    recent_seqs = {r["seq"] for r in recent}
    results = {d.statistic: d for d in drift(reference, _values(recent))}
    fig = _figure(len(STATISTICS))
    axes = fig.subplots(len(STATISTICS), 1, sharex=True, squeeze=False)[:, 0]
    xs = [r["seq"] for r in rows]
    for ax, name in zip(axes, STATISTICS):
        ys = [float(r["stats"].get(name, math.nan)) for r in rows]
        colors = ["#999999" if s in ref_seqs else "#e67e22" if s in recent_seqs else "#1f77b4" for s in xs]
        ax.scatter(xs, ys, s=8, c=colors)
        ref = [v for v in reference.get(name, []) if not math.isnan(v)]
        if len(ref) > 1:
            mean = sum(ref) / len(ref)
            sd = math.sqrt(sum((v - mean) ** 2 for v in ref) / (len(ref) - 1))
            ax.axhline(mean, color="#555555", lw=1)
            ax.axhspan(mean - 2 * sd, mean + 2 * sd, color="#cccccc", alpha=0.4, lw=0)
        d = results[name]
        flag = f"  DRIFT (KS p={d.p_value:.2g})" if d.flagged else ""
        ax.set_ylabel(name.replace("_", " "), fontsize=8)
        ax.set_title(f"{name}{flag}", fontsize=9, color="#c0392b" if d.flagged else "#222222", loc="left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("request (feed order)")
    return plots.figure_png(fig)


def _figure(n: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(10, 2.2 * n), layout="constrained")


def _token_cells(explanation: dict[str, Any], special: frozenset[str]) -> list[dict[str, Any]]:
    tokens, scores = explanation.get("tokens", []), explanation.get("scores", [])
    shown = [0.0 if t in special else float(s) for t, s in zip(tokens, scores)]
    peak = max(shown, default=0.0) or 1.0
    return [
        {"token": t, "score": float(s), "alpha": round(v / peak, 3), "special": t in special}
        for t, s, v in zip(tokens, scores, shown)
    ]


def _overlay_png(row: dict[str, Any]) -> bytes:
    import io

    import torch
    from PIL import Image

    from attnkit.explain import plots

    with Image.open(io.BytesIO(row["input_image"])) as im:
        im = im.convert("RGB")
        pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, 3)
    grid = torch.tensor(row["explanation"]["heatmap"], dtype=torch.float32)[None]
    pred = row["prediction"]
    title = f"{row['method']}: class {pred.get('label')} ({float(pred.get('score', 0)):.0%})"
    fig = plots.image_overlays(pixels[None].float(), grid, titles=[title], ncols=1)
    return plots.figure_png(fig)


def add_dashboard(app: FastAPI, service: Service) -> None:
    """Register the HTML pages on ``app``."""
    from attnkit.explain.report import SCRIPT, STYLE

    env = _env()

    def page(name: str, **context) -> HTMLResponse:
        models = sorted(set(service.endpoints) | set(service.store.models()))
        return HTMLResponse(
            env.get_template(name).render(report_style=STYLE, report_script=SCRIPT, models=models, **context)
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def feed(request: Request, model: str = "", method: str = "", q: str = "", since: str = "", until: str = ""):
        filters = Filters(
            model or None, method or None, parse_time(since, "since"), parse_time(until, "until"), q or None
        )
        rows = [summary(r) for r in service.store.list(filters, page=1, page_size=50)]
        after = max((r["seq"] for r in rows), default=0)
        form = {"model": model, "method": method, "q": q, "since": since, "until": until}
        return page("feed.html", rows=rows, after=after, form=form, methods=METHODS, total=service.store.count(filters))

    @app.get("/explanations/{record_id}", response_class=HTMLResponse, include_in_schema=False)
    def detail(record_id: str):
        from attnkit.explain.report import HeadMaps, Section, render_section
        from attnkit.serve.maps import unpack_maps

        row = service.store.get(record_id)
        if row is None:
            raise HTTPException(404, detail=f"no explanation with id {record_id!r}")
        record = full_record(row)
        browser = ""
        if row.get("attention") is not None:
            meta = row["attention_meta"]
            maps = unpack_maps(row["attention"], meta)
            section = Section(
                "Attention maps: layer / head browser",
                text="Pick a layer and a head (or their mean); rows are queries, columns keys. Hover for values.",
                head_maps=HeadMaps(
                    maps, query_tokens=meta["tokens"], layer_names=[f"layer {i}" for i in range(len(maps))]
                ),
            )
            browser = render_section(section, 0)
        endpoint = service.endpoints.get(row["model"])
        special = getattr(endpoint, "special_tokens", frozenset({"[CLS]", "[SEP]", "[PAD]"}))
        cells = _token_cells(row["explanation"], special) if row["input_kind"] == "text" else []
        return page("detail.html", r=record, cells=cells, browser=browser, has_image=row.get("input_image") is not None)

    @app.get("/explanations/{record_id}/overlay.png", include_in_schema=False)
    def overlay(record_id: str):
        row = service.store.get(record_id)
        if row is None or row.get("input_image") is None:
            raise HTTPException(404, detail=f"no stored image for {record_id!r}")
        return Response(_overlay_png(row), media_type="image/png")

    @app.get("/attention-health", response_class=HTMLResponse, include_in_schema=False)
    def health_page(model: str = ""):
        models = sorted(set(service.endpoints) | set(service.store.models()))
        chosen = model or (models[0] if models else "")
        report = health_report(service, chosen) if chosen else None
        return page("health.html", chosen=chosen, report=report, statistics=STATISTICS)

    @app.get("/attention-health/{model}.png", include_in_schema=False)
    def health_png(model: str):
        if model not in service.endpoints and model not in service.store.models():
            raise HTTPException(404, detail=f"unknown model {model!r}")
        return Response(health_figure(service, model), media_type="image/png")
