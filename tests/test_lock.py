"""worker/lock.py: one worker per (inbox, database), released by the kernel when the holder dies."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import dead_pid
from pgserver import fresh_database, postgres_server
from sqlalchemy.engine import make_url

from worker import recovery
from worker.exceptions import InboxLocked, WorkerIdStillHeld
from worker.lock import Holder, InboxLock, WorkerIdLock, lock_path, session_name, uses_claims, worker_id_key
from worker.migrations import WORKER_ID_LOCK_CLASS
from worker.store import Store


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/data/results.db"


def test_lock_file_lives_beside_the_sqlite_file_not_in_the_inbox(inbox: Path, tmp_path: Path) -> None:
    path = lock_path(inbox, sqlite_url(tmp_path))
    assert path.parent == tmp_path / "data"
    assert path.name.startswith(".fashion-worker-") and path.name.endswith(".lock")


def test_other_urls_lock_under_xdg_runtime_dir_or_beside_the_inbox(
    inbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql+psycopg://user@db.example/results"
    runtime = tmp_path / "run"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert lock_path(inbox, url).parent == runtime
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert lock_path(inbox, url).parent == inbox.parent


def test_second_lock_on_the_same_pair_names_the_holder(inbox: Path, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    with InboxLock(inbox, url) as first:
        assert first.held
        assert first.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(InboxLocked) as info:
            InboxLock(inbox, url).acquire()  # flock locks belong to the open file: this conflicts too
        message = str(info.value)
        assert f"pid {os.getpid()}" in message
        assert str(inbox) in message and url in message
        # Another database, or another inbox, is another pair.
        with InboxLock(inbox, f"sqlite:///{tmp_path}/other.db"), InboxLock(tmp_path / "inbox2", url):
            pass
    with InboxLock(inbox, url):  # released on exit
        pass


def test_two_spellings_of_one_database_share_the_lock(inbox: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "alias")
    spellings = [f"sqlite:///{tmp_path}/data/r.db", f"sqlite:///{tmp_path}/alias/r.db",
                 f"sqlite:///{tmp_path}/data/../data/r.db"]
    with InboxLock(inbox, spellings[0]):
        for url in spellings[1:]:
            with pytest.raises(InboxLocked):
                InboxLock(inbox, url).acquire()


@pytest.mark.timeout(30)
def test_sigkill_of_the_holder_releases_the_lock(inbox: Path, tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from worker.lock import InboxLock\n"
        f"InboxLock(Path({str(inbox)!r}), {url!r}).acquire()\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        with pytest.raises(InboxLocked, match=f"pid {child.pid}"):
            InboxLock(inbox, url).acquire()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        deadline = time.monotonic() + 5
        lock = InboxLock(inbox, url)
        while True:  # the kernel releases it as the process is torn down
            try:
                lock.acquire()
                break
            except InboxLocked:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert lock.path.exists()  # the file stays; only the flock mattered
        lock.release()
    finally:
        child.kill()
        child.wait()


# PostgreSQL: a lock on the worker id instead of the inbox ----------------------------------------------------
def test_only_postgresql_urls_use_claims() -> None:
    assert uses_claims("postgresql+psycopg://u@db/results") and uses_claims("postgresql://u@db/results")
    assert not uses_claims("sqlite:////srv/results.db") and not uses_claims("mysql://u@db/r")
    assert not uses_claims("not a url")


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_worker_id_lock_on_postgresql() -> None:
    with postgres_server() as url, Store(url) as store:
        store.heartbeat("web1", "host-a", 4242, 0)
        first = WorkerIdLock(store, "web1")
        first.acquire()
        with pytest.raises(InboxLocked) as refused:
            WorkerIdLock(store, "web1").acquire()
        # The row names another process than the one whose session holds the lock: that one has not reported.
        assert str(refused.value).startswith(f"another worker with id 'web1' (this host, pid {os.getpid()}, "
                                             "starting: it has not reported yet) is already running against ")
        store.heartbeat("web1", socket.gethostname(), os.getpid(), 0)
        with pytest.raises(InboxLocked) as refused:
            WorkerIdLock(store, "web1").acquire()
        assert str(refused.value).startswith(
            f"another worker with id 'web1' (host {socket.gethostname()}, pid {os.getpid()}, last heartbeat ")
        with WorkerIdLock(store, "web2"):  # another id: no conflict
            pass
        # The database drops the lock's connection (restart, network cut): check() takes the lock again.
        with store.engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_locks "
                                 "WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"))
        assert first.check() and first.held
        with pytest.raises(InboxLocked):
            WorkerIdLock(store, "web1").acquire()
        first.release()
        with WorkerIdLock(store, "web1") as again:
            assert again.held


class ClientCutProxy:
    """A TCP relay to PostgreSQL whose `cut()` resets the client side of every connection so far and keeps
    the server side open: the server keeps those sessions (no FIN reaches it) until its keepalives give up,
    as after a middlebox reset or a client-side timeout. Real sockets; only the fault is arranged."""

    def __init__(self, port: int) -> None:
        self.port_to = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.clients: list[socket.socket] = []
        self.cut_clients: set[socket.socket] = set()
        self.servers: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port_to))
            self.clients.append(client)
            self.servers.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        if a in self.cut_clients or b in self.cut_clients:
            return  # the cut: the server side is not closed here, its session lives on
        with contextlib.suppress(OSError):  # any other end (a session terminated, a reset) is passed on
            b.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for client in self.clients:
            self.cut_clients.add(client)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST to the client only
        self.clients = []

    def close(self) -> None:
        """Close every connection to the server (its sessions end) and stop listening."""
        self.listener.close()
        for sock in self.servers:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a FIN now: close() alone waits for the relay's blocked recv
            sock.close()


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_the_lock_s_own_lost_session_is_ended_not_taken_for_another_process(
        caplog: pytest.LogCaptureFixture) -> None:
    # The client side of the lock's connection is cut while its server session lives on: the lock is still
    # held by that session when check() reconnects. It used to be reported as taken by another process,
    # and the worker stopped for good (exit 2, which systemd does not restart).
    with postgres_server() as url:
        direct = sa.create_engine(url)
        proxy = ClientCutProxy(make_url(url).port)
        try:
            with Store(make_url(url).set(port=proxy.port).render_as_string(hide_password=False),
                       retry_s=2) as store:
                lock = WorkerIdLock(store, "web1")
                lock.acquire()
                holders = "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                with direct.connect() as conn:
                    (old,) = conn.execute(sa.text(holders)).scalars().all()
                proxy.cut()
                assert lock.check() and lock.held and not lock.taken
                with direct.connect() as conn:
                    (new,) = conn.execute(sa.text(holders)).scalars().all()
                    alive = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                                         {"pid": old}).scalar()
                assert new != old and alive == 0
                assert f"worker id 'web1' is still held by this worker's lost connection (server process {old}); " \
                       "ending that session" in caplog.messages
                # Another process that holds the id is still told apart from it.
                with direct.connect() as conn:
                    conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": new})
                    deadline = time.monotonic() + 10  # the terminated session lets go of the lock as it exits
                    while not conn.execute(sa.text("SELECT pg_try_advisory_lock(:cls, :key)"),
                                           {"cls": WORKER_ID_LOCK_CLASS, "key": worker_id_key("web1")}).scalar():
                        assert time.monotonic() < deadline, "the terminated session kept the lock"
                        time.sleep(0.05)
                    assert not lock.check() and lock.taken
                lock.release()
        finally:
            proxy.close()
            direct.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_the_session_of_a_gone_process_of_this_host_is_waited_for_and_no_other(
        caplog: pytest.LogCaptureFixture) -> None:
    """A session holds worker id 'web1@1' as a gone process's would (a host reset: the server keeps it until
    its keepalives give up). A restarted worker waits for it when the id's row names this host and a pid
    that no longer runs; it refuses at once when the row stopped cleanly (a new process holds the id and has
    not reported yet), names a running pid or another host. A row naming this very process's pid is an
    earlier process's (a container's PID 1 restarted): waited for. A wait that runs out exits 75, which
    systemd restarts on; `doctor` (wait_s=0) never waits. (The holder's session gives no worker name: an
    older version's, judged by the row.)"""
    host = socket.gethostname()
    with postgres_server() as url, Store(url) as store:
        holder = sa.create_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT")
        running = subprocess.Popen(["sleep", "60"])
        try:
            holder.execute(sa.text("SELECT pg_advisory_lock(:cls, :key)"),
                           {"cls": WORKER_ID_LOCK_CLASS, "key": worker_id_key("web1@1")})
            for pid in (dead_pid(), os.getpid()):
                store.heartbeat("web1@1", host, pid, 0)
                caplog.clear()
                with pytest.raises(WorkerIdStillHeld) as held:
                    WorkerIdLock(store, "web1@1", wait_s=0.6).acquire()
                assert held.value.exit_code == 75
                assert str(held.value).startswith("worker id 'web1@1' is still held by the database session of its "
                                                  f"earlier process on this host (pid {pid}, gone) after 0.6 s")
                assert "waiting up to 0.6 s for the server to end that session" in caplog.text
            for row in ({"pid": dead_pid(), "stopped": True}, {"pid": running.pid}, {"host": "web9"}):
                caplog.clear()
                store.heartbeat("web1@1", row.get("host", host), row.get("pid", dead_pid()), 0,
                                stopped=row.get("stopped", False))
                with pytest.raises(InboxLocked) as refused:
                    WorkerIdLock(store, "web1@1", wait_s=30).acquire()
                assert not isinstance(refused.value, WorkerIdStillHeld) and "waiting up to" not in caplog.text, row
            store.heartbeat("web1@1", host, dead_pid(), 0)
            with pytest.raises(InboxLocked) as refused:
                WorkerIdLock(store, "web1@1", wait_s=0).acquire()  # doctor's check
            assert not isinstance(refused.value, WorkerIdStillHeld)
            # The server ends the session (here: the holder lets go a moment later): the waiting worker starts.
            threading.Timer(0.5, lambda: holder.execute(sa.text("SELECT pg_advisory_unlock_all()"))).start()
            with WorkerIdLock(store, "web1@1", wait_s=30) as lock:
                assert lock.held
        finally:
            running.kill()
            running.wait()
            holder.close()


def worker_session(pid: int, start: int | None, *, host: str | None = None, boot: str | None = None) -> str:
    """A worker's id-lock session name (worker.lock.session_name) for another process, host or boot."""
    tag = hashlib.sha256((host or socket.gethostname()).encode()).hexdigest()[:12]
    return f"fashion-worker {pid}@{tag} {(recovery.boot_id() if boot is None else boot)[:8]} {start}"


def test_the_session_name_names_this_process_of_this_boot_and_host() -> None:
    assert session_name() == worker_session(os.getpid(), recovery.process_start())
    assert len(session_name().encode()) <= 63  # what PostgreSQL keeps of an application_name
    started = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert recovery.process_start() == started and recovery.same_process(os.getpid(), started)
    assert not recovery.same_process(os.getpid(), started + 1) and not recovery.same_process(dead_pid(), started)


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_a_holder_session_that_names_its_process_is_judged_by_that_process(
        caplog: pytest.LogCaptureFixture) -> None:
    """The id's row lags its lock: a restarted worker takes the lock, then start-up recovery reads the row as
    its gone predecessor left it (a dead pid) before the new process writes its own. A second start then
    took the holder for that gone process, waited 40 s and exited 75. The lock's session names its process
    (application_name: pid, host, boot, start), so the holder is judged by it, whatever the row says:
    running, or of another host, refused at once (2); gone, its pid free or held by a later process (on
    this boot or after a reboot: another start or boot), waited for."""
    host = socket.gethostname()
    with postgres_server() as url, Store(url) as store:
        own = WorkerIdLock(store, "web1@1")
        with own, own.store.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT application_name FROM pg_stat_activity "
                                        "WHERE application_name LIKE 'fashion-worker %'")).scalars().all() == [
                session_name()]
        holder = sa.create_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT")
        later = subprocess.Popen(["sleep", "60"])
        try:
            holder.execute(sa.text("SELECT pg_advisory_lock(:cls, :key)"),
                           {"cls": WORKER_ID_LOCK_CLASS, "key": worker_id_key("web1@1")})
            later_start = recovery.process_start(later.pid)
            other_boot = "0" * 8 if not recovery.boot_id().startswith("0" * 8) else "f" * 8
            running = {"this process": session_name(), "a running one": worker_session(later.pid, later_start),
                       "another host's": worker_session(dead_pid(), 1, host="no-such-host.invalid"),
                       # A host that could not read its start or boot: judged by the pid alone.
                       "start unknown": worker_session(later.pid, None), "boot unknown": worker_session(
                           later.pid, later_start, boot="")}
            gone = {"pid free": worker_session(dead_pid(), 1), "pid reused": worker_session(later.pid, later_start - 1),
                    "last boot's": worker_session(later.pid, later_start, boot=other_boot),
                    "start unknown, pid free": worker_session(dead_pid(), None)}
            # Rows that alone meant: wait; refuse.
            for row in ({"pid": dead_pid()}, {"pid": os.getpid(), "stopped": True}):
                store.heartbeat("web1@1", host, row["pid"], 0, stopped=row.get("stopped", False))
                for what, name in running.items():
                    holder.execute(sa.text("SELECT set_config('application_name', :name, false)"), {"name": name})
                    caplog.clear()
                    with pytest.raises(InboxLocked) as refused:
                        WorkerIdLock(store, "web1@1", wait_s=30).acquire()
                    assert not isinstance(refused.value, WorkerIdStillHeld), (what, row)
                    assert "waiting up to" not in caplog.text, (what, row)
                for what, name in gone.items():
                    holder.execute(sa.text("SELECT set_config('application_name', :name, false)"), {"name": name})
                    caplog.clear()
                    with pytest.raises(WorkerIdStillHeld) as held:
                        WorkerIdLock(store, "web1@1", wait_s=0.3).acquire()
                    pid = int(name.split()[1].split("@")[0])
                    assert f"(pid {pid}, gone) after 0.3 s" in str(held.value), (what, row)
                    assert f"(pid {pid}), which is gone; waiting up to 0.3 s" in caplog.text, (what, row)
                    with pytest.raises(InboxLocked) as refused:  # doctor's check: no wait, the holder named
                        WorkerIdLock(store, "web1@1", wait_s=0).acquire()
                    assert (f"(this host, pid {pid}, gone: the server keeps its session until its keepalives "
                            "give up) is already running") in str(refused.value), (what, row)
        finally:
            later.kill()
            later.wait()
            holder.close()



@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_the_same_id_held_in_another_database_of_the_server_is_not_this_ones_holder() -> None:
    """Advisory locks are per database and pg_locks lists the whole server's: a staging database on the same
    server with a worker under the same id must not be taken for this database's holder (it made a worker
    that lost its lock's connection take its own lingering session for another process's, and stop)."""
    with postgres_server() as url, Store(url) as store, Store(fresh_database(url)) as staging:
        with WorkerIdLock(staging, "web1@1"), WorkerIdLock(store, "web1@1") as lock:
            assert lock.held and lock._holder_backend() == lock._backend
            assert lock._holder_process() == Holder(os.getpid(), here=True, gone=False)
        with WorkerIdLock(staging, "web1@1"):
            own = WorkerIdLock(store, "web1@1")
            assert own._holder_backend() is None and own._holder_process() is None
