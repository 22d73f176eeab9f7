"""Read-only access to ensemble files: :class:`EnsembleReader` (arrays cut to ``n_complete``
rows, read under the shared commit lock, see "Locking" in :mod:`latticeflow.ensemble.storage`)
and :func:`read_ensemble` (a whole file into memory).
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from latticeflow.base.locking import FileLock, lock_same_file
from latticeflow.ensemble.layout import Ensemble, EnsembleMetadata, read_metadata
from latticeflow.ensemble.storage import WRITING, file_error, file_key, open_h5


class EnsembleReader:
    """Read-only access to an ensemble; arrays are cut to ``n_complete`` rows.

    ``with EnsembleReader(path) as r: x = r.read("configs", 0, 100)``.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = path
        self._lock = _reading_lock(path)
        try:
            # HDF5's own lock would refuse a file being written; the commit lock guards instead.
            self._file = open_h5(path, "r", locking=self._lock is None)
        except BaseException:
            if self._lock is not None:
                self._lock.close()
            raise
        try:
            self.metadata: EnsembleMetadata = read_metadata(self._file, path)
        except BaseException:
            self.close()
            raise

    @property
    def attrs(self) -> h5py.AttributeManager:
        """The file's root attributes, as h5py reads them (for extras beyond the schema's)."""
        return self._file.attrs

    @property
    def writer_pid(self) -> int | None:
        """The pid of the latticeflow process writing the file now (None: none, or this one)."""
        return None if self._lock is None else self._lock.holder_pid()

    @property
    def n_complete(self) -> int:
        return self.metadata.n_complete

    @property
    def datasets(self) -> tuple[str, ...]:
        return self.metadata.datasets

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` of dataset ``name`` (``stop`` defaults to and is clipped at
        ``n_complete``)."""
        if name not in self.metadata.datasets:
            raise KeyError(f"{self._path}: no row dataset {name!r} "
                           f"(have {', '.join(self.metadata.datasets)})")
        stop = self.n_complete if stop is None else min(stop, self.n_complete)
        try:
            return self._file[name][start:stop]
        except OSError as exc:
            raise file_error(self._path, f"corrupt ensemble: cannot read /{name}: {exc}") from None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.read(name)

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()
        if self._lock is not None:
            self._lock.close()

    def __enter__(self) -> EnsembleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _OwnWrite(Exception):
    """This process writes the file it is about to read."""


def _acquire_reading(lock: FileLock) -> None:
    if file_key(lock.fd) in WRITING:
        raise _OwnWrite
    lock.acquire_reading()


def _reading_lock(path: str | os.PathLike) -> FileLock | None:
    """A reader's shared commit lock on ``path`` (see "Locking" in
    :mod:`latticeflow.ensemble.storage`); None when this process
    writes the file itself (then HDF5 shares the writer's open file)."""
    try:
        return lock_same_file(path, False, _acquire_reading)
    except FileNotFoundError:
        raise file_error(path, "no such ensemble file") from None
    except _OwnWrite:
        return None


def read_ensemble(path: str | os.PathLike) -> Ensemble:
    """Read a whole ensemble (metadata and all row datasets, ``n_complete`` rows) into memory."""
    with EnsembleReader(path) as reader:
        data = {name: reader.read(name) for name in reader.datasets}
        return Ensemble(reader.metadata, data)
