"""The explanation service's core: a bounded queue in front of one model worker, and the records it writes.

Model calls run on one worker thread (torch already uses every core inside one call), off the event loop. At most
``queue_size`` requests are accepted at once; the next one is answered 503 with ``Retry-After`` before any work.
An accepted request always runs to the end and its record is committed before the answer, even if the client
goes away; shutdown waits for accepted work. The record's attention-health statistics are not part of the answer:
they are computed and written afterwards by :class:`attnkit.serve.stats_writer.StatsWriter`, off the request path.

Under ``store_inputs=False`` nothing of the input is stored but its SHA-256: the text, image and file name are left
out, and the token labels of the stored explanation and attention maps are positions (``"#1"``, ``"#2"``, ...)
instead of the text's word pieces (:meth:`~attnkit.serve.models.Endpoint.stored_tokens`: the ``[CLS]``/``[SEP]``
the tokenizer puts around every text keep their names, not being input, and the dashboard leaves them out of the
heatmap's scale; an image model's grid labels are kept). The request's options, ``labels`` included, are settings
of the method and are kept. The answer to the requester keeps the real tokens (they sent the text); the stored
record, ``GET /v1/explanations/{id}``, the dashboard and the exports never see them.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from attnkit.serve.inputs import InputError, check_text, decode_image
from attnkit.serve.maps import pack_maps
from attnkit.serve.models import Endpoint, OptionError
from attnkit.serve.schemas import ExplainRequest
from attnkit.serve.stats_writer import StatsWriter
from attnkit.serve.store import Store

__all__ = ["Busy", "ServeConfig", "Service"]


@dataclass(frozen=True)
class ServeConfig:
    """Service settings (the ``attnkit serve`` flags).

    Attributes:
        queue_size: requests accepted at once (running + waiting); more are answered 503.
        retry_after_s: the ``Retry-After`` of a 503, seconds.
        max_body_bytes: largest request body; larger ones get 413.
        max_text_chars: longest ``text``, in characters; longer ones get 413 (field ``text``).
        max_image_pixels: largest decoded image (width x height); larger ones get 413 before decompression.
        store_inputs: keep inputs in the store; ``False`` keeps their SHA-256 only, and the stored token labels are
            positions (``"#0"``, ``"#1"``, ...) instead of the text's tokens (the answer keeps the real tokens).
            The request's options, ``labels`` included, are settings of the method and are always kept.
        retention_days: delete records older than this (checked at start and hourly); ``None`` keeps all.
        reference_size: the first N requests form a model's reference window when no baseline is recorded.
        recent_size: the recent window compared against the reference.
        max_tokens: text inputs are truncated to this many tokens.
    """

    queue_size: int = 32
    retry_after_s: int = 1
    max_body_bytes: int = 8 * 1024 * 1024
    max_text_chars: int = 5000
    max_image_pixels: int = 4096 * 4096
    store_inputs: bool = True
    retention_days: float | None = None
    reference_size: int = 50
    recent_size: int = 50
    max_tokens: int = 128


class Busy(Exception):
    """The queue is full (answered 503 with ``Retry-After``)."""


def _version() -> str:
    from attnkit import __version__

    return __version__


class Service:
    """Endpoints + store + the bounded worker queue.

    Args:
        endpoints: ``{served name: endpoint}``.
        store: the open audit store (closed by :meth:`shutdown`).
        config: the service settings.
    """

    def __init__(self, endpoints: dict[str, Endpoint], store: Store, config: ServeConfig = ServeConfig()) -> None:
        self.endpoints, self.store, self.config = endpoints, store, config
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnkit-model")
        self.stats_writer = StatsWriter(store.set_stats)
        self.pending = 0
        self.completed = 0
        self._lock = threading.Lock()
        self._store_open = threading.Lock()  # a retention purge in progress holds it; shutdown waits for it
        self._closed = False
        self.started_at = time.time()

    # -- validation (event loop side, cheap) ---------------------------------------------------------------------
    def validate(self, req: ExplainRequest) -> Endpoint:
        """The endpoint serving ``req``, after every check that needs no model call.

        Raises:
            InputError: naming the bad field: ``model`` (not served), ``method`` (not offered by the model),
                ``text`` / ``image`` (missing, both, the wrong kind for the model, empty text), ``text`` with status
                413 (over ``max_text_chars``), ``text`` / ``filename`` / ``options.labels`` (a lone surrogate, which
                is not Unicode text, or a NUL character, which PostgreSQL cannot store), ``options.labels`` (given
                to an image model).
        """
        endpoint = self.endpoints.get(req.model)
        if endpoint is None:
            raise InputError("model", f"unknown model {req.model!r}; served: {', '.join(sorted(self.endpoints))}")
        if req.method not in endpoint.methods:
            raise InputError("method", f"method must be one of {', '.join(endpoint.methods)}, got {req.method!r}")
        if (req.text is None) == (req.image is None):
            raise InputError("text" if req.image is None else "image", "give exactly one of text or image")
        if endpoint.kind == "text":
            if req.text is None:
                raise InputError("image", f"model {req.model!r} takes text, not an image")
            if not req.text.strip():
                raise InputError("text", "text is empty")
            if len(req.text) > self.config.max_text_chars:
                raise InputError(
                    "text", f"text has {len(req.text)} characters; at most {self.config.max_text_chars}", status=413
                )
        elif req.image is None:
            raise InputError("text", f"model {req.model!r} takes an image (base64 PNG or JPEG), not text")
        if req.options.labels is not None and endpoint.kind != "text":
            raise InputError("options.labels", "labels apply to text models only")
        if req.text is not None:
            check_text("text", req.text)
        if req.filename is not None:
            check_text("filename", req.filename)
        for i, label in enumerate(req.options.labels or ()):
            check_text("options.labels", label, what=f"options.labels[{i}]")
        return endpoint

    # -- the queue -----------------------------------------------------------------------------------------------
    async def submit(self, req: ExplainRequest) -> dict[str, Any]:
        """Run one explanation on the worker thread and store its record (committed before this returns).

        Args:
            req: the parsed request body.

        Returns:
            the stored record's columns (``id``, ``created_at``, ``prediction``, ...), with the requester's own
            tokens in ``explanation`` and the store and total times added to ``timings`` (milliseconds).

        Raises:
            InputError: bad content, naming the field (:meth:`validate`; an undecodable image; an option out of
                range for the model).
            Busy: ``queue_size`` requests are already accepted (nothing was done).
        """
        endpoint = self.validate(req)
        with self._lock:
            if self.pending >= self.config.queue_size:
                raise Busy()
            self.pending += 1
        accepted = time.time()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._run, endpoint, req, accepted)
        future.add_done_callback(self._done)
        return await asyncio.shield(future)  # a client that leaves does not cancel accepted work

    def _done(self, _future) -> None:
        with self._lock:
            self.pending -= 1
            self.completed += 1

    # -- the worker ----------------------------------------------------------------------------------------------
    def _run(self, endpoint: Endpoint, req: ExplainRequest, accepted: float) -> dict[str, Any]:
        start = time.time()
        options = req.options.model_dump(exclude_none=True)
        if endpoint.kind == "text":
            data, raw = req.text, req.text.encode("utf-8")
        else:
            data, raw = decode_image(
                req.image,
                size=endpoint.image_size,
                channels=endpoint.channels,
                invert_light=endpoint.invert_light,
                max_pixels=self.config.max_image_pixels,
            )
        try:
            result = endpoint.explain(data, req.method, options)
        except OptionError as exc:
            raise InputError(exc.field, str(exc)) from None
        t_store = time.time()
        explanation, tokens = result.explanation, result.tokens
        if not self.config.store_inputs:  # the stored record names token positions, never the input's words
            tokens = endpoint.stored_tokens(tokens)  # positions; [CLS]/[SEP] the tokenizer adds are not input
            if "tokens" in explanation:
                explanation = {**explanation, "tokens": tokens}
        blob, meta = pack_maps(result.maps, tokens)
        timings = {k: round(v, 3) for k, v in {"queue_ms": (start - accepted) * 1e3, **result.timings}.items()}
        record = {
            "id": uuid.uuid4().hex,
            "created_at": accepted,
            "finished_at": t_store,
            "model": endpoint.name,
            "model_kind": endpoint.kind,
            "weights_sha256": endpoint.weights_sha256,
            "attnkit_version": _version(),
            "method": req.method,
            "options": options,
            "input_kind": endpoint.kind,
            "input_text": req.text if self.config.store_inputs else None,
            "input_image": raw if endpoint.kind == "image" and self.config.store_inputs else None,
            "input_filename": req.filename if self.config.store_inputs else None,
            "input_sha256": hashlib.sha256(raw).hexdigest(),
            "prediction": result.prediction,
            "explanation": explanation,
            "attention": blob,
            "attention_meta": meta,
            "stats": {},  # written by the stats writer once computed, off the request path
            "timings": timings,
            "latency_ms": (t_store - accepted) * 1e3,
        }
        self.store.add(record)
        self.stats_writer.submit(record["id"], result.health)
        done = time.time()
        timings = {
            **timings,
            "store_ms": round((done - t_store) * 1e3, 3),
            "total_ms": round((done - accepted) * 1e3, 3),
        }
        return {**record, "explanation": result.explanation, "timings": timings}  # the requester's own tokens

    def purge_expired(self) -> int:
        """Delete the records older than ``retention_days``.

        Returns:
            the number of records deleted (0 when retention is off).
        """
        if self.config.retention_days is None:
            return 0
        with self._store_open:
            if self._closed:  # shut down meanwhile: nothing to purge any more
                return 0
            return self.store.purge(self.config.retention_days * 86400.0)

    def shutdown(self) -> None:
        """Finish every accepted request, write the statistics still queued, wait for a retention purge in
        progress, then close the store."""
        self.executor.shutdown(wait=True)
        self.stats_writer.close()
        with self._store_open:
            self._closed = True
            self.store.close()
