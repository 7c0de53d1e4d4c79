"""``attnkit summarize``: an extractive summary keeping the sentences that receive the most attention."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnkit.cli.registry import UserError, subcommand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="a UTF-8 text file")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of sentences to keep (default 0.1)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--window", type=int, default=256, help="tokens per model window (default 256)")


def run(args: argparse.Namespace) -> int:
    from attnkit.cli.explain_text import load
    from attnkit.text.summarize import summarize

    if not 0 < args.ratio <= 1:
        raise UserError(f"--ratio must lie in (0, 1], got {args.ratio}")
    try:
        text = args.file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{args.file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{args.file}: cannot read it as UTF-8 text ({exc})") from None
    if not text.strip():
        raise UserError(f"{args.file}: the file is empty")
    tm = load(args.model)
    try:
        result = summarize(tm, text, ratio=args.ratio, max_tokens=args.window)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(result.text)
    print(
        f"\n[{len(result.selected)} of {len(result.sentences)} sentences, {result.num_windows} model window(s); "
        "kept: the sentences receiving the most attention rollout]"
    )
    return 0


subcommand("summarize", "extractive summary: keep the sentences that receive the most attention")(add_arguments, run)
