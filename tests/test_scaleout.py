"""Scale-out (issue 7): several real worker processes sharing one real PostgreSQL database and one inbox.

Each test starts a throw-away PostgreSQL server on loopback (tests/pgserver.py) and real `python -m worker
run --db postgresql+psycopg://…` processes on a real inbox with the real inotify watcher and a generated
ONNX model. Without the PostgreSQL binaries the tests skip with the reason; under CI they fail instead.

`-m slow -k throughput -s` measures the throughput of 1, 2 and 3 workers (README.md, Scale-out).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import dead_pid, distinct_jpegs, make_model, write_with_trailers
from pgserver import postgres_server
from PIL import Image
from sqlalchemy.engine import make_url

from worker import config as config_mod
from worker.claims import Claims, drop_key
from worker.cli import main as cli_main
from worker.daemon import HEARTBEAT_S, Worker
from worker.lock import worker_id_key
from worker.migrations import LATEST_VERSION, MIGRATIONS, WORKER_ID_LOCK_CLASS, Migration, migrate
from worker.model import Model
from worker.query import stats
from worker.store import ResultRecord, Store

pytestmark = pytest.mark.postgres

LEASE_S = 2.0
CONFIG = """\
[inbox]
path = "inbox"
settle_s = 0.3
[model]
path = "model.onnx"
intra_op_threads = 1
[batch]
decode_threads = 1
[database]
claim_lease_s = {lease}
[service]
worker_id = "{worker_id}"
"""


# Helpers -------------------------------------------------------------------------------------------------
@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def make_site(folder: Path, *, worker_id: str = "", lease: float = LEASE_S, model: Path | None = None) -> Path:
    """config.toml, a model and an empty inbox: what `fashion-worker run` expects in its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(CONFIG.format(lease=lease, worker_id=worker_id))
    if model is None:
        make_model(folder / "model.onnx")
    else:
        (folder / "model.onnx").symlink_to(model)
    (folder / "inbox").mkdir(exist_ok=True)
    return folder


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


class Workers:
    """Real `python -m worker run` processes, each logging to its own file; killed at the end if alive."""

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, site: Path, url: str, *args: str) -> subprocess.Popen[bytes]:
        log_path = site / f"worker-{len(self.procs)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "worker", "run", "--db", url, *args], cwd=site,
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((proc, log_path))
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return next(path for p, path in self.procs if p is proc).read_text(errors="replace")

    def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        wait_until(lambda: "watching inbox" in self.log(proc) or proc.poll() is not None, 90, "a worker to start")
        assert proc.poll() is None, self.log(proc)

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = Workers()
    yield started
    started.stop_all()


def query(url: str, sql: str) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def row_count(url: str) -> int:
    try:
        return query(url, "SELECT count(*) FROM results")[0][0]
    except sa.exc.ProgrammingError:  # before the first worker created the table
        return 0


# Three workers, one inbox, one SIGKILL ---------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_three_workers_share_one_inbox_and_survive_a_sigkill(tmp_path: Path, pg_url: str, workers: Workers,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    site = make_site(tmp_path / "site")
    staged = distinct_jpegs(tmp_path / "staging", 1000)
    procs = [workers.start(site, pg_url) for _ in range(3)]  # default ids: HOST:PID, one inbox
    for proc in procs:
        workers.wait_ready(proc)
    victim = procs[1]
    victim_id = f"{os.uname().nodename}:{victim.pid}"
    for path in staged:
        os.rename(path, site / "inbox" / path.name)

    def victim_rows() -> int:
        return query(pg_url, f"SELECT count(*) FROM results WHERE worker = '{victim_id}'")[0][0]

    wait_until(lambda: victim_rows() >= 20, 120, "the victim's first rows")
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at, by_victim = row_count(pg_url), victim_rows()
    assert killed_at < 900, "the burst should still have been running"

    wait_until(lambda: row_count(pg_url) >= 1000 and not any((site / "inbox").iterdir()), 150,
               "1,000 rows and an empty inbox")
    time.sleep(2 * LEASE_S)  # a second row for any file would show up now
    assert query(pg_url, "SELECT count(*), count(DISTINCT file), count(DISTINCT sha256), "
                         "sum(CASE WHEN status = 'ok' THEN 1 ELSE 0 END), count(duplicate_of), "
                         "count(DISTINCT worker), count(DISTINCT host) FROM results") == [
        (1000, 1000, 1000, 1000, 0, 3, 1)]
    assert query(pg_url, "SELECT DISTINCT category FROM results") == [("red",)]
    # Every file moved exactly once: processed/ holds the 1,000 names, none twice ("name (1).jpg").
    assert sorted(p.name for p in (site / "processed").iterdir()) == sorted(p.name for p in staged)
    assert not (site / "failed").exists() or not any((site / "failed").iterdir())
    # Every row names the file's place, except rows the victim committed and moved but was killed before
    # recording the new place: those still name the inbox (the taker found the file gone).
    stale = 0
    for file, location, worker in query(pg_url, "SELECT file, location, worker FROM results"):
        if location == str(site / "inbox" / file) and worker == victim_id:
            stale += 1
        else:
            assert location == str(site / "processed" / file)

    # stats aggregates across the workers (all three listed; the survivors still running).
    with Store(pg_url) as store:
        summary = stats(store)
    assert summary["total"] == 1000 and summary["by_category"] == {"red": 1000}
    assert len(summary["workers"]) == 3
    assert sum(round(w["throughput_5m"] * 5) for w in summary["workers"]) == 1000
    assert summary["claims"]["enabled"] and summary["claims"]["held"] == 0
    capsys.readouterr()
    assert cli_main(["stats", "--db", pg_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "Results:     1000 total, 1000 ok, 0 failed, 0 duplicates"
    assert re.fullmatch(r"Claims:      0 held, \d+ lapsed \(their workers stopped renewing them\)", out[5])
    header = next(i for i, line in enumerate(out) if line.startswith("worker "))
    assert out[header].split() == ["worker", "host", "state", "heartbeat", "age", "processed", "rate", "5m",
                                   "claims"]
    assert len(out) == header + 5  # the header, its rule and one line per worker

    for proc in procs:
        if proc is not victim:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, workers.log(proc)
    # What is left in claims: only the victim's. Each is for a file it recorded (and moved) before it died,
    # or for one another worker had just recorded, moved and released: the victim saw the file in the inbox,
    # claimed it right after that release, and was killed before finding it gone. Nobody sees such a drop
    # again; the renewal threads purge its claim PURGE_AFTER_S after the lease ends.
    recorded_by = dict(query(pg_url, "SELECT file, worker FROM results"))
    for worker, result_id, file in query(pg_url, "SELECT worker_id, result_id, file FROM claims"):
        assert worker == victim_id
        assert result_id is not None or recorded_by[file] != victim_id, file
    taken = sum(int(n) for proc in procs if proc is not victim
                for n in re.findall(r"took over (\d+) files", workers.log(proc)))
    print(f"\n1,000 images, 3 workers, one SIGKILLed with {killed_at} rows committed ({by_victim} its own); "
          f"{taken} of its claims taken over by the others; {stale} of its rows committed and moved just "
          "before the kill still name the inbox; rows per worker: "
          f"{query(pg_url, 'SELECT worker, count(*) FROM results GROUP BY worker ORDER BY worker')}")


def recorded_by_web9(pg_url: str, path: Path, location: str, sha256: str) -> int:
    """What worker web9:77 leaves when it claims `path` (key from its lstat here) and records it as seen at
    `location` with content `sha256`; its claim's lease lapses a second later. Returns the row id."""
    st = path.stat()
    with Store(pg_url) as store:
        dead = Claims(store, "web9:77", "web9", lease_s=1.0)
        key = drop_key(path.name, st.st_size, st.st_mtime_ns, st.st_ino)
        assert key in dead.claim({key: path.name}).granted
        (row_id,) = store.add_results([ResultRecord(
            file=path.name, location=location, status="ok", category="red", confidence=0.9, sha256=sha256,
            model_id="m" * 64, model_name="tiny", worker="web9:77", host="web9", claim_key=key)], claims=dead)
    return row_id


@pytest.mark.timeout(90)
def test_a_copy_with_the_same_name_size_and_mtime_is_not_taken_for_another_inbox_drop(
        tmp_path: Path, pg_url: str, workers: Workers) -> None:
    """An `rsync -t` copy of one photo into two inboxes: host web9 recorded its copy, moved it and died
    before releasing its claim (kept with its row up to an hour). This worker's copy, same name, size and
    mtime, is another file: it gets a row of its own, and web9's row keeps its place. It used to be taken
    for web9's drop ("already recorded: only moved now"), and with on_success = "delete" deleted without a
    row, web9's row then saying its file was gone."""
    site = make_site(tmp_path / "site")
    with (site / "config.toml").open("a") as config:
        config.write('[files]\non_success = "delete"\n')
    elsewhere = tmp_path / "web9-processed"
    elsewhere.mkdir()
    (theirs,) = distinct_jpegs(elsewhere, 1)
    ours = site / "inbox" / theirs.name
    ours.write_bytes(theirs.read_bytes())
    st = theirs.stat()
    os.utime(ours, ns=(st.st_atime_ns, st.st_mtime_ns))  # what rsync -t and cp -p keep
    row_id = recorded_by_web9(pg_url, theirs, f"/srv/web9/inbox/{theirs.name}",
                              hashlib.sha256(theirs.read_bytes()).hexdigest())
    # …web9 moves its copy and dies here: no location recorded, no release.
    proc = workers.start(site, pg_url, "--once")
    assert proc.wait(timeout=60) == 0, workers.log(proc)
    rows = query(pg_url, "SELECT id, file, worker, location FROM results ORDER BY id")
    assert rows == [(row_id, theirs.name, "web9:77", f"/srv/web9/inbox/{theirs.name}"),
                    (row_id + 1, theirs.name, f"{os.uname().nodename}:{proc.pid}", "")]  # ours: recorded, deleted
    assert not ours.exists() and theirs.exists()


# A drop recorded by a worker that died before moving it -------------------------------------------------------
@pytest.mark.timeout(90)
def test_a_drop_recorded_by_a_dead_worker_is_moved_by_another_without_a_second_row(
        tmp_path: Path, pg_url: str, workers: Workers) -> None:
    """The dead worker saw the shared inbox under another path, so only its claim (not the row's
    location, which Store.find_drop compares) tells the next worker that the drop is recorded."""
    site = make_site(tmp_path / "site")
    inbox = site / "inbox"
    recorded, *others = distinct_jpegs(inbox, 3)
    row_id = recorded_by_web9(pg_url, recorded, f"/mnt/share/inbox/{recorded.name}", "0" * 64)
    # …and web9 dies here: no release, no move, its lease lapses a second later.
    proc = workers.start(site, pg_url, "--once")
    assert proc.wait(timeout=60) == 0, workers.log(proc)
    rows = {file: (row, worker, location)
            for row, file, worker, location in query(pg_url, "SELECT id, file, worker, location FROM results")}
    assert sorted(rows) == sorted(p.name for p in [recorded, *others])  # one row each: no second one
    assert rows[recorded.name] == (row_id, "web9:77", str(site / "processed" / recorded.name))
    for p in others:
        assert rows[p.name][1:] == (f"{os.uname().nodename}:{proc.pid}", str(site / "processed" / p.name))
    assert sorted(p.name for p in (site / "processed").iterdir()) == sorted(p.name for p in [recorded, *others])
    assert not any(inbox.iterdir())
    assert query(pg_url, "SELECT count(*), sum(takeovers) FROM claims") == [(0, None)]
    assert "took over 1 files from workers whose lease lapsed (1 of them already recorded" in workers.log(proc)


@pytest.mark.timeout(90)
def test_a_restart_under_a_stable_id_records_where_its_crashed_process_moved_a_file(
        tmp_path: Path, pg_url: str, workers: Workers) -> None:
    """Process 1 of instance 1 recorded a.jpg, moved it to processed/ and was killed before recording where
    (its workers row unstopped, its pid gone). The restart's first heartbeat used to come before recovery
    and give the id's row its own pid and start: recovery then looked only at rows since that moment, and
    a.jpg's row named the inbox for good."""
    site = make_site(tmp_path / "site")
    host = os.uname().nodename
    worker_id = f"{host}@1"
    (site / "processed").mkdir()
    (site / "processed" / "a.jpg").write_bytes(b"a photo")
    with Store(pg_url) as store:
        store.heartbeat(worker_id, host, dead_pid(), 1,
                        folders=(str(site / "processed"), str(site / "failed")))
        (row_id,) = store.add_results([ResultRecord(
            file="a.jpg", location=str(Path(os.path.realpath(site / "inbox")) / "a.jpg"), status="ok",
            category="red", confidence=0.9, sha256=hashlib.sha256(b"a photo").hexdigest(), model_id="m" * 64,
            model_name="tiny", worker=worker_id, host=host)])
    (crashed_start,), = query(pg_url, "SELECT started_at FROM workers")
    proc = workers.start(site, pg_url, "--once", "--instance", "1")
    assert proc.wait(timeout=60) == 0, workers.log(proc)
    assert "recorded where 1 file(s) went that a crashed worker had moved" in workers.log(proc)
    assert query(pg_url, "SELECT id, location FROM results") == [(row_id, str(site / "processed" / "a.jpg"))]
    (pid, started, stopped), = query(pg_url, "SELECT pid, started_at, stopped_at FROM workers")
    assert pid == proc.pid and started > crashed_start and stopped is not None  # its own run, stopped cleanly


@pytest.mark.timeout(90)
def test_a_starting_worker_s_row_is_not_marked_stopped(tmp_path: Path, pg_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The id's row names the process as soon as it holds the id. Recovery used to come after that heartbeat,
    take the row for the id's crashed process and mark it stopped until start-up's last heartbeat: a restart
    after a kill in that window read "stopped", took the holder for a live process and refused with exit 2
    (the rare failure of test_a_restarted_instance_waits_for_the_session_its_gone_process_left). The row is
    read while the model warms up, the step between the two (a spy on the real warm-up: the window is too
    short to hit with a kill)."""
    site = make_site(tmp_path / "site", worker_id="vm@1")
    cfg = config_mod.load(site / "config.toml", {"database.url": pg_url})
    seen = []
    warm_up = Model.warm_up

    def reading_the_row(self: Model, batch: int) -> None:
        seen.append(query(pg_url, "SELECT pid, stopped_at FROM workers WHERE worker_id = 'vm@1'"))
        warm_up(self, batch)

    monkeypatch.setattr(Model, "warm_up", reading_the_row)
    for _ in range(2):  # a first start, then a restart with a row of its id there
        assert Worker(cfg).run(once=True) == 0
    assert seen == [[(os.getpid(), None)]] * 2


# One live process per worker id ------------------------------------------------------------------------------
def burst_recorded_once(tmp_path: Path, inbox: Path, pg_url: str, count: int, writers: set[str]) -> list[Path]:
    """Move `count` distinct photos into `inbox`, wait for a row each and an empty inbox, then check that no
    file got a second row (two leases later) and that only `writers` wrote. Returns the staged paths."""
    staged = distinct_jpegs(tmp_path / "staging", count)
    for path in staged:
        os.rename(path, inbox / path.name)
    wait_until(lambda: row_count(pg_url) >= count and not any(inbox.iterdir()), 60,
               f"{count} rows and an empty inbox")
    time.sleep(2 * LEASE_S)  # a second row for any file would show up now
    assert query(pg_url, "SELECT count(*), count(DISTINCT file), count(duplicate_of) FROM results") == [
        (count, count, 0)]
    assert {w for (w,) in query(pg_url, "SELECT DISTINCT worker FROM results")} <= writers
    return staged


@pytest.mark.timeout(90)
def test_a_second_worker_with_the_same_id_refuses_but_other_ids_share_the_inbox(
        tmp_path: Path, pg_url: str, workers: Workers) -> None:
    site = make_site(tmp_path / "site", worker_id="web1")
    first = workers.start(site, pg_url)
    workers.wait_ready(first)
    second = subprocess.run([sys.executable, "-m", "worker", "run", "--db", pg_url], cwd=site,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2 and second.stdout == ""
    lines = second.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr
    assert lines[0].startswith(f"fashion-worker: error: another worker with id 'web1' (host {os.uname().nodename}, "
                               f"pid {first.pid}, last heartbeat ")
    assert lines[0].endswith("give each worker its own service.worker_id (empty = HOST:PID)")
    # Another id on the same inbox and database starts: no inbox lock on PostgreSQL.
    other = make_site(tmp_path / "other", worker_id="web2")
    os.rmdir(other / "inbox")
    os.symlink(site / "inbox", other / "inbox")
    (other / "config.toml").write_text((other / "config.toml").read_text().replace(
        'path = "inbox"', f'path = "{site / "inbox"}"'))
    neighbour = workers.start(other, pg_url)
    workers.wait_ready(neighbour)
    first.send_signal(signal.SIGKILL)  # the lock dies with its process (its connection closes)
    first.wait()
    again = workers.start(site, pg_url)
    workers.wait_ready(again)
    # ...and the two ids share the drops: each file recorded once, moved once, by one of them.
    staged = burst_recorded_once(tmp_path, site / "inbox", pg_url, 60, {"web1", "web2"})
    # Each moves into its own processed/ (a default relative to its config): together, every name once.
    moved = [p.name for folder in (site, other) if (folder / "processed").is_dir()
             for p in (folder / "processed").iterdir()]
    assert sorted(moved) == sorted(p.name for p in staged)
    for proc in (neighbour, again):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


@pytest.mark.timeout(90)
def test_instances_of_one_config_share_the_inbox_under_ids_of_their_own(
        tmp_path: Path, pg_url: str, workers: Workers, capsys: pytest.CaptureFixture[str]) -> None:
    """`run --instance N` (systemd's fashion-worker@N.service): workers started from one config in one folder
    run as HOST@1, HOST@2, the same ids at every restart; a second process of one instance refuses, and
    `doctor --instance N` checks worker N's id."""
    host = os.uname().nodename
    site = make_site(tmp_path / "site")
    procs = [workers.start(site, pg_url, "--instance", str(n)) for n in (1, 2)]
    for proc in procs:
        workers.wait_ready(proc)
    lock_lines = {}
    for n in (2, 3):
        capsys.readouterr()
        cli_main(["doctor", "--config", str(site / "config.toml"), "--db", pg_url, "--instance", str(n)])
        lock_lines[n] = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("OK    lock:"))
    assert f"a worker is running: another worker with id '{host}@2' (host {host}, pid {procs[1].pid}, " in lock_lines[2]
    assert lock_lines[3].endswith(f"worker id '{host}@3' is free")
    again = subprocess.run([sys.executable, "-m", "worker", "run", "--db", pg_url, "--instance", "2"], cwd=site,
                           capture_output=True, text=True, timeout=60)
    assert (again.returncode, again.stdout) == (2, "") and "waiting up to" not in again.stderr  # its holder runs
    assert again.stderr.startswith(f"fashion-worker: error: another worker with id '{host}@2' (host {host}, "
                                   f"pid {procs[1].pid}, "), again.stderr
    # The refused process leaves the id's row as it was: it used to record its own stop there, so that the
    # running worker's row named a process that had exited, marked stopped, until its next heartbeat.
    assert query(pg_url, f"SELECT pid, stopped_at FROM workers WHERE worker_id = '{host}@2'") == [(procs[1].pid, None)]
    staged = burst_recorded_once(tmp_path, site / "inbox", pg_url, 40, {f"{host}@1", f"{host}@2"})
    assert sorted(p.name for p in (site / "processed").iterdir()) == sorted(p.name for p in staged)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, workers.log(proc)
    assert query(pg_url, "SELECT worker_id, pid, stopped_at IS NOT NULL FROM workers ORDER BY worker_id") == [
        (f"{host}@1", procs[0].pid, True), (f"{host}@2", procs[1].pid, True)], [workers.log(p) for p in procs]


@pytest.mark.timeout(120)
def test_a_restarted_instance_waits_for_the_session_its_gone_process_left(
        tmp_path: Path, pg_url: str, workers: Workers) -> None:
    """Worker 1's connections are cut on its side only (a host reset does that: the server keeps the
    sessions, and the id's lock, until its keepalives give up), then it is SIGKILLed. Restarted under the
    same id, it used to refuse at once with exit 2, which systemd does not restart: now it waits for the
    server to end the gone process's session, then starts. (Real server, real TCP relay, real processes;
    the relay closing its server side stands in for the keepalives ending the session.)"""
    from test_lock import ClientCutProxy

    site = make_site(tmp_path / "site")
    proxy = ClientCutProxy(make_url(pg_url).port)
    try:
        first = workers.start(site, make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False),
                              "--instance", "1")
        workers.wait_ready(first)
        proxy.cut()
        first.send_signal(signal.SIGKILL)
        first.wait()
        again = workers.start(site, pg_url, "--instance", "1")
        wait_until(lambda: "waiting up to" in workers.log(again) or again.poll() is not None, 60,
                   "the restarted worker to wait for the old session")
        assert again.poll() is None, workers.log(again)
        assert (f"worker id '{os.uname().nodename}@1' is still held by the database session of its earlier process "
                f"on this host (pid {first.pid}), which is gone; waiting up to 40 s") in workers.log(again)
        assert "watching inbox" not in workers.log(again)
    finally:
        proxy.close()  # the server sees its side close and ends the session: the lock is free
    workers.wait_ready(again)
    staged = distinct_jpegs(tmp_path / "staging", 3)
    for path in staged:
        os.rename(path, site / "inbox" / path.name)
    wait_until(lambda: row_count(pg_url) >= 3, 30, "3 rows")
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=20) == 0, workers.log(again)


@pytest.mark.timeout(120)
def test_a_worker_gone_during_its_start_up_is_waited_for_by_its_restart(
        tmp_path: Path, pg_url: str, workers: Workers) -> None:
    """As above, but the first process is cut off and killed while it is still starting (its model is a FIFO
    nobody writes, so it blocks loading it, after taking its id; on a GPU, warming the model up takes tens
    of seconds). It names itself in the workers table as soon as it holds its id, so the restart knows the
    holder is a gone process of this host and waits, instead of refusing an unknown holder with exit 2."""
    from test_lock import ClientCutProxy

    site = make_site(tmp_path / "site")
    (site / "model.onnx").unlink()
    os.mkfifo(site / "model.onnx")
    proxy = ClientCutProxy(make_url(pg_url).port)
    try:
        first = workers.start(site, make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False),
                              "--instance", "1")
        def named() -> bool:
            try:
                return query(pg_url, "SELECT pid FROM workers") == [(first.pid,)]
            except sa.exc.ProgrammingError:  # the worker has not made the tables yet
                return False

        wait_until(lambda: named() or first.poll() is not None, 60, "the first worker to name itself")
        assert first.poll() is None and "watching inbox" not in workers.log(first), workers.log(first)
        proxy.cut()
        first.send_signal(signal.SIGKILL)
        first.wait()
        (site / "model.onnx").unlink()
        make_model(site / "model.onnx")
        again = workers.start(site, pg_url, "--instance", "1")
        wait_until(lambda: "waiting up to" in workers.log(again) or again.poll() is not None, 60,
                   "the restarted worker to wait for the old session")
        assert again.poll() is None, workers.log(again)
        assert f"(pid {first.pid}), which is gone; waiting up to 40 s" in workers.log(again)
    finally:
        proxy.close()  # the server sees its side close and ends the session: the lock is free
    workers.wait_ready(again)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=20) == 0, workers.log(again)


@pytest.mark.timeout(120)
def test_a_second_start_before_the_first_wrote_its_row_is_refused_at_once(
        tmp_path: Path, pg_url: str, workers: Workers) -> None:
    """A restart under a stable id holds the id's lock through its start-up recovery before it writes the
    id's row, which meanwhile still names its gone predecessor. A second process started under that id
    then took the holder for the gone one: it waited 40 s and exited 75, which systemd restarts on. The
    lock's session names the process holding it: the second is refused at once, exit 2, one line. (The
    window is held open: the first is stopped with SIGSTOP and the row given a gone pid, as during that
    recovery.)"""
    site = make_site(tmp_path / "site")
    first = workers.start(site, pg_url, "--instance", "1")
    workers.wait_ready(first)
    first.send_signal(signal.SIGSTOP)
    try:
        engine = sa.create_engine(pg_url)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE workers SET pid = :pid"), {"pid": dead_pid()})
        engine.dispose()
        second = workers.start(site, pg_url, "--instance", "1")
        assert second.wait(timeout=30) == 2, workers.log(second)
    finally:
        first.send_signal(signal.SIGCONT)
    assert workers.log(second) == (
        f"fashion-worker: error: another worker with id '{os.uname().nodename}@1' (this host, pid {first.pid}, "
        f"starting: it has not reported yet) is already running against {make_url(pg_url).render_as_string()}; "
        "give each worker its own service.worker_id (empty = HOST:PID)\n")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0, workers.log(first)


@pytest.mark.timeout(120)
def test_a_worker_whose_id_another_process_took_stops_with_one_line(
        tmp_path: Path, pg_url: str, workers: Workers) -> None:
    """A network cut long enough to end the session that holds a worker's id lock, while another process
    starts under that id: the first stops (exit 2, one line) instead of running beside it, and does not
    mark the id's workers row stopped (it is the other process's now)."""
    site = make_site(tmp_path / "site", worker_id="web1")
    first = workers.start(site, pg_url)
    workers.wait_ready(first)
    staged = distinct_jpegs(tmp_path / "staging", 5)
    for path in staged:
        os.rename(path, site / "inbox" / path.name)
    wait_until(lambda: row_count(pg_url) == 5, 30, "5 rows")
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as replacement:  # the session ends (the cut), and another takes the id at once
            replacement.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_locks "
                                        "WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"))
            deadline = time.monotonic() + 10  # the terminated session lets go of the lock as it exits
            while not replacement.execute(sa.text("SELECT pg_try_advisory_lock(:cls, :key)"),
                                          {"cls": WORKER_ID_LOCK_CLASS, "key": worker_id_key("web1")}).scalar():
                assert time.monotonic() < deadline, "the terminated session kept the lock"
                time.sleep(0.02)
            # The first notices at its next heartbeat (every HEARTBEAT_S).
            assert first.wait(timeout=HEARTBEAT_S + 20) == 2
    finally:
        engine.dispose()
    log = workers.log(first)
    assert "Traceback" not in log
    assert log.splitlines()[-1] == (
        "fashion-worker: error: another process took worker id 'web1' while this one had lost its database "
        "connection; this one stopped (give each worker its own service.worker_id)")
    assert re.search(r"ERROR worker\.lock: worker id 'web1' is now held by another process \(host \S+, pid "
                     rf"{first.pid}, last heartbeat [^)]+\): two workers run under one id", log), log
    # Its rows and moves are whole; the id's workers row is not marked stopped by it.
    assert query(pg_url, "SELECT count(*), count(DISTINCT file) FROM results WHERE location LIKE '%processed%'") \
        == [(5, 5)]
    assert query(pg_url, "SELECT pid, stopped_at FROM workers WHERE worker_id = 'web1'") == [(first.pid, None)]


# Migrations: several processes starting at once on a new database ------------------------------------------------
def _slow_probe(conn: sa.Connection) -> None:
    conn.execute(sa.text("CREATE TABLE probe (x INTEGER)"))  # fails if a second starter applied it again
    time.sleep(0.3)


def _start(url: str, start: Any, out: Any) -> None:
    start.wait(20)
    store = Store(url)  # round 1: all race on the real migrations of an empty database
    start.wait(20)  # round 2: all race on an extra slow migration that breaks if applied twice
    out.put((store.schema_version, migrate(store.engine, (*MIGRATIONS, Migration(LATEST_VERSION + 1, "probe",
                                                                                  _slow_probe)))))
    store.close()


@pytest.mark.timeout(90)
def test_workers_starting_at_once_migrate_the_database_once(pg_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no connection pool shared by fork
    start, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_start, args=(pg_url, start, out)) for _ in range(6)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(80)
    assert [proc.exitcode for proc in procs] == [0] * 6
    assert sorted(out.get(timeout=5) for _ in procs) == [(LATEST_VERSION, LATEST_VERSION + 1)] * 6
    assert query(pg_url, "SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, LATEST_VERSION + 2)]
    assert query(pg_url, "SELECT count(*) FROM probe") == [(0,)]


# Throughput of 1, 2 and 3 workers (slow: run with -m slow; README.md, Scale-out) ------------------------------------
BENCH_CONFIG = """\
[inbox]
path = "inbox"
settle_s = 0.3
[model]
path = "{model}"
"""


def listing_photos(folder: Path, count: int, size: tuple[int, int] = (400, 533)) -> list[Path]:
    """`count` distinct JPEGs shaped like listing photos (smooth shading with some texture)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(1)
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
    pixels = np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return write_with_trailers(folder, buffer.getvalue(), count, "photo-{:05}.jpg")


RUNS = (("sqlite", 1), ("shared", 1), ("shared", 2), ("shared", 3), ("separate", 3))


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("model", ["generated", "default"])
def test_throughput_of_one_two_and_three_workers(tmp_path: Path, model: str, workers: Workers) -> None:
    """Not a speed assertion: prints images/s (first file moved in -> last row committed) of 1, 2 and 3
    workers with default settings sharing one inbox and one PostgreSQL database; for comparison, one
    worker on SQLite (no claims) and 3 workers on 3 inboxes (no contention for files). Each run must end
    with every image recorded once."""
    from worker.model import DEFAULT_MODEL

    if model == "default":
        model_path = DEFAULT_MODEL  # the shipped model the workers use by default (int8 on the CPU)
        if not model_path.exists():
            pytest.skip(f"{DEFAULT_MODEL} has not landed yet")
    else:
        model_path = make_model(tmp_path / "generated.onnx")
    count = int(os.environ.get("SCALEOUT_IMAGES", "1000"))
    repeat = int(os.environ.get("SCALEOUT_REPEAT", "1"))  # the median of this many runs of each is shown
    figures = []
    for layout, n, attempt in [(layout, n, attempt) for attempt in range(repeat) for layout, n in RUNS]:
        staged = listing_photos(tmp_path / f"staging-{layout}-{n}-{attempt}", count)
        sites = [tmp_path / f"site-{layout}-{n}-{attempt}-{i}" for i in range(n if layout == "separate" else 1)]
        for site in sites:
            (site / "inbox").mkdir(parents=True)
            (site / "config.toml").write_text(BENCH_CONFIG.format(model=model_path))
        database = (contextlib.nullcontext(f"sqlite:///{sites[0]}/results.db") if layout == "sqlite"
                    else postgres_server())
        with database as url:
            procs = [workers.start(sites[i % len(sites)], url) for i in range(n)]
            for proc in procs:
                workers.wait_ready(proc)
            start = datetime.now(UTC)
            for k, path in enumerate(staged):
                os.rename(path, sites[k % len(sites)] / "inbox" / path.name)
            wait_until(lambda url=url: row_count(url) >= count, 1200, f"{count} rows")
            assert query(url, "SELECT count(*), count(DISTINCT file) FROM results") == [(count, count)]
            with Store(url) as store:
                summary = stats(store)
            elapsed = (datetime.fromisoformat(summary["last_activity"]) - start).total_seconds()
            per_worker = "/".join(str(c) for (c,) in query(
                url, "SELECT count(*) FROM results GROUP BY worker ORDER BY count(*) DESC"))
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=30) == 0
        figures.append((layout, n, count / elapsed, per_worker))
    rates = {run: sorted(rate for layout, n, rate, _ in figures if (layout, n) == run) for run in RUNS}
    median = {run: values[len(values) // 2] for run, values in rates.items()}
    base = median[("shared", 1)]
    print(f"\n{count} distinct 400x533 JPEGs, {model} model, {os.cpu_count()} cores, median of {repeat} runs "
          f"each, load average {os.getloadavg()[0]:.1f} at the end")
    print("| workers | database | inboxes | images/s (median) | all runs | vs 1 worker on PostgreSQL "
          "| images per worker (last run) |")
    print("|---|---|---|---|---|---|---|")
    for layout, n in RUNS:
        inboxes = n if layout == "separate" else 1
        database = "SQLite" if layout == "sqlite" else "PostgreSQL"
        last = [per for lay, k, _, per in figures if (lay, k) == (layout, n)][-1]
        runs = ", ".join(f"{rate:.0f}" for rate in rates[(layout, n)])
        print(f"| {n} | {database} | {inboxes} | {median[(layout, n)]:.0f} | {runs} | "
              f"{median[(layout, n)] / base:.2f}x | {last} |")
