"""``attnkit`` command-line entry point: parse, dispatch to a subcommand, turn user errors into exit 2."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

from attnkit.cli.registry import SUBCOMMANDS, UserError

#: Subcommand modules, imported lazily so ``attnkit --help`` stays fast and optional extras stay optional.
MODULES = ("demo", "explain_text", "explain_image", "summarize", "bench", "ablate", "detect", "serve")


def _load_subcommands() -> None:
    for name in MODULES:
        try:
            importlib.import_module(f"attnkit.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"attnkit.cli.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_subcommands()
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="Attention for PyTorch: explain models, summarize text, benchmark backends.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run, _parser=p)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised like ``KeyboardInterrupt`` so that ``finally`` blocks remove temporary files."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_exception():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse text arguments that are not valid UTF-8 (the shell passes bytes; Python keeps bad ones as
    surrogates, which tokenizers and reports cannot use). File paths (``Path`` values) may hold any bytes."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    option = name if name in ("text", "images", "file") else "--" + name.replace("_", "-")
                    raise UserError(f"{option}: {shown!r} is not valid UTF-8 text") from None


def _one_line(message: str) -> str:
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Run the ``attnkit`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_as_exception():
            _check_text_arguments(args)
            return int(args._run(args) or 0)
    except UserError as exc:
        print(f"attnkit {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"attnkit {args.command}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # e.g. `attnkit summarize doc.txt | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
