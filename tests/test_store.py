"""worker.store on real SQLite files (and, where the statements differ, a real PostgreSQL server): schema, WAL,
duplicates, crash-recovery look-ups, locks, retries."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import statements_of, unwritable
from pgserver import fresh_database, postgres_server

from worker import query
from worker.exceptions import StoreError
from worker.migrations import LATEST_VERSION
from worker.store import ResultRecord, Store, results

MODEL = "m" * 64


def record(name: str, sha: str | None = "a" * 64, *, model_id: str = MODEL, status: str = "ok",
           **extra: object) -> ResultRecord:
    fields: dict[str, object] = {
        "file": name, "location": f"/inbox/{name}", "sha256": sha, "status": status, "model_id": model_id,
        "model_name": "tiny", "worker": "host:1",
    }
    if status == "ok":
        fields.update(category="red", confidence=0.9, top3=[("red", 0.9), ("green", 0.06), ("blue", 0.04)])
    else:
        fields.update(error="not an image")
    fields.update(extra)
    return ResultRecord(**fields)  # type: ignore[arg-type]


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "results.db"


@pytest.fixture
def store(db_path: Path):
    with Store(sqlite_url(db_path)) as opened:
        yield opened


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    """One throw-away PostgreSQL server for the module (skips without the binaries); tests take a fresh
    database on it (fresh_database)."""
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A Store on a fresh SQLite file, and on a fresh database of a real PostgreSQL server (one per module):
    the statements differ (PostgreSQL's take a batch as arrays), what they record must not."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "data" / "results.db")
    else:
        url = fresh_database(request.getfixturevalue("pg_server"))
    with Store(url) as opened:
        yield opened


def count_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM results").fetchone()[0]


# Opening -------------------------------------------------------------------------------------------
def test_open_creates_folder_schema_and_wal(db_path: Path) -> None:
    assert not db_path.parent.exists()
    with Store(sqlite_url(db_path)) as store:
        assert store.schema_version == LATEST_VERSION
        assert store.url == sqlite_url(db_path)
        assert store.dialect == "sqlite"
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"results", "workers", "schema_version"} <= tables
    indexes = {r[0]: r[1] for r in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'results'")}
    assert "ON results (sha256, model_id)" in indexes["ix_results_sha256_model_id"]
    for column in ("category", "status", "processed_at", "file"):
        assert f"ON results ({column})" in indexes[f"ix_results_{column}"]
    conn.close()


def test_every_connection_gets_the_pragmas(tmp_path: Path) -> None:
    with Store(sqlite_url(tmp_path / "r.db"), busy_timeout_ms=1234) as store, store.engine.connect() as conn:
        pragma = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                  for name in ("busy_timeout", "foreign_keys", "synchronous", "journal_mode")}
    assert pragma == {"busy_timeout": 1234, "foreign_keys": 1, "synchronous": 1, "journal_mode": "wal"}


@pytest.mark.parametrize(("url", "expected"), [
    ("not a url", "is not valid"),
    ("nosuchdb://x/y", "no SQLAlchemy dialect"),
    ("sqlite://data/results.db", r"database URL 'sqlite://data/results\.db' has two slashes: a SQLite URL has "
                                 r"three before a relative path \(sqlite:///data/results\.db\) and four before "),
])
def test_bad_url_is_one_clear_line(url: str, expected: str) -> None:
    with pytest.raises(StoreError, match=expected) as info:
        Store(url)
    assert "\n" not in str(info.value)


def test_a_missing_database_folder_is_created_and_said_so(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="worker.store"), Store(sqlite_url(tmp_path / "deep" / "er" / "r.db")):
        pass
    assert (tmp_path / "deep" / "er" / "r.db").is_file()  # a first start, or a typo in --db: the log says which
    assert f"created the database folder {tmp_path}/deep/er (it did not exist)" in caplog.messages


def test_folder_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")  # a file where the folder should be: fails even for root
    with pytest.raises(StoreError, match=r"cannot create database folder .*afile"):
        Store(sqlite_url(blocker / "sub" / "r.db"))


def test_path_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "r.db").mkdir()
    with pytest.raises(StoreError, match="unable to open database file"):
        Store(sqlite_url(tmp_path / "r.db"))


def test_not_a_database_file(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    path.write_bytes(b"this is a text file, not SQLite, long enough to hold a header" * 20)
    with pytest.raises(StoreError, match="file is not a database") as info:
        Store(sqlite_url(path))
    assert "\n" not in str(info.value)


def tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return sorted(name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


def test_a_reader_never_creates_migrates_or_writes(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE foo (x)")  # somebody else's database
    (tmp_path / "empty.db").write_bytes(b"")
    for path in (other, tmp_path / "empty.db"):
        before = path.read_bytes()
        with pytest.raises(StoreError) as info:
            Store(sqlite_url(path), readonly=True)
        assert str(info.value) == (f"database sqlite:///{path} is not a fashion-worker database "
                                   "(no schema_version table)")
        assert path.read_bytes() == before
    with pytest.raises(StoreError, match="does not exist"):
        Store(sqlite_url(tmp_path / "none.db"), readonly=True)
    assert not (tmp_path / "none.db").exists()

    path = tmp_path / "old.db"
    with Store(sqlite_url(path)) as store:
        store.add_results([record("a.jpg")])
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM schema_version WHERE version = (SELECT max(version) FROM schema_version)")
    with pytest.raises(StoreError, match=f"has schema version {LATEST_VERSION - 1}, older than this "
                                         f"fashion-worker's {LATEST_VERSION}: start the worker once to migrate it"):
        Store(sqlite_url(path), readonly=True)


def test_a_reader_opens_the_file_read_only(store: Store, db_path: Path) -> None:
    store.add_results([record("a.jpg")])
    with Store(sqlite_url(db_path), readonly=True) as reader:  # while the worker's store is open
        assert [row["file"] for row in query.results(reader)] == ["a.jpg"]
        with pytest.raises(StoreError, match="readonly database"):
            reader.add_results([record("b.jpg", "b" * 64)])
    assert count_rows(db_path) == 1


def test_a_reader_reads_a_closed_database_in_a_folder_it_cannot_write(db_path: Path) -> None:
    """WAL mode needs a -shm file that a reader cannot create in such a folder; with no worker holding the
    database (no -wal file), the reader reads the file as immutable instead."""
    with Store(sqlite_url(db_path)) as store:
        store.add_results([record("a.jpg")])
    assert not db_path.with_name("results.db-wal").exists()  # the last close checkpointed it
    with unwritable(db_path.parent):
        with Store(sqlite_url(db_path), readonly=True) as reader:
            assert [row["file"] for row in query.results(reader)] == ["a.jpg"]
        assert sorted(p.name for p in db_path.parent.iterdir()) == ["results.db"]


# Writing -------------------------------------------------------------------------------------------
def test_add_results_stores_every_field(any_store: Store) -> None:
    created = datetime(2025, 1, 31, 12, 0, 0, 123456, tzinfo=UTC)
    before = datetime.now(UTC)
    ok = record("shirts/red shirt.jpg", size_bytes=1234, decode_ms=np.float32(1.5),
                inference_ms=2.25, total_ms=4.0, created_at=created,
                confidence=np.float32(0.75), top3=[("red", np.float32(0.75)), ("green", 0.25)])
    bad = record("broken.png", sha="b" * 64, status="failed", error="truncated PNG")
    ids = any_store.add_results([ok, bad])
    assert ids == [1, 2]
    with any_store.engine.connect() as conn:
        rows = conn.execute(sa.select(results).order_by(results.c.id)).mappings().all()
    first = rows[0]
    assert first["file"] == "shirts/red shirt.jpg" and first["location"] == "/inbox/shirts/red shirt.jpg"
    assert (first["sha256"], first["size_bytes"], first["status"]) == ("a" * 64, 1234, "ok")
    assert (first["category"], first["confidence"], first["error"]) == ("red", 0.75, None)
    assert (first["model_id"], first["model_name"], first["worker"]) == (MODEL, "tiny", "host:1")
    assert (first["decode_ms"], first["inference_ms"], first["total_ms"]) == (1.5, 2.25, 4.0)
    assert json.loads(first["top3"]) == [["red", 0.75], ["green", 0.25]]
    assert first["created_at"] == created and first["created_at"].tzinfo == UTC
    assert before <= first["processed_at"] <= datetime.now(UTC)
    assert first["duplicate_of"] is None
    assert (rows[1]["status"], rows[1]["error"], rows[1]["category"]) == ("failed", "truncated PNG", None)
    if any_store.dialect != "sqlite":
        return
    # Plain sqlite3 sees UTC text that sorts and compares as a timestamp.
    with sqlite3.connect(any_store.engine.url.database) as conn:
        raw = conn.execute("SELECT created_at, top3 FROM results WHERE id = 1").fetchone()
    assert raw == ("2025-01-31 12:00:00.123456", '[["red", 0.75], ["green", 0.25]]')


def test_naive_created_at_is_taken_as_utc(any_store: Store) -> None:
    any_store.add_results([record("a.jpg", created_at=datetime(2025, 1, 1, 8, 30))])
    with any_store.engine.connect() as conn:
        created = conn.execute(sa.select(results.c.created_at)).scalar_one()
    assert created == datetime(2025, 1, 1, 8, 30, tzinfo=UTC)


def test_duplicate_of_within_a_batch_and_across_batches(any_store: Store) -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    batch1 = [record("1.jpg", a), record("2.jpg", b), record("3.jpg", a), record("4.jpg", a)]
    assert any_store.add_results(batch1) == [1, 2, 3, 4]
    assert [r.duplicate_of for r in batch1] == [None, None, 1, 1]
    other_model = record("5.jpg", a, model_id="x" * 64)
    batch2 = [record("6.jpg", b), record("7.jpg", c), record("8.jpg", a), other_model, record("9.jpg", c),
              record("10.jpg", None, status="failed"), record("11.jpg", None, status="failed")]
    assert any_store.add_results(batch2) == [5, 6, 7, 8, 9, 10, 11]
    assert [r.duplicate_of for r in batch2] == [2, None, 1, None, 6, None, None]
    with any_store.engine.connect() as conn:
        stored = dict(conn.execute(sa.select(results.c.id, results.c.duplicate_of)).all())
    assert stored == {1: None, 2: None, 3: 1, 4: 1, 5: 2, 6: None, 7: 1, 8: None, 9: 6, 10: None, 11: None}


def test_add_results_validates_status(store: Store) -> None:
    with pytest.raises(ValueError, match="ok, failed"):
        store.add_results([record("a.jpg", status="done")])
    assert store.add_results([]) == []


def test_a_failing_row_writes_nothing_of_its_batch(store: Store, db_path: Path) -> None:
    store.add_results([record("before.jpg")])
    broken = record("bad.jpg")
    broken.model_id = None  # type: ignore[assignment]  # NOT NULL violated by the last row of the batch
    with pytest.raises(StoreError, match="NOT NULL"):
        store.add_results([record("x.jpg", "x" * 64), record("y.jpg", "x" * 64), broken])
    assert count_rows(db_path) == 1
    assert store.add_results([record("after.jpg", "x" * 64)]) == [2]  # the id sequence was not disturbed


def test_odd_names_are_stored(any_store: Store) -> None:
    names = ["new\nline.jpg", "quote'\"s.jpg", "ünïcødé 画像.jpg", "spaces  in name.jpg",
             "bad-\udcff-byte.jpg"]  # the last one: an undecodable byte, as os.listdir returns it
    ids = any_store.add_results([record(n, f"{i}" * 64) for i, n in enumerate(names)])
    with any_store.engine.connect() as conn:
        stored = conn.execute(sa.select(results.c.file).order_by(results.c.id)).scalars().all()
    assert stored == [*names[:4], "bad-\\xff-byte.jpg"]
    assert any_store.find_drop(names[4], "4" * 64, MODEL, f"/inbox/{names[4]}") == ids[4]


# Look-ups for the worker ---------------------------------------------------------------------------
def test_first_by_content(any_store: Store) -> None:
    a, b = "a" * 64, "b" * 64
    any_store.add_results([record("1.jpg", a), record("2.png", b, status="failed"), record("3.jpg", a)])
    any_store.add_results([record("4.jpg", a, model_id="x" * 64)])
    found = any_store.first_by_content([a, b, "c" * 64, a], MODEL)
    assert set(found) == {a, b}
    assert (found[a].id, found[a].file, found[a].status, found[a].category) == (1, "1.jpg", "ok", "red")
    assert found[a].top3 == [("red", 0.9), ("green", 0.06), ("blue", 0.04)]
    assert (found[b].id, found[b].status, found[b].error) == (2, "failed", "not an image")
    assert found[b].top3 is None
    assert any_store.first_by_content([a], "x" * 64)[a].id == 4
    assert any_store.first_by_content([], MODEL) == {}


def test_find_drop_and_set_locations(any_store: Store) -> None:
    a = "a" * 64
    [row_id] = any_store.add_results([record("in/a.jpg", a, location="/inbox/in/a.jpg")])
    # Committed but not moved yet (a crash here): the drop is found.
    assert any_store.find_drop("in/a.jpg", a, MODEL, "/inbox/in/a.jpg") == row_id
    assert any_store.find_drop("in/a.jpg", "b" * 64, MODEL, "/inbox/in/a.jpg") is None  # other content
    assert any_store.find_drop("in/a.jpg", a, "x" * 64, "/inbox/in/a.jpg") is None  # other model
    assert any_store.find_drop("other.jpg", a, MODEL, "/inbox/in/a.jpg") is None  # other name
    any_store.set_locations([(row_id, "/processed/in/a.jpg")])
    # Moved and recorded: a new drop of the same name and bytes is a new drop, not a recovery.
    assert any_store.find_drop("in/a.jpg", a, MODEL, "/inbox/in/a.jpg") is None
    with any_store.engine.connect() as conn:
        assert conn.execute(sa.select(results.c.location)).scalar_one() == "/processed/in/a.jpg"
    any_store.set_locations([(row_id, "/processed/in/a (1).jpg"), (row_id, "/processed/in/a.jpg")])  # last wins
    with any_store.engine.connect() as conn:
        assert conn.execute(sa.select(results.c.location)).scalar_one() == "/processed/in/a.jpg"
    [failed_id] = any_store.add_results([record("x.bin", None, status="failed", location="/inbox/x.bin")])
    assert any_store.find_drop("x.bin", None, MODEL, "/inbox/x.bin") == failed_id
    any_store.set_locations([])


def test_correct_locations_changes_only_rows_still_naming_what_was_read(any_store: Store) -> None:
    """Crash recovery's write: a row a live worker recorded meanwhile keeps the place that worker gave it."""
    a, b = "a" * 64, "b" * 64
    first, second = any_store.add_results([record("a.jpg", a, location="/inbox/a.jpg"),
                                           record("b.jpg", b, location="/inbox/b.jpg")])
    any_store.set_locations([(second, "/processed/b (1).jpg")])  # the live worker's move, recorded first
    assert any_store.correct_locations([(first, "/inbox/a.jpg", "/processed/a.jpg"),
                                        (second, "/inbox/b.jpg", "/processed/b.jpg")]) == 1
    with any_store.engine.connect() as conn:
        assert dict(conn.execute(sa.select(results.c.id, results.c.location)).all()) == {
            first: "/processed/a.jpg", second: "/processed/b (1).jpg"}
    assert any_store.correct_locations([]) == 0


def test_find_drop_tells_the_recorded_file_from_another_of_the_same_name_and_bytes(any_store: Store) -> None:
    a = "a" * 64
    ctime = 1_795_000_000_123_456_789  # ns: the file read, as the worker recorded it
    [row_id] = any_store.add_results([ResultRecord(
        file="a.jpg", location="/inbox/a.jpg", status="ok", sha256=a, model_id=MODEL, model_name="m",
        worker="w", ctime_ns=ctime)])
    with any_store.engine.connect() as conn:
        assert conn.execute(sa.select(results.c.ctime_ns)).scalar_one() == ctime
    assert any_store.find_drop("a.jpg", a, MODEL, "/inbox/a.jpg", ctime) == row_id  # the file recorded
    assert any_store.find_drop("a.jpg", a, MODEL, "/inbox/a.jpg", ctime + 1) is None  # a later upload
    assert any_store.find_drop("a.jpg", a, MODEL, "/inbox/a.jpg") == row_id  # ctime unknown: as before
    # A row from before schema version 4 has no ctime: matched whatever the file's.
    [old_id] = any_store.add_results([record("b.jpg", a, location="/inbox/b.jpg")])
    assert any_store.find_drop("b.jpg", a, MODEL, "/inbox/b.jpg", ctime + 1) == old_id
    # A file refused before it was read (no sha256) is told apart the same way.
    [refused] = any_store.add_results([record("c.jpg", None, status="failed", location="/inbox/c.jpg", ctime_ns=ctime)])
    assert any_store.find_drop("c.jpg", None, MODEL, "/inbox/c.jpg", ctime) == refused
    assert any_store.find_drop("c.jpg", None, MODEL, "/inbox/c.jpg", ctime + 1) is None


def test_lookups_that_the_database_refuses_raise_store_error(store: Store, db_path: Path) -> None:
    """The pipeline turns a StoreError into a back-off and a retry of the batch; a raw driver error would
    instead end up as an unexpected error."""
    with sqlite3.connect(db_path) as conn:  # a schema broken behind the worker's back: not transient
        conn.execute("ALTER TABLE results RENAME TO results_gone")
    with pytest.raises(StoreError, match=r"looking up earlier results failed: .*no such table: results"):
        store.first_by_content(["a" * 64], MODEL)
    with pytest.raises(StoreError, match=r"looking up a recorded drop failed: .*no such table: results"):
        store.find_drop("a.jpg", "a" * 64, MODEL, "/inbox/a.jpg")


def test_heartbeat_upserts_the_worker_row(store: Store) -> None:
    from worker.store import workers

    def row() -> dict:
        with store.engine.connect() as conn:
            return dict(conn.execute(sa.select(workers)).mappings().one())

    store.heartbeat("host:10", "host", 10, 0)
    first = row()
    assert (first["host"], first["pid"], first["processed"], first["stopped_at"]) == ("host", 10, 0, None)
    assert first["started_at"] == first["heartbeat_at"]
    store.heartbeat("host:10", "host", 10, 42)
    second = row()
    assert second["processed"] == 42 and second["started_at"] == first["started_at"]
    assert second["heartbeat_at"] > first["heartbeat_at"]
    store.heartbeat("host:10", "host", 10, 43, stopped=True)
    assert row()["stopped_at"] is not None
    store.heartbeat("host:10", "host", 11, 0)  # same configured id, new process
    third = row()
    assert third["pid"] == 11 and third["stopped_at"] is None and third["started_at"] > first["started_at"]


# Concurrency ---------------------------------------------------------------------------------------
def test_readers_are_not_blocked_by_a_writer(store: Store, db_path: Path) -> None:
    store.add_results([record("committed.jpg")])
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO results (file, location, status, model_id, model_name, created_at, "
                   "processed_at, worker) VALUES ('open.jpg', '/x', 'ok', 'm', 'n', '2025-01-01 00:00:00', "
                   "'2025-01-01 00:00:00', 'w')")
    try:
        # A second pooled connection of the Store, and plain sqlite3 told not to wait at all.
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(results.c.file)).scalars().all() == ["committed.jpg"]
        reader = sqlite3.connect(db_path, timeout=0)
        assert reader.execute("SELECT file FROM results").fetchall() == [("committed.jpg",)]
        reader.close()
        assert store.first_by_content(["a" * 64], MODEL)["a" * 64].file == "committed.jpg"
    finally:
        writer.execute("COMMIT")
        writer.close()
    assert count_rows(db_path) == 2


@pytest.mark.timeout(60)
def test_add_results_retries_while_another_writer_holds_the_lock(db_path: Path, caplog) -> None:
    # A short busy timeout so that the Store's own retry loop (not SQLite's busy handler) does the waiting.
    store = Store(sqlite_url(db_path), busy_timeout_ms=50)
    holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release() -> None:
        holder.execute("ROLLBACK")
        released.set()

    timer = threading.Timer(1.0, release)
    timer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="worker.store"):
            ids = store.add_results([record("a.jpg"), record("b.jpg")])
        assert released.is_set()  # it could only have succeeded after the release
        assert ids == [1, 2]
        retries = [r for r in caplog.records if "database is locked" in r.getMessage()]
        assert retries and all(r.levelno == logging.WARNING for r in retries)
    finally:
        timer.join()
        holder.close()
        store.close()
    assert count_rows(db_path) == 2


class LostCommitAnswer(Store):
    """The real store, whose first write commits and then fails as a dropped connection would: the answer
    to COMMIT lost. Raised by hand (the one thing not real here) because a local SQLite commit cannot lose
    its answer; on PostgreSQL a server restart or a network cut during COMMIT does exactly this."""

    lost = False

    def _retry(self, what, attempt):  # type: ignore[no-untyped-def]
        def commit_then_lose():  # type: ignore[no-untyped-def]
            result = attempt()
            if not self.lost:
                self.lost = True
                raise sa.exc.OperationalError("COMMIT", {}, sqlite3.OperationalError("database is locked"))
            return result
        return super()._retry(what, commit_then_lose)


def test_a_commit_whose_answer_was_lost_is_not_recorded_twice(db_path: Path, caplog) -> None:
    with LostCommitAnswer(sqlite_url(db_path)) as store:
        store.add_results([record("x.jpg", "c" * 64)])
        store.lost = False  # the next batch's commit answer is lost
        batch = [record("a.jpg", "a" * 64), record("b.jpg", "b" * 64), record("c.jpg", "c" * 64)]
        assert store.add_results(batch) == [2, 3, 4]  # the ids the first attempt committed
        assert [r.duplicate_of for r in batch] == [None, None, 1]
    assert count_rows(db_path) == 4
    assert "an earlier attempt at recording 3 results had committed 3 of them; not recording them again" in \
        caplog.text


@pytest.mark.timeout(60)
def test_add_results_gives_up_after_retry_window_and_writes_nothing(db_path: Path) -> None:
    store = Store(sqlite_url(db_path), busy_timeout_ms=20, retry_s=0.5)
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match=r"still failing after .* database is locked"):
            store.add_results([record("a.jpg"), record("b.jpg", "b" * 64), record("c.jpg")])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert count_rows(db_path) == 0
    assert store.add_results([record("a.jpg")]) == [1]  # and it works again once the lock is gone
    store.close()


def _write_batches(url: str, worker: str, shas: list[str], start: Any) -> None:
    store = Store(url)
    start.wait(10)
    for i in range(0, len(shas), 5):
        store.add_results([record(f"{worker}-{i + j}.jpg", sha, worker=worker)
                           for j, sha in enumerate(shas[i:i + 5])])
    store.close()


def _first_rows_of_concurrent_writers(url: str, writers: int, shas: list[str]) -> tuple[int, int, int, int]:
    """`writers` processes each record `shas` at once in batches of 5 (_write_batches); then (rows, rows
    marked first, distinct contents, rows whose duplicate_of is not the lowest-id first row of their content)."""
    Store(url).close()
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_write_batches, args=(url, f"w{n}", shas, start)) for n in range(writers)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(50)
    assert [proc.exitcode for proc in procs] == [0] * writers
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        total, firsts, distinct = conn.execute(sa.text(
            "SELECT count(*), sum(CASE WHEN duplicate_of IS NULL THEN 1 ELSE 0 END), count(DISTINCT sha256) "
            "FROM results")).one()
        wrong = conn.execute(sa.text(
            "SELECT count(*) FROM results r JOIN results f ON r.duplicate_of = f.id "
            "WHERE f.sha256 != r.sha256 OR f.duplicate_of IS NOT NULL OR f.id > r.id")).scalar_one()
    engine.dispose()
    return total, firsts, distinct, wrong


@pytest.mark.timeout(60)
def test_two_writer_processes_agree_on_first_rows(db_path: Path) -> None:
    shas = [f"{i % 13:064d}" for i in range(60)]  # both processes write the same 13 contents
    assert _first_rows_of_concurrent_writers(sqlite_url(db_path), 2, shas) == (120, 13, 13, 0)


def test_a_lost_commit_answer_with_an_undecodable_file_name_is_not_recorded_twice(db_path: Path) -> None:
    # The retry looks for the earlier attempt's rows by file name, as the rows store it (bytes that are not
    # UTF-8 become \xNN text): binding the raw name failed with UnicodeEncodeError outside the retry.
    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name on a UTF-8 system: a surrogate escape
    with LostCommitAnswer(sqlite_url(db_path)) as store:
        store.lost = False
        assert store.add_results([record(name, "d" * 64)]) == [1]
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT id, file FROM results").fetchall() == [(1, "caf\\xe9.jpg")]


def test_a_connection_opened_while_the_database_was_read_only_is_not_kept(store: Store, db_path: Path) -> None:
    """SQLite opens a file it cannot write read-only, and such a connection stays read-only after the file
    is writable again. One the pool opened during a fault (here a lookup while the first connection is in
    use, as the worker's batching thread does beside its main thread) used to refuse every other write for
    good: the worker then kept backing off after the fault was over."""
    store.add_results([record("before.jpg", "0" * 64)])
    wal = db_path.with_name(db_path.name + "-wal")
    with contextlib.ExitStack() as fault:
        for path in (db_path.parent, db_path, wal):
            fault.enter_context(unwritable(path))
        with store.engine.connect():  # holds the pool's connection: the lookup opens a second one
            assert store.first_by_content(["0" * 64], MODEL)["0" * 64].id == 1
    assert store.engine.pool.checkedin() == 2
    for n in range(6):  # the pool hands out both connections in turn
        store.add_results([record(f"after{n}.jpg", f"{n + 1}" * 64)])
    assert count_rows(db_path) == 7


def test_a_column_type_without_a_postgresql_array_type_is_refused_when_the_statements_are_built() -> None:
    from worker.store import pg_array_type

    assert [pg_array_type(c) for c in (results.c.file, results.c.id, results.c.confidence,
                                       results.c.created_at)] == ["text[]", "bigint[]", "float8[]", "timestamptz[]"]
    with pytest.raises(TypeError, match="no PostgreSQL array type for column ok of type Boolean"):
        pg_array_type(sa.Column("ok", sa.Boolean))


@pytest.mark.postgres
def test_on_postgresql_a_batch_takes_the_same_statements_whatever_its_size(pg_server: str) -> None:
    """A batch's values travel as arrays: recording, looking up and moving 2 or 200 files sends the same
    statement texts, one each, so SQLAlchemy compiles and psycopg converts each once (a parameter per value
    made both do it again for every batch). The ids still follow the batch's order, as duplicate_of needs."""
    with Store(fresh_database(pg_server)) as store:
        sent = []
        for size in (2, 200):
            half = size // 2  # each content twice: the second row of each points at the first
            batch = [record(f"{size}-{i}.jpg", f"{size:04d}{i % half:04d}".ljust(64, "0")) for i in range(size)]
            with statements_of(store) as statements:
                ids = store.add_results(batch)
                store.first_by_content([r.sha256 for r in batch], MODEL)
                store.set_locations([(row_id, f"/processed/{r.file}") for row_id, r in zip(ids, batch, strict=True)])
            sent.append(statements)
            with store.engine.connect() as conn:
                stored = conn.execute(sa.select(results.c.id, results.c.file, results.c.duplicate_of,
                                                results.c.location).where(results.c.id.in_(ids))
                                      .order_by(results.c.id)).all()
            # In the database: the rows in the batch's order, each content's second row pointing at its first.
            assert [row.file for row in stored] == [r.file for r in batch]
            assert [row.id for row in stored] == ids
            assert [row.duplicate_of for row in stored] == [None] * half + ids[:half]
            assert [r.duplicate_of for r in batch] == [None] * half + ids[:half]
            assert all(row.location == f"/processed/{row.file}" for row in stored)
        assert sent[0] == sent[1]
        assert sum(text.startswith("INSERT INTO results") for text in sent[1]) == 1


@pytest.mark.postgres
def test_a_postgresql_connection_left_read_only_is_replaced(pg_server: str) -> None:
    """The same for PostgreSQL: a pooled connection to a server that became a standby (a fail-over behind a
    name or a pooler) refuses writes with SQLSTATE 25006 for good; pool_pre_ping does not notice. Made real
    here by a session set read-only on the pooled connection; the batch goes through on a new connection."""
    with Store(fresh_database(pg_server)) as store:
        with store.engine.connect() as conn:
            conn.exec_driver_sql("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            conn.commit()
        assert store.engine.pool.checkedin() == 1
        assert store.add_results([record("a.jpg")]) == [1]
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "off"
            assert conn.exec_driver_sql("SELECT count(*) FROM results").scalar() == 1


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_two_writer_processes_agree_on_first_rows_on_postgresql(pg_server: str) -> None:
    """As above, on a real PostgreSQL server, where duplicate detection is serialised per content
    (lock_contents): of rows with the same content exactly one is the first, and it has the lowest id."""
    shas = [f"{i % 13:064x}" for i in range(60)]
    assert _first_rows_of_concurrent_writers(fresh_database(pg_server), 3, shas) == (180, 13, 13, 0)


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_batches_without_a_content_in_common_commit_while_another_holds_its_contents(pg_server: str) -> None:
    """Only batches sharing a content wait for each other: with a transaction holding content X's lock
    open (as a slow commit of another worker would), a batch of content Y commits, and a batch of X waits
    until that transaction ends."""
    from worker.store import lock_contents

    x, y = "a" * 64, "b" * 64
    url = fresh_database(pg_server)
    with Store(url) as store:
        store.add_results([record("warm.jpg", "c" * 64)])  # schema made, pool warm
        holder = sa.create_engine(url)
        with holder.connect() as conn:
            lock_contents(conn, [record("held.jpg", x)])  # transaction left open
            other = threading.Thread(target=lambda: store.add_results([record("y.jpg", y)]))
            same = threading.Thread(target=lambda: store.add_results([record("x.jpg", x)]))
            other.start()
            other.join(30)
            same.start()
            assert not other.is_alive()  # committed while X was held
            same.join(1.0)
            assert same.is_alive()  # waits for the holder, not for a timeout of its own
            conn.rollback()
        same.join(30)
        assert not same.is_alive()
        holder.dispose()
        with store.engine.connect() as conn:
            rows = dict(conn.execute(sa.select(results.c.file, results.c.duplicate_of)).all())
    assert rows == {"warm.jpg": None, "y.jpg": None, "x.jpg": None}


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_a_batch_of_more_contents_than_the_lock_limit_locks_the_whole_table(pg_server: str) -> None:
    """Each content lock takes an entry of PostgreSQL's shared lock table: a batch of more contents than
    CONTENT_LOCKS_MAX takes the table-wide key exclusively instead, so it waits for any batch in progress
    and commits once that ends."""
    from worker.store import CONTENT_LOCKS_MAX, lock_contents

    big = [record(f"{i}.jpg", f"{i:064x}") for i in range(CONTENT_LOCKS_MAX + 1)]
    url = fresh_database(pg_server)
    with Store(url) as store:
        store.add_results([record("warm.jpg", "c" * 64)])
        holder = sa.create_engine(url)
        with holder.connect() as conn:
            lock_contents(conn, [record("held.jpg", "a" * 64)])  # another worker's batch in progress
            writer = threading.Thread(target=lambda: store.add_results(big))
            writer.start()
            writer.join(1.0)
            assert writer.is_alive()  # waits for the batch in progress, though no content is shared
            conn.rollback()
        writer.join(30)
        assert not writer.is_alive()
        holder.dispose()
        with store.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(results)).scalar_one() == len(big) + 1
