"""The append-only writer of one ensemble file (:class:`EnsembleWriter`): creating a file,
resuming one, its queries and its public methods. How a chunk is committed:
:mod:`latticeflow.ensemble.chunks`; the format: :mod:`latticeflow.ensemble.schema`; file
ownership: "Locking" in :mod:`latticeflow.ensemble.storage`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import latticeflow
from latticeflow.ensemble.chunks import (
    RESERVE_MARGIN,
    ChunkWriter,
    bytes_touched,
    close_without_writing,
    read_state_entry,
    write_state_entry,
)
from latticeflow.ensemble.schema import (
    FORMAT,
    FORMAT_VERSION,
    RESUME_GROUP,
    RESUME_SLOTS,
    ROW_DTYPES,
    SAMPLERS,
    SCALAR_CHUNK_ROWS,
    SHARDS_ATTR,
    EnsembleMetadata,
    config_chunk_length,
    numpy_dtype,
    read_metadata,
    row_datasets,
)
from latticeflow.ensemble.storage import (
    WRITING,
    extend_allocation,
    file_error,
    file_key,
    io_reason,
    open_h5,
    publish,
)
from latticeflow.errors import LatticeflowError
from latticeflow.locking import FileLock, own_file


class EnsembleWriter(ChunkWriter):
    """Append-only writer of one ensemble file; see :mod:`latticeflow.ensemble.chunks` for the
    protocol.

    Use :meth:`create` for a new file and :meth:`resume` to continue one; close it (or use it
    as a context manager) when done.
    """

    def __init__(self, file: h5py.File, path: str | os.PathLike, lock: FileLock):
        """Internal: use :meth:`create` or :meth:`resume`. ``lock`` owns the file."""
        self._file = file
        self._path = path
        self._lock = lock
        self._key = file_key(lock.fd)
        self._metadata = read_metadata(file, path)
        self._n_complete = self._metadata.n_complete
        self._names = self._metadata.datasets
        # Datasets written since the last flush, kept open: closing one writes its chunk cache,
        # and a write failing there would only be printed, not raised.
        self._handles: list[h5py.Dataset] = []
        WRITING.add(self._key)

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        theory: str,
        action_card: Mapping[str, Any],
        lattice: Sequence[int],
        field_shape: Sequence[int],
        sampler: str,
        seed: int,
        sampler_params: Mapping[str, Any],
        checkpoint_sha256: str = "",
        dtype: Any = np.float64,
        chains: bool = False,
        chunk_rows: int = 64,
        compression: str | None = "gzip",
        force: bool = False,
    ) -> EnsembleWriter:
        """Create a new, empty ensemble file (``n_complete = 0``).

        ``dtype`` (numpy or torch float32/float64) is the storage type of ``/configs``;
        ``chains`` adds the ``/chain`` dataset; ``chunk_rows`` is the intended number of rows
        per :meth:`append` (HDF5 chunking of uncompressed configs; other append sizes work too);
        ``compression`` of ``/configs`` is ``"gzip"``, ``"lzf"`` or None (faster to read for
        small configurations: one chunk per row costs ~30 µs per row when reading). An existing
        file is only replaced when ``force`` is true, and never while another latticeflow
        process writes it (:class:`~latticeflow.locking.InUseError`). The file is built under a
        temporary name in the same folder and then put in place, so an existing file is never
        truncated (see "Locking" in :mod:`latticeflow.ensemble.storage`).
        """
        if sampler not in SAMPLERS:
            raise LatticeflowError(f"unknown sampler {sampler!r} (expected one of {SAMPLERS})")
        card_theory = action_card.get("theory", theory)
        if card_theory != theory:
            raise LatticeflowError(f"theory {theory!r} does not match the action card's "
                                   f"theory {card_theory!r}")
        if chunk_rows < 1:
            raise LatticeflowError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if compression not in ("gzip", "lzf", None):
            raise LatticeflowError(f"compression must be 'gzip', 'lzf' or None, "
                                   f"got {compression!r}")
        path = Path(path)
        if path.exists() and not force:
            raise file_error(path, "already exists; refusing to overwrite it without force")
        config_dtype = numpy_dtype(dtype)
        field_shape = tuple(int(n) for n in field_shape)
        old = own_file(path) if path.exists() else None  # refuses a file being written
        try:
            return cls._build(path, old is not None, theory=theory, action_card=action_card,
                              lattice=lattice, field_shape=field_shape, sampler=sampler,
                              seed=seed, sampler_params=sampler_params,
                              checkpoint_sha256=checkpoint_sha256, config_dtype=config_dtype,
                              chains=chains, chunk_rows=chunk_rows, compression=compression)
        finally:
            if old is not None:
                old.close()

    @classmethod
    def _build(cls, path: Path, replace: bool, *, theory: str, action_card: Mapping[str, Any],
               lattice: Sequence[int], field_shape: tuple[int, ...], sampler: str, seed: int,
               sampler_params: Mapping[str, Any], checkpoint_sha256: str,
               config_dtype: np.dtype, chains: bool, chunk_rows: int,
               compression: str | None,
               fill: Callable[[h5py.File], None] | None = None) -> EnsembleWriter:
        """Write the empty file under a temporary name, owned from the start, and publish it
        (``fill``, given the new file, adds content before it is flushed and published)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise file_error(path, f"cannot create ensemble file: {exc}") from None
        lock = FileLock(fd, tmp)
        f = None
        try:
            lock.acquire_owner()
            # "none": freed file space is never reused (crash safety, see ensemble.chunks).
            f = h5py.File(tmp, "w", libver=("earliest", "v110"), fs_strategy="none")
            attrs = f.attrs
            attrs["format"] = FORMAT
            attrs["format_version"] = np.int64(FORMAT_VERSION)
            attrs["theory"] = theory
            attrs["action_params"] = json.dumps(dict(action_card), sort_keys=True)
            attrs["lattice"] = np.asarray(lattice, dtype=np.int64)
            attrs["sampler"] = sampler
            attrs["seed"] = np.int64(seed)
            attrs["created"] = datetime.now(UTC).isoformat(timespec="seconds")
            attrs["latticeflow_version"] = latticeflow.__version__
            attrs["checkpoint_sha256"] = checkpoint_sha256
            attrs["sampler_params"] = json.dumps(dict(sampler_params), sort_keys=True)
            attrs["n_complete"] = np.int64(0)
            row_bytes = config_dtype.itemsize * math.prod(field_shape)
            rows_per_chunk = config_chunk_length(chunk_rows, row_bytes, compression)
            f.create_dataset(
                "configs", shape=(0, *field_shape), maxshape=(None, *field_shape),
                dtype=config_dtype, chunks=(rows_per_chunk, *field_shape),
                compression=compression, compression_opts=4 if compression == "gzip" else None,
                shuffle=compression is not None,
            )
            for name in row_datasets(sampler, chains)[1:]:
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=ROW_DTYPES[name],
                                 chunks=(SCALAR_CHUNK_ROWS,))
            # Every group the resume state needs exists before the file is published: a link added
            # later would be written before the superblock's end-of-allocation that covers its
            # target (see "Crash safety" in ensemble.chunks).
            resume = f.create_group(RESUME_GROUP)
            for slot in RESUME_SLOTS:
                resume.create_group(slot).attrs["n_rows"] = np.int64(-1)
            if fill is not None:
                fill(f)
            f.flush()
            lock.fsync()
            publish(tmp, path, replace)
            lock.path = path
            return cls(f, path, lock)
        except BaseException as exc:
            if f is not None:
                f.close()
            lock.close()
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise file_error(path, f"cannot create ensemble file: {io_reason(exc)}") from None
            raise

    @classmethod
    def resume(cls, path: str | os.PathLike) -> EnsembleWriter:
        """Reopen an existing ensemble for appending; rows beyond ``n_complete`` are dropped.

        A file that a kill left with objects HDF5 cannot read outside its committed state (see
        "Crash safety" in :mod:`latticeflow.ensemble.chunks`) gets its superblock's end of
        allocation raised to the end of the file, or else is replaced by a copy of its committed
        state.

        Raises :class:`~latticeflow.locking.InUseError` (touching nothing) when another process
        writes the file."""
        try:
            lock = own_file(path)
        except FileNotFoundError:
            raise file_error(path, "no such ensemble file") from None
        writer = None
        try:
            with lock.committing():
                extended = False
                while True:
                    f = open_h5(path, "r+")
                    try:
                        if SHARDS_ATTR in f.attrs:
                            raise file_error(path, "a joined ensemble of shards cannot be appended "
                                              "to; resume its shards (the same torchrun "
                                              "command with --resume), which joins them again")
                        writer = cls(f, path, lock)
                        try:
                            writer._check_resume_group()
                            writer._drop_uncommitted()
                            return writer
                        except _DAMAGE:
                            # A killed flush left an object that cannot be read ("Crash safety"
                            # in ensemble.chunks): write nothing more through this handle; retry
                            # with the end of allocation raised to the end of the file, then
                            # fall back to a new file with the committed state.
                            WRITING.discard(writer._key)
                            writer = None
                            close_without_writing(f)
                    except BaseException:
                        if f.id.valid:
                            f.close()
                        raise
                    if extended or not extend_allocation(lock.fd):
                        break
                    extended = True
                repaired = cls._repair(path)
            lock.close()          # the new file is owned through its own lock
            return repaired
        except BaseException:
            if writer is not None:
                WRITING.discard(writer._key)
            lock.close()
            raise

    @classmethod
    def _repair(cls, path: str | os.PathLike) -> EnsembleWriter:
        """A new file in place of ``path`` with its committed state: the root attributes, the
        first ``n_complete`` rows and the valid resume slot (caller owns ``path``). Built under
        a temporary name and renamed over ``path``, so a kill meanwhile leaves ``path`` as it
        was."""
        src = open_h5(path, "r", locking=False)
        try:
            metadata = read_metadata(src, path)
            n = metadata.n_complete
            slot = None
            if n > 0:
                resume = src[RESUME_GROUP]
                slot = next((s for s in RESUME_SLOTS if s in resume
                             and int(resume[s].attrs.get("n_rows", -1)) == n), None)
                if slot is None:
                    raise file_error(path, f"corrupt ensemble: no resume state for the {n} "
                                      f"complete rows")
            configs = src["configs"]

            def fill(f: h5py.File) -> None:
                for name, value in src.attrs.items():
                    f.attrs[name] = value
                for name in metadata.datasets:
                    _copy_rows(src[name], f[name], n)
                if slot is not None:
                    old = src[RESUME_GROUP][slot]
                    state = {name: read_state_entry(old[name]) for name in old}
                    for target, n_rows in ((s, -1) for s in RESUME_SLOTS if s != slot):
                        _write_slot_entries(f[RESUME_GROUP][target], state, n_rows)
                    _write_slot_entries(f[RESUME_GROUP][slot], state, n)

            return cls._build(
                Path(path), True, theory=metadata.theory, action_card=metadata.action_params,
                lattice=metadata.lattice, field_shape=metadata.field_shape,
                sampler=metadata.sampler, seed=metadata.seed,
                sampler_params=metadata.sampler_params,
                checkpoint_sha256=metadata.checkpoint_sha256,
                config_dtype=metadata.config_dtype, chains="chain" in metadata.datasets,
                chunk_rows=configs.chunks[0], compression=configs.compression, fill=fill)
        except _DAMAGE as exc:
            raise file_error(path, f"corrupt ensemble: cannot read its committed state: "
                              f"{exc}") from None
        finally:
            src.close()

    def _drop_uncommitted(self) -> None:
        """Cut rows a killed writer left beyond ``n_complete``; check the resume state."""
        for name in self._names:
            if self._file[name].shape[0] != self._n_complete:
                self._file[name].resize(self._n_complete, axis=0)
        if self._n_complete > 0 and self._valid_slot() is None:
            raise file_error(self._path, f"corrupt ensemble: no resume state for the "
                                    f"{self._n_complete} complete rows")
        self._flush()

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
        group = self._file[RESUME_GROUP][slot]
        return {name: read_state_entry(group[name]) for name in group}

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

    def __enter__(self) -> EnsembleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_attributes(self, **attrs: Any) -> None:
        """Write extra root attributes (numbers or strings; a scalar is rewritten in place
        when it already exists with the same type) and flush. For run diagnostics such as the
        proposal summary of neural MCMC; the schema's own attributes are not to be set here."""
        with self._changing("the run's attributes", RESERVE_MARGIN):
            for name, value in attrs.items():
                self._file.attrs.modify(name, value)


#: What h5py raises for an object it cannot read (e.g. beyond the end of allocation).
_DAMAGE = (OSError, KeyError, RuntimeError, ValueError)


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, n: int) -> None:
    """Rows ``[0, n)`` of ``src`` into ``dst`` (resized to n), 16 MiB at a time."""
    dst.resize(n, axis=0)
    row = max(1, src.dtype.itemsize * math.prod(src.shape[1:]))
    step = max(1, (16 << 20) // row)
    for start in range(0, n, step):
        dst[start:start + step] = src[start:min(n, start + step)]


def _write_slot_entries(group: h5py.Group, state: Mapping[str, np.ndarray], n_rows: int
                        ) -> None:
    for name, value in state.items():
        write_state_entry(group, name, value)
    group.attrs.modify("n_rows", np.int64(n_rows))
