"""Recovering the file a killed writer left, for :meth:`EnsembleWriter.resume
<latticeflow.ensemble.EnsembleWriter.resume>` (see "Crash safety" in
:mod:`latticeflow.ensemble.commit`): raising the end of allocation in the HDF5 superblock to the
end of the file, and copying a file's committed state (root attributes, the ``n_complete`` rows,
the valid resume slot) into a new file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import h5py

from latticeflow.ensemble.layout import RESUME_GROUP, RESUME_SLOTS, EnsembleMetadata
from latticeflow.ensemble.resume import read_slot, valid_slot, write_slot
from latticeflow.ensemble.storage import file_error

#: What h5py raises for an object it cannot read (e.g. beyond the end of allocation).
DAMAGE = (OSError, KeyError, RuntimeError, ValueError)


def committed_copy(src: h5py.File, path: str | os.PathLike, metadata: EnsembleMetadata
                   ) -> Callable[[h5py.File], None]:
    """What fills a new, empty file with the committed state of ``src`` (whose header is
    ``metadata``): its root attributes, its first ``n_complete`` rows and its valid resume
    slot, written into the slot of the same name (the other slot gets the same entries,
    marked invalid)."""
    n = metadata.n_complete
    slot = None
    if n > 0:
        slot = valid_slot(src, n)
        if slot is None:
            raise file_error(path, f"corrupt ensemble: no resume state for the {n} "
                                   f"complete rows")

    def fill(f: h5py.File) -> None:
        for name, value in src.attrs.items():
            f.attrs[name] = value
        for name in metadata.datasets:
            _copy_rows(src[name], f[name], n)
        if slot is not None:
            state = read_slot(src[RESUME_GROUP][slot])
            for target, n_rows in ((s, -1) for s in RESUME_SLOTS if s != slot):
                write_slot(f, target, state, n_rows, [])
            write_slot(f, slot, state, n, [])

    return fill


def _copy_rows(src: h5py.Dataset, dst: h5py.Dataset, n: int) -> None:
    """Rows ``[0, n)`` of ``src`` into ``dst`` (resized to n), 16 MiB at a time."""
    dst.resize(n, axis=0)
    row = max(1, src.dtype.itemsize * math.prod(src.shape[1:]))
    step = max(1, (16 << 20) // row)
    for start in range(0, n, step):
        dst[start:start + step] = src[start:min(n, start + step)]


_SUPERBLOCK = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _lookup3(data: bytes) -> int:
    """HDF5's metadata checksum: Bob Jenkins' lookup3 ``hashlittle`` with initial value 0."""
    a = b = c = (0xDEADBEEF + len(data)) & _MASK
    words = [int.from_bytes(data[i:i + 4].ljust(4, b"\0"), "little")
             for i in range(0, len(data), 4)]
    n = len(data)
    i = 0
    while n > 12:
        a, b, c = (a + words[i]) & _MASK, (b + words[i + 1]) & _MASK, (c + words[i + 2]) & _MASK
        a = ((a - c) & _MASK) ^ _rot(c, 4)
        c = (c + b) & _MASK
        b = ((b - a) & _MASK) ^ _rot(a, 6)
        a = (a + c) & _MASK
        c = ((c - b) & _MASK) ^ _rot(b, 8)
        b = (b + a) & _MASK
        a = ((a - c) & _MASK) ^ _rot(c, 16)
        c = (c + b) & _MASK
        b = ((b - a) & _MASK) ^ _rot(a, 19)
        a = (a + c) & _MASK
        c = ((c - b) & _MASK) ^ _rot(b, 4)
        b = (b + a) & _MASK
        n -= 12
        i += 3
    if n == 0:
        return c
    tail = words[i:i + 3] + [0, 0]        # zero-padded, as the byte-wise cases add
    a, b, c = (a + tail[0]) & _MASK, (b + tail[1]) & _MASK, (c + tail[2]) & _MASK
    c = (c ^ b) - _rot(b, 14) & _MASK
    a = (a ^ c) - _rot(c, 11) & _MASK
    b = (b ^ a) - _rot(a, 25) & _MASK
    c = (c ^ b) - _rot(b, 16) & _MASK
    a = (a ^ c) - _rot(c, 4) & _MASK
    b = (b ^ a) - _rot(a, 14) & _MASK
    c = (c ^ b) - _rot(b, 24) & _MASK
    return c


def extend_allocation(fd: int) -> bool:
    """Raise the end of allocation (EOA) in the superblock of the HDF5 file ``fd`` to the
    file's size; True when it did. HDF5 writes the superblock last in a flush, so a killed
    writer can leave links to objects it wrote beyond the EOA on disk, which HDF5 then refuses
    to read (see "Crash safety" in :mod:`latticeflow.ensemble.commit`). Only a version 2 or 3
    superblock at offset 0 with 8-byte addresses and a checksum that verifies is changed (one
    48-byte write, then ``fsync``); the space between the two ends is merely never reused."""
    block = os.pread(fd, 48, 0)
    if (len(block) != 48 or block[:8] != _SUPERBLOCK or block[8] not in (2, 3)
            or block[9] != 8 or _lookup3(block[:44]) != int.from_bytes(block[44:], "little")
            or int.from_bytes(block[12:20], "little") != 0):
        return False
    size = os.fstat(fd).st_size
    if size <= int.from_bytes(block[28:36], "little"):
        return False
    block = block[:28] + size.to_bytes(8, "little") + block[36:44]
    os.pwrite(fd, block + _lookup3(block).to_bytes(4, "little"), 0)
    os.fsync(fd)
    return True
