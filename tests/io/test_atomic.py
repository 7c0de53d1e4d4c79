"""attnkit.io.atomic: the one writer (no clobbering, also without hard links), output checks, failed-run cleanup."""

from __future__ import annotations

import errno
import os

import pytest

from attnkit.io import atomic
from attnkit.io.atomic import OutputTracker, atomic_write, check_output_dir, check_output_file


def test_writes_text_and_bytes_and_never_clobbers(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "é")
    assert path.read_bytes() == "é".encode()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write(path, b"x")
    atomic_write(path, b"x", overwrite=True)
    assert path.read_bytes() == b"x" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, b"x", overwrite=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "nope" / "a.txt", b"x")


def test_without_hard_links_the_name_is_reserved_first(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(atomic.os, "link", no_links)
    path = atomic_write(tmp_path / "b.txt", b"data")
    assert path.read_bytes() == b"data"
    real_open = os.open

    def racing_open(file, flags, *args):  # another writer creates the file right before the reservation
        if str(file) == str(tmp_path / "c.txt"):
            (tmp_path / "c.txt").write_text("theirs")
        return real_open(file, flags, *args)

    monkeypatch.setattr(atomic.os, "open", racing_open)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "c.txt", b"ours")
    assert (tmp_path / "c.txt").read_text() == "theirs"
    assert sorted(os.listdir(tmp_path)) == ["b.txt", "c.txt"]  # no temporary file left


def test_output_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        check_output_file(tmp_path / "file")
    assert check_output_file(tmp_path / "file", overwrite=True) == tmp_path / "file"
    with pytest.raises(IsADirectoryError):
        check_output_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        check_output_file(tmp_path / "missing" / "r.html")
    with pytest.raises(NotADirectoryError):
        check_output_file(tmp_path / "file" / "r.html")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    with pytest.raises(NotADirectoryError):
        check_output_dir(tmp_path / "file" / "sub")
    assert not (tmp_path / "new").exists()  # checks create nothing


def test_tracker_removes_only_what_the_run_created(tmp_path):
    (tmp_path / "existing").mkdir()
    with pytest.raises(RuntimeError), OutputTracker() as out:
        folder = out.mkdir(tmp_path / "existing" / "new" / "files")
        out.add(atomic_write(folder / "a.png", b"png"))
        raise RuntimeError("the model failed")
    assert os.listdir(tmp_path) == ["existing"] and os.listdir(tmp_path / "existing") == []
    with OutputTracker() as out:
        out.add(atomic_write(out.mkdir(tmp_path / "kept") / "a.png", b"png"))
    assert (tmp_path / "kept" / "a.png").exists()


def test_streaming_writer(tmp_path):
    from attnkit.io.atomic import atomic_file

    with atomic_file(tmp_path / "s.jsonl") as tmp, open(tmp, "w") as f:
        f.write("one\n")
    assert (tmp_path / "s.jsonl").read_text() == "one\n"
    with pytest.raises(FileExistsError):
        atomic_file(tmp_path / "s.jsonl").__enter__()
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "s.jsonl", overwrite=True) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert (tmp_path / "s.jsonl").read_text() == "one\n" and os.listdir(tmp_path) == ["s.jsonl"]
