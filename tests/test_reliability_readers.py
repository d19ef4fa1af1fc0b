"""Reliability 2: people query the database while the worker writes, and another writer holds it.

Readers run continuously while the worker records a burst: `fashion-worker results` processes, the
`sqlite3` command-line shell with `.timeout 5000` (when installed), and plain Python sqlite3 connections
with Python's default 5 s busy timeout, as people open them. None may ever see "database is locked", and
the row count a reader sees never goes backwards; the slowest query of each kind is reported. (With
timeout=0, WAL readers do very rarely get SQLITE_BUSY while the WAL index is being reset: 1 of ~2,000
queries in one CI run, none in others; a busy timeout absorbs it, so that is what readers are told to use.)
The shell WITHOUT a busy timeout is measured too and its
"locked" rate reported (see Readers._sqlite3_shell for why it is not asserted).

Then another process takes the write lock (BEGIN IMMEDIATE) and holds it for several seconds while files
arrive: the worker retries with backoff (logged), readers keep working, and once the lock is released
every file is recorded exactly once.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from workerproc import Site, distinct_images, move_into, report, wait_until, workers

__all__ = ["workers"]


class Readers:
    """Reader threads of every kind, counting queries and collecting every error."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.stop = threading.Event()
        self.queries: Counter[str] = Counter()
        self.errors: list[str] = []
        self.max_latency: dict[str, float] = {}
        self.backwards = 0
        self._lock = threading.Lock()
        self.t0 = time.monotonic()
        self.kinds = ["fashion-worker results", "sqlite3 connection (kept open)",
                      "sqlite3 connection (new each query)"]
        self.threads = [self._thread(self._cli_results), self._thread(self._held_connection),
                        self._thread(self._fresh_connections)]
        self.shell_without_timeout: Counter[str] = Counter()
        if shutil.which("sqlite3"):
            self.kinds.append("sqlite3 shell (.timeout 5000)")
            self.threads.append(self._thread(self._sqlite3_shell))
            self.threads.append(self._thread(self._sqlite3_shell, False))

    def _thread(self, target: Callable[..., None], *args: object) -> threading.Thread:
        """A reader thread whose unexpected exception (a reader bug, a timeout) is an error of the test,
        not a thread that ends quietly while the others go on."""
        def guarded() -> None:
            try:
                target(*args)
            except Exception as exc:  # any of them fails the test, with its name
                with self._lock:
                    self.errors.append(f"{target.__name__} stopped: {type(exc).__name__}: {exc}")
        return threading.Thread(target=guarded, daemon=True)

    def __enter__(self) -> Readers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
            if thread.is_alive():
                self.errors.append(f"a reader thread did not stop within 30 s: {thread.name}")

    def _done(self, kind: str, started: float, error: str | None = None) -> None:
        with self._lock:
            self.queries[kind] += 1
            self.max_latency[kind] = max(self.max_latency.get(kind, 0.0), time.monotonic() - started)
            if error:
                self.errors.append(f"{kind} at +{started - self.t0:.2f} s: {error}")

    def _cli_results(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "worker", "results", "--limit", "20", "--format", "json"],
                                  cwd=self.site.root, capture_output=True, text=True, timeout=60)
            error = None
            if done.returncode != 0 or "locked" in done.stderr:
                error = f"exit {done.returncode}: {done.stderr.strip()}"
            else:
                json.loads(done.stdout)
            self._done("fashion-worker results", started, error)

    def _sqlite3_shell(self, busy_timeout: bool = True) -> None:
        """The sqlite3 shell as people run it. With `.timeout 5000` (what README.md, Reliability tells them)
        its errors fail the test; without a busy timeout its errors are counted and reported only: the
        sqlite3 3.40 shell then sees "database is locked" now and then while ANY writer commits (the
        same happens with a plain Python writer and no worker at all), which no writer can prevent."""
        timeout = ["-cmd", ".timeout 5000"] if busy_timeout else []
        kind = "sqlite3 shell (.timeout 5000)"
        while not self.stop.is_set():
            started = time.monotonic()
            done = subprocess.run(["sqlite3", *timeout, str(self.site.db),
                                   "SELECT count(*), max(id) FROM results; "
                                   "SELECT category, count(*) FROM results GROUP BY category;"],
                                  capture_output=True, text=True, timeout=60)
            error = f"exit {done.returncode}: {done.stderr.strip()}" if done.returncode or done.stderr else None
            if busy_timeout:
                self._done(kind, started, error)
            else:
                with self._lock:
                    self.shell_without_timeout["queries"] += 1
                    self.shell_without_timeout["locked"] += bool(error and "locked" in error)
                    self.shell_without_timeout["other errors"] += bool(error and "locked" not in error)

    def _held_connection(self) -> None:
        conn = sqlite3.connect(str(self.site.db), timeout=5.0, isolation_level=None)
        last = 0
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    count = conn.execute("SELECT count(*) FROM results").fetchone()[0]
                    conn.execute("SELECT id, file, category, confidence FROM results ORDER BY id DESC LIMIT 50"
                                 ).fetchall()
                    conn.execute("SELECT status, count(*), avg(confidence) FROM results GROUP BY status").fetchall()
                except sqlite3.Error as exc:
                    self._done("sqlite3 connection (kept open)", started, str(exc))
                    continue
                if count < last:
                    self.backwards += 1
                last = count
                self._done("sqlite3 connection (kept open)", started)
                time.sleep(0.005)
        finally:
            conn.close()

    def _fresh_connections(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                conn = sqlite3.connect(str(self.site.db), timeout=5.0)
                try:
                    conn.execute("SELECT * FROM results WHERE status = 'ok' ORDER BY processed_at DESC LIMIT 10"
                                 ).fetchall()
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                self._done("sqlite3 connection (new each query)", started, str(exc))
                continue
            self._done("sqlite3 connection (new each query)", started)
            time.sleep(0.005)

    def figures(self) -> dict[str, object]:
        return {"queries": dict(self.queries), "errors": len(self.errors),
                "max_latency_s": {k: round(v, 3) for k, v in self.max_latency.items()},
                "count_went_backwards": self.backwards,
                "sqlite3_shell_without_timeout": dict(self.shell_without_timeout) or "not installed"}


@pytest.mark.timeout(120)
def test_readers_never_see_a_locked_database_while_the_worker_writes(tmp_path: Path, workers, capsys) -> None:
    site = Site(tmp_path)
    staged = distinct_images(tmp_path / "staging", 1500)
    worker = workers(site).wait_ready()
    wait_until(site.db.exists, 10, "the database")
    with Readers(site) as readers:
        time.sleep(0.5)
        started = time.monotonic()
        for first in range(0, 1500, 50):  # bursts of 50 every 0.2 s: the worker writes for several seconds
            move_into(staged[first:first + 50], site.inbox)
            time.sleep(0.2)
        wait_until(lambda: site.count() >= 1500 and not site.inbox_files(), 90, "1500 rows")
        seconds = time.monotonic() - started
        time.sleep(0.5)
    assert worker.stop() == 0, worker.log
    line = report(capsys, "concurrent readers (1500 images)", rows=site.count(), write_seconds=round(seconds, 1),
                  **readers.figures())
    assert not readers.errors, f"{line}\n" + "\n".join(readers.errors[:10])
    assert readers.backwards == 0, line
    assert all(readers.queries[kind] >= 2 for kind in readers.kinds), line  # every reader, not those that ran
    assert site.count() == 1500 and site.count("status = 'ok'") == 1500, line


@pytest.mark.timeout(120)
def test_worker_retries_while_another_writer_holds_the_database(tmp_path: Path, workers, capsys) -> None:
    # A short busy timeout, so that the hold outlasts many lock waits and the retry path runs.
    site = Site(tmp_path, busy_timeout_ms=500)
    first = distinct_images(tmp_path / "staging", 50, seed=1, prefix="before")
    during = distinct_images(tmp_path / "staging", 200, seed=2, prefix="during")
    worker = workers(site).wait_ready()
    move_into(first, site.inbox)
    wait_until(lambda: site.count() >= 50, 60, "the first 50 rows")

    hold_s = 6.0
    holder = sqlite3.connect(str(site.db), timeout=10, isolation_level=None)
    with Readers(site) as readers:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long admin transaction would take it
        held_at = time.monotonic()
        move_into(during, site.inbox)
        time.sleep(hold_s)
        rows_during_hold = site.count() - 50
        in_inbox_at_release = len(site.inbox_files())
        holder.execute("ROLLBACK")
        released = time.monotonic()
        wait_until(lambda: site.count() >= 250 and not site.inbox_files(), 60, "all 250 rows")
        resumed_s = time.monotonic() - released
    holder.close()
    held_s = released - held_at
    assert worker.stop() == 0, worker.log
    log = worker.log
    retries = log.count("busy during recording")
    line = report(capsys, "database held by another writer", hold_s=round(held_s, 1), busy_timeout_ms=500,
                  worker_retries_logged=retries, rows_committed_during_hold=rows_during_hold,
                  files_waiting_in_inbox_at_release=in_inbox_at_release,
                  all_recorded_after_release_s=round(resumed_s, 2),
                  rows=site.count(), distinct_files=site.query("SELECT count(DISTINCT file) FROM results")[0][0],
                  reader_errors=len(readers.errors), reader_queries=sum(readers.queries.values()))
    assert rows_during_hold == 0 and in_inbox_at_release == 200, line  # nothing moved before its commit
    assert retries >= 1, f"{line}\nno retry was logged:\n{log}"
    assert "Traceback" not in log and "cannot record" not in log, log
    assert site.count() == 250 and site.count("status = 'ok'") == 250, line
    assert site.query("SELECT count(DISTINCT file) FROM results")[0][0] == 250, line
    assert not readers.errors, f"{line}\n" + "\n".join(readers.errors[:10])
    assert len(list(site.processed.iterdir())) == 250, line
