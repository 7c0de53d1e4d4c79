"""A :class:`attnkit.explain.Recording` on disk: one safetensors file, the metadata as JSON in its header.

Tensors: ``maps.<i>`` for the stored weights of record ``i`` (records captured with ``store=False`` have none).
Header metadata key ``"attnkit.recording"``: a JSON object ``{"format": "attnkit.recording", "version": 1,
"model": str | null, "tokens": [str] | [[str]] | null, "num_calls": int, "records": [{"name", "layer", "call",
"kind", "source", "shape", "heads", "query_rows", "head_mean", "layout", "weights"}]}`` where ``layout`` is
``{"num_prefix_tokens", "grid", "patch_size", "window", "extra"}`` or null, and ``weights`` the tensor's name or
null. Any safetensors reader (Python, Rust, JavaScript) can read the maps; the JSON says what they are.

Written with :func:`attnkit.io.atomic.atomic_write` (never a partial file; an existing file is kept unless
``overwrite``); read with ``safetensors`` (no pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnkit.explain.records import AttentionRecord, TokenLayout
from attnkit.io.atomic import atomic_write

if TYPE_CHECKING:
    from attnkit.explain.capture import Recording

__all__ = ["FORMAT", "load_recording", "save_recording"]

FORMAT, VERSION, KEY = "attnkit.recording", 1, "attnkit.recording"
_MAX_HEADER_JSON = 64 * 2**20


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("saving recordings needs safetensors: pip install 'attnkit[hf]'") from err
    return safetensors.torch


def _check_tokens(tokens: Any) -> list | None:
    if tokens is None:
        return None
    ok = isinstance(tokens, (list, tuple)) and (
        all(isinstance(t, str) for t in tokens)
        or all(isinstance(row, (list, tuple)) and all(isinstance(t, str) for t in row) for row in tokens)
    )
    if not ok:
        raise TypeError("Recording.save: tokens must be a list of strings, or one list of strings per batch item")
    return [t if isinstance(t, str) else list(t) for t in tokens]


def _layout_json(layout: TokenLayout | None, index: int) -> dict | None:
    if layout is None:
        return None
    try:
        extra = json.loads(json.dumps(layout.extra))
    except (TypeError, ValueError):
        raise ValueError(
            f"Recording.save: record {index}'s layout.extra holds values JSON cannot store: {layout.extra!r:.120}"
        ) from None
    return {
        "num_prefix_tokens": layout.num_prefix_tokens,
        "grid": layout.grid,
        "patch_size": layout.patch_size,
        "window": layout.window,
        "extra": extra,
    }


def save_recording(
    rec: Recording,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    tokens: list | None = None,
    model: str | None = None,
) -> Path:
    """Write ``rec`` to ``path`` (see the module docstring for the format). Arguments as :meth:`Recording.save`."""
    st = _safetensors()
    tokens = _check_tokens(rec.tokens if tokens is None else tokens)
    model = rec.model if model is None else model
    if model is not None and not isinstance(model, str):
        raise TypeError(f"Recording.save: model must be a string (a name or path), got {type(model).__name__}")
    tensors, records = {}, []
    for i, m in enumerate(rec.maps):
        name = None
        if m.weights is not None:
            name = f"maps.{i}"
            tensors[name] = m.weights.detach().cpu().contiguous()
        records.append(
            {
                "name": m.name,
                "layer": m.layer,
                "call": m.call,
                "kind": m.kind,
                "source": m.source,
                "shape": list(m.shape),
                "heads": None if m.heads is None else list(m.heads),
                "query_rows": None if m.query_rows is None else list(m.query_rows),
                "head_mean": m.head_mean,
                "layout": _layout_json(m.layout, i),
                "weights": name,
            }
        )
    meta = {"format": FORMAT, "version": VERSION, "model": model, "tokens": tokens, "num_calls": rec.num_calls}
    meta["records"] = records
    data = st.save(tensors, metadata={KEY: json.dumps(meta)})
    return atomic_write(path, data, overwrite=overwrite, who="Recording.save")


def _tuple(value, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"Recording.load: {what} must be a list of ints, got {value!r:.80}")
    return tuple(value)


def _record(entry: dict, tensors: dict, index: int) -> AttentionRecord:
    if not isinstance(entry, dict):
        raise ValueError(f"Recording.load: record {index} is not a JSON object")
    try:
        layout = entry["layout"]
        if layout is not None:
            layout = TokenLayout(
                num_prefix_tokens=int(layout["num_prefix_tokens"]),
                grid=_tuple(layout["grid"], "layout.grid"),
                patch_size=_tuple(layout["patch_size"], "layout.patch_size"),
                window=_tuple(layout["window"], "layout.window"),
                extra=dict(layout["extra"]),
            )
        weights = entry["weights"]
        if weights is not None and weights not in tensors:
            raise ValueError(f"Recording.load: record {index} names tensor {weights!r}, which the file lacks")
        return AttentionRecord(
            name=str(entry["name"]),
            layer=int(entry["layer"]),
            call=int(entry["call"]),
            kind=str(entry["kind"]),
            source=str(entry["source"]),
            shape=_tuple(entry["shape"], "shape"),
            weights=None if weights is None else tensors[weights],
            heads=_tuple(entry["heads"], "heads"),
            query_rows=_tuple(entry["query_rows"], "query_rows"),
            head_mean=bool(entry["head_mean"]),
            layout=layout,
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"Recording.load: record {index} is malformed ({type(err).__name__}: {err})") from None


def load_recording(path: str | os.PathLike, recording_cls: type[Recording]) -> Recording:
    """Read a file written by :func:`save_recording` (the tensors on the CPU) into a new ``recording_cls()``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a safetensors file, or not an attnkit recording (no or malformed metadata, a newer
            format version, missing tensors).
    """
    from safetensors import safe_open

    from attnkit.io.checkpoint_files import regular_file

    path = Path(path)
    regular_file(path, what="Recording.load")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a mapping
    except Exception as err:  # safetensors raises several error types for corrupt files
        raise ValueError(f"Recording.load: cannot read {str(path)!r} as safetensors: {err}") from None
    text = header.get(KEY)
    if text is None or len(text) > _MAX_HEADER_JSON:
        raise ValueError(f"Recording.load: {str(path)!r} holds no attnkit recording metadata ({KEY!r})")
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ValueError(f"Recording.load: {str(path)!r} has malformed metadata: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("records"), list):
        raise ValueError(f"Recording.load: {str(path)!r} is not an attnkit recording")
    if meta.get("version") != VERSION:
        raise ValueError(f"Recording.load: format version {meta.get('version')!r}; this attnkit reads {VERSION}")
    rec = recording_cls()
    rec.maps = [_record(e, tensors, i) for i, e in enumerate(meta["records"])]
    rec.num_calls = int(meta.get("num_calls", len(rec.maps)))
    rec.tokens = meta.get("tokens")
    rec.model = meta.get("model")
    return rec
