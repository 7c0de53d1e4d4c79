"""``attnkit serve``: attention explanations for models in production, with an audit trail and a live dashboard.

Needs the ``serve`` extra (``pip install 'attnkit[serve]'``): FastAPI, uvicorn, SQLAlchemy, Alembic, pyarrow.

* :func:`build` / :func:`create_app`: the ASGI application (JSON API under ``/v1``, dashboard pages);
* :class:`Store`: the audit store (any SQLAlchemy URL; SQLite by default) with versioned migrations;
* :func:`export`: JSON Lines and Parquet exports of the store;
* :mod:`attnkit.serve.health`: attention-health statistics and drift.
"""

from __future__ import annotations

__all__ = ["ServeConfig", "Service", "Store", "build", "create_app", "export"]


def __getattr__(name: str):
    if name in ("build", "create_app"):
        from attnkit.serve import app

        return getattr(app, name)
    if name in ("ServeConfig", "Service"):
        from attnkit.serve import service

        return getattr(service, name)
    if name == "Store":
        from attnkit.serve.store import Store

        return Store
    if name == "export":
        from attnkit.serve.export import export

        return export
    raise AttributeError(f"module 'attnkit.serve' has no attribute {name!r}")
