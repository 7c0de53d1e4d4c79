"""The ASGI application: the JSON API under ``/v1``, the dashboard pages, errors as 4xx JSON naming the field.

Built on FastAPI (routing, pydantic validation, the OpenAPI schema at ``/openapi.json``) and served by uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from attnkit.serve.inputs import InputError
from attnkit.serve.schemas import ExplainRequest, ExplainResponse, Page
from attnkit.serve.service import Busy, ServeConfig, Service
from attnkit.serve.store import MAX_SEQ, Filters, Store, redact_url
from attnkit.serve.views import full_record, iso, parse_time, summary

__all__ = ["build", "create_app"]


log = logging.getLogger("attnkit.serve")

#: Largest ``after`` cursor and ``page`` of ``GET /v1/explanations``, larger values are answered 422 naming the
#: parameter: a record's ``seq`` is an SQL INTEGER (32-bit on PostgreSQL), and ``page * page_size`` rows skipped
#: must stay inside the databases' 64-bit OFFSET.
MAX_CURSOR = MAX_SEQ
MAX_PAGE = 2**40


class BodyTooLarge(Exception):
    """A streamed request body went over the limit (answered 413, field ``body``)."""


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes`` (declared or streamed), before they are buffered.

    A declared ``Content-Length`` over the limit is answered here; a streamed body raises :class:`BodyTooLarge` from
    ``receive`` once it passes the limit, which the application answers 413 (field ``body``).

    Args:
        app: the ASGI application to wrap.
        max_bytes: the largest body accepted, in bytes.
    """

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


def _error_page(status: int, message: str, headers: dict[str, str] | None = None) -> HTMLResponse:
    """A dashboard error page: the status and the (escaped) message, with a link back to the feed."""
    title = f"{status} {HTTPStatus(status).phrase}"
    body = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title} - attnkit serve</title></head>'
        f"<body><h1>{title}</h1><p>{html.escape(message)}</p>"
        '<p><a href="/">the feed</a> &middot; <a href="/attention-health">attention health</a></p></body></html>\n'
    )
    return HTMLResponse(body, status_code=status, headers=headers)


def _serves_html(request: Request) -> bool:
    """Whether ``request`` is for a dashboard route (HTML errors) rather than the JSON API and its schema."""
    path = request.url.path
    return not (path == "/v1" or path.startswith(("/v1/", "/openapi.json", "/docs", "/redoc")))


def _respond(
    request: Request, status: int, field: str | None, message: str, headers: dict[str, str] | None = None
) -> Response:
    """An error answer: ``{"detail", "field"}`` JSON for the API, an HTML page for the dashboard's routes."""
    if _serves_html(request):
        return _error_page(status, message, headers)
    return _error(status, field, message, headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def _body_error(cause: BaseException, max_bytes: int) -> tuple[int, str]:
    """Status and message for a body FastAPI could not read (``cause``: what its parser raised)."""
    if isinstance(cause, BodyTooLarge):
        return 413, f"request body is over {max_bytes} bytes"
    if isinstance(cause, UnicodeDecodeError):
        return 400, f"malformed JSON: the body is not UTF-8 ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return 400, "malformed JSON: the body's arrays/objects are nested too deeply"
    return 400, f"malformed JSON: the body cannot be read ({type(cause).__name__}: {cause})"


def create_app(service: Service, *, retention_period_s: float = 3600.0) -> FastAPI:
    """The FastAPI application around ``service``: the JSON API under ``/v1`` and the dashboard.

    Args:
        service: the endpoints, store and queue to serve; the app's lifespan starts its retention loop and, on
            shutdown, waits for accepted work and closes the store (:meth:`Service.shutdown`).
        retention_period_s: seconds between two retention purges (when ``service.config.retention_days`` is set;
            the first runs at start). A purge that fails is logged on the ``attnkit.serve`` logger and retried at
            the next period.

    Returns:
        the application (serve it with uvicorn, or drive it with ``fastapi.testclient.TestClient``).

    Raises:
        ValueError: ``retention_period_s`` not positive.

    Errors are answered, never raised: the API answers ``{"detail", "field"}`` JSON, ``field`` naming the request
    field (``body`` for the body itself); the dashboard's pages answer an HTML page with the same status.

    * 400 ``body``: malformed JSON (a syntax error, not UTF-8, nested too deeply).
    * 413 ``body``: a body over ``max_body_bytes`` (declared or streamed); ``text``: over ``max_text_chars``;
      ``image``: over ``max_image_pixels`` or a decompression bomb.
    * 422: any other bad field (unknown model or method, wrong type, not an image, a lone surrogate or a NUL
      character in a string, an option out of range, a bad query parameter such as ``since=nan``).
    * 404: an unknown record or model (``{"detail"}`` naming it).
    * 503: the queue is full, with ``Retry-After``.
    """
    from attnkit import __version__

    if not retention_period_s > 0:
        raise ValueError(f"create_app: retention_period_s must be > 0 seconds, got {retention_period_s!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if service.config.retention_days is not None:
            task = asyncio.create_task(_retention_loop(service, retention_period_s))
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
            message = f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            return _respond(request, 400, "body", message)
        field = _field(tuple(first.get("loc", ())))
        if first.get("type") == "model_attributes_type":
            return _respond(request, 422, field, f"{'the body' if field == 'body' else field} must be a JSON object")
        return _respond(request, 422, field, f"{field}: {first['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not read the body
            status, message = _body_error(exc.__cause__, service.config.max_body_bytes)
            return _respond(request, status, "body", message)
        if _serves_html(request):
            return _error_page(exc.status_code, str(exc.detail), exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return _respond(request, exc.status, exc.field, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return _respond(request, 413, "body", f"request body is over {service.config.max_body_bytes} bytes")

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
        after: int | None = Query(None, ge=0, le=MAX_CURSOR, description="only records after this feed cursor (seq)"),
        page: int = Query(1, ge=1, le=MAX_PAGE),
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
    400: {"description": "malformed JSON (syntax, not UTF-8, nested too deeply)"},
    413: {"description": "body, text or image too large"},
    422: {"description": "invalid field (named in `field`)"},
    503: {"description": "queue full; see Retry-After"},
}


async def _retention_loop(service: Service, period_s: float) -> None:
    """Purge expired records now and every ``period_s`` seconds; a failed purge is logged and retried later."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.run_in_executor(None, service.purge_expired)
        except Exception:  # a database hiccup must not end retention for the life of the server
            log.exception("retention: purging expired records failed; retrying in %g s", period_s)
        await asyncio.sleep(period_s)


def build(
    models: dict[str, str | None] | None = None, db: str = "attnkit-serve.db", config: ServeConfig | None = None
) -> FastAPI:
    """The application serving ``models`` from the store ``db``, in one call.

    Args:
        models: ``{served name: source}`` (a shipped name or a checkpoint directory; ``None``: the name itself);
            default the shipped ``minilm`` and ``digits-vit``.
        db: an SQLAlchemy URL or an SQLite file path (:class:`~attnkit.serve.store.Store`).
        config: the service settings (default :class:`ServeConfig`'s).

    Returns:
        the FastAPI application (:func:`create_app`).

    Raises:
        StoreError: ``db`` cannot be opened or migrated.
        ModelLoadError: a source cannot be served (the store is closed again).
    """
    from attnkit.serve.models import load_endpoint

    models = {"minilm": None, "digits-vit": None} if models is None else models
    config = ServeConfig() if config is None else config
    store = Store(db)
    try:
        endpoints = {name: load_endpoint(name, src, max_tokens=config.max_tokens) for name, src in models.items()}
    except BaseException:
        store.close()
        raise
    return create_app(Service(endpoints, store, config))
