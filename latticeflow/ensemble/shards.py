"""Joining the shards of a multi-process run into one ensemble (:func:`join_shards`).

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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latticeflow.base.errors import LatticeflowError
from latticeflow.ensemble.layout import ROW_DTYPES, SHARDS_ATTR, EnsembleMetadata, root_attributes
from latticeflow.ensemble.reader import EnsembleReader
from latticeflow.ensemble.storage import file_error

#: Values HDF5 returns for rows of a joined file whose shard cannot be found.
_VIRTUAL_FILL = {"b": False, "i": -1, "f": np.nan}


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
        raise file_error(path, "already exists; refusing to overwrite it without force")
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
            f.attrs.update(root_attributes(
                theory=first.theory, action_params=first.action_params, lattice=first.lattice,
                sampler=first.sampler, seed=seed, checkpoint_sha256=first.checkpoint_sha256,
                sampler_params=sampler_params, n_complete=total))
            f.attrs[SHARDS_ATTR] = json.dumps([{"file": name, "rows": meta.n_complete}
                                               for name, meta in zip(names, metas, strict=True)])
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
