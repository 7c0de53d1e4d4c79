"""Subcommand registry for the ``attnkit`` command.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int`` and registers them with
:func:`subcommand`. User mistakes raise :class:`UserError`; ``main`` prints them as one line and exits 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SUBCOMMANDS", "Subcommand", "UserError", "subcommand"]


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as ``attnkit <cmd>: error: <message>``, exit 2."""


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str):
    """Class-free decorator: ``@subcommand("bench", "...")`` on ``add_arguments``; ``run`` is found by name.

    Usage::

        def add_arguments(parser): ...
        def run(args): ...
        subcommand("bench", "time backends")(add_arguments, run)
    """

    def register(add_arguments, run) -> Subcommand:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)
        return SUBCOMMANDS[name]

    return register
