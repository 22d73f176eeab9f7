"""Where the analysis reads its rows from, and how they split into chains and bins.

Conventions
-----------
* Input: an ensemble file (path) or an in-memory :class:`~latticeflow.ensemble.Ensemble`
  (:func:`open_rows`). With a ``/chain`` dataset the rows of chain c (``chain == c``, in file
  order) form one Markov chain; without it the whole file is one chain. ``thermalization = K``
  drops the first K rows of *every* chain; K must be smaller than the shortest chain
  (:func:`chain_layout`). Chains are independent replicas for
  :func:`~latticeflow.statistics.gamma_method` (one global mean, Γ(t) summed over replicas).
* Memory: configurations are read in chunks of about ``chunk_bytes`` (:func:`_chunk_ranges`)
  and measured with torch on the CPU in float64. Per configuration only a few scalars are kept
  (the Monte Carlo histories); the correlator spectrum |φ̃(p)|² and the Wilson-loop table are
  accumulated into at most ``max_micro_bins`` equal *micro-bins* (:class:`MicroBins`:
  consecutive kept rows of one chain; the last ``n_chain mod b`` rows of a chain are not
  binned). Jackknife bins are groups of micro-bins (:func:`jackknife_bins`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import Tensor

from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble import Ensemble, EnsembleMetadata, EnsembleReader

log = logging.getLogger(__name__)

_JACKKNIFE_BIN_TAUS = 6.0   # jackknife bins hold at least this many τ_int,max rows
_MIN_GAMMA_ROWS = 4         # gamma_method needs 4 measurements per replica


class RowSource(Protocol):
    """What the analysis reads from: an :class:`EnsembleReader` or an in-memory ensemble."""

    metadata: EnsembleMetadata

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray: ...


class _InMemoryRows:
    """:class:`RowSource` over an :class:`Ensemble` already in memory."""

    def __init__(self, ensemble: Ensemble):
        self.metadata = ensemble.metadata
        self._data = ensemble.data

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.metadata.n_complete if stop is None else min(stop, self.metadata.n_complete)
        return self._data[name][start:stop]


@contextmanager
def open_rows(source: str | os.PathLike | Ensemble) -> Iterator[RowSource]:
    """A :class:`RowSource` for a path (opened read-only, closed on exit) or an Ensemble."""
    if isinstance(source, Ensemble):
        yield _InMemoryRows(source)
        return
    with EnsembleReader(source) as reader:
        yield reader


@dataclass(frozen=True)
class ChainLayout:
    """Which file rows belong to which chain. ``rows[c]``: file-row indices of chain c in Markov
    order (all of them); ``kept[c]``: those left after dropping ``thermalization`` rows."""

    rows: list[np.ndarray]
    thermalization: int

    @property
    def kept(self) -> list[np.ndarray]:
        return [r[self.thermalization:] for r in self.rows]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(r) for r in self.rows)

    @property
    def n_kept(self) -> int:
        return sum(len(r) for r in self.kept)


def chain_layout(chain: np.ndarray | None, n_rows: int, thermalization: int,
                 where: str = "ensemble") -> ChainLayout:
    """Split ``n_rows`` file rows into chains by the ``/chain`` column (None: one chain) and
    check ``thermalization``; raises :class:`LatticeflowError` for K < 0, K ≥ the shortest
    chain, or fewer than 4 analysed rows in a chain."""
    if n_rows == 0:
        raise LatticeflowError(f"{where}: the ensemble has no complete rows")
    if thermalization < 0:
        raise LatticeflowError(f"thermalization must be >= 0, got {thermalization}")
    if chain is None:
        rows = [np.arange(n_rows)]
    else:
        chain = np.asarray(chain)
        rows = [np.flatnonzero(chain == c) for c in np.unique(chain)]
    shortest = min(len(r) for r in rows)
    per = "per chain " if len(rows) > 1 else ""
    if thermalization >= shortest:
        what = (f"the shortest of its {len(rows)} chains has {shortest} rows" if len(rows) > 1
                else f"it has {shortest} rows")
        raise LatticeflowError(f"{where}: thermalization K = {thermalization} {per}leaves no "
                               f"data ({what}; need K < N)")
    if shortest - thermalization < _MIN_GAMMA_ROWS:
        raise LatticeflowError(f"{where}: only {shortest - thermalization} rows {per}left after "
                               f"thermalization K = {thermalization}; need at least "
                               f"{_MIN_GAMMA_ROWS}")
    return ChainLayout(rows, thermalization)


def _chunk_ranges(n_rows: int, row_bytes: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)


class MicroBins:
    """Accumulates per-row vectors into equal micro-bins of ``size`` consecutive kept rows of
    one chain (micro-bins ordered chain by chain); ``means()`` gives ``(n_micro, n_cols)``."""

    def __init__(self, layout: ChainLayout, n_rows: int, n_cols: int, max_bins: int):
        self.size = max(1, math.ceil(layout.n_kept / max(1, max_bins)))
        self.index = np.full(n_rows, -1, dtype=np.int64)
        offset = 0
        for kept in layout.kept:
            n_binned = len(kept) // self.size * self.size
            self.index[kept[:n_binned]] = offset + np.arange(n_binned) // self.size
            offset += n_binned // self.size
        self.n_bins = offset
        self._sums = np.zeros((offset, n_cols))

    def add(self, start: int, values: Tensor) -> None:
        """Add the rows ``values`` (``(B, n_cols)``) that are file rows start … start+B−1."""
        index = self.index[start:start + len(values)]
        keep = index >= 0
        if keep.any():
            # numpy, not torch.index_add_: the latter's thread pool stalls for ~0.1 s per call
            # on an oversubscribed CPU
            np.add.at(self._sums, index[keep], values.numpy()[keep])

    def means(self) -> np.ndarray:
        return self._sums / self.size


def jackknife_bins(n_kept: int, n_micro: int, tau_max: float, max_bins: int) -> int:
    """Number of jackknife bins (groups of micro-bins) for ``n_kept`` rows in ``n_micro``
    micro-bins: bins of at least 6 τ_int,max rows, at most ``max_bins`` and ``n_micro``; among
    the counts from half that target up to it, the one leaving the fewest micro-bins over
    (ties: more bins). At least 2 (when ``n_micro`` ≥ 2); warns below 10."""
    tau = tau_max if math.isfinite(tau_max) and tau_max > 0 else 0.5
    target = min(max_bins, n_micro, int(n_kept // math.ceil(_JACKKNIFE_BIN_TAUS * tau)))
    if target < 10:
        log.warning("jackknife errors of the correlators use only %d bins (N = %d, "
                    "tau_int,max = %.3g): they are unreliable", max(target, 0), n_kept, tau)
    if target < 2:
        return min(2, n_micro)
    return min(range(max(2, (target + 1) // 2), target + 1),
               key=lambda n: (n_micro % n, -n))
