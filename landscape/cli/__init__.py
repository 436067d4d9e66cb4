"""The ``landscape`` command line: ``landscape --help`` lists the commands; each has ``--help``.

One parser, built from an explicit list of command modules (:data:`COMMAND_MODULES`), each exposing
``COMMANDS`` (:class:`~landscape.cli.common.Command`); the flags they share are declared once in
:mod:`landscape.cli.common`. Every command is a thin entry point over library calls.
"""

from __future__ import annotations

import argparse
import sys

from landscape.cli import compare, evaluate, interop, quantize, scan, show, spectrum
from landscape.cli.errors import DEBUG_FLAG, run_guarded, split_debug

COMMAND_MODULES = (evaluate, quantize, interop, scan, compare, spectrum, show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="landscape", description=__doc__.splitlines()[0])
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the traceback of a failure (anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        for command in module.COMMANDS:
            p = sub.add_parser(command.name, help=command.help, description=command.help)
            command.add_arguments(p)
            p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; failures become one ``error:`` line (:mod:`landscape.cli.errors`)."""
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a fanned-out sweep's jobs run again, on their shards
    return run_guarded(lambda: args.func(args), "landscape", argv, debug, resumable=hasattr(args, "resume"))
