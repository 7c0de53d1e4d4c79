"""Alembic migrations of the audit store (``versions/`` holds one file per schema revision)."""
