"""worker/daemon.py: the worker as a real process, with a real inotify watcher, SQLite file and signals.

The daemon tests start `python -m worker run` as a subprocess on a temp inbox and drop files into it the
ways uploaders do (cp, slow chunked writes, temp name then rename, mv from elsewhere, folders moved in,
bursts); they read the results with plain sqlite3 while the worker writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import distinct_jpegs, make_model, write_image

from worker import config as config_mod
from worker.daemon import Worker, layout_problems

CONFIG = """\
[inbox]
path = "inbox"
settle_s = 0.3
[model]
path = "model.onnx"
[database]
url = "sqlite:///data/results.db"
"""


# Helpers -------------------------------------------------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder with config.toml, a model and an empty inbox, as `fashion-worker run` expects."""
    (tmp_path / "config.toml").write_text(CONFIG)
    make_model(tmp_path / "model.onnx")
    (tmp_path / "inbox").mkdir()
    return tmp_path


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def query(site: Path, sql: str) -> list[tuple]:
    db = site / "data" / "results.db"
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError as exc:  # before the worker created the table
            if "no such table" in str(exc):
                return []
            raise


def row_count(site: Path) -> int:
    rows = query(site, "SELECT count(*) FROM results")
    return rows[0][0] if rows else 0


class Daemon:
    """`python -m worker run` in `site`, its output in a log file."""

    def __init__(self, site: Path, *args: str) -> None:
        self.site = site
        self.log_path = site / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "run", *args], cwd=site,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> Daemon:
        wait_until(lambda: "watching inbox" in self.log or self.proc.poll() is not None, 60, "the worker")
        assert self.proc.poll() is None, self.log
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat(5))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(site: Path, *args: str) -> Daemon:
        daemon = Daemon(site, *args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


def burst_files(folder: Path, count: int) -> list[Path]:
    """`count` distinct photo-sized (800x600) JPEGs."""
    return distinct_jpegs(folder, count, (800, 600), prefix="burst-")


def move_all(paths: list[Path], inbox: Path) -> None:
    for path in paths:
        os.rename(path, inbox / path.name)


# In-process: run --once -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_run_once_processes_a_mixed_folder_and_returns(site: Path) -> None:
    inbox = site / "inbox"
    write_image(inbox / "red.jpg", (255, 0, 0), noise_seed=1)
    write_image(inbox / "shoes" / "green.png", (0, 255, 0))
    (inbox / "red-again.jpg").write_bytes((inbox / "red.jpg").read_bytes())
    (inbox / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (inbox / "zero.jpg").write_bytes(b"")
    (inbox / "readme.jpg").write_text("plain text")
    (inbox / "upload.jpg.part").write_bytes(b"half")  # a temp name: ignored, left alone
    cfg = config_mod.load(site / "config.toml")
    assert Worker(cfg).run(once=True) == 0
    rows = query(site, "SELECT file, status, category, duplicate_of IS NOT NULL, location FROM results")
    assert {r[0]: r[1:3] for r in rows} == {
        "red.jpg": ("ok", "red"), "red-again.jpg": ("ok", "red"), "shoes/green.png": ("ok", "green"),
        "corrupt.jpg": ("failed", None), "zero.jpg": ("failed", None), "readme.jpg": ("failed", None),
    }
    # The same bytes twice: whichever was found second is recorded as a duplicate of the first.
    assert sorted(r[0] for r in rows if r[3]) in (["red-again.jpg"], ["red.jpg"])
    for file, status, _, _, location in rows:
        assert location == str(site / ("processed" if status == "ok" else "failed") / file)
        assert Path(location).is_file()
    assert [p.name for p in inbox.rglob("*") if p.is_file()] == ["upload.jpg.part"]
    workers = query(site, "SELECT processed, stopped_at IS NOT NULL, processed_dir, failed_dir FROM workers")
    assert workers == [(6, 1, str(site / "processed"), str(site / "failed"))]  # where recovery would look


@pytest.mark.parametrize("outcome", ["processed", "failed"])
def test_a_run_that_stops_with_a_recorded_file_unmoved_is_looked_at_again(
        site: Path, caplog: pytest.LogCaptureFixture, outcome: str) -> None:
    """A stable id stops cleanly with a recorded file it could not move (a file where its processed/sub or
    failed/sub folder should be; the failed one an empty file, refused before it is read). Its workers row
    is left unstopped: the next run moves the file, and a kill before it records where would otherwise
    leave the row naming the inbox, with no later start looking (recovery looks only at unstopped rows).
    The next run takes the rows over (same started_at), moves the file, and marks the id stopped."""
    inbox = site / "inbox"
    if outcome == "processed":
        write_image(inbox / "sub" / "a.jpg", (255, 0, 0), noise_seed=1)
    else:
        (inbox / "sub").mkdir()
        (inbox / "sub" / "a.jpg").write_bytes(b"")
    (site / outcome).mkdir()
    (site / outcome / "sub").write_text("in the way")
    cfg = config_mod.load(site / "config.toml", {"service.worker_id": "w@1"})
    with caplog.at_level(logging.INFO, logger="worker.daemon"):
        Worker(cfg).run(once=True)
    assert "1 recorded file(s) still wait in the inbox and 0 moved file(s) have no recorded place: the next " \
           "start looks at this worker's rows again" in caplog.messages
    (started, stopped), = query(site, "SELECT started_at, stopped_at FROM workers")
    assert stopped is None and (inbox / "sub" / "a.jpg").exists()
    (site / outcome / "sub").unlink()
    assert Worker(cfg).run(once=True) == 0
    moved = str(site / outcome / "sub" / "a.jpg")
    assert query(site, "SELECT file, location FROM results") == [("sub/a.jpg", moved)]
    assert query(site, "SELECT started_at, stopped_at IS NOT NULL FROM workers") == [(started, 1)]


def test_output_folders_inside_the_inbox_are_refused(site: Path) -> None:
    cfg = config_mod.load(site / "config.toml", {"files.processed_dir": "inbox/done"})
    assert layout_problems(cfg) == [
        f"files.processed_dir ({site}/inbox/done) must not be the inbox or inside it ({site}/inbox): "
        "the worker would pick its own output up again"
    ]


# The daemon as a process ----------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_daemon_classifies_files_dropped_every_way_uploaders_do(site: Path, daemons) -> None:
    inbox, outside = site / "inbox", site / "staging"
    daemon = daemons(site).wait_ready()

    write_image(inbox / "dropped.jpg", (255, 0, 0))  # cp: written and closed
    wait_until(lambda: row_count(site) == 1, what="the dropped file")

    # Written slowly in chunks: never read half-written.
    data = write_image(outside / "slow.png", (0, 0, 255), size=(300, 200), noise_seed=5).read_bytes()
    with (inbox / "slow.png").open("wb") as handle:
        for start in range(0, len(data), len(data) // 5 + 1):
            handle.write(data[start:start + len(data) // 5 + 1])
            handle.flush()
            time.sleep(0.3)
            assert row_count(site) == 1  # nothing read while it is open
    # A temp name renamed to its final name (rsync, SFTP clients), and a mv from another folder.
    write_image(inbox / ".upload.jpg.part", (0, 255, 0), fmt="JPEG")
    os.rename(inbox / ".upload.jpg.part", inbox / "renamed.jpg")
    os.rename(write_image(outside / "moved in.jpg", (255, 0, 0), noise_seed=7), inbox / "moved in.jpg")
    # A whole folder moved in at once.
    for i in range(3):
        write_image(outside / "album" / f"{i}.png", (0, 255, 0), noise_seed=10 + i)
    os.rename(outside / "album", inbox / "album")

    wait_until(lambda: row_count(site) == 7, what="all seven files")
    time.sleep(0.5)  # a second row for any of them would show up now
    assert query(site, "SELECT file, status, category FROM results ORDER BY file") == [
        ("album/0.png", "ok", "green"), ("album/1.png", "ok", "green"), ("album/2.png", "ok", "green"),
        ("dropped.jpg", "ok", "red"), ("moved in.jpg", "ok", "red"), ("renamed.jpg", "ok", "green"),
        ("slow.png", "ok", "blue"),
    ]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert not [p for p in inbox.rglob("*") if p.is_file()]


@pytest.mark.timeout(60)
def test_idle_worker_uses_no_cpu(site: Path, daemons) -> None:
    """Not a speed test: it checks that nothing spins while there is no work (issue 6: < 1 % CPU)."""
    daemon = daemons(site).wait_ready()
    write_image(site / "inbox" / "a.jpg", (255, 0, 0))  # some work first, so the pools have run
    wait_until(lambda: row_count(site) == 1, what="the file")
    time.sleep(0.5)
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    before, start = daemon.cpu_ticks(), time.monotonic()
    time.sleep(3)
    used_s = (daemon.cpu_ticks() - before) / ticks_per_s
    elapsed = time.monotonic() - start
    assert used_s <= 0.01 * elapsed, f"idle worker used {used_s:.2f} s of CPU in {elapsed:.1f} s"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


@pytest.mark.timeout(90)
def test_burst_is_classified_exactly_once(site: Path, daemons) -> None:
    staged = burst_files(site / "staging", 300)
    daemon = daemons(site).wait_ready()
    move_all(staged, site / "inbox")
    wait_until(lambda: row_count(site) >= 300, 60, "300 rows")
    time.sleep(0.5)
    assert query(site, "SELECT count(*), count(DISTINCT file), count(DISTINCT sha256), "
                       "sum(status = 'ok'), sum(duplicate_of IS NOT NULL) FROM results") == [(300, 300, 300, 300, 0)]
    assert len(list((site / "processed").iterdir())) == 300
    assert not list((site / "inbox").iterdir())
    first, last = query(site, "SELECT min(created_at), max(processed_at) FROM results")[0]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    print(f"burst of 300 800x600 JPEGs: first found {first}, last committed {last}")


@pytest.mark.timeout(90)
def test_sigterm_mid_burst_exits_cleanly_with_every_committed_file_moved(site: Path, daemons) -> None:
    staged = burst_files(site / "staging", 300)
    daemon = daemons(site).wait_ready()
    move_all(staged, site / "inbox")
    wait_until(lambda: row_count(site) >= 20, 60, "the first rows")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0  # it stops mid-burst: fewer rows than files, below
    assert "finishing the current batch" in daemon.log
    rows = query(site, "SELECT file, location FROM results")
    assert daemon.log.rstrip().endswith(f"INFO worker.daemon: stopped; {len(rows)} results recorded since start")
    left = sorted(p.name for p in (site / "inbox").iterdir())
    assert 20 <= len(rows) < 300, "the burst should still have been running"
    for file, location in rows:  # every committed file was moved; the rest is untouched in the inbox
        assert location == str(site / "processed" / file) and Path(location).is_file()
    assert sorted([r[0] for r in rows] + left) == sorted(p.name for p in staged)


@pytest.mark.timeout(90)
def test_restart_after_sigkill_completes_without_duplicate_rows(site: Path, daemons) -> None:
    staged = burst_files(site / "staging", 200)
    daemon = daemons(site).wait_ready()
    move_all(staged, site / "inbox")
    wait_until(lambda: row_count(site) >= 30, 60, "the first rows")
    daemon.signal(signal.SIGKILL)
    assert daemon.wait() == -signal.SIGKILL
    killed_at = row_count(site)
    again = daemons(site, "--once")  # the lock died with the process: the restart is not refused
    assert again.wait(timeout=60) == 0, again.log
    assert query(site, "SELECT count(*), count(DISTINCT file), sum(status = 'ok') FROM results") == [(200, 200, 200)]
    assert not list((site / "inbox").iterdir())
    assert sorted(p.name for p in (site / "processed").iterdir()) == sorted(p.name for p in staged)
    assert query(site, "PRAGMA integrity_check") == [("ok",)]
    print(f"killed with {killed_at} of 200 rows committed; the restart completed the rest")


@pytest.mark.timeout(60)
def test_second_worker_on_the_same_inbox_and_database_refuses(site: Path, daemons) -> None:
    first = daemons(site).wait_ready()
    second = subprocess.run([sys.executable, "-m", "worker", "run"], cwd=site, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 2
    assert second.stdout == ""
    lines = second.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr
    assert lines[0].startswith(f"fashion-worker: error: another worker (pid {first.proc.pid}) is already "
                               f"processing inbox {site}/inbox into sqlite:///{site}/data/results.db")
    # A second signal while the first is being handled exits at once with 128 + its number. (Python runs
    # pending signal handlers in signal-number order, so SIGINT is handled first even if both are pending.)
    first.signal(signal.SIGINT)
    first.signal(signal.SIGTERM)
    assert first.wait() == 128 + signal.SIGTERM
    assert "WARNING worker.daemon: SIGTERM again: exiting now" in first.log


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_watchdog_pings_stop_once_the_batching_thread_has_ended(site: Path, monkeypatch, caplog) -> None:
    """systemd restarts a worker whose WATCHDOG=1 pings stop: they must stop when no batch can form.

    The batching thread survives every Exception; to end it the test makes its step raise SystemExit
    (a BaseException, which nothing real here raises on cue). The notify socket is a real AF_UNIX socket."""
    sock_path = site / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        worker = Worker(config_mod.load(site / "config.toml"))
        worker.start_up()
        try:
            worker.housekeeping()
            messages = [sock.recv(4096) for _ in range(3)]  # READY=1, WATCHDOG=1, STATUS=…
            assert b"WATCHDOG=1\n" in messages
            assert worker.pipeline is not None and worker.pipeline.feeding

            def fail() -> bool:
                raise SystemExit("simulated")
            monkeypatch.setattr(worker.pipeline, "_feed_once", fail)
            worker.pipeline.queue.wake()  # the thread leaves its wait and runs the failing step
            wait_until(lambda: not worker.pipeline.feeding, what="the batching thread to end")
            worker._next_watchdog = 0.0
            with caplog.at_level("ERROR", logger="worker.daemon"):
                worker.housekeeping()
                worker._next_watchdog = 0.0
                worker.housekeeping()
            sent = []
            sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while True:
                    sent.append(sock.recv(4096))
            assert b"WATCHDOG=1\n" not in sent
            assert sent == [b"STATUS=batching thread ended; waiting for the watchdog restart\n"]
            assert [r.getMessage() for r in caplog.records
                    if r.name == "worker.daemon" and r.levelname == "ERROR"] == [
                "the batching thread has ended; no batch can form, so the worker stops telling systemd it is "
                "alive (WatchdogSec restarts it)"]
        finally:
            worker.shut_down()
