"""Running a sampler into an ensemble file: open it (new, replaced or resumed, see
:func:`~latticeflow.ensemble.output.open_output`), continue the sampler from the file's resume
state, run until the file holds ``n`` rows and report. Shared by the neural-MCMC and HMC
workflows, for the command line and the Python API alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import EnsembleWriter
from latticeflow.ensemble.output import check_seed, open_output
from latticeflow.samplers.chain import ChainResult, Sampler, load_resume_state, run_chain

log = logging.getLogger("latticeflow")

#: The header fields (:class:`~latticeflow.ensemble.EnsembleMetadata` names) a resumed file
#: can be checked against, with the :meth:`EnsembleWriter.create` argument each comes from.
HEADER_FIELDS = {"theory": "theory", "action_params": "action_card", "lattice": "lattice",
                 "sampler": "sampler", "seed": "seed", "sampler_params": "sampler_params",
                 "checkpoint_sha256": "checkpoint_sha256"}

#: How the command line names the settings in its messages (the Python API uses the names).
OPTION_NAMES = {"n": "--n", "chunk": "--chunk", "seed": "--seed", "batch_size": "--batch-size",
                "chains": "--chains", "lattice": "--lattice"}


@dataclass(frozen=True)
class ChainRun:
    """A sampling run's outcome: the file, its rows now, the rows this run added, and whether
    it was interrupted (Ctrl-C; the file holds every complete chunk, continue with resume)."""

    path: Path
    n_complete: int
    n_added: int
    interrupted: bool


def setting_name(names: Mapping[str, str], name: str) -> str:
    """How a setting is called in messages: ``names[name]``, or ``name`` itself."""
    return names.get(name, name)


def check_count(names: Mapping[str, str], name: str, value: object) -> None:
    """A count setting is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LatticeflowError(f"{setting_name(names, name)} must be a positive integer, "
                               f"got {value!r}")


def check_output(names: Mapping[str, str], n: int, chunk: int, seed: object) -> None:
    """The settings every sampling run has: rows ``n``, rows per chunk, seed."""
    check_count(names, "n", n)
    check_count(names, "chunk", chunk)
    check_seed(seed, setting_name(names, "seed"))


def open_chain_file(path: Path, header: dict[str, Any], chunk: int, *, resume: bool,
                    force: bool, resume_checks: tuple[str, ...]) -> EnsembleWriter:
    """The writer of ``path`` for a run with ``header``; a resumed file must match the header
    in the fields ``resume_checks`` (checked in that order)."""
    expected = {key: header.get(HEADER_FIELDS[key], "") for key in resume_checks}
    return open_output(path, resume, force, header, chunk, expected)


def run_to_file(sampler: Sampler, writer: EnsembleWriter, n: int, chunk: int, *,
                report: bool = True, summary: Callable[[ChainResult], str] | None = None
                ) -> ChainRun:
    """Run ``sampler`` into ``writer`` until it holds ``n`` rows, continuing from the file's
    resume state, and close it. ``report``: a progress bar and log lines (with ``summary`` of
    the run); without it the run is silent."""
    with writer:
        if writer.n_complete >= n:
            if report:
                log.info("%s already holds %d rows (>= --n %d); nothing to do", writer.path,
                         writer.n_complete, n)
            return ChainRun(Path(writer.path), writer.n_complete, 0, False)
        if load_resume_state(sampler, writer) and report:
            log.info("resuming %s at row %d", writer.path, writer.n_complete)
        result = run_chain(sampler, writer, n, chunk, progress=report)
    if report:
        described = "" if summary is None else f"; {summary(result)}"
        if result.interrupted:
            log.warning("interrupted: %d complete rows are in %s (%d new%s); continue with "
                        "--resume", result.n_complete, writer.path, result.n_added, described)
        else:
            log.info("%s: %d rows (%d new)%s", writer.path, result.n_complete, result.n_added,
                     described)
    return ChainRun(Path(writer.path), result.n_complete, result.n_added, result.interrupted)


__all__ = ["HEADER_FIELDS", "OPTION_NAMES", "ChainRun", "check_count", "check_output",
           "open_chain_file", "run_to_file", "setting_name"]
