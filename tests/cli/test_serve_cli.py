"""``attnkit serve`` command line: user errors exit 2 before any work; export and baseline on a real store."""

from __future__ import annotations

import json

import pytest

from attnkit.cli.main import main

pytest.importorskip("fastapi", reason="attnkit serve needs the serve extra")


@pytest.fixture
def filled_db(tmp_path):
    from attnkit.serve.store import Store
    from serve_helpers import record

    db = tmp_path / "audit.db"
    store = Store(str(db))
    for i in range(4):
        store.add(record(text=f"sentence {i}", model="minilm" if i < 3 else "other", created=1_700_000_000.0 + i))
    store.close()
    return db


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--queue-size", "0"], "--queue-size must be at least 1"),
        (["serve", "--port", "70000"], "--port must be in"),
        (["serve", "--retention-days", "-1"], "--retention-days must be positive"),
        (["serve", "--retry-after", "0"], "--retry-after must be at least 1, got 0"),
        (["serve", "--max-image-pixels", "-5"], "--max-image-pixels must be at least 1, got -5"),
        (["serve", "--model", "a=minilm", "--model", "a=digits-vit"], "each NAME may be given once"),
        (["serve", "--model", "x=/no/such/dir", "--db", "{tmp}/a.db"], "not a shipped model"),
        (["serve", "--db", "nosuchdialect://x/y"], "cannot open"),
        (["serve", "export", "{tmp}/out.csv", "--db", "{tmp}/a.db"], "cannot tell the format"),
        (["serve", "export", "{tmp}/out.jsonl", "--since", "soon", "--db", "{tmp}/a.db"], "--since must be ISO 8601"),
        (["serve", "export", "{tmp}/no/such/dir/out.jsonl", "--db", "{tmp}/a.db"], "/no/such/dir' does not exist"),
        (["serve", "baseline", "--model", "minilm", "--db", "{tmp}/a.db"], "no records of model 'minilm'"),
    ],
)
def test_user_errors_exit_2(argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit serve: error: ") and message in err and err.count("\n") == 1


def test_export_to_a_missing_directory_fails_before_any_work(tmp_path, capsys):
    db, out = tmp_path / "never-created.db", tmp_path / "missing" / "out.jsonl"
    assert main(["serve", "export", str(out), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"directory {str(out.parent)!r} does not exist" in err
    assert not out.parent.exists() and not db.exists()  # no directory made, the store not even opened


def test_limits_flags_reach_the_service_config():
    from attnkit.cli.main import build_parser
    from attnkit.cli.serve import serve_config
    from attnkit.serve.service import ServeConfig

    default = serve_config(build_parser().parse_args(["serve"]))
    assert (default.max_image_pixels, default.retry_after_s) == (ServeConfig().max_image_pixels, 1)
    args = build_parser().parse_args(["serve", "--max-image-pixels", "1000000", "--retry-after", "7"])
    config = serve_config(args)
    assert (config.max_image_pixels, config.retry_after_s) == (1_000_000, 7)


@pytest.mark.parametrize("flag", ["--max-image-pixels", "--retry-after"])
def test_limits_flags_must_be_integers(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error: usage, then the message
        main(["serve", flag, "1.5"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: invalid int value: '1.5'" in capsys.readouterr().err


def test_export_and_baseline(filled_db, tmp_path, capsys):
    out = tmp_path / "audit.jsonl"
    assert main(["serve", "export", str(out), "--db", str(filled_db), "--model", "minilm"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input_text"] for r in rows] == ["sentence 0", "sentence 1", "sentence 2"]
    assert main(["serve", "export", str(out), "--db", str(filled_db)]) == 2  # no clobbering
    assert main(["serve", "export", str(out), "--db", str(filled_db), "--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 4
    parquet = tmp_path / "audit.parquet"
    assert main(["serve", "export", str(parquet), "--db", str(filled_db), "--until", "1700000001.5"]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(parquet).num_rows == 2
    assert main(["serve", "baseline", "--model", "minilm", "--db", str(filled_db)]) == 0
    assert "3 records" in capsys.readouterr().out
    from attnkit.serve.store import Store

    store = Store(str(filled_db))
    try:
        assert store.latest_baseline("minilm")["stats"]["confidence"] == [0.5, 0.5, 0.5]
    finally:
        store.close()


def test_real_process_serves_and_exits_cleanly_on_sigterm(tmp_path, digit_png_b64):
    """``attnkit serve`` as a real process: binds 127.0.0.1, answers, SIGTERM finishes and exits 0."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import serve_server as sp

    port = sp.free_port()
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    db = tmp_path / "audit.db"
    cmd = [sys.executable, "-m", "attnkit.cli.main", "serve", "--model", "digits-vit", "--db", str(db)]
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                health = sp.get(f"http://127.0.0.1:{port}/v1/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        assert [m["name"] for m in health["models"]] == ["digits-vit"]
        status, body, _ = sp.post(
            f"http://127.0.0.1:{port}/v1/explain", {"model": "digits-vit", "image": digit_png_b64}
        )
        assert status == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out and "Traceback" not in out
    from attnkit.serve.store import Store

    store = Store(str(db))
    try:
        assert store.get(body["id"])["model"] == "digits-vit"
    finally:
        store.close()


@pytest.fixture
def digit_png_b64():
    import torch

    from serve_helpers import png_b64

    canvas = torch.zeros(64, 64, dtype=torch.uint8)
    canvas[20:44, 28:34] = 255  # a "1"
    return png_b64(canvas.numpy())


def test_baseline_reads_statistics_only_within_its_window(filled_db, monkeypatch, capsys):
    from attnkit.serve.store import Store

    def no_full_records(*args, **kwargs):
        raise AssertionError("serve baseline must not load full records (inputs, maps) to read statistics")

    monkeypatch.setattr(Store, "iter_records", no_full_records)
    monkeypatch.setattr(Store, "get", no_full_records)
    argv = ["serve", "baseline", "--model", "minilm", "--db", str(filled_db)]
    assert main([*argv, "--since", "1700000001", "--until", "1700000002.5"]) == 0  # records 1 and 2 of 0..2
    assert "2 records" in capsys.readouterr().out
    store = Store(str(filled_db))
    try:
        baseline = store.latest_baseline("minilm")
    finally:
        store.close()
    assert baseline["num_records"] == 2 and baseline["window_start"] == 1_700_000_001.0
    assert baseline["window_end"] == 1_700_000_002.5 and baseline["stats"]["sink_mass"] == [0.3, 0.3]
