"""Durable commits: what an open :class:`~latticeflow.ensemble.EnsembleWriter` does
(:class:`DurableWriter`, its base class): append a chunk of rows with the sampler state after
them so that the chunk is on disk when the call returns, write the run's attributes, abandon the
file when a write fails, close it. Where a writer comes from (a new file, a resumed one):
:mod:`latticeflow.ensemble.writer`.

Crash safety (SIGKILL at any point)
-----------------------------------
:meth:`EnsembleWriter.append` (1) writes the new rows after row ``n_complete``, (2) writes the
resume state into the slot that is *not* the valid one (first marking it ``n_rows = -1``, then
its data, then its ``n_rows``), (3) flushes, (4) sets ``n_complete`` (in place, one small
metadata write) and (5) flushes again. Until step 4 reaches the disk the old ``n_complete`` and
its untouched slot describe a consistent file; afterwards the new ones do.

Durability: step 3 is an HDF5 flush followed by ``fsync``, and step 5 is a flush and an
``fsync``, so a committed chunk is on the storage device before :meth:`EnsembleWriter.append`
returns. Before each chunk the writer checks the free space (``shutil.disk_usage``) and reserves
an upper bound of what the chunk takes (every HDF5 chunk its rows begin, in full, twice the
resume state, 64 KiB for metadata) at the end of the file (``posix_fallocate``; the unused part
is cut off after the commit), so that a full disk or a file-size limit stops the run *before*
anything of the chunk is written: :class:`DiskSpaceError`, nothing changed. Should a write fail
anyway (an estimate too small, an I/O error), the writer abandons the file at once (HDF5's file
descriptor is pointed at an anonymous memory file, so that nothing more reaches the disk, not
even while closing) and raises :class:`EnsembleWriteError`; the file on disk is then what a
killed writer leaves.

What must never happen is that storage holding committed rows is rewritten. HDF5 rewrites a
*compressed* chunk that gains rows to a new place and frees the old one, and it may hand the
freed space out again at once (it shrinks the end of the file or its small-data block) while the
on-disk chunk index still points there; a kill in between (a window that opens when
``resize`` evicts the chunk from the chunk cache) leaves a chunk that fails to decompress.
Hence: compressed ``/configs`` has exactly one row per chunk, so a compressed chunk is written
once and never again; all other row datasets (and ``compression=None`` configs, whose chunk
length divides ``chunk_rows``) are uncompressed, and an uncompressed chunk is rewritten in place
with identical bytes for the committed rows. The file is created with the free-space strategy
``"none"`` (space freed by HDF5 is not tracked for reuse), and resume slots are overwritten in
place.

A flush is not atomic either. HDF5 writes the changed metadata in address order and the
superblock, which holds the end of allocation (EOA), *last*; it refuses to read anything at or
beyond the EOA of the superblock on disk ("len not positive after adjustment for EOA", "addr
overflow"). An object allocated since the last commit lies beyond that EOA, and the object that
links it (lower address, changed in place) is written before it and before the superblock: a
kill in between leaves a link that cannot be followed. Where the resume state is concerned
(once: the group ``/resume/slot1``, created by the second chunk; resuming failed in
``require_group``), this is ruled out or repaired:

* every group of ``/resume`` exists before the file is published (:meth:`EnsembleWriter.create`
  builds it under a temporary name), and the first chunk writes its state into *both* slots, so
  that later chunks create no object there while the layout of the state stays the same (an
  entry that grows past its capacity, or a changed layout, still allocates);
* :meth:`EnsembleWriter.resume` first reads all of ``/resume`` and drops the rows beyond
  ``n_complete``. Should HDF5 fail there, it abandons the handle (nothing more is written
  through it) and (a) raises the EOA in the superblock to the size of the file
  (:func:`~latticeflow.ensemble.recovery.extend_allocation`: one 48-byte write, only for a
  version 2/3 superblock whose checksum verifies; the file then holds everything the killed
  flush wrote, and the space up to the end of the file is merely never reused) and tries again;
  should that fail too (the kill came before some object was written), (b) it builds a new file
  with the committed state (root attributes, the ``n_complete`` rows, the valid slot) under a
  temporary name, which then replaces the old file. A kill meanwhile leaves the old file as it
  was (and perhaps a stale ``.NAME.PID.tmp`` next to it).

Residual risk: a flush that splits a chunk-index B-tree node of a row dataset (roughly once
every 32 HDF5 chunks) moves index entries of committed rows to new nodes. A kill after those
were written but before the superblock is repaired by (a) on resume (readers fail until then);
a kill after the node that links them but before the new nodes themselves (a few writes of one
flush) leaves committed rows unreadable, and reading and resuming fail loudly. The guarantee is
against a killed process (the OS keeps written data), not against power loss.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np

from latticeflow.base.locking import FileLock
from latticeflow.ensemble.layout import RESUME_GROUP, RESUME_SLOTS, EnsembleMetadata
from latticeflow.ensemble.resume import other_slot, read_slot, valid_slot, write_slot
from latticeflow.ensemble.storage import (
    WRITING,
    DiskSpaceError,
    EnsembleWriteError,
    file_error,
    io_reason,
)

RESERVE_MARGIN = 64 << 10       # bytes reserved for a chunk's metadata


def bytes_touched(dataset: h5py.Dataset, start: int, k: int) -> int:
    """An upper bound on the file space that writing rows ``[start, start + k)`` of a row
    dataset takes: every HDF5 chunk they begin, in full, plus its index entry (a chunk that
    already holds rows is rewritten in place)."""
    per_chunk = dataset.chunks[0]
    chunks = max(0, (start + k - 1) // per_chunk - -(-start // per_chunk) + 1)
    row = dataset.dtype.itemsize * math.prod(dataset.shape[1:])
    return chunks * (per_chunk * row + 64)


def close_without_writing(file: h5py.File) -> None:
    """Close ``file`` so that nothing more reaches the disk: HDF5's file descriptor is first
    pointed at an anonymous memory file (Linux; elsewhere HDF5 closes the file as it is)."""
    try:
        if hasattr(os, "memfd_create"):
            memory = os.memfd_create("abandoned-ensemble")
            os.dup2(memory, file.id.get_vfd_handle())
            os.close(memory)
    finally:
        try:
            file.close()
        except (OSError, RuntimeError):
            pass


class DurableWriter:
    """The open writer: queries, :meth:`append`, :meth:`set_attributes` and :meth:`close`, and
    the commit protocol behind them (see "Crash safety" above). :class:`EnsembleWriter
    <latticeflow.ensemble.EnsembleWriter>` opens the file and sets the attributes below."""

    _file: h5py.File
    _path: str | os.PathLike
    _lock: FileLock
    _key: tuple[int, int]
    _metadata: EnsembleMetadata
    _n_complete: int
    _names: tuple[str, ...]
    _handles: list[h5py.Dataset]

    # ---------------------------------------------------------------------------- queries
    @property
    def path(self) -> str:
        return str(self._path)

    @property
    def n_complete(self) -> int:
        """Number of committed rows."""
        return self._n_complete

    @property
    def metadata(self) -> EnsembleMetadata:
        """The file's header as it was when opened (``n_complete`` there is not updated)."""
        return self._metadata

    @property
    def datasets(self) -> tuple[str, ...]:
        """Names of the row datasets every :meth:`append` must provide."""
        return self._names

    def resume_state(self) -> dict[str, np.ndarray] | None:
        """The sampler state stored with the last committed chunk (None before the first)."""
        slot = self._valid_slot()
        if slot is None:
            return None
        return read_slot(self._file[RESUME_GROUP][slot])

    # ---------------------------------------------------------------------------- writing
    def append(self, rows: Mapping[str, np.ndarray], resume_state: Mapping[str, np.ndarray]
               ) -> None:
        """Commit a chunk of rows together with the sampler state after its last row.

        ``rows`` maps every name of :attr:`datasets` to an array with the same leading length
        k (``configs``: ``(k, *field_shape)``); ``resume_state`` maps names to numpy arrays.

        Durable: the chunk is on the storage device when this returns. Raises
        :class:`DiskSpaceError` (nothing written; the writer stays usable) when the chunk would
        not fit, and :class:`EnsembleWriteError` (the writer is closed) when a write fails.
        """
        k = self._check_rows(rows)
        state = {name: np.asarray(value) for name, value in resume_state.items()}
        size = (sum(bytes_touched(self._file[name], self._n_complete, k) for name in self._names)
                + 2 * sum(v.nbytes for v in state.values()) + RESERVE_MARGIN)
        what = f"rows {self._n_complete}..{self._n_complete + k - 1}"
        with self._changing(what, size):
            self._write_rows(rows, k)
            self._write_resume_state(state, self._n_complete + k)
            self._flush()
            self._commit(self._n_complete + k)

    def set_attributes(self, **attrs: Any) -> None:
        """Write extra root attributes (numbers or strings; a scalar is rewritten in place
        when it already exists with the same type) and flush. For run diagnostics such as the
        proposal summary of neural MCMC; the schema's own attributes are not to be set here."""
        with self._changing("the run's attributes", RESERVE_MARGIN):
            for name, value in attrs.items():
                self._file.attrs.modify(name, value)

    # ---------------------------------------------------------------------------- closing
    def close(self) -> None:
        """Flush and close the file and give up its ownership (idempotent)."""
        try:
            if self._file.id.valid:
                self._file.close()
        finally:
            self._release()

    def _release(self) -> None:
        WRITING.discard(self._key)
        self._lock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- commit protocol
    @contextmanager
    def _changing(self, what: str, size: int) -> Iterator[None]:
        """The frame of every change to the file: ``size`` bytes are checked and reserved
        first, the commit lock is held throughout, the reservation's unused part is cut off
        after, and a failed write abandons the file (see "Durability")."""
        if not self._file.id.valid:
            raise file_error(self._path, "the writer is closed")
        self._check_free_space(what, size)
        with self._lock.committing():
            end = self._reserve(what, size)
            try:
                yield
                self._flush()
                self._handles.clear()
                if end is not None:
                    os.ftruncate(self._lock.fd, max(self._file.id.get_filesize(), end))
            except OSError as exc:
                self._abandon()
                raise EnsembleWriteError(
                    f"{self._path}: writing {what} failed ({io_reason(exc)}); the first "
                    f"{self._n_complete} rows are safely in the file; free space, then "
                    f"`--resume`") from None

    def _flush(self) -> None:
        """HDF5 flush, then ``fsync``; a failure is an OSError (h5py raises RuntimeError)."""
        try:
            self._file.flush()
        except RuntimeError as exc:
            raise OSError(str(exc)) from None
        self._lock.fsync()

    def _space_error(self, what: str, problem: str) -> DiskSpaceError:
        return DiskSpaceError(f"{self._path}: {problem}, so {what} were not written; the first "
                              f"{self._n_complete} rows are safely in the file; free space, "
                              f"then `--resume`")

    def _check_free_space(self, what: str, size: int) -> None:
        free = shutil.disk_usage(Path(self._path).absolute().parent).free
        if free < size:
            raise self._space_error(what, f"disk full ({free} bytes free, the next chunk needs "
                                          f"up to {size})")

    def _reserve(self, what: str, size: int) -> int | None:
        """Allocate ``size`` bytes past the end of the file (so HDF5's writes cannot run out of
        space); returns the old end, or None where the file system cannot reserve."""
        end = os.fstat(self._lock.fd).st_size
        try:
            os.posix_fallocate(self._lock.fd, end, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return None
            if os.fstat(self._lock.fd).st_size != end:
                os.ftruncate(self._lock.fd, end)
            raise self._space_error(what, f"no room for the next chunk "
                                          f"({exc.strerror})") from None
        return end

    def _abandon(self) -> None:
        """Stop all writes to the file after a failed one and close it: HDF5's descriptor is
        pointed at an anonymous memory file, so closing cannot write half a state to disk."""
        try:
            close_without_writing(self._file)
        finally:
            self._handles.clear()
            self._release()

    def _check_rows(self, rows: Mapping[str, np.ndarray]) -> int:
        if set(rows) != set(self._names):
            raise ValueError(f"rows must have exactly the datasets {sorted(self._names)}, "
                             f"got {sorted(rows)}")
        k = len(rows["configs"])
        field_shape = self._file["configs"].shape[1:]
        if tuple(np.shape(rows["configs"])[1:]) != field_shape:
            raise ValueError(f"configs rows have shape {np.shape(rows['configs'])[1:]}, "
                             f"expected {field_shape}")
        for name in self._names:
            if np.ndim(rows[name]) < 1 or len(rows[name]) != k:
                raise ValueError(f"row dataset {name!r} has {np.shape(rows[name])[:1]} rows, "
                                 f"configs has {k}")
        return k

    def _write_rows(self, rows: Mapping[str, np.ndarray], k: int) -> None:
        start = self._n_complete
        for name in self._names:
            dataset = self._file[name]
            self._handles.append(dataset)
            dataset.resize(start + k, axis=0)
            if k:
                dataset[start:start + k] = np.asarray(rows[name], dtype=dataset.dtype)

    def _drop_uncommitted(self) -> None:
        """Cut rows a killed writer left beyond ``n_complete`` (when a file is resumed);
        check that the committed rows have their resume state."""
        for name in self._names:
            if self._file[name].shape[0] != self._n_complete:
                self._file[name].resize(self._n_complete, axis=0)
        if self._n_complete > 0 and self._valid_slot() is None:
            raise file_error(self._path, f"corrupt ensemble: no resume state for the "
                                    f"{self._n_complete} complete rows")
        self._flush()

    def _valid_slot(self) -> str | None:
        return valid_slot(self._file, self._n_complete)

    def _write_resume_state(self, state: Mapping[str, np.ndarray], n_rows: int) -> None:
        """Write ``state`` into the slot that is not the valid one; mark it valid for n_rows
        (see "Resume state" in :mod:`latticeflow.ensemble.resume`)."""
        valid = self._valid_slot()
        if valid is None:
            # No committed state yet (the first chunk): give the other slot the same entries
            # now, so that later chunks only overwrite existing objects (see "Crash safety").
            write_slot(self._file, RESUME_SLOTS[1], state, -1, self._handles)
        write_slot(self._file, other_slot(valid), state, n_rows, self._handles)

    def _commit(self, n_complete: int) -> None:
        self._file.attrs.modify("n_complete", np.int64(n_complete))
        self._flush()
        self._n_complete = n_complete
