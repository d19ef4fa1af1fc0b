"""worker.migrations on real SQLite files, including several real processes migrating one new database."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from worker.exceptions import StoreError
from worker.migrations import LATEST_VERSION, MIGRATIONS, Migration, current_version, migrate
from worker.store import ResultRecord, Store, metadata


def url_for(path: Path) -> str:
    return f"sqlite:///{path}"


def version_rows(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT version, description FROM schema_version ORDER BY version").fetchall()


def _add_note_column(conn: sa.Connection) -> None:
    conn.execute(sa.text("ALTER TABLE results ADD COLUMN note TEXT"))


def _create_then_fail(conn: sa.Connection) -> None:
    conn.execute(sa.text("CREATE TABLE half_done (x INTEGER)"))
    conn.execute(sa.text("ALTER TABLE no_such_table ADD COLUMN x INTEGER"))  # a real failing statement


def test_empty_database_migrates_to_latest(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    sqlite3.connect(path).close()  # an existing, empty database file
    with Store(url_for(path)) as store:
        assert store.schema_version == LATEST_VERSION
        with store.engine.connect() as conn:
            assert current_version(conn) == LATEST_VERSION
    assert version_rows(path) == [(m.version, m.description) for m in MIGRATIONS]


def test_migrating_again_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with Store(url_for(path)) as store:
        store.add_results([ResultRecord(file="a.jpg", location="/a.jpg", status="ok", model_id="m",
                                        model_name="n", worker="w")])
        assert migrate(store.engine) == LATEST_VERSION
    with Store(url_for(path)) as store:
        assert store.schema_version == LATEST_VERSION
    assert len(version_rows(path)) == len(MIGRATIONS)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM results").fetchone()[0] == 1


def test_migrated_schema_matches_the_live_table_definitions(tmp_path: Path) -> None:
    with Store(url_for(tmp_path / "r.db")) as store, store.engine.connect() as conn:
        inspector = sa.inspect(conn)
        for table in metadata.sorted_tables:
            columns = {c["name"]: c for c in inspector.get_columns(table.name)}
            assert list(columns) == [c.name for c in table.columns], table.name
            for column in table.columns:
                assert columns[column.name]["nullable"] == column.nullable, (table.name, column.name)
                db_type = columns[column.name]["type"]
                assert db_type._type_affinity == column.type.dialect_impl(conn.dialect)._type_affinity
        indexed = {tuple(ix["column_names"]) for ix in inspector.get_indexes("results")}
        assert indexed == {("sha256", "model_id"), ("category",), ("status",), ("processed_at",), ("file",)}


def test_rows_of_a_version_3_database_keep_their_values_and_have_no_ctime(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    engine = sa.create_engine(url_for(path))
    with engine.begin() as conn:  # a database as schema version 3 left it, with one row
        migrate(engine, MIGRATIONS[:3])
        conn.execute(sa.text(
            "INSERT INTO results (file, location, sha256, status, model_id, model_name, created_at, "
            "processed_at, worker) VALUES ('a.jpg', '/inbox/a.jpg', :sha, 'ok', 'm', 'n', '2026-01-01', "
            "'2026-01-01', 'w')"), {"sha": "a" * 64})
    engine.dispose()
    with Store(url_for(path)) as store:
        assert store.schema_version == LATEST_VERSION == 4
        assert store.find_drop("a.jpg", "a" * 64, "m", "/inbox/a.jpg", 12345) == 1  # matched as before
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT file, sha256, ctime_ns FROM results").fetchall() == [("a.jpg", "a" * 64, None)]
    assert version_rows(path)[-1] == (4, MIGRATIONS[3].description)


def test_only_missing_migrations_are_applied(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with Store(url_for(path)) as store:
        store.add_results([ResultRecord(file="a.jpg", location="/a.jpg", status="ok", model_id="m",
                                        model_name="n", worker="w")])
        newer = (*MIGRATIONS, Migration(LATEST_VERSION + 1, "note column", _add_note_column))
        assert migrate(store.engine, newer) == LATEST_VERSION + 1
        assert migrate(store.engine, newer) == LATEST_VERSION + 1  # nothing left: no second ALTER
    assert version_rows(path)[-1] == (LATEST_VERSION + 1, "note column")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT file, note FROM results").fetchall() == [("a.jpg", None)]


def test_a_failing_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    with Store(url_for(path)) as store:
        broken = (*MIGRATIONS, Migration(LATEST_VERSION + 1, "broken", _create_then_fail))
        with pytest.raises(StoreError, match=r"cannot migrate database .*no such table: no_such_table"):
            migrate(store.engine, broken)
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "half_done" not in tables  # the DDL was rolled back with the transaction
    assert len(version_rows(path)) == len(MIGRATIONS)


def test_a_newer_database_is_refused_naming_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    Store(url_for(path)).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', '2030-01-01 00:00:00')")
    with pytest.raises(StoreError, match=f"schema version 99, newer .*version {LATEST_VERSION}"):
        Store(url_for(path))


def test_migration_list_must_be_in_order() -> None:
    with pytest.raises(ValueError, match="1, 2, 3"):
        migrate(sa.create_engine("sqlite://"), (MIGRATIONS[0], Migration(3, "gap", _add_note_column)))


def _slow_probe(conn: sa.Connection) -> None:
    # Creating a table fails if it runs twice, and the sleep makes every other starter overlap with it.
    conn.execute(sa.text("CREATE TABLE probe (x INTEGER)"))
    time.sleep(0.3)


def _start_worker(url: str, start: Any, out: Any) -> None:
    start.wait(10)
    store = Store(url)  # round 1: all race on the real migrations of a brand-new file
    start.wait(10)  # round 2: all race on an extra slow migration that breaks if applied twice
    version = migrate(store.engine, (*MIGRATIONS, Migration(LATEST_VERSION + 1, "probe", _slow_probe)))
    store.close()
    out.put(version)


@pytest.mark.timeout(60)
def test_concurrent_starters_apply_each_migration_once(tmp_path: Path) -> None:
    path = tmp_path / "new" / "r.db"
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_start_worker, args=(url_for(path), start, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(50)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [LATEST_VERSION + 1] * 4
    assert [v for v, _ in version_rows(path)] == list(range(1, LATEST_VERSION + 2))
