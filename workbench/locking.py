"""One writer per output directory: an exclusive ``flock`` on ``DIR/.lock``, which holds the writer's pid.

Every job that writes a directory (``workbench cache``, ``workbench train``, ``workbench train-sae``)
takes the lock first; a second writer fails at once with :class:`OutputLockedError` instead of
interleaving its files with the first one's. ``flock`` belongs to the open file, so the kernel
releases it when the holder dies, even by ``kill -9``: a lock file left behind by a dead process
never blocks anyone (its pid is only there to name the holder in the error).

The lock file is removed on release, so a finished output holds only what the job wrote. Removing
it is safe because a taker checks, once it holds the lock, that the path still names the file it
locked (otherwise it locked a file just unlinked by a releasing holder, and tries again).

Within one thread the lock is re-entrant (a command may hold it around a library call that takes it
too); another thread of the same process is refused like another process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from workbench.errors import ConfigError, WorkbenchError

LOCK_FILE = ".lock"

# realpath of a lock file -> (thread ident, depth) for the locks this process holds
_held: dict[str, tuple[int, int]] = {}
_held_guard = threading.Lock()


class OutputLockedError(WorkbenchError, RuntimeError):
    """Another process (or another job of this process) is writing the same output directory."""


def lock_name(rank: int = 0) -> str:
    """Return the lock file name for a process of rank ``rank`` (``.lock``; ``.lock.rN`` for N > 0).

    Under ``torchrun`` each rank of the store writer writes its own shards, so each locks its own
    file; rank 0's is the plain ``.lock``, which is also what a single process takes, so a
    one-process job and a torchrun job on the same directory exclude each other.
    """
    return LOCK_FILE if rank == 0 else f"{LOCK_FILE}.r{rank}"


@contextmanager
def output_lock(directory: str | os.PathLike, name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold the exclusive lock on ``directory`` (created if missing) for the ``with`` block; yield the lock path.

    Raises :class:`OutputLockedError` at once, without waiting, when another writer holds it.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"the output {directory} is a file, not a directory; choose another --out")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the output directory {directory} ({exc.strerror}); choose another --out"
        ) from exc
    if not directory.is_dir():
        raise ConfigError(f"the output {directory} is a file, not a directory; choose another --out")
    path = directory / name
    key = os.path.realpath(path)
    me = threading.get_ident()
    with _held_guard:
        holder = _held.get(key)
        if holder is not None and holder[0] == me:
            _held[key] = (me, holder[1] + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                thread, depth = _held[key]
                _held[key] = (thread, depth - 1)
        return

    fd = _acquire(path, directory)
    with _held_guard:
        _held[key] = (me, 1)
    try:
        yield path
    finally:
        with _held_guard:
            del _held[key]
        _release(path, fd)


def _acquire(path: Path, directory: Path) -> int:
    """Return an open descriptor of ``path`` holding its exclusive flock, with this pid written in it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"cannot write in the output directory {directory} ({exc.strerror}); choose another --out"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise ConfigError(
                    f"cannot lock {path} ({exc.strerror}); the file system of {directory} may not support "
                    "locks: choose an --out on a local disk"
                ) from exc
            pid = _read_pid(fd)
            os.close(fd)
            raise OutputLockedError(_locked_message(directory, pid)) from None
        # The holder before us may have unlinked the file between our open and our flock: then we
        # locked a file nobody else will open. Lock the one the path names now instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(path: Path, fd: int) -> None:
    # Unlink while still holding the lock: a taker that opened the old file sees it is gone and retries.
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _locked_message(directory: Path, pid: int | None) -> str:
    if pid is not None and pid == os.getpid():
        return (f"another job of this process (pid {pid}) is writing {directory}; wait for it to finish "
                "or choose another --out")
    who = f"pid {pid}" if pid is not None else "pid unknown"
    return f"another process is writing {directory} ({who}); wait for it or choose another --out"


def holder_pid(directory: str | os.PathLike, name: str = LOCK_FILE) -> int | None:
    """Return the pid of the process holding ``directory``'s lock, or None when nobody holds it."""
    path = Path(directory) / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
