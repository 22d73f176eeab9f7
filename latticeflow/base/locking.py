"""Advisory locks that keep latticeflow processes from writing the same file at once.

A lock is a set of ``fcntl`` byte-range locks on the locked file itself, far beyond its end
(``_BASE = 2**62``), so they never touch its data. Linux open-file-description locks
(``F_OFD_SETLK``) are used where available: they belong to one open file, so opening and closing
the same file elsewhere in the process (HDF5 does) does not drop them, and two opens in one
process exclude each other like two processes do. Elsewhere the classic per-process POSIX locks
stand in. The kernel releases every lock when its process dies, so a killed run leaves nothing
behind.

Ranges, relative to ``_BASE``:

* ``OWNER`` (0): held exclusively by the one writer for as long as it writes;
* ``COMMIT`` (1): held exclusively by the writer while it changes the file (one append), shared
  by readers while they have the file open, so a reader sees the file only between commits;
* ``_PID + pid``: held by the owner, so that others can name it (an OFD lock does not report
  its holder's pid).

A file system without lock support (some network mounts) degrades to no locking, logged at
debug level.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from latticeflow.base.errors import LatticeflowError

log = logging.getLogger("latticeflow")

_BASE = 1 << 62
OWNER, COMMIT, _PID = 0, 1, 16
_PID_SPAN = 1 << 32
_SET, _SET_WAIT, _GET = ((fcntl.F_OFD_SETLK, fcntl.F_OFD_SETLKW, fcntl.F_OFD_GETLK)
                         if hasattr(fcntl, "F_OFD_SETLK")
                         else (fcntl.F_SETLK, fcntl.F_SETLKW, fcntl.F_GETLK))
_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (Linux layout)
_BUSY = (errno.EAGAIN, errno.EACCES)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
#: How long a reader waits for a writer's commit to end before giving up, in seconds.
READ_WAIT_S = 60.0
_POLL_S = 0.02
_WAIT_NOTICE_S = 2.0


class InUseError(LatticeflowError):
    """The file or run directory is held by another latticeflow process."""


def _request(fd: int, cmd: int, kind: int, start: int, length: int = 1) -> bytes:
    return fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, _BASE + start, length, 0))


def in_use_message(what: str | os.PathLike, pid: int | None) -> str:
    holder = f"pid {pid}" if pid is not None else "pid unknown"
    return (f"{what}: in use by another latticeflow process ({holder}); wait for it to finish "
            f"or stop it")


class FileLock:
    """The locks of one open file (``fd``, kept open by this object; :meth:`close` drops
    them)."""

    def __init__(self, fd: int, path: str | os.PathLike):
        self.fd, self.path = fd, path
        self.supported = True

    @classmethod
    def open(cls, path: str | os.PathLike, writable: bool) -> FileLock:
        """Open ``path`` (read-write for a writer's locks, read-only for a reader's)."""
        flags = os.O_RDWR if writable else os.O_RDONLY
        return cls(os.open(path, flags | os.O_CLOEXEC), path)

    def _try(self, cmd: int, kind: int, start: int) -> bool:
        """Take (or release) one range; False when another holder conflicts."""
        if not self.supported or self.fd < 0:
            return True
        try:
            _request(self.fd, cmd, kind, start)
        except OSError as exc:
            if exc.errno in _BUSY:
                return False
            if exc.errno not in _UNSUPPORTED:
                raise
            log.debug("%s: file locks are not supported here (%s); continuing unlocked",
                      self.path, exc.strerror)
            self.supported = False
        return True

    def holder_pid(self) -> int | None:
        """The pid of the process that owns the file (None: no owner, or unknown)."""
        if not self.supported:
            return None
        try:
            answer = fcntl.fcntl(self.fd, _GET, struct.pack(
                _FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _BASE + _PID, _PID_SPAN, 0))
        except OSError:
            return None
        kind, _, start, _, _ = struct.unpack(_FLOCK, answer)
        return None if kind == fcntl.F_UNLCK else start - _BASE - _PID

    def owned_elsewhere(self) -> bool:
        """Whether another open file (process) holds the owner lock now."""
        if not self.supported:
            return False
        try:
            answer = fcntl.fcntl(self.fd, _GET, struct.pack(
                _FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _BASE + OWNER, 1, 0))
        except OSError:
            return False
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK

    def acquire_owner(self) -> None:
        """Become the file's one writer, or raise :class:`InUseError` naming the owner."""
        if not self._try(_SET, fcntl.F_WRLCK, OWNER):
            raise InUseError(in_use_message(self.path, self.holder_pid()))
        self._try(_SET, fcntl.F_WRLCK, _PID + os.getpid())

    @contextmanager
    def committing(self) -> Iterator[None]:
        """Exclusive use of the file's contents (waits for open readers to close it)."""
        self._wait(fcntl.F_WRLCK, None, "readers of it to close it")
        try:
            yield
        finally:
            self._try(_SET, fcntl.F_UNLCK, COMMIT)

    def acquire_reading(self) -> None:
        """A shared lock that keeps writers from committing while this reader has the file."""
        self._wait(fcntl.F_RDLCK, READ_WAIT_S, "its writer to finish a commit")

    def _wait(self, kind: int, timeout: float | None, whom: str) -> None:
        start = time.monotonic()
        noticed = False
        while not self._try(_SET, kind, COMMIT):
            waited = time.monotonic() - start
            if timeout is not None and waited > timeout:
                raise InUseError(f"{self.path}: still busy after {timeout:.0f} s waiting for "
                                 f"{whom}")
            if not noticed and waited > _WAIT_NOTICE_S:
                log.info("%s: waiting for %s", self.path, whom)
                noticed = True
            time.sleep(_POLL_S)

    def fsync(self) -> None:
        """Write the file's data through to the storage device."""
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the descriptor, dropping every lock (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def same_file(lock: FileLock, path: str | os.PathLike) -> bool:
    """Whether ``path`` still names the file that ``lock`` holds (not replaced meanwhile)."""
    try:
        here, there = os.fstat(lock.fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def refuse_if_in_use(path: str | os.PathLike) -> None:
    """Raise :class:`InUseError` when another latticeflow process writes ``path`` (an existing
    file); reads nothing of its contents."""
    lock = FileLock.open(path, writable=False)
    try:
        if lock.owned_elsewhere():
            raise InUseError(in_use_message(path, lock.holder_pid()))
    finally:
        lock.close()


def lock_same_file(path: str | os.PathLike, writable: bool,
                   acquire: Callable[[FileLock], None]) -> FileLock:
    """Open ``path`` and take a lock on it with ``acquire(lock)``; retried when the file is
    replaced between the open and the lock. Whatever ``acquire`` raises closes the file and
    propagates."""
    for _ in range(100):
        lock = FileLock.open(path, writable=writable)
        try:
            acquire(lock)
        except BaseException:
            lock.close()
            raise
        if same_file(lock, path):
            return lock
        lock.close()
    raise LatticeflowError(f"{path}: keeps being replaced by another process")


def own_file(path: str | os.PathLike) -> FileLock:
    """Open ``path`` and become its one writer (:class:`InUseError` when another process is)."""
    return lock_same_file(path, True, FileLock.acquire_owner)


# ------------------------------------------------------------------------- run directories
#: The lock file of a run directory, there only while a process trains in it.
RUN_LOCK_NAME = ".latticeflow.lock"
_held_dirs: dict[Path, tuple[FileLock, int]] = {}


def hold_run_dir(run_dir: str | os.PathLike) -> None:
    """Make this process the one that trains in ``run_dir`` (created if missing), or raise
    :class:`InUseError`. Re-entrant within a process; undo with :func:`release_run_dir`."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_dirs:
        lock, count = _held_dirs[run_dir]
        _held_dirs[run_dir] = (lock, count + 1)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOCK_NAME
    for _ in range(100):
        lock = FileLock(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), path)
        try:
            lock.acquire_owner()
        except InUseError:
            pid = lock.holder_pid()
            lock.close()
            raise InUseError(in_use_message(run_dir, pid)) from None
        if same_file(lock, path):  # not removed by a releasing owner meanwhile
            _held_dirs[run_dir] = (lock, 1)
            return
        lock.close()
    raise LatticeflowError(f"{run_dir}: its lock file keeps being replaced")


def release_run_dir(run_dir: str | os.PathLike) -> None:
    """Undo one :func:`hold_run_dir`; the last removes the lock file (while still holding it,
    so a process that opened it before sees it replaced) and drops the lock."""
    run_dir = Path(run_dir).resolve()
    lock, count = _held_dirs.pop(run_dir)
    if count > 1:
        _held_dirs[run_dir] = (lock, count - 1)
        return
    try:
        Path(lock.path).unlink(missing_ok=True)
    finally:
        lock.close()


@contextmanager
def run_dir_held(run_dir: str | os.PathLike) -> Iterator[None]:
    """:func:`hold_run_dir` for the duration of the block."""
    hold_run_dir(run_dir)
    try:
        yield
    finally:
        release_run_dir(run_dir)
