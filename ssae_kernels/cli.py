"""The ``ssae`` command: one subcommand per pipeline (``ssae_kernels.recipes.PIPELINES``).

A user mistake ends in one line, ``ssae <command>: error: ...``, and exit status 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from . import __version__
from .recipes import PIPELINES
from .recipes.common import UsageError

# Exceptions that report a problem with the inputs, files or environment rather than a bug here.
USER_ERRORS = (UsageError, ValueError, OSError, ImportError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssae", description="Sparse autoencoders on fused kernels")
    parser.add_argument("--version", action="version", version=f"ssae-kernels {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in PIPELINES:
        importlib.import_module(f".recipes.{name}", __package__).add_subcommands(sub)
    for command in sub.choices.values():  # also after the subcommand; SUPPRESS keeps `ssae --debug cmd` working
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except KeyboardInterrupt as stop:
        print(f"ssae {args.command}: interrupted: {stop}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure ends in one line unless --debug
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, USER_ERRORS):
            print(f"ssae {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(f"ssae {args.command}: internal error: {type(error).__name__}: {message} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
