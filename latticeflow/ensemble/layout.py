"""The layout of an ensemble file (schema v1 of DESIGN §6): names, storage types, the root
attributes and empty datasets of a new file, the decoded header (:class:`EnsembleMetadata`), an
ensemble in memory (:class:`Ensemble`) and the validation of a file's header.

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
  one row per HDF5 chunk (or lzf, or uncompressed with multi-row chunks; see "Crash safety" in
  :mod:`latticeflow.ensemble.commit`);
* ``/action``     ``(N,)`` float64, S of the stored configuration;
* ``/accepted``   ``(N,)`` bool;
* ``/log_q``, ``/log_weight``  ``(N,)`` float64, nmcmc only (log_weight = −S − log q);
* ``/delta_H``    ``(N,)`` float64, hmc only;
* ``/chain``      ``(N,)`` int32, optional (``chains=True`` at creation): index of the
  independent Markov chain the row belongs to. Rows of different chains may interleave in any
  order; the rows of one chain, ``data[chain == c]``, are in Markov-chain order. (The HMC
  sampler writes chains round-robin: row i belongs to chain ``i % n_chains``.)

Resume state: the groups ``/resume/slot0`` and ``/resume/slot1``, created with the file; what
they hold and which one is valid: :mod:`latticeflow.ensemble.resume`.
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
from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble.storage import file_error

FORMAT = "latticeflow-ensemble"
FORMAT_VERSION = 1
SAMPLERS = ("nmcmc", "hmc")
COMMON_DATASETS = ("configs", "action", "accepted")
SAMPLER_DATASETS = {"nmcmc": ("log_q", "log_weight"), "hmc": ("delta_H",)}
CHAIN_DATASET = "chain"
RESUME_GROUP = "resume"
RESUME_SLOTS = ("slot0", "slot1")
SHARDS_ATTR = "shards"
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
SCALAR_CHUNK_ROWS = 4096      # per-row scalars: uncompressed, long chunks (few index nodes)
LENGTH_ATTR = "length"


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


def numpy_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    result = np.dtype(dtype)
    if result not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise LatticeflowError(f"configurations are stored as float32 or float64, not {result}")
    return result


def config_chunk_length(chunk_rows: int, row_bytes: int, compression: str | None) -> int:
    """Rows per HDF5 chunk of ``/configs``: 1 when compressed (a compressed chunk must never be
    rewritten, see :mod:`latticeflow.ensemble.commit`), else the largest divisor of
    ``chunk_rows`` whose chunk stays within ``_CONFIG_CHUNK_BYTES``."""
    if compression is not None:
        return 1
    limit = max(1, _CONFIG_CHUNK_BYTES // max(1, row_bytes))
    if chunk_rows <= limit:
        return chunk_rows
    return max(n for n in range(1, limit + 1) if chunk_rows % n == 0)


def root_attributes(*, theory: str, action_params: Mapping[str, Any], lattice: Sequence[int],
                    sampler: str, seed: int, checkpoint_sha256: str,
                    sampler_params: Mapping[str, Any], n_complete: int) -> dict[str, Any]:
    """The root attributes of a new file, in the order they are written (``created``: now, UTC;
    ``latticeflow_version``: this one)."""
    return {
        "format": FORMAT, "format_version": np.int64(FORMAT_VERSION), "theory": theory,
        "action_params": json.dumps(dict(action_params), sort_keys=True),
        "lattice": np.asarray(lattice, dtype=np.int64), "sampler": sampler,
        "seed": np.int64(seed), "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "latticeflow_version": latticeflow.__version__, "checkpoint_sha256": checkpoint_sha256,
        "sampler_params": json.dumps(dict(sampler_params), sort_keys=True),
        "n_complete": np.int64(n_complete),
    }


def create_layout(f: h5py.File, *, field_shape: tuple[int, ...], config_dtype: np.dtype,
                  sampler: str, chains: bool, chunk_rows: int, compression: str | None) -> None:
    """The empty row datasets and the (empty) resume slots of a new file."""
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
    # later would be written before the superblock's end-of-allocation that covers its target
    # (see "Crash safety" in ensemble.commit).
    resume = f.create_group(RESUME_GROUP)
    for slot in RESUME_SLOTS:
        resume.create_group(slot).attrs["n_rows"] = np.int64(-1)


def read_metadata(f: h5py.File, path: str | os.PathLike) -> EnsembleMetadata:
    """Validate the header of an open file and decode it; raises LatticeflowError."""
    try:
        metadata = _decode_metadata(f, path)
    except (OSError, KeyError) as exc:
        raise file_error(path, f"corrupt ensemble: {exc}") from None
    if SHARDS_ATTR in f.attrs:
        _check_shards(f, path)
    return metadata


def _check_shards(f: h5py.File, path: str | os.PathLike) -> None:
    """Every shard of a joined file is where HDF5 will look for it, with enough rows."""
    try:
        shards = json.loads(f.attrs[SHARDS_ATTR])
    except (TypeError, ValueError) as exc:
        raise file_error(path, f"corrupt joined ensemble: bad {SHARDS_ATTR} attribute "
                               f"({exc})") from None
    folder = Path(path).resolve().parent
    for shard in shards:
        source = folder / shard["file"]
        if not source.is_file():
            raise file_error(path, f"shard {source} is missing (a joined ensemble reads its rows "
                              f"from its shard files; keep them next to it)")
        try:
            with h5py.File(source, "r") as g:
                have = int(g.attrs.get("n_complete", -1))
        except OSError as exc:
            raise file_error(path, f"cannot open shard {source} (is it being written?): "
                              f"{exc}") from None
        if have < int(shard["rows"]):
            raise file_error(path, f"shard {source} holds {have} rows but the joined file maps "
                              f"{shard['rows']}; it was replaced after joining")


def _decode_metadata(f: h5py.File, path: str | os.PathLike) -> EnsembleMetadata:
    attrs = f.attrs
    if attrs.get("format") != FORMAT:
        raise file_error(path, f"not a latticeflow ensemble (format attribute is "
                          f"{attrs.get('format')!r}, expected {FORMAT!r})")
    version = attrs.get("format_version")
    if version is None or int(version) != FORMAT_VERSION:
        raise file_error(path, f"unsupported ensemble format_version {version!r} "
                          f"(this latticeflow reads version {FORMAT_VERSION})")
    missing = [name for name in _REQUIRED_ATTRS if name not in attrs]
    if missing:
        raise file_error(path, f"corrupt ensemble: missing attribute(s) {', '.join(missing)}")
    sampler = str(attrs["sampler"])
    if sampler not in SAMPLERS:
        raise file_error(path, f"corrupt ensemble: unknown sampler {sampler!r}")
    n_complete = int(attrs["n_complete"])
    present = tuple(name for name in row_datasets(sampler, chains=True) if name in f)
    for name in row_datasets(sampler):
        if name not in present:
            raise file_error(path, f"corrupt ensemble: dataset /{name} is missing")
    for name in present:
        if f[name].shape[0] < n_complete:
            raise file_error(path, f"truncated ensemble: /{name} has {f[name].shape[0]} rows but "
                              f"n_complete = {n_complete}")
    try:
        action_params = json.loads(attrs["action_params"])
        sampler_params = json.loads(attrs["sampler_params"])
    except (TypeError, ValueError) as exc:
        raise file_error(path, f"corrupt ensemble: bad JSON attribute ({exc})") from None
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
