"""The ASGI application: the JSON API under ``/v1``, the dashboard pages, errors as 4xx JSON naming the field.

Built on FastAPI (routing, pydantic validation, the OpenAPI schema at ``/openapi.json``) and served by uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from attnkit.serve.inputs import InputError
from attnkit.serve.schemas import ExplainRequest, ExplainResponse, Page
from attnkit.serve.service import Busy, ServeConfig, Service
from attnkit.serve.store import Filters, Store, redact_url
from attnkit.serve.views import full_record, iso, parse_time, summary

__all__ = ["build", "create_app"]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared or streamed), before they are buffered."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = _error(413, "body", f"request body is {int(declared)} bytes; at most {self.max_bytes}")
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        return await self.app(scope, limited, send)


def _error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "field": field}, status_code=status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def create_app(service: Service) -> FastAPI:
    """The FastAPI application around ``service`` (its endpoints, store and queue)."""
    from attnkit import __version__

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_retention_loop(service)) if service.config.retention_days is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await asyncio.get_running_loop().run_in_executor(None, service.shutdown)

    app = FastAPI(
        title="attnkit serve",
        version=__version__,
        description="Attention explanations for models in production, with an audit trail and a dashboard.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return _error(400, "body", f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        field = _field(tuple(first.get("loc", ())))
        if first.get("type") == "model_attributes_type":
            return _error(422, "body", "the body must be a JSON object")
        return _error(422, field, f"{field}: {first['msg']}")

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return _error(exc.status, exc.field, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return _error(413, "body", f"request body is over {service.config.max_body_bytes} bytes")

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        retry = str(service.config.retry_after_s)
        return _error(503, None, "the explanation queue is full; retry later", {"Retry-After": retry})

    @app.post("/v1/explain", response_model=ExplainResponse, tags=["api"], responses=_ERRORS)
    async def explain(req: ExplainRequest) -> dict[str, Any]:
        """Explain one input: prediction, explanation data, record id and timings. The record is committed first."""
        record = await service.submit(req)
        return {
            "id": record["id"],
            "model": record["model"],
            "method": record["method"],
            "created_at": iso(record["created_at"]),
            "prediction": record["prediction"],
            "explanation": record["explanation"],
            "timings": record["timings"],
        }

    @app.get("/v1/explanations/{record_id}", tags=["api"], responses={404: {"description": "no such record"}})
    def get_explanation(record_id: str) -> dict[str, Any]:
        """One full record: input (unless stored as a hash only), model, weights hash, method, options, timings."""
        row = service.store.get(record_id)
        if row is None:
            raise HTTPException(404, detail=f"no explanation with id {record_id!r}")
        return full_record(row)

    @app.get("/v1/explanations", response_model=Page, tags=["api"])
    def list_explanations(
        model: str | None = None,
        method: str | None = None,
        since: str | None = Query(None, description="ISO 8601 or epoch seconds, inclusive"),
        until: str | None = Query(None, description="ISO 8601 or epoch seconds, exclusive"),
        q: str | None = Query(None, max_length=200, description="search the input text, file name or id prefix"),
        after: int | None = Query(None, ge=0, description="only records after this feed cursor (seq)"),
        page: int = Query(1, ge=1),
        page_size: int = Query(50, ge=1, le=500),
    ) -> dict[str, Any]:
        """Record summaries, newest first, paged."""
        filters = Filters(model, method, parse_time(since, "since"), parse_time(until, "until"), q or None, after)
        total = service.store.count(filters)
        items = [summary(r) for r in service.store.list(filters, page=page, page_size=page_size)]
        more = page * page_size < total
        return {
            "items": items,
            "page": page,
            "page_size": page_size,
            "total": total,
            "next_page": page + 1 if more else None,
        }

    @app.get("/v1/health", tags=["api"])
    def health() -> dict[str, Any]:
        """Liveness and what is served: models, queue occupancy, store back end."""
        return {
            "status": "ok",
            "version": __version__,
            "models": [e.info() for e in service.endpoints.values()],
            "queue": {"pending": service.pending, "capacity": service.config.queue_size},
            "completed": service.completed,
            "store": {"backend": service.store.backend, "url": redact_url(service.store.url)},
        }

    @app.get("/v1/models/{name}/health", tags=["api"])
    def model_health(name: str) -> dict[str, Any]:
        """Attention-health statistics of one model: reference vs recent window, drift per statistic."""
        from attnkit.serve.dashboard import health_report

        return health_report(service, name)

    from attnkit.serve.dashboard import add_dashboard

    add_dashboard(app, service)
    return app


_ERRORS = {
    400: {"description": "malformed JSON"},
    413: {"description": "body, text or image too large"},
    422: {"description": "invalid field (named in `field`)"},
    503: {"description": "queue full; see Retry-After"},
}


async def _retention_loop(service: Service, period_s: float = 3600.0) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await loop.run_in_executor(None, service.purge_expired)
        await asyncio.sleep(period_s)


def build(
    models: dict[str, str | None] | None = None, db: str = "attnkit-serve.db", config: ServeConfig | None = None
) -> FastAPI:
    """Load ``models`` (``{name: source}``; default the shipped ``minilm`` and ``digits-vit``), open ``db``, build."""
    from attnkit.serve.models import load_endpoint

    models = {"minilm": None, "digits-vit": None} if models is None else models
    config = ServeConfig() if config is None else config
    store = Store(db)
    endpoints = {name: load_endpoint(name, src, max_tokens=config.max_tokens) for name, src in models.items()}
    return create_app(Service(endpoints, store, config))
