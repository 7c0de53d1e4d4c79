"""Atomic, no-clobber file writes, and the checks a command runs on its output paths before any work.

:func:`atomic_write` is the one writer every attnkit report, figure and table goes through: the data goes to a
temporary file in the target's directory, is flushed to disk (``fsync``), and then appears under its name in one
step. Without ``overwrite`` the final step is ``os.link``, which fails if the name exists — so an existing file
is never replaced, even when another process creates it between the check and the write. Readers never see a
partial file; the temporary file is removed on any error, including ``KeyboardInterrupt`` (and ``SIGTERM`` in the
``attnkit`` command, which turns it into an exception).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OutputTracker", "atomic_file", "atomic_write", "check_output_dir", "check_output_file"]

_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Path:
    """Check that ``path`` can be written as a new file (or replaced, with ``overwrite``), before any work.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        IsADirectoryError: ``path`` is a directory.
        FileNotFoundError: its parent directory does not exist.
        NotADirectoryError: its parent is not a directory.
        PermissionError: its parent directory is not writable.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory; expected a file name")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{what} {str(path)!r} exists; pass overwrite (--overwrite) to replace it")
    if not parent.exists():
        raise FileNotFoundError(f"{what} {str(path)!r}: directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r}: {str(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(path)!r}: directory {str(parent)!r} is not writable")
    return path


def check_output_dir(path: str | os.PathLike, *, what: str = "output directory") -> Path:
    """Check that ``path`` is a writable directory, or can be created (its nearest existing ancestor is a
    writable directory), before any work.

    Raises:
        NotADirectoryError: ``path`` (or an ancestor) exists and is not a directory.
        PermissionError: the directory (or the ancestor it would be created in) is not writable.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r}: {str(probe)!r} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(path)!r}: {str(probe)!r} is not writable")
    return path


def _commit(tmp: str, path: Path, overwrite: bool, exists: FileExistsError) -> None:
    """Give the synced temporary file ``tmp`` the name ``path``: ``os.replace`` with ``overwrite``, else a hard link
    (fails if the name exists), else an ``O_EXCL`` reservation then ``os.replace`` (no hard links here)."""
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise exists from None
        except OSError as err:
            if err.errno not in _NO_LINKS:
                raise
            try:  # reserve the name (fails if it exists), then move the data over the placeholder
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                raise exists from None
            os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_target(path: Path, overwrite: bool, who: str) -> FileExistsError:
    """Refuse a directory, an existing file without ``overwrite``, or a missing parent; return the error to raise
    should the name appear before the write is committed."""
    exists = FileExistsError(f"{who}: {str(path)!r} exists; pass overwrite=True to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"{who}: {str(path)!r} is a directory")
    if os.path.lexists(path) and not overwrite:
        raise exists
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{who}: directory {str(path.parent)!r} does not exist")
    return exists


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = False, who: str = "write") -> Iterator[Path]:
    """Context manager for writers that need a file name (streams, Parquet, safetensors): yields a temporary path
    in the target's directory; on a normal exit the file is ``fsync``-ed and given its name exactly as
    :func:`atomic_write` does; on an exception (``KeyboardInterrupt`` included) it is removed.

    Example::

        with atomic_file("records.jsonl") as tmp, open(tmp, "w") as f:
            f.write(...)

    Raises:
        FileExistsError, IsADirectoryError, FileNotFoundError: as :func:`atomic_write` (checked on entry, and
            again when the file gets its name).
    """
    path = Path(path)
    exists = _check_target(path, overwrite, who)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path, overwrite, exists)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, overwrite: bool = False, who: str = "write") -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``path`` atomically, never replacing an existing file unless
    ``overwrite``.

    The data is written to a temporary file in the same directory and ``fsync``-ed; then ``os.link`` gives it its
    name (fails if the name exists: race-free no-clobber) or, with ``overwrite``, ``os.replace`` swaps it in. On
    file systems without hard links the name is first reserved with ``O_CREAT | O_EXCL`` and then replaced.

    Args:
        path: the file to write.
        data: its content.
        overwrite: replace an existing file.
        who: how to name the caller in error messages.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``path`` exists (or appears meanwhile) and ``overwrite`` is False.
        IsADirectoryError: ``path`` is a directory.
        FileNotFoundError: the parent directory does not exist.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    exists = _check_target(path, overwrite, who)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path, overwrite, exists)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


class OutputTracker:
    """Remembers the files and directories a command creates, to remove them if the command fails.

    Example::

        with OutputTracker() as out:
            folder = out.mkdir(Path("report_files"))
            out.add(atomic_write(folder / "a.png", png))
        # an exception inside the block removes a.png and report_files/ (only what was created here)
    """

    def __init__(self) -> None:
        self.created: list[Path] = []

    def add(self, path: Path) -> Path:
        """Record a file this command created."""
        self.created.append(Path(path))
        return Path(path)

    def mkdir(self, path: Path) -> Path:
        """Create ``path`` (and missing parents), recording each directory that did not exist."""
        path = Path(path)
        missing = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True, exist_ok=True)
        self.created += reversed(missing)
        return path

    def cleanup(self) -> None:
        """Remove what was recorded, newest first (directories only if now empty)."""
        for p in reversed(self.created):
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    p.rmdir()
                else:
                    p.unlink()
        self.created.clear()

    def __enter__(self) -> OutputTracker:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.cleanup()
