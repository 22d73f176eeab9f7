"""Files on disk: opening an ensemble with one-line errors, publishing a new file without
clobbering one, making renames durable, the errors of a failed write and the set of files this
process writes.

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
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import h5py

from latticeflow.errors import LatticeflowError
from latticeflow.locking import InUseError

#: (st_dev, st_ino) of the files this process has open for writing.
WRITING: set[tuple[int, int]] = set()


class DiskSpaceError(LatticeflowError):
    """The next chunk would not fit (free space or file-size limit); nothing was written."""


class EnsembleWriteError(LatticeflowError):
    """Writing a chunk failed; the file holds its committed rows and the writer is closed."""


def file_error(path: str | os.PathLike, problem: str) -> LatticeflowError:
    return LatticeflowError(f"{path}: {problem}")


def open_h5(path: str | os.PathLike, mode: str, locking: bool = True) -> h5py.File:
    try:
        return h5py.File(path, mode, locking=locking)
    except FileNotFoundError:
        raise file_error(path, "no such ensemble file") from None
    except OSError as exc:
        if "unable to lock file" in str(exc):
            raise InUseError(f"{path}: in use by another process (it holds HDF5's file lock); "
                             f"wait for it to close the file") from None
        raise file_error(path, f"not a readable HDF5 ensemble (truncated or corrupt?): "
                               f"{exc}") from None


def file_key(fd_or_path: int | str | os.PathLike) -> tuple[int, int]:
    st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    return st.st_dev, st.st_ino


def io_reason(exc: BaseException) -> str:
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


def publish(tmp: Path, path: Path, replace: bool) -> None:
    """Put the finished file ``tmp`` at ``path``: over the old file (``replace``) or only where
    there is none (a hard link cannot clobber a file that appeared meanwhile)."""
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise file_error(path, "already exists; refusing to overwrite it without "
                                   "force") from None
        except OSError as exc:  # a file system without hard links
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if path.exists():
                raise file_error(path, "already exists; refusing to overwrite it without "
                                  "force") from None
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    sync_folder(path)


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
    to read (see "Crash safety" in :mod:`latticeflow.ensemble.chunks`). Only a version 2 or 3
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
