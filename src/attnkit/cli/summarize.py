"""``attnkit summarize``: an extractive summary keeping the sentences that receive the most attention."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from attnkit.cli.checks import add_strict
from attnkit.cli.registry import UserError, subcommand

MAX_BYTES = 10_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="a UTF-8 text file")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of sentences to keep (default 0.1)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--window", type=int, default=256, help="tokens per model window (default 256)")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=MAX_BYTES,
        help=f"refuse larger files (default {MAX_BYTES:,}: about 2,500 windows of 256 tokens)",
    )
    add_strict(parser)


def read_text(path: Path, max_bytes: int) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes`` bytes (FIFOs and devices refused unread)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot open it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: not a regular file (a directory, FIFO or device); pass a text file")
    if info.st_size > max_bytes:
        raise UserError(f"{path}: {info.st_size:,} bytes is above --max-bytes {max_bytes:,}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > max_bytes:  # the file grew after the check
        raise UserError(f"{path}: more than --max-bytes {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({exc})") from None


def _progress_bar():
    """``(callback, close)`` showing windows done on stderr with tqdm (plain lines without it)."""
    state = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            try:
                from tqdm import tqdm
            except ImportError:  # tqdm is in the demo extra
                state["bar"] = None
            else:
                state["bar"] = tqdm(total=total, desc="summarize", unit="window", file=sys.stderr, leave=False)
        bar = state["bar"]
        if bar is None:
            if done == total or done % 100 < 8:
                print(f"... {done}/{total} windows", file=sys.stderr, flush=True)
        else:
            bar.update(done - bar.n)

    def close() -> None:
        if state.get("bar") is not None:
            state["bar"].close()

    return update, close


def run(args: argparse.Namespace) -> int:
    from attnkit.cli.explain_text import load
    from attnkit.text.summarize import summarize

    if not 0 < args.ratio <= 1:
        raise UserError(f"--ratio must lie in (0, 1], got {args.ratio}")
    if args.max_bytes < 1:
        raise UserError(f"--max-bytes must be at least 1, got {args.max_bytes}")
    if args.window < 8:
        raise UserError(f"--window must be at least 8, got {args.window}")
    text = read_text(args.file, args.max_bytes)
    if not text.strip():
        raise UserError(f"{args.file}: the file is empty")
    tm = load(args.model, strict=args.strict)
    update, close = _progress_bar()
    try:
        result = summarize(tm, text, ratio=args.ratio, max_tokens=args.window, progress=update)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    finally:
        close()
    print(result.text)
    print(
        f"\n[{len(result.selected)} of {len(result.sentences)} sentences, {result.num_windows} model window(s); "
        "kept: the sentences receiving the most attention rollout]"
    )
    return 0


subcommand("summarize", "extractive summary: keep the sentences that receive the most attention")(add_arguments, run)
