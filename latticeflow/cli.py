"""The ``latticeflow`` command.

Exit codes: 0 success; 1 unexpected internal error (a bug: please report it); 2 bad input
(missing or malformed file, invalid option or parameter, refused overwrite, unusable output
folder); 130 interrupted (Ctrl-C; whatever was complete has been written).

Every error is printed as one line ``latticeflow COMMAND: error: MESSAGE`` on stderr. Messages
go through the ``latticeflow`` logger (stderr): ``-q`` keeps warnings and errors only, ``-v``
adds debug output. Progress bars are drawn only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from latticeflow import __version__
from latticeflow.base.console import StderrHandler, install_stderr_handler, one_line
from latticeflow.base.errors import (  # noqa: F401 (the exit codes are the command's too)
    EXIT_BUG,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    LatticeflowError,
)

COMMANDS = ("run", "train", "sample", "hmc", "info", "bench")


log = logging.getLogger("latticeflow")

_EPILOG = """\
exit codes:
  0    success
  1    internal error (a bug: please report it)
  2    bad input: missing or malformed file, invalid option or parameter, refused overwrite
       (use --force), unusable output folder; the problem is printed as one line
  130  interrupted (Ctrl-C): completed work is kept and can be resumed (--resume)

examples:
  latticeflow run runs/quickstart.toml
  latticeflow -q hmc actions/u1_beta2.toml --lattice 8x8 --n 1000 --out u1.h5
  latticeflow info runs/quickstart/nmcmc.h5

Run 'latticeflow COMMAND --help' for the options and examples of a command."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (``PROG: error: MESSAGE (see PROG --help)``),
    exit code 2. Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT, f"{self.prog}: error: {one_line(message)} "
                              f"(see '{self.prog} --help')\n")


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (global options take no values, so it is the first
    word that is not an option), or None."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. With ``argv`` naming a command, only that command's module is
    imported (start-up time); otherwise all commands are registered."""
    parser = ArgumentParser(
        prog="latticeflow",
        description="Train normalizing-flow samplers for lattice field theories, generate "
                    "HDF5 ensembles and analyse them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"latticeflow {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _command_in(argv) if argv is not None else None
    if argv is not None and chosen is None and "--version" in argv:
        return parser  # answered while parsing; importing the commands would only cost time
    for name in (chosen,) if chosen else COMMANDS:
        module = importlib.import_module(f"latticeflow.commands.{name}")
        module.register(sub)
    return parser


def setup_logging(level: int) -> None:
    """Messages of the ``latticeflow`` logger at ``level`` and above to stderr, bare.

    The handler sits on the root logger (where ``tqdm.contrib.logging`` redirects it around
    progress bars); other libraries keep the root's level (warnings), so ``-v`` adds only
    latticeflow's debug messages."""
    install_stderr_handler("%(message)s")
    log.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv) or "latticeflow"
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        setup_logging(logging.WARNING if args.quiet else
                      logging.DEBUG if args.verbose else logging.INFO)
        return int(args.handler(args) or EXIT_OK)
    except (LatticeflowError, OSError) as exc:
        # OSError: a file or folder the system refused (permissions, not a directory, disk
        # full, ...): the user's to fix, not a bug.
        _error(f"latticeflow {command}: error: {one_line(exc)}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        _error(f"latticeflow {command}: interrupted; completed work has been kept")
        return EXIT_INTERRUPTED


def _error(line: str) -> None:
    if any(isinstance(h, StderrHandler) for h in logging.getLogger().handlers):
        log.error(line)
    else:  # before logging was set up (e.g. Ctrl-C while starting)
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
