"""The audit store's tables (SQLAlchemy Core), identical on SQLite and PostgreSQL.

Created and upgraded only by the versioned migrations in ``attnkit/serve/migrations`` (Alembic); a test checks that
the migrated database matches this metadata, so the two cannot drift apart. Times are UTC seconds since the epoch
(float), portable across back ends and cheap to index.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["SCHEMA_REVISION", "baselines", "explanations", "metadata"]

#: The Alembic revision this code expects (the newest file in ``migrations/versions``).
SCHEMA_REVISION = "0001"

metadata = sa.MetaData()

explanations = sa.Table(
    "explanations",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # insertion order: the live feed's cursor
    sa.Column("id", sa.String(32), nullable=False, unique=True),  # uuid4 hex, the public id
    sa.Column("created_at", sa.Float, nullable=False, index=True),  # request accepted (UTC epoch seconds)
    sa.Column("finished_at", sa.Float, nullable=False),  # explanation computed
    sa.Column("model", sa.String(128), nullable=False, index=True),
    sa.Column("model_kind", sa.String(16), nullable=False),  # "text" | "image"
    sa.Column("weights_sha256", sa.String(64), nullable=False),
    sa.Column("attnkit_version", sa.String(32), nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("input_kind", sa.String(8), nullable=False),  # "text" | "image"
    sa.Column("input_text", sa.Text, nullable=True),  # NULL under --no-store-inputs
    sa.Column("input_image", sa.LargeBinary, nullable=True),  # the submitted PNG/JPEG bytes, or NULL
    sa.Column("input_filename", sa.String(255), nullable=True),
    sa.Column("input_sha256", sa.String(64), nullable=False),
    sa.Column("prediction", sa.JSON, nullable=False),
    sa.Column("explanation", sa.JSON, nullable=False),
    sa.Column("attention", sa.LargeBinary, nullable=True),  # zstd(uint8 (layers, H, L, L)), see maps.py
    sa.Column("attention_meta", sa.JSON, nullable=True),
    sa.Column("stats", sa.JSON, nullable=False),  # attention-health statistics of this request
    sa.Column("timings", sa.JSON, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
)

baselines = sa.Table(
    "baselines",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(128), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("window_start", sa.Float, nullable=False),
    sa.Column("window_end", sa.Float, nullable=False),
    sa.Column("num_records", sa.Integer, nullable=False),
    sa.Column("stats", sa.JSON, nullable=False),  # {statistic: [values of the window]}
)
