"""Atomic, no-clobber file writes for everything :mod:`attnkit.explain` saves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = False, who: str = "write") -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write; the temporary file is
    removed if anything fails.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        FileNotFoundError: the parent directory does not exist.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{who}: {str(path)!r} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{who}: directory {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        if overwrite:
            os.replace(tmp, path)
        else:  # link fails if the path appeared meanwhile: never clobber, even in a race
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{who}: {str(path)!r} exists; pass overwrite=True to replace it") from None
            except OSError:  # no hard links on this file system: check, then replace (a tiny race window)
                if path.exists():
                    raise FileExistsError(f"{who}: {str(path)!r} exists; pass overwrite=True to replace it") from None
                os.replace(tmp, path)
            if os.path.exists(tmp):
                os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
