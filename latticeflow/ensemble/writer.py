"""Where an :class:`EnsembleWriter` comes from: a new file (:meth:`EnsembleWriter.create`, built
under a temporary name and published) or one to continue (:meth:`EnsembleWriter.resume`, with
the uncommitted rows a killed writer left dropped, and its file recovered where needed). What an
open writer does: :mod:`latticeflow.ensemble.commit`; the format:
:mod:`latticeflow.ensemble.layout`; file ownership: "Locking" in
:mod:`latticeflow.ensemble.storage`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latticeflow.base.errors import LatticeflowError
from latticeflow.base.locking import FileLock, own_file
from latticeflow.ensemble.commit import DurableWriter, close_without_writing
from latticeflow.ensemble.layout import (
    SAMPLERS,
    SHARDS_ATTR,
    create_layout,
    numpy_dtype,
    read_metadata,
    root_attributes,
)
from latticeflow.ensemble.recovery import DAMAGE, committed_copy, extend_allocation
from latticeflow.ensemble.resume import check_slots
from latticeflow.ensemble.storage import WRITING, file_error, file_key, io_reason, open_h5, publish


class EnsembleWriter(DurableWriter):
    """Append-only writer of one ensemble file; see :mod:`latticeflow.ensemble.commit` for the
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
        process writes it (:class:`~latticeflow.base.locking.InUseError`). The file is built under a
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
            # "none": freed file space is never reused (crash safety, see ensemble.commit).
            f = h5py.File(tmp, "w", libver=("earliest", "v110"), fs_strategy="none")
            f.attrs.update(root_attributes(
                theory=theory, action_params=action_card, lattice=lattice, sampler=sampler,
                seed=seed, checkpoint_sha256=checkpoint_sha256, sampler_params=sampler_params,
                n_complete=0))
            create_layout(f, field_shape=field_shape, config_dtype=config_dtype, sampler=sampler,
                          chains=chains, chunk_rows=chunk_rows, compression=compression)
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
        "Crash safety" in :mod:`latticeflow.ensemble.commit`) gets its superblock's end of
        allocation raised to the end of the file, or else is replaced by a copy of its committed
        state.

        Raises :class:`~latticeflow.base.locking.InUseError` (touching nothing) when another process
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
                            check_slots(f)
                            writer._drop_uncommitted()
                            return writer
                        except DAMAGE:
                            # A killed flush left an object that cannot be read ("Crash safety"
                            # in ensemble.commit): write nothing more through this handle; retry
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
            fill = committed_copy(src, path, metadata)
            configs = src["configs"]
            return cls._build(
                Path(path), True, theory=metadata.theory, action_card=metadata.action_params,
                lattice=metadata.lattice, field_shape=metadata.field_shape,
                sampler=metadata.sampler, seed=metadata.seed,
                sampler_params=metadata.sampler_params,
                checkpoint_sha256=metadata.checkpoint_sha256,
                config_dtype=metadata.config_dtype, chains="chain" in metadata.datasets,
                chunk_rows=configs.chunks[0], compression=configs.compression, fill=fill)
        except DAMAGE as exc:
            raise file_error(path, f"corrupt ensemble: cannot read its committed state: "
                              f"{exc}") from None
        finally:
            src.close()
