"""The audit store: every explanation kept with its input, model, weights hash, method, options and timings.

Any SQLAlchemy URL works with the same schema (created and upgraded by Alembic migrations on open): SQLite by
default (one file, write-ahead logging so the dashboard reads while the service writes), PostgreSQL for a team.
A plain file path is taken as an SQLite file. Writes commit before the service answers, so a 2xx response means
the record is durable; its attention-health statistics follow a moment later (:meth:`Store.set_stats`, from
:mod:`attnkit.serve.stats_writer`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from attnkit.serve.inputs import check_text
from attnkit.serve.schema import SCHEMA_REVISION, baselines, explanations

__all__ = ["DEFAULT_DB", "Filters", "Store", "StoreError", "database_url", "redact_url"]

#: The default database: an SQLite file in the working directory.
DEFAULT_DB = "attnkit-serve.db"

#: Columns of a feed/list entry (no inputs, maps or per-token data: those come with the full record).
SUMMARY_COLUMNS = (
    "seq",
    "id",
    "created_at",
    "model",
    "model_kind",
    "method",
    "input_kind",
    "input_filename",
    "input_text",
    "prediction",
    "latency_ms",
)


class StoreError(ValueError):
    """A database URL that cannot be opened or migrated (the message names the URL, password redacted)."""


def database_url(db: str) -> str:
    """An SQLAlchemy URL for ``db``: URLs pass through, a plain path becomes ``sqlite:///<absolute path>``."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, errors and ``/v1/health``)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"


@dataclass(frozen=True)
class Filters:
    """Which records a listing or an export covers; ``None`` means no restriction.

    Attributes:
        model: exact model name.
        method: exact method name.
        since: UTC epoch seconds, inclusive lower bound on ``created_at``.
        until: UTC epoch seconds, exclusive upper bound on ``created_at``.
        q: case-insensitive substring of the input text, the input file name, or a prefix of the record id.
        after: only records inserted after this feed cursor (``seq``).

    Raises:
        InputError: (:class:`attnkit.serve.inputs.InputError`, field ``model``, ``method`` or ``q``) a string with a
            lone surrogate or a NUL character, which no stored record contains and PostgreSQL cannot compare.
    """

    model: str | None = None
    method: str | None = None
    since: float | None = None
    until: float | None = None
    q: str | None = None
    after: int | None = None

    def __post_init__(self) -> None:
        for name in ("model", "method", "q"):
            value = getattr(self, name)
            if value is not None:
                check_text(name, value)

    def clauses(self) -> list[Any]:
        """The SQLAlchemy ``WHERE`` conditions of these filters on the ``explanations`` table.

        Returns:
            a list of boolean clauses to combine with AND (``select(...).where(*filters.clauses())``); empty when
            nothing is restricted. ``q`` matches with ``ILIKE``, its ``%``, ``_`` and ``\\`` taken literally.
        """
        t = explanations.c
        out = []
        if self.model is not None:
            out.append(t.model == self.model)
        if self.method is not None:
            out.append(t.method == self.method)
        if self.since is not None:
            out.append(t.created_at >= self.since)
        if self.until is not None:
            out.append(t.created_at < self.until)
        if self.after is not None:
            out.append(_after(self.after))
        if self.q:
            pattern = "%" + self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            out.append(
                sa.or_(
                    t.input_text.ilike(pattern, escape="\\"),
                    t.input_filename.ilike(pattern, escape="\\"),
                    t.id.startswith(self.q.lower(), autoescape=True),
                )
            )
        return out


#: The largest ``seq`` a record can have: the column is an SQL INTEGER, 32-bit on PostgreSQL. A feed cursor past it
#: selects nothing (compared as such, it would overflow PostgreSQL's parameter).
MAX_SEQ = 2**31 - 1


def _after(cursor: int):
    """The clause ``seq > cursor``; nothing for a cursor past any ``seq`` (never an overflowing parameter)."""
    return explanations.c.seq > cursor if cursor < MAX_SEQ else sa.false()


#: The insert of one record (the record's values as parameters: SQLAlchemy compiles it once per engine dialect).
_INSERT_EXPLANATION = explanations.insert()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor the writer the readers
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Store:
    """An open audit store.

    Args:
        db: an SQLAlchemy URL (``sqlite:///file.db``, ``postgresql+psycopg://user@host/db``) or a file path.
        migrate: bring the schema to the newest revision on open (default); ``False`` only checks it.

    Raises:
        StoreError: the URL is malformed, its driver missing, the server unreachable, or (``migrate=False``) the
            schema not at :data:`~attnkit.serve.schema.SCHEMA_REVISION`.
    """

    def __init__(self, db: str = DEFAULT_DB, *, migrate: bool = True) -> None:
        self.url = database_url(db)
        try:
            url = sa.engine.make_url(self.url)
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if url.get_backend_name() == "sqlite":
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
            self.engine = sa.create_engine(url, **kwargs)
        except (sa.exc.ArgumentError, ImportError, sa.exc.NoSuchModuleError) as exc:
            raise StoreError(f"--db {redact_url(self.url)}: cannot open ({exc})") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            if migrate:
                from attnkit.serve.migrations_runner import upgrade

                upgrade(self.engine)
            else:
                self.check_revision()
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            raise StoreError(f"--db {redact_url(self.url)}: cannot connect ({exc.orig})") from None

    @property
    def backend(self) -> str:
        """``"sqlite"``, ``"postgresql"``, ..."""
        return self.engine.dialect.name

    def check_revision(self) -> None:
        """Raise StoreError unless the database's schema revision is :data:`SCHEMA_REVISION`."""
        from attnkit.serve.migrations_runner import current_revision

        found = current_revision(self.engine)
        if found != SCHEMA_REVISION:
            raise StoreError(
                f"--db {redact_url(self.url)}: schema revision {found!r}, expected {SCHEMA_REVISION!r} "
                "(open it once with migrations enabled to upgrade)"
            )

    def close(self) -> None:
        """Release every connection (pending writes are already committed)."""
        self.engine.dispose()

    # -- writing ---------------------------------------------------------------------------------------------
    def add(self, record: dict[str, Any]) -> int:
        """Insert one explanation record (keys: the ``explanations`` columns except ``seq``) and commit.

        Args:
            record: the column values (JSON columns as Python objects, binary ones as bytes).

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database refused the row (a duplicate id, a lost connection).

        Returns:
            the record's ``seq`` (feed cursor).
        """
        with self.engine.begin() as conn:  # one statement, the record as its parameters: compiled once, then cached
            result = conn.execute(_INSERT_EXPLANATION, record)
            return int(result.inserted_primary_key[0])

    def set_stats(self, stats: dict[str, dict[str, float]]) -> None:
        """Write the attention-health statistics of existing records, in one transaction.

        Args:
            stats: ``{record id: {statistic: value}}``; ids with no record are skipped.
        """
        t = explanations.c
        query = explanations.update().where(t.id == sa.bindparam("record_id")).values(stats=sa.bindparam("new_stats"))
        with self.engine.begin() as conn:
            conn.execute(query, [{"record_id": k, "new_stats": v} for k, v in stats.items()])

    def purge(self, older_than_s: float, *, now: float | None = None) -> int:
        """Delete the records created more than ``older_than_s`` seconds before ``now``.

        Args:
            older_than_s: age limit in seconds.
            now: UTC epoch seconds (default the current time).

        Returns:
            the number of records deleted.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        with self.engine.begin() as conn:
            return int(conn.execute(explanations.delete().where(explanations.c.created_at < cutoff)).rowcount)

    def add_baseline(self, model: str, window_start: float, window_end: float, stats: dict[str, list[float]]) -> int:
        """Record a reference window of attention-health statistics for ``model``.

        Args:
            model: the served model name.
            window_start: UTC epoch seconds, the window's start.
            window_end: UTC epoch seconds, the window's end.
            stats: ``{statistic: [value per record of the window]}``.

        Returns:
            the baseline's id.
        """
        n = len(next(iter(stats.values()), []))
        row = {
            "model": model,
            "created_at": time.time(),
            "window_start": window_start,
            "window_end": window_end,
            "num_records": n,
            "stats": stats,
        }
        with self.engine.begin() as conn:
            return int(conn.execute(baselines.insert().values(**row)).inserted_primary_key[0])

    # -- reading ---------------------------------------------------------------------------------------------
    def get(self, record_id: str) -> dict[str, Any] | None:
        """The full record with this id, or ``None`` (also for ids no record can have, such as one with a NUL)."""
        if "\x00" in record_id:  # PostgreSQL cannot even compare such a string; no id contains one
            return None
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(explanations).where(explanations.c.id == record_id)).mappings().first()
        return None if row is None else dict(row)

    def count(self, filters: Filters = Filters()) -> int:
        """How many records match ``filters``.

        Args:
            filters: which records (default all).

        Returns:
            the number of matching records.
        """
        query = sa.select(sa.func.count()).select_from(explanations).where(*filters.clauses())
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def list(self, filters: Filters = Filters(), *, page: int = 1, page_size: int = 50) -> list[dict[str, Any]]:
        """One page of record summaries (the :data:`SUMMARY_COLUMNS`), newest first.

        Args:
            filters: which records (default all).
            page: 1-based page number.
            page_size: records per page.

        Returns:
            up to ``page_size`` rows as dicts; empty past the last page.

        Raises:
            ValueError: ``page`` or ``page_size`` below 1, or a page whose offset exceeds 2**62 rows (the databases'
                64-bit offsets).
        """
        if page < 1 or page_size < 1 or (page - 1) * page_size > 2**62:
            raise ValueError(f"expected page >= 1, page_size >= 1, offset <= 2**62, got {page}, {page_size}")
        cols = [explanations.c[name] for name in SUMMARY_COLUMNS]
        query = (
            sa.select(*cols)
            .where(*filters.clauses())
            .order_by(explanations.c.seq.desc())
            .limit(page_size)
            .offset((page - 1) * page_size)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def iter_records(self, filters: Filters = Filters(), *, batch: int = 200) -> Iterator[dict[str, Any]]:
        """Every full record matching ``filters``, oldest first, fetched ``batch`` at a time (for exports).

        Args:
            filters: which records (default all).
            batch: rows per query (each batch is one short read; writers are not held up).

        Yields:
            full records as dicts, in ``seq`` order.
        """
        last = 0
        while True:
            query = (
                sa.select(explanations)
                .where(*filters.clauses(), explanations.c.seq > last)
                .order_by(explanations.c.seq)
                .limit(batch)
            )
            with self.engine.connect() as conn:
                rows = [dict(r) for r in conn.execute(query).mappings()]
            if not rows:
                return
            yield from rows
            last = rows[-1]["seq"]

    def stats_series(
        self,
        model: str,
        *,
        limit: int | None = None,
        first: bool = False,
        after: int = 0,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """``[{seq, created_at, stats}]`` of ``model`` after cursor ``after``, oldest first: all, the first
        ``limit`` (``first=True``) or the last ``limit``; records whose statistics are not written yet are left
        out.

        Args:
            model: the served model's name.
            limit: at most this many rows (``None``: all).
            first: the oldest ``limit`` rows instead of the newest.
            after: only records with ``seq > after`` (a feed cursor).
            since, until: only records created in ``[since, until)`` (Unix seconds; ``None``: unbounded).
        """
        t = explanations.c
        query = sa.select(t.seq, t.created_at, t.stats).where(t.model == model)
        query = query.where(_after(after))
        if since is not None:
            query = query.where(t.created_at >= since)
        if until is not None:
            query = query.where(t.created_at < until)
        query = query.order_by(t.seq if first or limit is None else t.seq.desc())
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings() if r["stats"]]  # {}: not yet written
        return rows if first or limit is None else rows[::-1]

    def latest_baseline(self, model: str) -> dict[str, Any] | None:
        """The newest recorded baseline of ``model``.

        Returns:
            the ``baselines`` row as a dict (``stats``: ``{statistic: [values]}``), or ``None`` when there is none.
        """
        query = sa.select(baselines).where(baselines.c.model == model).order_by(baselines.c.id.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else dict(row)

    def models(self) -> list[str]:
        """Names of the models that have records."""
        with self.engine.connect() as conn:
            return sorted(conn.execute(sa.select(explanations.c.model).distinct()).scalars())
