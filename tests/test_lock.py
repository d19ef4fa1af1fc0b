"""worker/lock.py: one worker per (inbox, database), released by the kernel when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from pgserver import postgres_server

from worker.exceptions import InboxLocked
from worker.lock import InboxLock, WorkerIdLock, lock_path, uses_claims
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
        assert str(refused.value).startswith("another worker with id 'web1' (host host-a, pid 4242, last heartbeat ")
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
