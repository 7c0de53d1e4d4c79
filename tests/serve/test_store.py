"""The audit store on SQLite and on a real PostgreSQL server: migrations, writes, queries, retention, exports."""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa

from attnkit.serve.store import Filters, Store, StoreError, database_url, redact_url
from serve_helpers import record


def test_database_url_and_redaction(tmp_path):
    assert database_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path / 'a.db'}"
    assert database_url("postgresql+psycopg://u:secret@h/db") == "postgresql+psycopg://u:secret@h/db"
    assert "secret" not in redact_url("postgresql+psycopg://u:secret@h/db")


def test_roundtrip_filters_paging(db_url):
    store = Store(db_url)
    try:
        t0 = 1_700_000_000.0
        rows = [record(text=f"text {i}", created=t0 + i) for i in range(7)]
        rows.append(
            record(model="digits-vit", text=None, created=t0 + 10, input_kind="image", input_filename="a_b.png")
        )
        rows.append(record(text="100% sure_thing", created=t0 + 11, method="raw"))
        seqs = [store.add(r) for r in rows]
        assert seqs == sorted(seqs)
        got = store.get(rows[0]["id"])
        for key in ("options", "prediction", "explanation", "stats", "attention", "input_text", "created_at"):
            assert got[key] == rows[0][key]
        assert store.get("nope") is None
        assert store.count() == 9
        page1, page2 = store.list(page=1, page_size=4), store.list(page=2, page_size=4)
        assert [r["id"] for r in page1] == [r["id"] for r in rows[::-1][:4]]  # newest first
        assert [r["id"] for r in page2] == [r["id"] for r in rows[::-1][4:8]]
        assert store.count(Filters(model="digits-vit")) == 1
        assert store.count(Filters(method="raw")) == 1
        assert store.count(Filters(since=t0 + 2, until=t0 + 5)) == 3  # inclusive since, exclusive until
        assert store.count(Filters(after=seqs[6])) == 2
        assert store.count(Filters(q="TEXT 3")) == 1  # case-insensitive
        assert store.count(Filters(q="100%")) == 1  # LIKE wildcards are literal
        assert store.count(Filters(q="%")) == 1
        assert store.count(Filters(q="_")) == 2  # "a_b.png" and "sure_thing", not every row
        assert store.count(Filters(q=rows[3]["id"][:10])) == 1  # id prefix
        assert store.models() == ["digits-vit", "minilm"]
        series = store.stats_series("minilm", limit=3)
        assert [r["seq"] for r in series] == seqs[5:7] + seqs[8:]  # the last three, oldest first
        assert [r["seq"] for r in store.stats_series("minilm", limit=2, first=True)] == seqs[:2]
        window = store.stats_series("minilm", since=t0 + 2, until=t0 + 5)  # inclusive since, exclusive until
        assert [r["seq"] for r in window] == seqs[2:5]
        assert [r["id"] for r in store.iter_records(batch=2)] == [r["id"] for r in rows]
    finally:
        store.close()


def test_retention_purges_only_old_records(db_url):
    store = Store(db_url)
    try:
        now = time.time()
        old, new = record(created=now - 10 * 86400), record(created=now - 3600)
        store.add(old)
        store.add(new)
        assert store.purge(7 * 86400, now=now) == 1
        assert store.get(old["id"]) is None and store.get(new["id"]) is not None
    finally:
        store.close()


def test_baselines(db_url):
    store = Store(db_url)
    try:
        assert store.latest_baseline("minilm") is None
        store.add_baseline("minilm", 1.0, 2.0, {"confidence": [0.1, 0.2]})
        second = store.add_baseline("minilm", 3.0, 4.0, {"confidence": [0.3]})
        latest = store.latest_baseline("minilm")
        assert latest["id"] == second and latest["stats"] == {"confidence": [0.3]} and latest["num_records"] == 1
    finally:
        store.close()


def test_migrations_match_the_schema_and_are_reversible(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from attnkit.serve.migrations_runner import current_revision, downgrade, upgrade
    from attnkit.serve.schema import SCHEMA_REVISION, metadata

    store = Store(db_url)
    try:
        assert current_revision(store.engine) == SCHEMA_REVISION
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []  # the migrations build exactly the tables the code uses
        downgrade(store.engine, "base")
        assert set(sa.inspect(store.engine).get_table_names()) <= {"alembic_version"}
        with pytest.raises(StoreError, match="schema revision None"):
            Store(db_url, migrate=False)
        upgrade(store.engine)
        Store(db_url, migrate=False).close()  # upgraded: the check passes
        store.add(record())
        assert store.count() == 1
    finally:
        store.close()


def test_sqlite_runs_in_wal_mode(tmp_path):
    store = Store(str(tmp_path / "wal.db"))
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert store.backend == "sqlite"
    finally:
        store.close()


def test_unreachable_or_malformed_databases_raise_store_error(tmp_path):
    with pytest.raises(StoreError, match="cannot"):
        Store("postgresql+psycopg://nobody:pw@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="cannot open"):
        Store("nosuchdialect://x/y")
    with pytest.raises(StoreError) as info:
        Store("postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_roundtrips_every_column(db_url, tmp_path, fmt):
    import base64

    from attnkit.serve.export import export
    from attnkit.serve.schema import explanations

    store = Store(db_url)
    try:
        rows = [record(text=f"t{i}", input_image=bytes([i, 255])) for i in range(3)]
        for r in rows:
            store.add(r)
        out = tmp_path / f"audit.{fmt}"
        assert export(store, out) == 3
        with pytest.raises(FileExistsError):
            export(store, out)
        assert export(store, out, filters=Filters(q="t1"), overwrite=True) == 1
        assert export(store, out, overwrite=True) == 3
    finally:
        store.close()
    if fmt == "jsonl":
        got = [json.loads(line) for line in out.read_text().splitlines()]
        images = [base64.b64decode(g["input_image"]) for g in got]
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(out).to_pylist()
        images = [g["input_image"] for g in got]
        for g in got:
            g["prediction"] = json.loads(g["prediction"])
    assert set(got[0]) == {c.name for c in explanations.columns}
    assert [g["id"] for g in got] == [r["id"] for r in rows]
    assert images == [r["input_image"] for r in rows]
    assert got[1]["prediction"] == rows[1]["prediction"] and got[2]["input_text"] == "t2"


def test_strings_no_record_holds_are_refused_or_find_nothing(db_url):
    from attnkit.serve.inputs import InputError

    for name in ("model", "method", "q"):
        for bad in ("a\x00b", "\udfff"):
            with pytest.raises(InputError) as info:
                Filters(**{name: bad})
            assert info.value.field == name and info.value.status == 422
    store = Store(db_url)
    try:
        store.add(record())
        assert store.get("a\x00b") is None  # PostgreSQL cannot compare it: no query is sent
        assert len(store.list(page=2**40, page_size=500)) == 0
        with pytest.raises(ValueError, match="offset <= 2\\*\\*62"):
            store.list(page=2**62, page_size=500)
        with pytest.raises(ValueError, match="page >= 1"):
            store.list(page=0)
    finally:
        store.close()
