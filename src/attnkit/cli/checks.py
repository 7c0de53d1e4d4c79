"""What every subcommand checks before any work (output paths, as one-line user errors) and shared options."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnkit.cli.registry import UserError


def check_out_file(path: Path | None, *, overwrite: bool, option: str = "--out") -> Path | None:
    """Refuse (exit 2) an output file that exists without ``--overwrite``, is a directory, or whose folder is
    missing, not a folder or read-only. ``None`` (no output asked for) passes."""
    from attnkit.io.atomic import check_output_file

    if path is None:
        return None
    try:
        return check_output_file(path, overwrite=overwrite, what=option)
    except OSError as exc:
        raise UserError(str(exc).replace("overwrite (--overwrite)", "--overwrite")) from None


def check_out_dir(path: Path, *, option: str = "--out") -> Path:
    """Refuse (exit 2) an output folder that is a file, or cannot be created or written."""
    from attnkit.io.atomic import check_output_dir

    try:
        return check_output_dir(path, what=option)
    except OSError as exc:
        raise UserError(str(exc)) from None


def add_strict(parser: argparse.ArgumentParser) -> None:
    """``--strict``: refuse checkpoints whose weights hold NaN or inf (default: a warning)."""
    parser.add_argument("--strict", action="store_true", help="refuse weights holding NaN or inf (default: warn)")


def nonfinite_policy(args: argparse.Namespace) -> str:
    """The loaders' ``nonfinite`` argument for ``--strict``."""
    return "error" if getattr(args, "strict", False) else "warn"
