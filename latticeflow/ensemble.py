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

Resume state: ``/resume/slot0`` and ``/resume/slot1`` are groups of plain datasets (the
sampler's ``state_dict()``: RNG state, current configurations, ...), each with an attribute
``n_rows``: the number of rows the state corresponds to. The *valid* state is the slot whose
``n_rows == n_complete`` (none while ``n_complete == 0``).

Crash safety (SIGKILL at any point)
-----------------------------------
:meth:`EnsembleWriter.append` (1) writes the new rows after row ``n_complete``, (2) writes the
resume state into the slot that is *not* the valid one (first marking it ``n_rows = -1``, then
its data, then its ``n_rows``), (3) flushes, (4) sets ``n_complete`` (in place, one small
metadata write) and (5) flushes again. Until step 4 reaches the disk the old ``n_complete`` and
its untouched slot describe a consistent file; afterwards the new ones do.

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

While a writer holds a file, HDF5's file locking keeps other processes from opening it.

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

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

import latticeflow
from latticeflow.errors import LatticeflowError

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


def _open(path: str | os.PathLike, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise _fail(path, "no such ensemble file") from None
    except OSError as exc:
        raise _fail(path, f"not a readable HDF5 ensemble (truncated or corrupt?): {exc}") from None


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


class EnsembleWriter:
    """Append-only writer of one ensemble file; see the module docstring for the protocol.

    Use :meth:`create` for a new file and :meth:`resume` to continue one; close it (or use it
    as a context manager) when done.
    """

    def __init__(self, file: h5py.File, path: str | os.PathLike):
        """Internal: use :meth:`create` or :meth:`resume`."""
        self._file = file
        self._path = path
        self._metadata = _read_metadata(file, path)
        self._n_complete = self._metadata.n_complete
        self._names = self._metadata.datasets

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
        file is only replaced when ``force`` is true.
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
        if Path(path).exists() and not force:
            raise _fail(path, "already exists; refusing to overwrite it without force")
        config_dtype = _numpy_dtype(dtype)
        field_shape = tuple(int(n) for n in field_shape)
        try:
            # "none": freed file space is never reused (crash safety, see module docstring).
            f = h5py.File(path, "w" if force else "w-", libver=("earliest", "v110"),
                          fs_strategy="none")
        except OSError as exc:
            raise _fail(path, f"cannot create ensemble file: {exc}") from None
        try:
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
            return cls(f, path)
        except BaseException:
            f.close()
            raise

    @classmethod
    def resume(cls, path: str | os.PathLike) -> EnsembleWriter:
        """Reopen an existing ensemble for appending; rows beyond ``n_complete`` are dropped."""
        f = _open(path, "r+")
        try:
            if SHARDS_ATTR in f.attrs:
                raise _fail(path, "a joined ensemble of shards cannot be appended to; resume its "
                                  "shards (the same torchrun command with --resume), which "
                                  "joins them again")
            writer = cls(f, path)
            for name in writer._names:
                if f[name].shape[0] != writer._n_complete:
                    f[name].resize(writer._n_complete, axis=0)
            if writer._n_complete > 0 and writer._valid_slot() is None:
                raise _fail(path, f"corrupt ensemble: no resume state for the "
                                  f"{writer._n_complete} complete rows")
            f.flush()
            return writer
        except BaseException:
            f.close()
            raise

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
        return {name: np.asarray(group[name][()]) for name in group}

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
        """
        k = self._check_rows(rows)
        self._write_rows(rows, k)
        self._write_resume_state(resume_state, self._n_complete + k)
        self._file.flush()
        self._commit(self._n_complete + k)

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
            dataset.resize(start + k, axis=0)
            if k:
                dataset[start:start + k] = np.asarray(rows[name], dtype=dataset.dtype)

    def _write_resume_state(self, state: Mapping[str, np.ndarray], n_rows: int) -> None:
        """Write ``state`` into the slot that is not the valid one; mark it valid for n_rows."""
        root = self._file[RESUME_GROUP]
        valid = self._valid_slot()
        target = RESUME_SLOTS[1] if valid == RESUME_SLOTS[0] else RESUME_SLOTS[0]
        group = root.require_group(target)
        group.attrs.modify("n_rows", np.int64(-1))
        for name in list(group):
            if name not in state:
                del group[name]
        for name, value in state.items():
            value = np.asarray(value)
            if name in group and (group[name].shape != value.shape
                                  or group[name].dtype != value.dtype):
                del group[name]
            if name in group:
                group[name][...] = value    # in place: the slot's old data is not referenced
            else:
                group.create_dataset(name, data=value)
        group.attrs.modify("n_rows", np.int64(n_rows))

    def _commit(self, n_complete: int) -> None:
        self._file.attrs.modify("n_complete", np.int64(n_complete))
        self._file.flush()
        self._n_complete = n_complete

    # ---------------------------------------------------------------------------- closing
    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> EnsembleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_attributes(self, **attrs: Any) -> None:
        """Write extra root attributes (numbers or strings; a scalar is rewritten in place
        when it already exists with the same type) and flush. For run diagnostics such as the
        proposal summary of neural MCMC; the schema's own attributes are not to be set here."""
        for name, value in attrs.items():
            self._file.attrs.modify(name, value)
        self._file.flush()


class EnsembleReader:
    """Read-only access to an ensemble; arrays are cut to ``n_complete`` rows.

    ``with EnsembleReader(path) as r: x = r.read("configs", 0, 100)``.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = path
        self._file = _open(path, "r")
        try:
            self.metadata: EnsembleMetadata = _read_metadata(self._file, path)
        except BaseException:
            self._file.close()
            raise

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

    def __enter__(self) -> EnsembleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
