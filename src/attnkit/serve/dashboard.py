"""The HTML dashboard: live feed, per-record detail (heatmap + layer/head browser), attention health with drift.

Pages are Jinja2 templates with autoescaping on, so text and file names from requests are always escaped; the
feed's JavaScript builds rows with ``textContent`` only. Nothing is loaded from the network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from torch import Tensor

from attnkit.serve.health import STATISTICS, drift
from attnkit.serve.service import Service
from attnkit.serve.store import Filters
from attnkit.serve.views import full_record, parse_time, summary

__all__ = [
    "CONFIDENCE_LABELS",
    "OVERLAY_MAX_SIDE",
    "HealthWindows",
    "add_dashboard",
    "health_figure",
    "health_report",
    "health_windows",
    "model_kind",
    "overlay_pixels",
    "statistic_labels",
]

TEMPLATES = Path(__file__).resolve().parent / "templates"
METHODS = ("raw", "rollout", "relevance", "flow")


def _env():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(default=True))
    return env


def _values(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    return {name: [float(r["stats"].get(name, math.nan)) for r in rows] for name in STATISTICS}


#: What ``confidence`` (the stored ``prediction.score``) is, per model kind: a text model's prediction is the label
#: nearest to the sentence embedding, so its score is a cosine similarity in ``[-1, 1]``, not a probability.
CONFIDENCE_LABELS = {
    "text": "confidence (cosine similarity to the nearest label)",
    "image": "confidence (top-class probability)",
}


class HealthWindows(NamedTuple):
    """The two windows a model's attention health compares (see :func:`health_windows`).

    Attributes:
        reference: ``{statistic: values}`` of the reference window (a recorded baseline, else the first requests).
        source: a description of the reference window, for the page.
        recent: ``[{seq, created_at, stats}]`` of the recent window, oldest first.
        reference_seqs: the feed cursors (``seq``) of the reference records still in the store; empty for a
            baseline (its values are kept with it, not as records).
    """

    reference: dict[str, list[float]]
    source: str
    recent: list[dict[str, Any]]
    reference_seqs: set[int]


def health_windows(service: Service, model: str) -> HealthWindows:
    """The reference and recent windows of ``model``'s attention-health statistics.

    With a baseline recorded by ``attnkit serve baseline`` (the newest one) the reference is its values and the
    recent window the model's last ``config.recent_size`` records; without one the reference is the model's first
    ``config.reference_size`` records and the recent window the last ``config.recent_size`` records after them
    (none overlap). Records whose statistics are not written yet are left out of both.
    """
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
    return HealthWindows(reference, source, recent, ref_seqs)


def model_kind(service: Service, model: str) -> str | None:
    """``"text"`` or ``"image"``: the served endpoint's kind, else that of the model's newest record (``None``
    when there is neither)."""
    endpoint = service.endpoints.get(model)
    if endpoint is not None:
        return endpoint.kind
    rows = service.store.list(Filters(model=model), page=1, page_size=1)
    return rows[0]["model_kind"] if rows else None


def statistic_labels(kind: str | None) -> dict[str, str]:
    """``{statistic: label}`` for the page and the plot; ``confidence`` says what it measures for this model kind
    (a cosine similarity for text models, a probability for image models)."""
    labels = {name: name.replace("_", " ") for name in STATISTICS}
    labels["confidence"] = CONFIDENCE_LABELS.get(kind, "confidence (top score)")
    return labels


def health_report(service: Service, model: str) -> dict[str, Any]:
    """The JSON attention-health summary of ``model`` (``GET /v1/models/{name}/health`` and the health page).

    Returns:
        ``{"model", "model_kind", "reference": {"source", "num_records"}, "recent": {"num_records"},
        "statistics": [...], "drift"}``: one entry per statistic of :data:`~attnkit.serve.health.STATISTICS` with
        the fields of :class:`~attnkit.serve.health.Drift` (``nan`` as ``None``; ``shift`` is the standardised mean
        difference) and its display ``label``; ``drift`` is True when any statistic is flagged.

    Raises:
        HTTPException: 404 when ``model`` is neither served nor in the store.
    """
    if model not in service.endpoints and model not in service.store.models():
        raise HTTPException(404, detail=f"unknown model {model!r}")
    windows = health_windows(service, model)
    results = drift(windows.reference, _values(windows.recent))
    kind = model_kind(service, model)
    labels = statistic_labels(kind)
    return {
        "model": model,
        "model_kind": kind,
        "reference": {"source": windows.source, "num_records": len(next(iter(windows.reference.values()), []))},
        "recent": {"num_records": len(windows.recent)},
        "statistics": [
            {
                **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.__dict__.items()},
                "label": labels[d.statistic],
            }
            for d in results
        ],
        "drift": any(d.flagged for d in results),
    }


def health_figure(service: Service, model: str, *, max_points: int = 2000) -> bytes:
    """PNG of each statistic over the model's last ``max_points`` requests (feed order): the reference window's
    records grey with its mean and mean ± 2 sd band, the recent window orange, the rest blue; a flagged statistic's
    title says DRIFT with the KS p-value."""
    from attnkit.explain import plots

    reference, _, recent, ref_seqs = health_windows(service, model)
    rows = service.store.stats_series(model, limit=max_points)
    recent_seqs = {r["seq"] for r in recent}
    results = {d.statistic: d for d in drift(reference, _values(recent))}
    labels = statistic_labels(model_kind(service, model))
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
        ax.set_title(f"{labels[name]}{flag}", fontsize=9, color="#c0392b" if d.flagged else "#222222", loc="left")
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


#: Longest side in pixels of the image under a record page's overlay (the page shows it at most 420 px wide): a
#: stored image may be up to ``max_image_pixels`` (4096 x 4096 by default), far more than the page can show.
OVERLAY_MAX_SIDE = 512


def overlay_pixels(data: bytes, *, max_side: int = OVERLAY_MAX_SIDE) -> Tensor:
    """The stored image ``data`` (PNG/JPEG bytes) as ``(Hi, Wi, 3)`` uint8 RGB pixels, downscaled (aspect kept,
    never enlarged) so that its longest side is at most ``max_side``, before any float conversion.

    Pillow's ``thumbnail`` decodes a JPEG at a reduced scale first (``draft``) and then resamples (bicubic)."""
    import io

    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.thumbnail((max_side, max_side))
        im = im.convert("RGB")
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, 3)


def _overlay_png(row: dict[str, Any]) -> bytes:
    import torch

    from attnkit.explain import plots

    pixels = overlay_pixels(row["input_image"])  # (Hi, Wi, 3), longest side <= OVERLAY_MAX_SIDE
    grid = torch.tensor(row["explanation"]["heatmap"], dtype=torch.float32)[None]
    pred = row["prediction"]
    title = f"{row['method']}: class {pred.get('label')} ({float(pred.get('score', 0)):.0%})"
    fig = plots.image_overlays(pixels[None].float(), grid, titles=[title], ncols=1)
    return plots.figure_png(fig)


def add_dashboard(app: FastAPI, service: Service) -> None:
    """Register the HTML pages on ``app``: ``/`` (live feed with filters), ``/explanations/{id}`` (one record)
    and its ``overlay.png`` (image records), ``/attention-health`` and ``/attention-health/{model}.png``."""
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
