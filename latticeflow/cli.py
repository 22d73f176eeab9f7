"""The ``latticeflow`` command.

Exit codes: 0 success; 1 unexpected internal error (a bug: please report it); 2 bad input
(missing or malformed file, invalid option or parameter, refused overwrite); 130 interrupted
(Ctrl-C; whatever was complete has been written).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from latticeflow import __version__
from latticeflow.errors import LatticeflowError

COMMANDS = ("run", "train", "sample", "hmc", "info", "bench")

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger("latticeflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latticeflow",
        description="Train normalizing-flow samplers for lattice field theories, generate "
                    "HDF5 ensembles and analyse them.",
        epilog="Run 'latticeflow COMMAND --help' for the options and examples of a command.",
    )
    parser.add_argument("--version", action="version", version=f"latticeflow {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"latticeflow.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.handler(args) or EXIT_OK)
    except LatticeflowError as exc:
        log.error("latticeflow %s: error: %s", args.command, exc)
        return EXIT_INPUT
    except KeyboardInterrupt:
        log.error("latticeflow %s: interrupted; completed work has been kept", args.command)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
