"""The driver that runs any sampler into an ensemble file, chunk by chunk, resumably.

Sampler protocol
----------------
``advance(k) -> dict[str, np.ndarray]``
    the next k rows, keyed by the ensemble's row dataset names (``configs`` ``(k, *field_shape)``,
    ``action``, ``accepted``, ... see :mod:`latticeflow.ensemble`).
``state_dict() -> dict[str, np.ndarray]``
    everything needed to continue *exactly* after the last row returned (RNG state included).
``load_state_dict(state)``
    the inverse: a fresh sampler (same parameters and seed) loaded with a state continues
    bit-for-bit like the sampler the state was taken from.
``rows_emitted: int`` (optional)
    rows returned so far; when present, :func:`run_chain` checks it against the file.
``attributes() -> dict`` (optional)
    root attributes describing the run so far (e.g. proposal diagnostics); when present,
    :func:`run_chain` writes them after every committed chunk.

Interruption: :func:`run_chain` catches ``KeyboardInterrupt``, stops after the last committed
chunk and *returns* ``ChainResult(interrupted=True)``; the file is valid and can be resumed. A
SIGINT that arrives while a chunk is being written is held back until the chunk is committed.
After an interruption the sampler object may be ahead of the file: to continue, reload it from
the file (:func:`load_resume_state`). A CLI should exit with status 130 when interrupted.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tqdm import tqdm

from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import EnsembleWriter


class Sampler(Protocol):
    """What :func:`run_chain` needs from a sampler (see the module docstring)."""

    def advance(self, k: int) -> dict[str, np.ndarray]: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...


@dataclass(frozen=True)
class ChainResult:
    """Outcome of :func:`run_chain`: rows in the file now, rows added, whether interrupted."""

    n_complete: int
    n_added: int
    interrupted: bool


def load_resume_state(sampler: Sampler, writer: EnsembleWriter) -> bool:
    """Load the writer's stored resume state into ``sampler``; False when there is none yet
    (no committed rows: the sampler starts from its seed)."""
    state = writer.resume_state()
    if state is None:
        return False
    sampler.load_state_dict(state)
    return True


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back SIGINT inside the block; deliver it (as the old handler would) afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def run_chain(sampler: Sampler, writer: EnsembleWriter, n_rows: int, chunk_rows: int,
              progress: bool = True) -> ChainResult:
    """Advance ``sampler`` until ``writer`` holds ``n_rows`` rows in total, committing
    ``chunk_rows`` rows (and the sampler state) at a time.

    For a resumed file, load the sampler first (:func:`load_resume_state`). The progress bar
    goes to stderr and is shown only when ``progress`` and stderr is a terminal.
    """
    if chunk_rows < 1:
        raise LatticeflowError(f"chunk_rows must be >= 1, got {chunk_rows}")
    emitted = getattr(sampler, "rows_emitted", None)
    if emitted is not None and emitted != writer.n_complete:
        raise LatticeflowError(
            f"{writer.path}: the sampler has produced {emitted} rows but the file holds "
            f"{writer.n_complete}; load the file's resume state into the sampler first")
    start = writer.n_complete
    bar = tqdm(total=max(n_rows, start), initial=start, unit="row", dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    n_accepted = 0
    interrupted = False
    try:
        while writer.n_complete < n_rows:
            k = min(chunk_rows, n_rows - writer.n_complete)
            rows = sampler.advance(k)
            with _sigint_deferred():
                writer.append(rows, sampler.state_dict())
                if hasattr(sampler, "attributes"):
                    writer.set_attributes(**sampler.attributes())
            n_accepted += int(np.count_nonzero(rows["accepted"]))
            bar.update(k)
            bar.set_postfix(acc=f"{n_accepted / (writer.n_complete - start):.3f}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    return ChainResult(writer.n_complete, writer.n_complete - start, interrupted)
