"""HDF5 ensemble files (schema v1 of DESIGN §6): append-only writer and validating reader.

Layout
------
Root attributes: ``format = "latticeflow-ensemble"``, ``format_version = 1``, ``theory``,
``action_params`` (JSON of ``action.card()``), ``lattice`` (int64 array), ``sampler``
(``"nmcmc"`` | ``"hmc"``), ``seed``, ``created`` (ISO-8601, UTC), ``latticeflow_version``,
``checkpoint_sha256`` (nmcmc; ``""`` otherwise), ``sampler_params`` (JSON), ``n_complete``.

Row datasets, all of length N >= ``n_complete`` along axis 0, resizable (``maxshape[0] = None``)
and chunked along N; only the first ``n_complete`` rows are valid (N > n_complete only in a
file left by a killed writer; :meth:`EnsembleWriter.resume` truncates them):

* ``/configs``    ``(N, *field_shape)`` float32 or float64, gzip-compressed (+ shuffle) with
  one row per HDF5 chunk (or lzf, or uncompressed with multi-row chunks; see crash safety);
* ``/action``     ``(N,)`` float64, S of the stored configuration;
* ``/accepted``   ``(N,)`` bool;
* ``/log_q``, ``/log_weight``  ``(N,)`` float64, nmcmc only (log_weight = −S − log q);
* ``/delta_H``    ``(N,)`` float64, hmc only;
* ``/chain``      ``(N,)`` int32, optional (``chains=True`` at creation): index of the
  independent Markov chain the row belongs to. Rows of different chains may interleave in any
  order; the rows of one chain, ``data[chain == c]``, are in Markov-chain order. (The HMC
  sampler writes chains round-robin: row i belongs to chain ``i % n_chains``.)

Resume state: ``/resume/slot0`` and ``/resume/slot1`` are groups of datasets (the sampler's
``state_dict()``: RNG state, current configurations, unused proposals, ...), each with an
attribute ``n_rows``: the number of rows the state corresponds to. The *valid* state is the slot
whose ``n_rows == n_complete`` (none while ``n_complete == 0``). An array entry is stored in an
uncompressed, chunked dataset resizable along axis 0 whose attribute ``length`` says how many
of its leading rows hold the value; its extent (the capacity) only grows, so a value of varying
length (the unused proposals) is rewritten in place and a slot never needs more space than its
longest value: the file grows with its rows, not with the number of appends. A scalar entry is
a scalar dataset. (Files written before ``length`` existed store each entry as a plain dataset
of exactly its value; they are read as such and converted on their next append.)

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
place. Residual risk: a kill *during* the metadata flush that splits a chunk-index B-tree node
could leave the index inconsistent (then reading fails loudly); the window is microseconds once
every ~32 chunks. The guarantee is against a killed process (the OS keeps written data), not
against power loss.

Locking (:mod:`latticeflow.locking`): a writer owns its file through an advisory ``fcntl`` lock
taken before anything is created, opened for writing or truncated, and held until it closes; a
second writer (``--resume``, ``--force``) is refused with :class:`~latticeflow.locking.InUseError`
naming the owner's pid. :meth:`EnsembleWriter.create` never truncates a file: it builds the new
file under a temporary name next to it and then links it into place (or, with ``force``, renames
it over the old one, which it owns first), so a reader that has the old file open keeps reading
the old file. Each commit holds a second, exclusive lock; an :class:`EnsembleReader` holds it
shared while it has the file open, so it opens and reads the file only between commits, when
everything the writer changed has been flushed: a reader of a live file sees a consistent file
with the ``n_complete`` rows committed when it opened it (reopen to see more), and a writer's
commit waits while readers have the file open. (The writer also keeps HDF5's own file lock, so
plain ``h5py.File(path)`` calls are refused while it writes; the reader opens with HDF5's locking
off and relies on the commit lock instead.)

Joined shards
-------------
A multi-process run (``torchrun ... latticeflow sample``) writes one ordinary ensemble per rank,
``FILE.rank<r>.h5``, and :func:`join_shards` joins them into ``FILE.h5``: a file with the same
root attributes (``n_complete`` = the total, ``seed`` = the run's base seed) whose row datasets
are HDF5 *virtual datasets* mapping the shards' first ``n_complete`` rows, shard after shard. It
reads like any other ensemble (plain h5py included); the configurations are not copied. Its
extra attribute ``shards`` (JSON) lists ``{"file": name, "rows": n}`` per shard, with the file
names relative to the joined file's folder, where HDF5 looks for them: move the files together.
(HDF5 silently returns fill values, NaN for floats, for a missing source file; the reader checks
that every shard is there with at least its rows, and refuses otherwise.) A joined file has no
resume state and cannot be appended to: extend the shards and join them again.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

import latticeflow
from latticeflow.errors import LatticeflowError
from latticeflow.locking import FileLock, InUseError, lock_same_file, own_file

FORMAT = "latticeflow-ensemble"
FORMAT_VERSION = 1
SAMPLERS = ("nmcmc", "hmc")
COMMON_DATASETS = ("configs", "action", "accepted")
SAMPLER_DATASETS = {"nmcmc": ("log_q", "log_weight"), "hmc": ("delta_H",)}
CHAIN_DATASET = "chain"
RESUME_GROUP = "resume"
RESUME_SLOTS = ("slot0", "slot1")
SHARDS_ATTR = "shards"
#: Values HDF5 returns for rows of a joined file whose shard cannot be found.
_VIRTUAL_FILL = {"b": False, "i": -1, "f": np.nan}
ROW_DTYPES = {
    "action": np.float64,
    "accepted": np.bool_,
    "log_q": np.float64,
    "log_weight": np.float64,
    "delta_H": np.float64,
    "chain": np.int32,
}
_REQUIRED_ATTRS = ("theory", "action_params", "lattice", "sampler", "seed", "created",
                   "latticeflow_version", "checkpoint_sha256", "sampler_params", "n_complete")
_CONFIG_CHUNK_BYTES = 4 << 20   # at most 4 MiB of uncompressed configurations per HDF5 chunk
_SCALAR_CHUNK_ROWS = 4096      # per-row scalars: uncompressed, long chunks (few index nodes)
_STATE_CHUNK_BYTES = 256 << 10  # resume-state arrays: at most 256 KiB per HDF5 chunk
_RESERVE_MARGIN = 64 << 10       # bytes reserved for a chunk's metadata
LENGTH_ATTR = "length"
#: (st_dev, st_ino) of the files this process has open for writing.
_WRITING: set[tuple[int, int]] = set()


class DiskSpaceError(LatticeflowError):
    """The next chunk would not fit (free space or file-size limit); nothing was written."""


class EnsembleWriteError(LatticeflowError):
    """Writing a chunk failed; the file holds its committed rows and the writer is closed."""


@dataclass(frozen=True)
class EnsembleMetadata:
    """The root attributes of an ensemble file, decoded (JSON parsed, arrays → tuples)."""

    path: str
    format_version: int
    theory: str
    action_params: dict[str, Any]
    lattice: tuple[int, ...]
    sampler: str
    seed: int
    created: str
    latticeflow_version: str
    checkpoint_sha256: str
    sampler_params: dict[str, Any]
    n_complete: int
    field_shape: tuple[int, ...]
    config_dtype: np.dtype
    datasets: tuple[str, ...]


@dataclass(frozen=True)
class Ensemble:
    """An ensemble read into memory: metadata plus the row datasets cut to ``n_complete``."""

    metadata: EnsembleMetadata
    data: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.data[name]

    def __len__(self) -> int:
        return self.metadata.n_complete


def row_datasets(sampler: str, chains: bool = False) -> tuple[str, ...]:
    """Names of the row datasets of a ``sampler`` file (with ``/chain`` when ``chains``)."""
    return COMMON_DATASETS + SAMPLER_DATASETS[sampler] + ((CHAIN_DATASET,) if chains else ())


def _numpy_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    result = np.dtype(dtype)
    if result not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise LatticeflowError(f"configurations are stored as float32 or float64, not {result}")
    return result


def _config_chunk_length(chunk_rows: int, row_bytes: int, compression: str | None) -> int:
    """Rows per HDF5 chunk of ``/configs``: 1 when compressed (a compressed chunk must never be
    rewritten, see the module docstring), else the largest divisor of ``chunk_rows`` whose
    chunk stays within ``_CONFIG_CHUNK_BYTES``."""
    if compression is not None:
        return 1
    limit = max(1, _CONFIG_CHUNK_BYTES // max(1, row_bytes))
    if chunk_rows <= limit:
        return chunk_rows
    return max(n for n in range(1, limit + 1) if chunk_rows % n == 0)


def _fail(path: str | os.PathLike, problem: str) -> LatticeflowError:
    return LatticeflowError(f"{path}: {problem}")


def _open(path: str | os.PathLike, mode: str, locking: bool = True) -> h5py.File:
    try:
        return h5py.File(path, mode, locking=locking)
    except FileNotFoundError:
        raise _fail(path, "no such ensemble file") from None
    except OSError as exc:
        if "unable to lock file" in str(exc):
            raise InUseError(f"{path}: in use by another process (it holds HDF5's file lock); "
                             f"wait for it to close the file") from None
        raise _fail(path, f"not a readable HDF5 ensemble (truncated or corrupt?): {exc}") from None


def _file_key(fd_or_path: int | str | os.PathLike) -> tuple[int, int]:
    st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    return st.st_dev, st.st_ino


def _reason(exc: BaseException) -> str:
    """The operating system's words for an HDF5 I/O error (``File too large``, ...)."""
    text = str(exc)
    found = re.search(r"error message = '([^']*)'", text)
    if found:
        return found.group(1)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(text.split())[:200]


def sync_folder(path: Path) -> None:
    """Make a rename or link in ``path``'s folder durable (best effort)."""
    try:
        fd = os.open(path.absolute().parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    """Put the finished file ``tmp`` at ``path``: over the old file (``replace``) or only where
    there is none (a hard link cannot clobber a file that appeared meanwhile)."""
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _fail(path, "already exists; refusing to overwrite it without force") from None
        except OSError as exc:  # a file system without hard links
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if path.exists():
                raise _fail(path, "already exists; refusing to overwrite it without "
                                  "force") from None
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    sync_folder(path)


def _read_metadata(f: h5py.File, path: str | os.PathLike) -> EnsembleMetadata:
    """Validate the header of an open file and decode it; raises LatticeflowError."""
    try:
        metadata = _decode_metadata(f, path)
    except (OSError, KeyError) as exc:
        raise _fail(path, f"corrupt ensemble: {exc}") from None
    if SHARDS_ATTR in f.attrs:
        _check_shards(f, path)
    return metadata


def _check_shards(f: h5py.File, path: str | os.PathLike) -> None:
    """Every shard of a joined file is where HDF5 will look for it, with enough rows."""
    try:
        shards = json.loads(f.attrs[SHARDS_ATTR])
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"corrupt joined ensemble: bad {SHARDS_ATTR} attribute ({exc})") from None
    folder = Path(path).resolve().parent
    for shard in shards:
        source = folder / shard["file"]
        if not source.is_file():
            raise _fail(path, f"shard {source} is missing (a joined ensemble reads its rows "
                              f"from its shard files; keep them next to it)")
        try:
            with h5py.File(source, "r") as g:
                have = int(g.attrs.get("n_complete", -1))
        except OSError as exc:
            raise _fail(path, f"cannot open shard {source} (is it being written?): "
                              f"{exc}") from None
        if have < int(shard["rows"]):
            raise _fail(path, f"shard {source} holds {have} rows but the joined file maps "
                              f"{shard['rows']}; it was replaced after joining")


def _decode_metadata(f: h5py.File, path: str | os.PathLike) -> EnsembleMetadata:
    attrs = f.attrs
    if attrs.get("format") != FORMAT:
        raise _fail(path, f"not a latticeflow ensemble (format attribute is "
                          f"{attrs.get('format')!r}, expected {FORMAT!r})")
    version = attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        raise _fail(path, f"unsupported ensemble format_version {version!r} "
                          f"(this latticeflow reads version {FORMAT_VERSION})")
    missing = [name for name in _REQUIRED_ATTRS if name not in attrs]
    if missing:
        raise _fail(path, f"corrupt ensemble: missing attribute(s) {', '.join(missing)}")
    sampler = str(attrs["sampler"])
    if sampler not in SAMPLERS:
        raise _fail(path, f"corrupt ensemble: unknown sampler {sampler!r}")
    n_complete = int(attrs["n_complete"])
    present = tuple(name for name in row_datasets(sampler, chains=True) if name in f)
    for name in row_datasets(sampler):
        if name not in present:
            raise _fail(path, f"corrupt ensemble: dataset /{name} is missing")
    for name in present:
        if f[name].shape[0] < n_complete:
            raise _fail(path, f"truncated ensemble: /{name} has {f[name].shape[0]} rows but "
                              f"n_complete = {n_complete}")
    try:
        action_params = json.loads(attrs["action_params"])
        sampler_params = json.loads(attrs["sampler_params"])
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"corrupt ensemble: bad JSON attribute ({exc})") from None
    configs = f["configs"]
    return EnsembleMetadata(
        path=str(path), format_version=int(version), theory=str(attrs["theory"]),
        action_params=action_params, lattice=tuple(int(n) for n in attrs["lattice"]),
        sampler=sampler, seed=int(attrs["seed"]), created=str(attrs["created"]),
        latticeflow_version=str(attrs["latticeflow_version"]),
        checkpoint_sha256=str(attrs["checkpoint_sha256"]), sampler_params=sampler_params,
        n_complete=n_complete, field_shape=tuple(configs.shape[1:]), config_dtype=configs.dtype,
        datasets=present,
    )


def _read_state_entry(dataset: h5py.Dataset) -> np.ndarray:
    """A resume-state value: the first ``length`` rows, or the whole (older or scalar) dataset."""
    if LENGTH_ATTR in dataset.attrs:
        return np.asarray(dataset[:int(dataset.attrs[LENGTH_ATTR])])
    return np.asarray(dataset[()])


def _bytes_touched(dataset: h5py.Dataset, start: int, k: int) -> int:
    """An upper bound on the file space that writing rows ``[start, start + k)`` of a row
    dataset takes: every HDF5 chunk they begin, in full, plus its index entry (a chunk that
    already holds rows is rewritten in place)."""
    per_chunk = dataset.chunks[0]
    chunks = max(0, (start + k - 1) // per_chunk - -(-start // per_chunk) + 1)
    row = dataset.dtype.itemsize * math.prod(dataset.shape[1:])
    return chunks * (per_chunk * row + 64)


def _write_state_entry(group: h5py.Group, name: str, value: np.ndarray) -> h5py.Dataset:
    """Store ``value`` as entry ``name`` of a resume slot, in place where possible (see
    "Resume state" in the module docstring); returns the dataset."""
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
        rows = max(1, min(len(value), _STATE_CHUNK_BYTES // row_bytes))
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


class EnsembleWriter:
    """Append-only writer of one ensemble file; see the module docstring for the protocol.

    Use :meth:`create` for a new file and :meth:`resume` to continue one; close it (or use it
    as a context manager) when done.
    """

    def __init__(self, file: h5py.File, path: str | os.PathLike, lock: FileLock):
        """Internal: use :meth:`create` or :meth:`resume`. ``lock`` owns the file."""
        self._file = file
        self._path = path
        self._lock = lock
        self._key = _file_key(lock.fd)
        self._metadata = _read_metadata(file, path)
        self._n_complete = self._metadata.n_complete
        self._names = self._metadata.datasets
        # Datasets written since the last flush, kept open: closing one writes its chunk cache,
        # and a write failing there would only be printed, not raised.
        self._handles: list[h5py.Dataset] = []
        _WRITING.add(self._key)

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
        truncated (see "Locking" in the module docstring).
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
            raise _fail(path, "already exists; refusing to overwrite it without force")
        config_dtype = _numpy_dtype(dtype)
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
               compression: str | None) -> EnsembleWriter:
        """Write the empty file under a temporary name, owned from the start, and publish it."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _fail(path, f"cannot create ensemble file: {exc}") from None
        lock = FileLock(fd, tmp)
        f = None
        try:
            lock.acquire_owner()
            # "none": freed file space is never reused (crash safety, see module docstring).
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
            rows_per_chunk = _config_chunk_length(chunk_rows, row_bytes, compression)
            f.create_dataset(
                "configs", shape=(0, *field_shape), maxshape=(None, *field_shape),
                dtype=config_dtype, chunks=(rows_per_chunk, *field_shape),
                compression=compression, compression_opts=4 if compression == "gzip" else None,
                shuffle=compression is not None,
            )
            for name in row_datasets(sampler, chains)[1:]:
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=ROW_DTYPES[name],
                                 chunks=(_SCALAR_CHUNK_ROWS,))
            f.create_group(RESUME_GROUP)
            f.flush()
            lock.fsync()
            _publish(tmp, path, replace)
            lock.path = path
            return cls(f, path, lock)
        except BaseException as exc:
            if f is not None:
                f.close()
            lock.close()
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise _fail(path, f"cannot create ensemble file: {_reason(exc)}") from None
            raise

    @classmethod
    def resume(cls, path: str | os.PathLike) -> EnsembleWriter:
        """Reopen an existing ensemble for appending; rows beyond ``n_complete`` are dropped.

        Raises :class:`~latticeflow.locking.InUseError` (touching nothing) when another process
        writes the file."""
        try:
            lock = own_file(path)
        except FileNotFoundError:
            raise _fail(path, "no such ensemble file") from None
        writer = None
        try:
            with lock.committing():
                f = _open(path, "r+")
                try:
                    if SHARDS_ATTR in f.attrs:
                        raise _fail(path, "a joined ensemble of shards cannot be appended to; "
                                          "resume its shards (the same torchrun command with "
                                          "--resume), which joins them again")
                    writer = cls(f, path, lock)
                    writer._drop_uncommitted()
                except BaseException:
                    f.close()
                    raise
            return writer
        except BaseException:
            if writer is not None:
                _WRITING.discard(writer._key)
            lock.close()
            raise

    def _drop_uncommitted(self) -> None:
        """Cut rows a killed writer left beyond ``n_complete``; check the resume state."""
        for name in self._names:
            if self._file[name].shape[0] != self._n_complete:
                self._file[name].resize(self._n_complete, axis=0)
        if self._n_complete > 0 and self._valid_slot() is None:
            raise _fail(self._path, f"corrupt ensemble: no resume state for the "
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
        return {name: _read_state_entry(group[name]) for name in group}

    def _valid_slot(self) -> str | None:
        if self._n_complete == 0:
            return None
        group = self._file[RESUME_GROUP]
        for slot in RESUME_SLOTS:
            if slot in group and int(group[slot].attrs.get("n_rows", -1)) == self._n_complete:
                return slot
        return None

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
        size = (sum(_bytes_touched(self._file[name], self._n_complete, k) for name in self._names)
                + 2 * sum(v.nbytes for v in state.values()) + _RESERVE_MARGIN)
        what = f"rows {self._n_complete}..{self._n_complete + k - 1}"
        with self._changing(what, size):
            self._write_rows(rows, k)
            self._write_resume_state(state, self._n_complete + k)
            self._flush()
            self._commit(self._n_complete + k)

    @contextmanager
    def _changing(self, what: str, size: int) -> Iterator[None]:
        """The frame of every change to the file: ``size`` bytes are checked and reserved
        first, the commit lock is held throughout, the reservation's unused part is cut off
        after, and a failed write abandons the file (see "Durability")."""
        if not self._file.id.valid:
            raise _fail(self._path, "the writer is closed")
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
                    f"{self._path}: writing {what} failed ({_reason(exc)}); the first "
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
            if hasattr(os, "memfd_create"):   # Linux; elsewhere HDF5 closes the file as it is
                memory = os.memfd_create("abandoned-ensemble")
                os.dup2(memory, self._file.id.get_vfd_handle())
                os.close(memory)
        finally:
            self._handles.clear()
            try:
                self._file.close()
            except (OSError, RuntimeError):
                pass
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
        root = self._file[RESUME_GROUP]
        valid = self._valid_slot()
        target = RESUME_SLOTS[1] if valid == RESUME_SLOTS[0] else RESUME_SLOTS[0]
        group = root.require_group(target)
        group.attrs.modify("n_rows", np.int64(-1))
        for name in group:
            if name not in state and LENGTH_ATTR in group[name].attrs:
                group[name].attrs.modify(LENGTH_ATTR, np.int64(0))
        for name, value in state.items():
            self._handles.append(_write_state_entry(group, name, value))
        group.attrs.modify("n_rows", np.int64(n_rows))

    def _commit(self, n_complete: int) -> None:
        self._file.attrs.modify("n_complete", np.int64(n_complete))
        self._flush()
        self._n_complete = n_complete

    # ---------------------------------------------------------------------------- closing
    def close(self) -> None:
        """Flush and close the file and give up its ownership (idempotent)."""
        try:
            if self._file.id.valid:
                self._file.close()
        finally:
            self._release()

    def _release(self) -> None:
        _WRITING.discard(self._key)
        self._lock.close()

    def __enter__(self) -> EnsembleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_attributes(self, **attrs: Any) -> None:
        """Write extra root attributes (numbers or strings; a scalar is rewritten in place
        when it already exists with the same type) and flush. For run diagnostics such as the
        proposal summary of neural MCMC; the schema's own attributes are not to be set here."""
        with self._changing("the run's attributes", _RESERVE_MARGIN):
            for name, value in attrs.items():
                self._file.attrs.modify(name, value)


class EnsembleReader:
    """Read-only access to an ensemble; arrays are cut to ``n_complete`` rows.

    ``with EnsembleReader(path) as r: x = r.read("configs", 0, 100)``.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = path
        self._lock = _reading_lock(path)
        try:
            # HDF5's own lock would refuse a file being written; the commit lock guards instead.
            self._file = _open(path, "r", locking=self._lock is None)
        except BaseException:
            if self._lock is not None:
                self._lock.close()
            raise
        try:
            self.metadata: EnsembleMetadata = _read_metadata(self._file, path)
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
            raise _fail(self._path, f"corrupt ensemble: cannot read /{name}: {exc}") from None

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
    if _file_key(lock.fd) in _WRITING:
        raise _OwnWrite
    lock.acquire_reading()


def _reading_lock(path: str | os.PathLike) -> FileLock | None:
    """A reader's shared commit lock on ``path`` (see "Locking"); None when this process
    writes the file itself (then HDF5 shares the writer's open file)."""
    try:
        return lock_same_file(path, False, _acquire_reading)
    except FileNotFoundError:
        raise _fail(path, "no such ensemble file") from None
    except _OwnWrite:
        return None


def join_shards(path: str | os.PathLike, shards: Sequence[str | os.PathLike], *, seed: int,
                sampler_params: Mapping[str, Any], force: bool = False) -> EnsembleMetadata:
    """Join shard ensembles into one ensemble at ``path`` (see "Joined shards" above).

    The shards must agree in theory, action, lattice, sampler, checkpoint, field shape, storage
    type and row datasets, and lie in ``path``'s folder or below. ``seed`` and
    ``sampler_params`` become the joined file's attributes. The file is written under a
    temporary name and renamed, so an existing ``path`` (replaced only with ``force``) is never
    left half-written. Returns the joined file's metadata.
    """
    path = Path(path)
    if path.exists() and not force:
        raise _fail(path, "already exists; refusing to overwrite it without force")
    if not shards:
        raise LatticeflowError(f"{path}: no shards to join")
    metas = []
    for shard in shards:
        with EnsembleReader(shard) as reader:
            metas.append(reader.metadata)
    first = metas[0]
    keys = ("theory", "action_params", "lattice", "sampler", "checkpoint_sha256",
            "field_shape", "config_dtype", "datasets")
    for meta in metas[1:]:
        for key in keys:
            if getattr(meta, key) != getattr(first, key):
                raise LatticeflowError(f"cannot join {meta.path} to {first.path}: {key} differs "
                                       f"({getattr(meta, key)!r} vs {getattr(first, key)!r})")
    folder = path.resolve().parent
    names = [os.path.relpath(Path(shard).resolve(), folder) for shard in shards]
    if any(name.startswith("..") for name in names):
        raise LatticeflowError(f"{path}: shards must lie in its folder (or below) so that the "
                               f"joined file finds them: {names}")
    total = sum(meta.n_complete for meta in metas)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({
                "format": FORMAT, "format_version": np.int64(FORMAT_VERSION),
                "theory": first.theory,
                "action_params": json.dumps(first.action_params, sort_keys=True),
                "lattice": np.asarray(first.lattice, dtype=np.int64), "sampler": first.sampler,
                "seed": np.int64(seed), "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "latticeflow_version": latticeflow.__version__,
                "checkpoint_sha256": first.checkpoint_sha256,
                "sampler_params": json.dumps(dict(sampler_params), sort_keys=True),
                "n_complete": np.int64(total),
                SHARDS_ATTR: json.dumps([{"file": name, "rows": meta.n_complete}
                                         for name, meta in zip(names, metas, strict=True)]),
            })
            for dataset in first.datasets:
                configs = dataset == "configs"
                shape = first.field_shape if configs else ()
                dtype = first.config_dtype if configs else np.dtype(ROW_DTYPES[dataset])
                layout = h5py.VirtualLayout(shape=(total, *shape), dtype=dtype)
                offset = 0
                for name, meta in zip(names, metas, strict=True):
                    n = meta.n_complete
                    if n:
                        layout[offset:offset + n] = h5py.VirtualSource(
                            name, dataset, shape=(n, *shape), dtype=dtype)
                    offset += n
                f.create_virtual_dataset(dataset, layout, fillvalue=_VIRTUAL_FILL[dtype.kind])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with EnsembleReader(path) as reader:
        return reader.metadata


def read_ensemble(path: str | os.PathLike) -> Ensemble:
    """Read a whole ensemble (metadata and all row datasets, ``n_complete`` rows) into memory."""
    with EnsembleReader(path) as reader:
        data = {name: reader.read(name) for name in reader.datasets}
        return Ensemble(reader.metadata, data)
