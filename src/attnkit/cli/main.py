"""``attnkit`` command-line entry point: parse, dispatch to a subcommand, turn user errors into exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

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


def main(argv: list[str] | None = None) -> int:
    """Run the ``attnkit`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"attnkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `attnkit summarize doc.txt | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
