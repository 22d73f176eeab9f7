"""The resume state of an ensemble file: the sampler state stored with the committed rows, so
that a run continues exactly where the file stops.

Resume state
------------
``/resume/slot0`` and ``/resume/slot1`` are groups of datasets (the sampler's
``state_dict()``: RNG state, current configurations, unused proposals, ...), each with an
attribute ``n_rows``: the number of rows the state corresponds to. The *valid* state is the slot
whose ``n_rows == n_complete`` (none while ``n_complete == 0``). An array entry is stored in an
uncompressed, chunked dataset resizable along axis 0 whose attribute ``length`` says how many
of its leading rows hold the value; its extent (the capacity) only grows, so a value of varying
length (the unused proposals) is rewritten in place and a slot never needs more space than its
longest value: the file grows with its rows, not with the number of appends. A scalar entry is
a scalar dataset. (Files written before ``length`` existed store each entry as a plain dataset
of exactly its value; they are read as such and converted on their next append.)

A chunk's state goes into the slot that is *not* the valid one, so the valid slot is never
touched while a chunk is written (see "Crash safety" in :mod:`latticeflow.ensemble.commit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import h5py
import numpy as np

from latticeflow.ensemble.layout import LENGTH_ATTR, RESUME_GROUP, RESUME_SLOTS

# Array entries: at most 64 KiB per HDF5 chunk, so that an entry's capacity exceeds its longest
# value by less than that (both slots are sized by the first chunk's state).
STATE_CHUNK_BYTES = 64 << 10


def valid_slot(file: h5py.File, n_complete: int) -> str | None:
    """The slot holding the state for ``n_complete`` rows (None while ``n_complete == 0``)."""
    if n_complete == 0:
        return None
    group = file[RESUME_GROUP]
    for slot in RESUME_SLOTS:
        if slot in group and int(group[slot].attrs.get("n_rows", -1)) == n_complete:
            return slot
    return None


def other_slot(slot: str | None) -> str:
    """The slot the next state is written to: the one that is not ``slot``."""
    return RESUME_SLOTS[1] if slot == RESUME_SLOTS[0] else RESUME_SLOTS[0]


def read_slot(group: h5py.Group) -> dict[str, np.ndarray]:
    """Every entry of a slot, by name."""
    return {name: read_state_entry(group[name]) for name in group}


def read_state_entry(dataset: h5py.Dataset) -> np.ndarray:
    """A resume-state value: the first ``length`` rows, or the whole (older or scalar) dataset."""
    if LENGTH_ATTR in dataset.attrs:
        return np.asarray(dataset[:int(dataset.attrs[LENGTH_ATTR])])
    return np.asarray(dataset[()])


def write_slot(file: h5py.File, slot: str, state: Mapping[str, np.ndarray], n_rows: int,
               written: list[h5py.Dataset]) -> None:
    """Write ``state`` into ``slot`` (marked ``n_rows = -1`` meanwhile), then its ``n_rows``.

    An entry missing from ``state`` gets length 0, keeping its space for later. Each dataset
    written is appended to ``written`` as soon as it is written (the writer keeps them open
    until its next flush)."""
    group = file[RESUME_GROUP].require_group(slot)  # older files: created lazily
    group.attrs.modify("n_rows", np.int64(-1))
    for name in group:
        if name not in state and LENGTH_ATTR in group[name].attrs:
            group[name].attrs.modify(LENGTH_ATTR, np.int64(0))
    for name, value in state.items():
        written.append(write_state_entry(group, name, value))
    group.attrs.modify("n_rows", np.int64(n_rows))


def write_state_entry(group: h5py.Group, name: str, value: np.ndarray) -> h5py.Dataset:
    """Store ``value`` as entry ``name`` of a resume slot, in place where possible (see
    "Resume state" above); returns the dataset."""
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


def check_slots(file: h5py.File) -> None:
    """Read every object of ``/resume`` in full (both slots, every entry to its whole extent),
    as resuming and the next chunks will touch them: an object that a killed flush left
    unreachable raises here (OSError, KeyError, RuntimeError, ValueError), before anything is
    changed, instead of in the middle of the next chunk."""
    root = file[RESUME_GROUP]
    for slot in RESUME_SLOTS:
        if slot not in root:
            continue
        group = root[slot]
        dict(group.attrs)
        for name in group:
            dataset = group[name]
            dict(dataset.attrs)
            dataset[()]
