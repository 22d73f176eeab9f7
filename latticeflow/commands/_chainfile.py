"""Shared plumbing of the sampling commands: open (or resume) the output file, run, report."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from latticeflow.cli import EXIT_INTERRUPTED, EXIT_OK
from latticeflow.ensemble import EnsembleWriter
from latticeflow.errors import LatticeflowError
from latticeflow.samplers.chain import ChainResult, load_resume_state, run_chain

log = logging.getLogger("latticeflow")


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


def check_counts(args: argparse.Namespace) -> None:
    for name in ("n", "chunk"):
        if getattr(args, name) < 1:
            raise LatticeflowError(f"--{name} must be a positive integer, "
                                   f"got {getattr(args, name)}")


def run_to_file(sampler: Any, writer: EnsembleWriter, n: int, chunk: int,
                summary: Callable[[ChainResult], str]) -> int:
    """Run ``sampler`` into ``writer`` until it holds ``n`` rows; log a summary line."""
    with writer:
        if writer.n_complete >= n:
            log.info("%s already holds %d rows (>= --n %d); nothing to do", writer.path,
                     writer.n_complete, n)
            return EXIT_OK
        if load_resume_state(sampler, writer):
            log.info("resuming %s at row %d", writer.path, writer.n_complete)
        result = run_chain(sampler, writer, n, chunk)
    if result.interrupted:
        log.warning("interrupted: %d complete rows are in %s (%d new; %s); continue with "
                    "--resume", result.n_complete, writer.path, result.n_added, summary(result))
        return EXIT_INTERRUPTED
    log.info("%s: %d rows (%d new); %s", writer.path, result.n_complete, result.n_added,
             summary(result))
    return EXIT_OK
