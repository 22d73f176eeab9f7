"""Opening an ensemble file for a sampling run: new, replaced or resumed, with the checks that
keep a user's file safe (an existing file is never overwritten unasked, a file another process
writes is left alone, a file is resumed only by the run that wrote it). Used by the sampling
commands and by the Python API alike."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from latticeflow.base.errors import LatticeflowError
from latticeflow.base.locking import refuse_if_in_use
from latticeflow.ensemble.layout import EnsembleMetadata
from latticeflow.ensemble.reader import EnsembleReader
from latticeflow.ensemble.writer import EnsembleWriter

log = logging.getLogger("latticeflow")


def check_seed(seed: object, option: str = "seed") -> None:
    """A seed is stored as an int64 and seeds torch generators: an int with 0 <= seed < 2**63."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise LatticeflowError(f"{option} must be an integer in [0, 2**63), got {seed!r}")


def check_output_folder(out: Path) -> None:
    folder = out.absolute().parent
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise LatticeflowError(f"{out}: output folder {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LatticeflowError(f"{out}: output folder {folder} is not writable")


def open_output(out: Path, resume: bool, force: bool, header: dict[str, Any], chunk: int,
                expected: Mapping[str, Any] | None = None) -> EnsembleWriter:
    """A writer for ``out``: resumed (``resume``), replaced (``force``) or new (refuses an
    existing file otherwise).

    ``expected``: header fields (:class:`EnsembleMetadata` names) that a file to be resumed
    must match; they are checked read-only, before the file is opened for writing. A file that
    another latticeflow process is writing is refused first, whatever the mode
    (:class:`~latticeflow.base.locking.InUseError`), and left untouched.
    """
    check_output_folder(out)
    if out.is_dir():
        raise LatticeflowError(f"{out}: is a directory; give a file name for the ensemble")
    if out.exists():
        refuse_if_in_use(out)
    if resume:
        if not out.exists():
            raise LatticeflowError(f"{out}: nothing to resume (no such file)")
        if expected:
            with EnsembleReader(out) as reader:
                problem = metadata_mismatch(reader.metadata, expected)
            if problem:
                raise LatticeflowError(f"{out}: cannot resume: {problem}")
        log.debug("resuming %s", out)
        return EnsembleWriter.resume(out)
    if out.exists() and not force:
        raise LatticeflowError(f"{out}: already exists; use --resume to continue it or --force "
                               "to overwrite it")
    log.debug("%s %s (chunks of %d rows)", "replacing" if out.exists() else "creating", out,
              chunk)
    return EnsembleWriter.create(out, chunk_rows=chunk, force=force, **header)


def metadata_mismatch(metadata: EnsembleMetadata, expected: dict[str, Any]) -> str | None:
    """The first header field of a file to be resumed that differs from this run's."""
    for key, value in expected.items():
        have = getattr(metadata, key)
        if key == "lattice":
            have, value = tuple(have), tuple(value)
        if have != value:
            return f"{key} is {have!r} in the file but {value!r} for this run"
    return None
