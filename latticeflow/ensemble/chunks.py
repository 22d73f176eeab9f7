"""How :class:`~latticeflow.ensemble.EnsembleWriter` commits a chunk: free-space check and
reservation, rows, resume state, flush and commit, and abandoning the file when a write fails
(:class:`ChunkWriter`, the writer's base class), plus the resume-state entries of a slot.

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
  (:func:`~latticeflow.ensemble.storage._extend_allocation`: one 48-byte write, only for a
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

import h5py
import numpy as np

from latticeflow.ensemble.schema import (
    LENGTH_ATTR,
    RESUME_GROUP,
    RESUME_SLOTS,
    STATE_CHUNK_BYTES,
)
from latticeflow.ensemble.storage import (
    DiskSpaceError,
    EnsembleWriteError,
    file_error,
    io_reason,
)
from latticeflow.locking import FileLock

RESERVE_MARGIN = 64 << 10       # bytes reserved for a chunk's metadata


def read_state_entry(dataset: h5py.Dataset) -> np.ndarray:
    """A resume-state value: the first ``length`` rows, or the whole (older or scalar) dataset."""
    if LENGTH_ATTR in dataset.attrs:
        return np.asarray(dataset[:int(dataset.attrs[LENGTH_ATTR])])
    return np.asarray(dataset[()])


def bytes_touched(dataset: h5py.Dataset, start: int, k: int) -> int:
    """An upper bound on the file space that writing rows ``[start, start + k)`` of a row
    dataset takes: every HDF5 chunk they begin, in full, plus its index entry (a chunk that
    already holds rows is rewritten in place)."""
    per_chunk = dataset.chunks[0]
    chunks = max(0, (start + k - 1) // per_chunk - -(-start // per_chunk) + 1)
    row = dataset.dtype.itemsize * math.prod(dataset.shape[1:])
    return chunks * (per_chunk * row + 64)


def write_state_entry(group: h5py.Group, name: str, value: np.ndarray) -> h5py.Dataset:
    """Store ``value`` as entry ``name`` of a resume slot, in place where possible (see
    "Resume state" in :mod:`latticeflow.ensemble.schema`); returns the dataset."""
    if name in group and not _fits(group[name], value):
        del group[name]  # a changed dtype or trailing shape (or an older file's layout): rare
    if value.ndim == 0:
        if name in group:
            group[name][()] = value
        else:
            group.create_dataset(name, data=value)
        return group[name]
    if name not in group:
        row_bytes = max(1, value.dtype.itemsize * math.prod(value.shape[1:]))
        rows = max(1, min(len(value), STATE_CHUNK_BYTES // row_bytes))
        group.create_dataset(name, shape=value.shape, maxshape=(None, *value.shape[1:]),
                             dtype=value.dtype, chunks=(rows, *value.shape[1:]))
        group[name].attrs[LENGTH_ATTR] = np.int64(0)
    dataset = group[name]
    if dataset.shape[0] < len(value):
        dataset.resize(len(value), axis=0)
    if len(value):
        dataset[:len(value)] = value
    dataset.attrs.modify(LENGTH_ATTR, np.int64(len(value)))
    return dataset


def _fits(dataset: h5py.Dataset, value: np.ndarray) -> bool:
    """Whether ``dataset`` can hold ``value`` in place."""
    if dataset.dtype != value.dtype:
        return False
    if value.ndim == 0:
        return dataset.shape == ()
    return (LENGTH_ATTR in dataset.attrs and dataset.maxshape[0] is None
            and dataset.shape[1:] == value.shape[1:])


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


class ChunkWriter:
    """The commit protocol of :class:`~latticeflow.ensemble.EnsembleWriter` (see "Crash
    safety" above); the writer sets the attributes and defines :meth:`_release`."""

    _file: h5py.File
    _path: str | os.PathLike
    _lock: FileLock
    _n_complete: int
    _names: tuple[str, ...]
    _handles: list[h5py.Dataset]

    def _valid_slot(self) -> str | None:
        if self._n_complete == 0:
            return None
        group = self._file[RESUME_GROUP]
        for slot in RESUME_SLOTS:
            if slot in group and int(group[slot].attrs.get("n_rows", -1)) == self._n_complete:
                return slot
        return None

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

    def _write_resume_state(self, state: Mapping[str, np.ndarray], n_rows: int) -> None:
        """Write ``state`` into the slot that is not the valid one; mark it valid for n_rows.

        In place: an entry's dataset is reused while its dtype and trailing shape stay (its
        capacity grows when a longer value comes), so a slot's size is bounded by its largest
        state. An entry missing from ``state`` gets length 0, keeping its space for later."""
        valid = self._valid_slot()
        target = RESUME_SLOTS[1] if valid == RESUME_SLOTS[0] else RESUME_SLOTS[0]
        if valid is None:
            # No committed state yet (the first chunk): give the other slot the same entries
            # now, so that later chunks only overwrite existing objects (see "Crash safety").
            self._write_slot(RESUME_SLOTS[1], state, -1)
        self._write_slot(target, state, n_rows)

    def _write_slot(self, slot: str, state: Mapping[str, np.ndarray], n_rows: int) -> None:
        """Write ``state`` into ``slot`` (marked ``n_rows = -1`` meanwhile), then its n_rows."""
        group = self._file[RESUME_GROUP].require_group(slot)  # older files: created lazily
        group.attrs.modify("n_rows", np.int64(-1))
        for name in group:
            if name not in state and LENGTH_ATTR in group[name].attrs:
                group[name].attrs.modify(LENGTH_ATTR, np.int64(0))
        for name, value in state.items():
            self._handles.append(write_state_entry(group, name, value))
        group.attrs.modify("n_rows", np.int64(n_rows))

    def _check_resume_group(self) -> None:
        """Read every object of ``/resume`` in full (both slots, every entry to its whole
        extent), as the resume and the next chunks will touch them: an object that a killed
        flush left unreachable raises here (OSError, KeyError, RuntimeError, ValueError), before
        anything is changed, instead of in the middle of the next chunk."""
        root = self._file[RESUME_GROUP]
        for slot in RESUME_SLOTS:
            if slot not in root:
                continue
            group = root[slot]
            dict(group.attrs)
            for name in group:
                dataset = group[name]
                dict(dataset.attrs)
                dataset[()]

    def _commit(self, n_complete: int) -> None:
        self._file.attrs.modify("n_complete", np.int64(n_complete))
        self._flush()
        self._n_complete = n_complete
