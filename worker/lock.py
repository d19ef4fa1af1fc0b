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
`<key>` is a hash of the inbox's real path and the database (a SQLite file by its real path), so one
folder can hold the locks of several (inbox, database) pairs. flock is local to a machine: it does not
guard an inbox shared over NFS by workers on several hosts.

PostgreSQL (scale-out, README.md, Scale-out): several workers may share an inbox, on one host or several,
because each file is claimed in the database before it is read (worker.claims), so no inbox lock is
taken. What must stay unique there is the worker id (results, heartbeats and claims are kept under it):
`WorkerIdLock` holds a session-level `pg_try_advisory_lock` on the worker id for the life of the worker,
on a connection of its own. A second process started with the same `service.worker_id`, on any host,
refuses with InboxLocked naming the holder. PostgreSQL releases the lock when the holder's connection
ends (a process killed by any signal closes its socket at once; a host that vanishes is noticed through
the TCP keepalives this connection asks the server for, within about half a minute). A worker restarted
under the same id on the same host while the server still keeps its gone process's session (a host reset)
waits for that session to end rather than refusing (GONE_HOLDER_WAIT_S). The lock's session names its
process in its application_name (`session_name`: pid, a tag of the host, the boot and the process's start),
so a restart tells a gone holder from a running one exactly, no clock involved, even before the holder has
written its row in the workers table (it does so after start-up recovery, which reads the row as the id's
previous process left it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from worker.exceptions import InboxLocked, StoreError, WorkerIdStillHeld
from worker.migrations import WORKER_ID_LOCK_CLASS
from worker.recovery import boot_id, pid_alive, process_start, same_process
from worker.store import Store, hide_password, workers

log = logging.getLogger(__name__)

SQLITE_PREFIX = "sqlite:///"


# Server-side keepalives of the lock connection: a vanished client host is noticed in about 10 + 3 x 5 s.
# How long a session of this process that lost its client side takes to end once terminated, at most.
OWN_SESSION_END_S = 5.0
KEEPALIVE_SETTINGS = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5, "tcp_keepalives_count": 3}
# How long a starting worker waits for the session of its id's earlier, gone process to end; and how often
# it looks.
GONE_HOLDER_WAIT_S = 40.0
GONE_HOLDER_POLL_S = 0.5


def session_name() -> str:
    """The application_name of this process's id-lock session: "fashion-worker PID@HOST BOOT START", HOST 12
    hex digits of a hash of the host name (application_name keeps 63 bytes, a host name may be longer),
    BOOT the first 8 of this boot's id, START the process's start in clock ticks since boot. Together they
    name this one process for good: a pid handed out again, on this boot or after a reboot, is not it."""
    return f"fashion-worker {os.getpid()}@{_host_tag()} {boot_id()[:8]} {process_start()}"


def _host_tag() -> str:
    # The host name alone: two containers given one host name and pid namespaces of their own, under one
    # worker id, see each other's pids as gone or another process's; the second then waits for the first's
    # session and exits 75 instead of 2 at once (it never runs beside it: the lock stays held).
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:12]


# pg_locks rows (as l) of a worker id's lock: advisory locks are per database, pg_locks lists the server's.
_HELD_BY = ("l.locktype = 'advisory' AND l.granted AND l.classid = :cls AND l.objid = :obj AND l.objsubid = 2 "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())")
_SESSION_NAME = re.compile(r"fashion-worker (\d+)@([0-9a-f]{12}) ([0-9a-f-]{0,8}) (\d+|None)")


def uses_claims(database_url: str) -> bool:
    """True for PostgreSQL URLs: workers coordinate through claims (worker.claims), not an inbox lock."""
    try:
        return make_url(database_url).get_backend_name() == "postgresql"
    except ArgumentError:
        return False


def lock_key(inbox: Path, database_url: str) -> str:
    """A short stable key for the pair (inbox real path, database): a SQLite file by its real path, so that
    two spellings of one database (a symlinked folder, "data/../data") share one lock; other URLs as given."""
    database_file = sqlite_file(database_url)
    database = str(database_file.resolve()) if database_file is not None else database_url
    text = f"{Path(inbox).resolve()}\0{database}"
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
        return database_file.resolve().parent / name
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
                f"another worker ({who}) is already processing inbox {self.inbox} into "
                f"{hide_password(self.database_url)} "
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


def worker_id_key(worker_id: str) -> int:
    """The second advisory-lock key (a signed 32-bit int) of a worker id; the first is WORKER_ID_LOCK_CLASS."""
    digest = hashlib.sha256(worker_id.encode("utf-8", "surrogateescape")).digest()
    return struct.unpack(">i", digest[:4])[0]


@dataclass(frozen=True)
class Holder:
    """The process whose session holds a worker id: its pid, whether it is of this host, and whether it
    is gone (a process of this host that no longer runs, its session left to the server's keepalives)."""

    pid: int
    here: bool
    gone: bool


class WorkerIdLock:
    """PostgreSQL: `with WorkerIdLock(store, worker_id):` holds the worker id, or raises InboxLocked naming
    the host and pid of the process that holds it (from the workers table). See the module docstring."""

    def __init__(self, store: Store, worker_id: str, *, wait_s: float = GONE_HOLDER_WAIT_S,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.store = store
        self.worker_id = worker_id
        self.wait_s = wait_s  # how long acquire waits for the session of a gone process of this host (0: not)
        self.stopping = stopping  # a stop was asked for: acquire waits no longer
        self._conn: Connection | None = None
        self._wanted = False
        self._backend: int | None = None  # the server process of the session holding the lock
        self.taken = False  # another process took the id after this one lost its connection

    @property
    def held(self) -> bool:
        return self._conn is not None

    def _try(self) -> Connection | None:
        """A connection holding the lock, or None when another session holds it."""
        conn = self.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            for name, value in KEEPALIVE_SETTINGS.items():
                conn.exec_driver_sql(f"SET {name} = {int(value)}")
            conn.execute(sa.text("SELECT set_config('application_name', :name, false)"), {"name": session_name()})
            got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:cls, :key)"),
                               {"cls": WORKER_ID_LOCK_CLASS, "key": worker_id_key(self.worker_id)}).scalar()
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        if got:
            self._backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            return conn
        conn.invalidate()  # not back to the pool: its session carries the lock's name and keepalives
        conn.close()
        return None

    def _lock_keys(self) -> dict[str, int]:
        """The id's lock as pg_locks shows it, for _HELD_BY: classid and objid (the second key, unsigned)."""
        return {"cls": WORKER_ID_LOCK_CLASS, "obj": worker_id_key(self.worker_id) % 2**32}

    def _holder_backend(self) -> int | None:
        """The server process of the session that holds the lock now (None: nobody)."""
        with self.store.engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT l.pid FROM pg_locks l WHERE {_HELD_BY}"), self._lock_keys()).scalar()

    def _holder_process(self) -> Holder | None:
        """The worker process whose session holds the lock, by the name that session gives itself
        (`session_name`); None when nobody holds it or its session does not name a worker process (an older
        version's, or another program's)."""
        with self.store.engine.connect() as conn:
            name = conn.execute(sa.text(
                f"SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE {_HELD_BY}"),
                self._lock_keys()).scalar()
        match = _SESSION_NAME.fullmatch(name or "")
        if match is None:
            return None
        pid, here, boot, start = int(match[1]), match[2] == _host_tag(), match[3], match[4]
        if not here:
            return Holder(pid, here=False, gone=False)
        ours = boot_id()[:8]
        if start == "None" or not boot or not ours:  # its start or boot is not known: judged by its pid alone
            return Holder(pid, here=True, gone=pid == os.getpid() or not pid_alive(pid))
        return Holder(pid, here=True, gone=boot != ours or not same_process(pid, int(start)))

    def _retake(self) -> Connection | None:
        """Take the lock again after its connection was lost; None when another process holds it.

        The holder can be this process's own previous session: the server keeps it until its keepalives
        notice the connection is gone when only the client side was cut (a middlebox reset, a client
        timeout). That session is ended and the lock taken again."""
        conn = self._try()
        if conn is not None:
            return conn
        holder = self._holder_backend()
        if holder is None:  # freed meanwhile
            return self._try()
        if holder != self._backend:
            return None
        log.warning("worker id %r is still held by this worker's lost connection (server process %d); ending "
                    "that session", self.worker_id, holder)
        with self.store.engine.connect() as admin:
            admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": holder})
        deadline = time.monotonic() + OWN_SESSION_END_S
        while (conn := self._try()) is None and self._holder_backend() in (holder, None):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return conn

    def acquire(self) -> None:
        if self._conn is not None:
            return
        self._wanted = True
        try:
            self._conn = self._try() or self._after_a_gone_holder()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot lock worker id {self.worker_id!r} in {self.store.url}: {exc}") from None
        if self._conn is None:
            self._wanted = False
            raise InboxLocked(
                f"another worker with id {self.worker_id!r} ({self._holder()}) is already running against "
                f"{self.store.url}; give each worker its own service.worker_id (empty = HOST:PID)"
            )
        log.debug("worker id %r locked in %s", self.worker_id, self.store.url)

    def _after_a_gone_holder(self) -> Connection | None:
        """The lock, once the server ends the session of the process that held it, when that process was of
        this host and is gone: a host reset, or a kill while its connection was cut, leaves its session to
        the server's keepalives (about 25 s, KEEPALIVE_SETTINGS). A worker restarted under the same id (run
        --instance, service.worker_id) waits for that, up to wait_s, then exits with WorkerIdStillHeld
        (75, which systemd restarts on) rather than InboxLocked (2, which it does not). None at once when
        the holder may run: its session names a running process or another host; or, for a session that
        does not name its process, the id's row stopped cleanly (a new process holds the id, not yet
        reported), is of another host, names a running process, or is missing."""
        if self.wait_s <= 0:
            return None
        holder = self._holder_process()
        if holder is not None:
            if not holder.gone:
                return None
            pid = holder.pid
        else:
            with self.store.engine.connect() as conn:
                row = conn.execute(sa.select(workers.c.host, workers.c.pid, workers.c.heartbeat_at,
                                             workers.c.stopped_at).where(workers.c.worker_id == self.worker_id)).first()
            if (row is None or row.stopped_at is not None or row.host != socket.gethostname()
                    or (row.pid != os.getpid() and pid_alive(row.pid, seen_at=row.heartbeat_at))):
                return None  # (a row naming this pid is an earlier process's: this one does not hold the id)
            pid = row.pid
        log.warning("worker id %r is still held by the database session of its earlier process on this host "
                    "(pid %d), which is gone; waiting up to %g s for the server to end that session",
                    self.worker_id, pid, self.wait_s)
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline and not self.stopping():
            time.sleep(GONE_HOLDER_POLL_S)
            conn = self._try()
            if conn is not None:
                log.info("worker id %r is free again", self.worker_id)
                return conn
        self._wanted = False
        keys = self._lock_keys()
        held_by = _HELD_BY.replace(":cls", str(keys["cls"])).replace(":obj", str(keys["obj"]))
        raise WorkerIdStillHeld(
            f"worker id {self.worker_id!r} is still held by the database session of its earlier process on this "
            f"host (pid {pid}, gone) after {self.wait_s:g} s; the server ends it once its keepalives give up "
            f"(or, in that database: SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE {held_by})")

    def _holder(self) -> str:
        """Who holds the id, for a message: the id's row, unless the holder's session names another
        process (one that holds the lock and has not written the row yet)."""
        try:
            holder = self._holder_process()
            with self.store.engine.connect() as conn:
                row = conn.execute(sa.select(workers.c.host, workers.c.pid, workers.c.heartbeat_at)
                                   .where(workers.c.worker_id == self.worker_id)).first()
        except SQLAlchemyError:
            holder, row = None, None
        if holder is not None and (row is None or (row.pid, row.host == socket.gethostname())
                                   != (holder.pid, holder.here)):
            if holder.gone:
                return f"this host, pid {holder.pid}, gone: the server keeps its session until its keepalives give up"
            where = "this host" if holder.here else "another host"
            return f"{where}, pid {holder.pid}, starting: it has not reported yet"
        if row is None:
            return "it has not reported yet"
        return f"host {row.host}, pid {row.pid}, last heartbeat {row.heartbeat_at.isoformat(timespec='seconds')}"

    def check(self) -> bool:
        """Still held? When the lock's connection was lost (database restart, network cut), take the lock
        again on a new one; False (and an error logged) when that fails. `taken` then says whether another
        process holds the id now (the caller should stop) rather than the database being out of reach."""
        if not self._wanted:
            return False
        if self._conn is not None:
            try:
                self._conn.exec_driver_sql("SELECT 1")
                return True
            except SQLAlchemyError:
                with contextlib.suppress(SQLAlchemyError):
                    self._conn.invalidate()
                    self._conn.close()
                self._conn = None
        try:
            self._conn = self._retake()
        except SQLAlchemyError as exc:
            log.warning("lost the database connection holding worker id %r; cannot take it again yet: %s",
                        self.worker_id, " ".join(str(exc).split()))
            return False
        if self._conn is None:
            self.taken = True
            log.error("worker id %r is now held by another process (%s): two workers run under one id",
                      self.worker_id, self._holder())
            return False
        log.warning("the database connection holding worker id %r was lost; the lock is taken again",
                    self.worker_id)
        return True

    def release(self) -> None:
        self._wanted = False
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        with contextlib.suppress(SQLAlchemyError):
            conn.invalidate()  # closing the session releases its advisory locks
            conn.close()

    def __enter__(self) -> WorkerIdLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
