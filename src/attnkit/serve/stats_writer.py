"""Attention-health statistics computed off the request path, by one writer thread, and stored with the record.

The answer to ``POST /v1/explain`` does not need the health statistics (they feed the health page and drift
detection), so the worker commits the record with empty ``stats`` and answers; this thread then computes
:func:`attnkit.serve.health.request_stats` from the request's maps and writes them into the record, several
records per transaction when requests queue up. :meth:`StatsWriter.close` (service shutdown) writes everything
still queued. A record whose statistics were never written (the process was killed in between) keeps ``{}`` and
is left out of the health windows.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import torch

from attnkit.serve.health import HealthInputs

__all__ = ["StatsWriter"]

log = logging.getLogger("attnkit.serve")

_STOP = object()


class StatsWriter:
    """One daemon thread that computes health statistics and writes them into the store.

    Args:
        write: ``write({record_id: stats})`` stores the statistics of several records in one transaction
            (:meth:`attnkit.serve.store.Store.set_stats`).
        max_batch: at most this many records per transaction.
    """

    def __init__(self, write: Callable[[dict[str, dict[str, float]]], None], *, max_batch: int = 64) -> None:
        self.write, self.max_batch = write, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.written = 0
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name="attnkit-stats", daemon=True)
        self.thread.start()

    def submit(self, record_id: str, inputs: HealthInputs) -> None:
        """Queue the statistics of the committed record ``record_id``.

        Raises:
            RuntimeError: after :meth:`close`.
        """
        if self._closed:
            raise RuntimeError("StatsWriter.submit: the writer is closed")
        self.queue.put((record_id, inputs))

    def flush(self) -> None:
        """Wait until everything submitted so far is written."""
        self.queue.join()

    def close(self) -> None:
        """Write everything queued, then stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.queue.put(_STOP)
        self.thread.join()

    def _loop(self) -> None:
        stop = False
        while not stop:
            items = [self.queue.get()]
            while len(items) < self.max_batch:  # whatever else is already waiting goes into the same transaction
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in items)
            jobs = [item for item in items if item is not _STOP]
            try:
                stats = {}
                for record_id, inputs in jobs:
                    try:
                        with torch.inference_mode():
                            stats[record_id] = inputs.stats()
                    except Exception:  # one bad map must not stop the statistics of the others
                        log.exception("attention-health statistics of record %s failed", record_id)
                if stats:
                    self.write(stats)
                    self.written += len(stats)
            except Exception:
                log.exception("writing the attention-health statistics of %d records failed", len(jobs))
            finally:
                for _ in items:
                    self.queue.task_done()
