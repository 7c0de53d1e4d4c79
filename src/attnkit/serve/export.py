"""Export the audit store to JSON Lines or Parquet (``attnkit serve export``).

Every column of the ``explanations`` table is exported; binary columns (the input image, the packed attention
maps) as base64 in JSON Lines and as binary in Parquet; JSON columns as JSON text in Parquet. Files are written to a
temporary name in the target directory and renamed into place, so a reader never sees a partial export and an
existing file is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from attnkit.io.atomic import atomic_file
from attnkit.serve.schema import explanations
from attnkit.serve.store import Filters, Store

__all__ = ["FORMATS", "export"]

FORMATS = ("jsonl", "parquet")
_BINARY = {c.name for c in explanations.columns if c.type.python_type is bytes}
_JSON = {"options", "prediction", "explanation", "attention_meta", "stats", "timings"}


def _jsonl_row(row: dict[str, Any]) -> str:
    out = {
        k: (None if v is None else base64.b64encode(v).decode("ascii")) if k in _BINARY else v for k, v in row.items()
    }
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _parquet_schema():
    import pyarrow as pa

    types = {int: pa.int64(), float: pa.float64(), str: pa.string(), bytes: pa.binary()}
    fields = []
    for c in explanations.columns:
        kind = pa.string() if c.name in _JSON else types[c.type.python_type]
        fields.append(pa.field(c.name, kind, nullable=c.nullable))
    return pa.schema(fields)


def export(
    store: Store, path: str | os.PathLike, *, fmt: str | None = None, filters: Filters | None = None, overwrite=False
) -> int:
    """Write the records matching ``filters`` (oldest first) to ``path``; returns how many.

    Args:
        store: the open store.
        path: the output file; its directory must exist.
        fmt: ``"jsonl"`` or ``"parquet"``; default from the suffix (``.jsonl``, ``.parquet``).
        filters: which records (default: all).
        overwrite: replace an existing file.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: the directory of ``path`` does not exist (it is not created, as
            :meth:`attnkit.explain.Recording.save`).
        ValueError: an unknown format.
        ImportError: pyarrow missing for Parquet (``pip install 'attnkit[serve]'``).
    """
    path = Path(path)
    filters = Filters() if filters is None else filters
    fmt = fmt or path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"export: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"export: {path} exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_file(path, overwrite=overwrite, who="export") as tmp:
        count = _write_jsonl(store, str(tmp), filters) if fmt == "jsonl" else _write_parquet(store, str(tmp), filters)
    return count


def _write_jsonl(store: Store, tmp: str, filters: Filters) -> int:
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in store.iter_records(filters):
            f.write(_jsonl_row(row) + "\n")
            count += 1
    return count


def _write_parquet(store: Store, tmp: str, filters: Filters, batch: int = 500) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet export needs pyarrow: pip install 'attnkit[serve]'") from None
    schema = _parquet_schema()
    count, rows = 0, []
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:

        def flush():
            cols = {f.name: [r[f.name] for r in rows] for f in schema}
            for name in _JSON:
                cols[name] = [None if v is None else json.dumps(v, ensure_ascii=False) for v in cols[name]]
            writer.write_table(pa.table(cols, schema=schema))

        for row in store.iter_records(filters):
            rows.append(row)
            count += 1
            if len(rows) >= batch:
                flush()
                rows = []
        if rows or count == 0:
            flush()
    return count
