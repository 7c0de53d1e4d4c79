"""``attnkit.serve.export``: the output's directory is not created for the caller."""

from __future__ import annotations

import pytest

from attnkit.serve.export import export
from attnkit.serve.store import Store
from serve_helpers import record


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_missing_directory_is_an_error_naming_it(tmp_path, name):
    store = Store(str(tmp_path / "audit.db"))
    try:
        store.add(record())
        out = tmp_path / "missing" / name
        with pytest.raises(FileNotFoundError, match=f"directory {str(out.parent)!r} does not exist"):
            export(store, out)
        assert not out.parent.exists()
    finally:
        store.close()
