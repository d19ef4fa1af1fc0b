"""One worker per (inbox, database): an advisory `fcntl.flock` lock file.

A second worker started by accident on the same inbox and the same database refuses with `InboxLocked`,
naming the pid that holds the lock. The lock belongs to the open file description, so the kernel releases
it when the holding process dies for any reason, SIGKILL included: a stale lock file on disk never blocks
a restart. The file itself is left in place on exit (unlinking a lock file races with a starting worker).

Where the lock file lives (never inside the watched inbox):
- SQLite file database: beside the database file (its folder must be writable for the WAL anyway, and is
  the systemd `StateDirectory=`), named `.fashion-worker-<key>.lock`;
- any other URL (PostgreSQL…): in `$XDG_RUNTIME_DIR` when it is set and writable, otherwise in the inbox's
  parent folder.
`<key>` is a hash of the inbox's real path and the database URL, so one folder can hold the locks of
several (inbox, database) pairs. flock is local to a machine: it does not guard an inbox shared over NFS
by workers on several hosts (the scale-out design coordinates through the database instead).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
from pathlib import Path
from types import TracebackType

from worker.exceptions import InboxLocked, StoreError

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"


def lock_key(inbox: Path, database_url: str) -> str:
    """A short stable key for the pair (inbox real path, database URL)."""
    text = f"{Path(inbox).resolve()}\0{database_url}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def sqlite_file(database_url: str) -> Path | None:
    """The database file of a SQLite URL, or None for other URLs and in-memory databases."""
    if not database_url.startswith(SQLITE_PREFIX) or ":memory:" in database_url:
        return None
    path = database_url[len(SQLITE_PREFIX):].split("?", 1)[0]
    return Path(path) if path else None


def lock_path(inbox: Path, database_url: str) -> Path:
    """Where the lock file for this (inbox, database) pair lives; see the module docstring."""
    name = f".fashion-worker-{lock_key(inbox, database_url)}.lock"
    database_file = sqlite_file(database_url)
    if database_file is not None:
        return database_file.parent / name
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime) and os.access(runtime, os.W_OK):
        return Path(runtime) / name
    return Path(inbox).resolve().parent / name


class InboxLock:
    """`with InboxLock(inbox, url):` holds the lock, or raises InboxLocked naming the holder's pid."""

    def __init__(self, inbox: Path, database_url: str, path: Path | None = None) -> None:
        self.inbox = Path(inbox)
        self.database_url = database_url
        self.path = path or lock_path(self.inbox, database_url)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the worker lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"cannot lock {self.path}: {exc.strerror}") from None
            who = f"pid {holder}" if holder else "another process"
            raise InboxLocked(
                f"another worker ({who}) is already processing inbox {self.inbox} into {self.database_url} "
                f"(lock file {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        log.debug("lock %s acquired", self.path)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> InboxLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
