"""Versioned database schema: an ordered list of migrations and `migrate(engine)` applying the missing ones.

Why not Alembic: the schema is one results table and a workers table that will see few changes, and the
one hard requirement is that several workers starting at the same moment against the same new database
apply each migration exactly once. That takes a lock around "read the version, apply what is missing,
record it", which is a few lines here (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: `pg_advisory_xact_lock`),
whereas Alembic would add a dependency, a migration environment and a script folder to ship inside the
package, and still need the same lock around its upgrade call.

How it works:
- `schema_version(version, description, applied_at)` holds one row per applied migration.
- `migrate()` first reads the version without taking any lock (the common case, an up-to-date database,
  costs one read and works for read-only users); only when something is missing does it open one
  write transaction under the lock, re-read the version, apply each missing migration in order, record
  it and commit. Both SQLite and PostgreSQL run DDL transactionally, so a failure leaves the database at
  the previous version. A concurrent starter waits for the lock, then finds nothing left to do.
- A database whose version is newer than the newest migration known here is refused with a StoreError
  naming both versions (an older worker must not write into a newer schema).

Each migration's DDL is frozen in its own function (it must never change once released); the live table
definitions that queries use are in worker.store and a test checks that the two agree.

`migrate()` expects an engine made by worker.store.Store: on SQLite it relies on the Store's `begin`
hook honouring the BEGIN_MODE execution option to emit `BEGIN IMMEDIATE`.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from worker.exceptions import StoreError

log = logging.getLogger(__name__)

# Execution option read by the Store's SQLite `begin` hook: "immediate" -> BEGIN IMMEDIATE.
BEGIN_MODE = "fashion_worker_begin"
# PostgreSQL advisory lock keys (64-bit ints derived from fixed names).
MIGRATE_LOCK_KEY = zlib.crc32(b"fashion-worker:migrate")
RESULTS_LOCK_KEY = zlib.crc32(b"fashion-worker:results")
# Session-level advisory locks of worker ids (worker.lock.WorkerIdLock) use this as the first of two keys.
WORKER_ID_LOCK_CLASS = zlib.crc32(b"fashion-worker:worker-id") & 0x7FFFFFFF

VERSION_TABLE = "schema_version"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _id_type() -> sa.types.TypeEngine:
    # BIGINT on PostgreSQL; INTEGER on SQLite so the column is the rowid alias and autoincrements.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _v1_results_and_workers(conn: Connection) -> None:
    """Version 1: the results table (one row per image drop) and the workers table (heartbeats)."""
    md = sa.MetaData()
    ts = sa.DateTime(timezone=True)
    sa.Table(
        "results", md,
        sa.Column("id", _id_type(), primary_key=True, autoincrement=True),
        sa.Column("file", sa.Text, nullable=False),
        sa.Column("location", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("category", sa.Text),
        sa.Column("confidence", sa.Float),
        sa.Column("top3", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("model_name", sa.Text, nullable=False),
        sa.Column("duplicate_of", _id_type(), sa.ForeignKey("results.id", name="fk_results_duplicate_of")),
        sa.Column("decode_ms", sa.Float),
        sa.Column("inference_ms", sa.Float),
        sa.Column("total_ms", sa.Float),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("processed_at", ts, nullable=False),
        sa.Column("worker", sa.Text, nullable=False),
        sa.CheckConstraint("status IN ('ok', 'failed')", name="ck_results_status"),
        sa.Index("ix_results_sha256_model_id", "sha256", "model_id"),
        sa.Index("ix_results_category", "category"),
        sa.Index("ix_results_status", "status"),
        sa.Index("ix_results_processed_at", "processed_at"),
        sa.Index("ix_results_file", "file"),
    )
    sa.Table(
        "workers", md,
        sa.Column("worker_id", sa.String(255), primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("heartbeat_at", ts, nullable=False),
        sa.Column("stopped_at", ts),
        sa.Column("processed", sa.BigInteger, nullable=False, server_default="0"),
    )
    md.create_all(conn)


def _v2_scale_out(conn: Connection) -> None:
    """Version 2 (scale-out): results.host, and the claims table through which several workers sharing one
    PostgreSQL database agree on who classifies each drop (see worker.claims). Created on SQLite too, where
    it stays empty, so that both dialects have one schema."""
    conn.execute(sa.text("ALTER TABLE results ADD COLUMN host TEXT"))
    md = sa.MetaData()
    ts = sa.DateTime(timezone=True)
    sa.Table(
        "claims", md,
        sa.Column("drop_key", sa.String(64), primary_key=True),
        sa.Column("file", sa.Text, nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("claimed_at", ts, nullable=False),
        sa.Column("lease_until", ts, nullable=False),
        sa.Column("result_id", _id_type()),
        sa.Column("done_at", ts),
        sa.Column("takeovers", sa.Integer, nullable=False, server_default="0"),
        sa.Index("ix_claims_owner", "owner"),
    )
    md.create_all(conn)


def _v3_worker_folders(conn: Connection) -> None:
    """Version 3: where each worker moves files (workers.processed_dir, workers.failed_dir), so that crash
    recovery looks for a dead worker's files in its folders, not in those of whichever worker starts next
    (workers on one host may each have their own, and a restart may come with new settings)."""
    conn.execute(sa.text("ALTER TABLE workers ADD COLUMN processed_dir TEXT"))
    conn.execute(sa.text("ALTER TABLE workers ADD COLUMN failed_dir TEXT"))


def _v4_results_ctime(conn: Connection) -> None:
    """Version 4: results.ctime_ns, the status-change time (ctime, ns) of the file that was read. With it,
    a row whose file was moved away without the row saying so (a worker killed between its move and
    recording it) is no longer taken for a later drop of the same name and bytes, which is another file
    (worker.store.Store.find_drop, worker.recovery)."""
    conn.execute(sa.text("ALTER TABLE results ADD COLUMN ctime_ns BIGINT"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "results and workers tables", _v1_results_and_workers),
    Migration(2, "results.host and the claims table (scale-out)", _v2_scale_out),
    Migration(3, "workers.processed_dir and failed_dir (crash recovery)", _v3_worker_folders),
    Migration(4, "results.ctime_ns (a recorded drop told from a later one of the same name and bytes)",
              _v4_results_ctime),
)
LATEST_VERSION = MIGRATIONS[-1].version


def _version_table(md: sa.MetaData | None = None) -> sa.Table:
    return sa.Table(
        VERSION_TABLE, md or sa.MetaData(),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
    )


def current_version(conn: Connection) -> int:
    """The highest applied migration, 0 for a database without a schema_version table."""
    if not sa.inspect(conn).has_table(VERSION_TABLE):
        return 0
    table = _version_table()
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c.version), 0))).scalar_one())


def _check_sequence(migrations: Sequence[Migration]) -> int:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migration versions must be 1, 2, 3, ... in order, got {versions}")
    return versions[-1] if versions else 0


def _refuse_newer(current: int, latest: int, where: str) -> None:
    if current > latest:
        raise StoreError(
            f"database {where} has schema version {current}, newer than this fashion-worker supports "
            f"(version {latest}); upgrade fashion-worker or use another database"
        )


def _lock(conn: Connection) -> None:
    """Serialise migrators. SQLite: the transaction is already BEGIN IMMEDIATE (the write lock)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
    elif conn.dialect.name != "sqlite":
        log.warning("no migration lock for %s: start one worker first when migrating", conn.dialect.name)


def _versions(engine: Engine, migrations: Sequence[Migration]) -> tuple[int, int, str]:
    """(the database's schema version, the latest of `migrations`, the URL without its password)."""
    latest = _check_sequence(migrations)
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            return current_version(conn), latest, where
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open database {where}: {_one_line(exc)}") from exc


def check_version(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """The schema version of a database opened to be read, never migrated: StoreError unless it is a
    fashion-worker database at this version."""
    current, latest, where = _versions(engine, migrations)
    if current == 0:
        raise StoreError(f"database {where} is not a fashion-worker database (no {VERSION_TABLE} table)")
    _refuse_newer(current, latest, where)
    if current < latest:
        raise StoreError(f"database {where} has schema version {current}, older than this fashion-worker's "
                         f"{latest}: start the worker once to migrate it")
    return current


def migrate(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply the missing migrations in one locked transaction; return the schema version now.

    Raises StoreError when the database is newer than `migrations` or a migration fails.
    """
    current, latest, where = _versions(engine, migrations)
    _refuse_newer(current, latest, where)
    if current == latest:
        return current
    try:
        with engine.connect() as conn:
            conn.execution_options(**{BEGIN_MODE: "immediate"})
            with conn.begin():
                _lock(conn)
                _version_table().create(conn, checkfirst=True)
                current = current_version(conn)  # again, under the lock: another starter may have won
                _refuse_newer(current, latest, where)
                table = _version_table()
                for migration in migrations:
                    if migration.version <= current:
                        continue
                    log.info("migrating database %s to schema version %d: %s",
                             where, migration.version, migration.description)
                    migration.apply(conn)
                    conn.execute(sa.insert(table).values(
                        version=migration.version, description=migration.description,
                        applied_at=datetime.now(UTC),
                    ))
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot migrate database {where} to schema version {latest}: {_one_line(exc)}") from exc
    return latest


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return " ".join(str(orig if orig is not None else exc).split())
