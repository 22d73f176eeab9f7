"""Files on disk: opening an ensemble with one-line errors, publishing a new file without
clobbering one, making renames durable, the errors of a failed write and the set of files this
process writes.

Locking (:mod:`latticeflow.base.locking`): a writer owns its file through an advisory ``fcntl`` lock
taken before anything is created, opened for writing or truncated, and held until it closes; a
second writer (``--resume``, ``--force``) is refused with
:class:`~latticeflow.base.locking.InUseError` naming the owner's pid. :meth:`EnsembleWriter.create`
never truncates a file: it builds the new file under a temporary name next to it and then links it
into place (or, with ``force``, renames it over the old one, which it owns first), so a reader that
has the old file open keeps reading the old file. Each commit holds a second, exclusive lock; an
:class:`EnsembleReader` holds it shared while it has the file open, so it opens and reads the file
only between commits, when everything the writer changed has been flushed: a reader of a live file
sees a consistent file with the ``n_complete`` rows committed when it opened it (reopen to see
more), and a writer's commit waits while readers have the file open. (The writer also keeps HDF5's
own file lock, so plain ``h5py.File(path)`` calls are refused while it writes; the reader opens with
HDF5's locking off and relies on the commit lock instead.)
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import h5py

from latticeflow.base.errors import LatticeflowError
from latticeflow.base.locking import InUseError

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
