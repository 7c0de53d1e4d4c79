"""The attention-health statistics are written off the request path: batched, flushed on close, errors contained."""

from __future__ import annotations

import threading

import pytest
import torch

from attnkit.serve.health import HealthInputs, request_stats
from attnkit.serve.stats_writer import StatsWriter
from attnkit.serve.store import Store
from serve_helpers import record


def _inputs(seed: int) -> HealthInputs:
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(2, 3, 6, 6, generator=gen).softmax(-1)
    return HealthInputs(maps, (0, 5), 0, 0.25 + 0.01 * seed)


class _Broken(HealthInputs):
    def stats(self):
        raise ValueError("bad maps")


def test_statistics_are_the_request_stats_and_queued_ones_share_a_transaction():
    writes, gate = [], threading.Event()

    def write(stats):
        gate.wait(10)  # hold the first transaction so the next submissions queue up
        writes.append(stats)

    writer = StatsWriter(write)
    jobs = {f"r{i}": _inputs(i) for i in range(5)}
    for record_id, inputs in jobs.items():
        writer.submit(record_id, inputs)
    gate.set()
    writer.close()
    assert sum(len(w) for w in writes) == 5 == writer.written and len(writes) < 5
    got = {k: v for w in writes for k, v in w.items()}
    for record_id, inputs in jobs.items():
        assert got[record_id] == request_stats(inputs.maps, inputs.sinks, inputs.summary_row, inputs.confidence)
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit("late", _inputs(9))
    writer.close()  # idempotent


def test_a_failing_record_is_logged_and_the_others_are_written(caplog):
    writes = []
    writer = StatsWriter(writes.append)
    writer.submit("bad", _Broken(*_inputs(0).__dict__.values()))
    writer.submit("good", _inputs(1))
    writer.flush()
    writer.close()
    assert {k for w in writes for k in w} == {"good"}
    assert "record bad failed" in caplog.text and "bad maps" in caplog.text


def test_store_set_stats_and_pending_records_left_out_of_the_series(db_url):
    store = Store(db_url)
    try:
        rows = [record(stats={}) for _ in range(3)]
        for r in rows:
            store.add(r)
        assert store.stats_series("minilm") == []  # nothing written yet
        writer = StatsWriter(store.set_stats)
        for i, r in enumerate(rows[:2]):
            writer.submit(r["id"], _inputs(i))
        writer.close()
        series = store.stats_series("minilm")
        assert [s["seq"] for s in series] == [1, 2]
        assert store.get(rows[0]["id"])["stats"] == _inputs(0).stats()
        assert store.get(rows[2]["id"])["stats"] == {}
    finally:
        store.close()
