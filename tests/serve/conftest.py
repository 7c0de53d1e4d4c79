"""Fixtures of the serve tests: the shipped models loaded once, stores on SQLite and (when available) PostgreSQL."""

from __future__ import annotations

import os
import uuid

import pytest

from serve_helpers import png_b64

pytest.importorskip("fastapi", reason="the serve tests need the serve extra: pip install 'attnkit[serve]'")

POSTGRES_ENV = "ATTNKIT_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def endpoints():
    from attnkit.serve.models import load_endpoint

    return {name: load_endpoint(name) for name in ("minilm", "digits-vit")}


@pytest.fixture(scope="session")
def digit_png():
    """A real held-out digit canvas (scikit-learn's handwritten digits) as base64 PNG, and its label."""
    from attnkit.datasets.digits import DigitCanvases

    data = DigitCanvases("test", num_canvases=1, seed=7)
    return png_b64((data.images[0, 0] * 255).round().byte().numpy()), int(data.labels[0])


def postgres_url_or_skip() -> str:
    """The test server's URL; skip (with the reason) when none is configured, fail under CI=true."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        reason = f"PostgreSQL store tests need a server: set {POSTGRES_ENV} (.ci/run starts one)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return url


@pytest.fixture
def postgres_db():
    """A fresh, empty PostgreSQL database on the test server (dropped afterwards)."""
    import sqlalchemy as sa

    url = sa.engine.make_url(postgres_url_or_skip())
    name = f"attnkit_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh store URL on each back end."""
    if request.param == "sqlite":
        return str(tmp_path / "audit.db")
    return request.getfixturevalue("postgres_db")
