"""The first schema: explanations (the audit trail) and baselines (reference windows of attention health).

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "explanations",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(32), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_kind", sa.String(16), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("attnkit_version", sa.String(32), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("input_kind", sa.String(8), nullable=False),
        sa.Column("input_text", sa.Text, nullable=True),
        sa.Column("input_image", sa.LargeBinary, nullable=True),
        sa.Column("input_filename", sa.String(255), nullable=True),
        sa.Column("input_sha256", sa.String(64), nullable=False),
        sa.Column("prediction", sa.JSON, nullable=False),
        sa.Column("explanation", sa.JSON, nullable=False),
        sa.Column("attention", sa.LargeBinary, nullable=True),
        sa.Column("attention_meta", sa.JSON, nullable=True),
        sa.Column("stats", sa.JSON, nullable=False),
        sa.Column("timings", sa.JSON, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
    )
    op.create_index("ix_explanations_created_at", "explanations", ["created_at"])
    op.create_index("ix_explanations_model", "explanations", ["model"])
    op.create_table(
        "baselines",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("window_start", sa.Float, nullable=False),
        sa.Column("window_end", sa.Float, nullable=False),
        sa.Column("num_records", sa.Integer, nullable=False),
        sa.Column("stats", sa.JSON, nullable=False),
    )
    op.create_index("ix_baselines_model", "baselines", ["model"])


def downgrade() -> None:
    op.drop_index("ix_baselines_model", "baselines")
    op.drop_table("baselines")
    op.drop_index("ix_explanations_model", "explanations")
    op.drop_index("ix_explanations_created_at", "explanations")
    op.drop_table("explanations")
