"""JSON views of stored records, and the time format of the API (ISO 8601, UTC)."""

from __future__ import annotations

import base64
import math
from datetime import datetime, timezone
from typing import Any

from attnkit.serve.inputs import InputError

__all__ = ["full_record", "iso", "parse_time", "summary"]


def iso(ts: float) -> str:
    """UTC epoch seconds as ISO 8601 with milliseconds (``"2026-12-01T13:00:00.000Z"``).

    Args:
        ts: UTC epoch seconds.

    Returns:
        the ISO 8601 string, ``Z`` for UTC.
    """
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str | None, field: str) -> float | None:
    """Epoch seconds of a time given as ISO 8601 (naive = UTC) or as epoch seconds.

    Args:
        value: ``"2026-12-01T13:00:00Z"``, ``"2026-12-01 13:00"``, ``"1764594000"``...; ``None`` or ``""``: none.
        field: the query parameter it came from (named in the error).

    Returns:
        UTC epoch seconds, or ``None`` for no value.

    Raises:
        InputError: (422, ``field``) neither ISO 8601 nor a finite number (``nan`` and ``inf`` are refused).
    """
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise InputError(field, f"{field} must be a finite time, got {value!r}")
        return seconds
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            field, f"{field} must be ISO 8601 (2026-12-01T13:00:00Z) or epoch seconds, got {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a feed/list entry (:class:`~attnkit.serve.schemas.RecordSummary`).

    Args:
        row: a record with at least the :data:`~attnkit.serve.store.SUMMARY_COLUMNS`.

    Returns:
        the entry: times as ISO 8601, the first 200 characters of the text as ``input_preview`` (``None`` when
        the text is not stored), the predicted label and score.
    """
    text = row.get("input_text")
    pred = row.get("prediction") or {}
    return {
        "seq": row["seq"],
        "id": row["id"],
        "created_at": iso(row["created_at"]),
        "model": row["model"],
        "model_kind": row["model_kind"],
        "method": row["method"],
        "input_kind": row["input_kind"],
        "input_filename": row.get("input_filename"),
        "input_preview": None if text is None else text[:200],
        "label": None if pred.get("label") is None else str(pred.get("label")),
        "score": pred.get("score"),
        "latency_ms": round(row["latency_ms"], 3),
    }


def full_record(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON of one full record (``GET /v1/explanations/{id}``).

    Args:
        row: a full record of the store (:meth:`~attnkit.serve.store.Store.get`).

    Returns:
        every column but the attention maps (left to the dashboard), times as ISO 8601, the input under
        ``input`` with the image as base64 and ``stored`` False when only its SHA-256 was kept.
    """
    image = row.get("input_image")
    return {
        "id": row["id"],
        "seq": row["seq"],
        "created_at": iso(row["created_at"]),
        "finished_at": iso(row["finished_at"]),
        "model": row["model"],
        "model_kind": row["model_kind"],
        "weights_sha256": row["weights_sha256"],
        "attnkit_version": row["attnkit_version"],
        "method": row["method"],
        "options": row["options"],
        "input": {
            "kind": row["input_kind"],
            "text": row.get("input_text"),
            "image": None if image is None else base64.b64encode(image).decode("ascii"),
            "filename": row.get("input_filename"),
            "sha256": row["input_sha256"],
            "stored": row.get("input_text") is not None or image is not None,
        },
        "prediction": row["prediction"],
        "explanation": row["explanation"],
        "stats": row["stats"],
        "timings": row["timings"],
        "latency_ms": row["latency_ms"],
    }
