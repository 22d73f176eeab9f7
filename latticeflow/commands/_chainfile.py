"""The output options the sampling commands share (the run itself is in
:mod:`latticeflow.workflows.chainfile`)."""

from __future__ import annotations

import argparse


def add_output_options(parser: argparse.ArgumentParser, defaults_from: str | None = None,
                       default_chunk: int = 100) -> None:
    """--n (alias --rows), --chunk, --resume, --force; with ``defaults_from``, --n and --chunk
    default to the values named there (resolved by the command) instead of --n being required.

    --rows is the spelling for launchers that parse abbreviations of their own options
    (``torchrun`` reads ``--n`` as an ambiguous prefix of ``--nnodes``/``--nproc-per-node``).
    """
    rows = ("--n", "--rows")
    if defaults_from:
        parser.add_argument(*rows, dest="n", type=int,
                            help=f"rows in total (default: {defaults_from}); spell it --rows "
                                 f"under torchrun")
        parser.add_argument("--chunk", type=int,
                            help=f"rows per committed chunk (default: {defaults_from})")
    else:
        parser.add_argument(*rows, dest="n", type=int, required=True, help="rows in total")
        parser.add_argument("--chunk", type=int, default=default_chunk,
                            help=f"rows per committed chunk (default {default_chunk})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted file up to --n rows (same seed and settings)")
    mode.add_argument("--force", action="store_true", help="overwrite an existing output file")
