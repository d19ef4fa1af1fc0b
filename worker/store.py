"""The results database: SQLAlchemy 2.0 Core, dialect-neutral (SQLite by default, PostgreSQL to scale out).

One row per image drop in `results`; one row per worker process in `workers` (heartbeats). The schema is
created and upgraded by worker.migrations when a Store opens.

SQLite: the file's folder is created; every connection gets `journal_mode=WAL` (readers never block the
writer nor each other), `busy_timeout`, `synchronous=NORMAL` (durable at checkpoints, safe against
corruption; a power cut may lose the last transactions, a process crash loses nothing) and foreign keys.
pysqlite's own transaction handling is turned off and the Store emits BEGIN itself, `BEGIN IMMEDIATE` for
writes, so a write transaction takes the write lock up front and never fails half-way on a lock upgrade.
Timestamps are UTC; SQLite stores them as text 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC, sortable), so plain
`sqlite3` users can compare them with string literals. PostgreSQL stores TIMESTAMPTZ.

Writes (add_results, set_locations, heartbeat) are one transaction each and are retried on transient lock
errors ("database is locked", serialization failures, deadlocks, a dropped connection) with exponential
backoff for up to `retry_s` seconds (60 by default), logging a warning each time; then StoreError. A failed
transaction is rolled back whole: nothing is half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from worker.config import sqlite_url_problem
from worker.exceptions import StoreError
from worker.migrations import BEGIN_MODE, RESULTS_LOCK_KEY, check_version, migrate

if TYPE_CHECKING:
    from worker.claims import Claims

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed")
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime (a naive one is taken as UTC)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware UTC datetimes on every dialect (naive inputs are taken as UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The live schema (what migrations produce at LATEST_VERSION; tests/test_migrations.py checks they agree).
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
metadata = sa.MetaData()
results = sa.Table(
    "results", metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("file", sa.Text, nullable=False),  # name relative to the inbox, posix, as dropped
    sa.Column("location", sa.Text, nullable=False),  # absolute path where the file is now
    sa.Column("sha256", sa.String(64)),  # NULL when the file could not be read
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("status", sa.String(16), nullable=False),  # ok | failed
    sa.Column("category", sa.Text),
    sa.Column("confidence", sa.Float),
    sa.Column("top3", sa.Text),  # JSON [[label, p], ...]
    sa.Column("error", sa.Text),
    sa.Column("model_id", sa.String(64), nullable=False),  # sha256 of the model file
    sa.Column("model_name", sa.Text, nullable=False),
    sa.Column("duplicate_of", _ID, sa.ForeignKey("results.id")),  # first row with the same sha256+model_id
    sa.Column("decode_ms", sa.Float),
    sa.Column("inference_ms", sa.Float),
    sa.Column("total_ms", sa.Float),
    sa.Column("created_at", UTCDateTime, nullable=False),  # when the file was found ready
    sa.Column("processed_at", UTCDateTime, nullable=False),  # when the row was committed
    sa.Column("worker", sa.Text, nullable=False),  # "host:pid" or the configured worker id
    sa.Column("host", sa.Text),  # the worker's host name (NULL in rows written before schema version 2)
    # The status-change time (ctime, ns since the epoch) of the file read; NULL before schema version 4 and
    # when the file could not be looked at. Tells the drop recorded from a later file of the same name and
    # bytes (Store.find_drop, worker.recovery).
    sa.Column("ctime_ns", sa.BigInteger),
)
workers = sa.Table(
    "workers", metadata,
    sa.Column("worker_id", sa.String(255), primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("heartbeat_at", UTCDateTime, nullable=False),
    sa.Column("stopped_at", UTCDateTime),  # set by a clean shutdown, cleared by the next heartbeat
    sa.Column("processed", sa.BigInteger, nullable=False),  # images this process has recorded
    # Where it moves files (crash recovery looks there); processed_dir "" when ok files are not moved
    # (on_success "leave" or "delete"); both NULL in rows written before schema version 3.
    sa.Column("processed_dir", sa.Text),
    sa.Column("failed_dir", sa.Text),
)
claims = sa.Table(  # PostgreSQL scale-out: who classifies which drop (worker.claims); unused on SQLite
    "claims", metadata,
    sa.Column("drop_key", sa.String(64), primary_key=True),  # worker.claims.drop_key(file, size, mtime, inode)
    sa.Column("file", sa.Text, nullable=False),  # name relative to the inbox, for people
    sa.Column("worker_id", sa.String(255), nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("owner", sa.String(64), nullable=False),  # the holding process (a random token per start)
    sa.Column("claimed_at", UTCDateTime, nullable=False),
    sa.Column("lease_until", UTCDateTime, nullable=False),  # database clock; renewed while the owner lives
    sa.Column("result_id", _ID),  # set in the transaction that commits the drop's row
    sa.Column("done_at", UTCDateTime),  # files.on_success = "leave": recorded and left in place for good
    sa.Column("takeovers", sa.Integer, nullable=False),  # times taken over from a worker whose lease lapsed
)

# The statements of the per-batch path, built once: building them per call (SQLAlchemy's coercions and
# cache keys) took about a third of a one-row commit.
def _first_ids(contents: sa.ColumnElement[bool]) -> sa.Select:
    """(sha256, id of its first row) for the contents matched by `contents` under one model."""
    return (sa.select(results.c.sha256, sa.func.min(results.c.id))
            .where(results.c.model_id == sa.bindparam("model_id"), contents).group_by(results.c.sha256))


def _first_rows(first_ids: sa.Select) -> sa.Select:
    return sa.select(results).where(
        results.c.id.in_(first_ids.with_only_columns(sa.func.min(results.c.id)).scalar_subquery()))


_FIRST_IDS = _first_ids(results.c.sha256.in_(sa.bindparam("shas", expanding=True)))
# PostgreSQL: the contents as one array (the same statement text for any number of them; see _PG_INSERT).
_PG_FIRST_IDS = _first_ids(results.c.sha256 == sa.any_(sa.bindparam("shas", type_=ARRAY(sa.Text))))
_FIRST_ROWS = _first_rows(_FIRST_IDS)
_PG_FIRST_ROWS = _first_rows(_PG_FIRST_IDS)
_MAX_ID = sa.select(sa.func.coalesce(sa.func.max(results.c.id), 0))
_IDS_ABOVE = sa.select(results.c.id).where(results.c.id > sa.bindparam("before")).order_by(results.c.id)
_INSERT = sa.insert(results)
# PostgreSQL: the results lock shared, then each content of the batch exclusively, in key order (see
# lock_contents). unnest reads a one-dimensional array out in its order, so the locks follow the sort.
_LOCK_RESULTS_SHARED = sa.text("SELECT pg_advisory_xact_lock_shared(:key)")
_LOCK_RESULTS = sa.text("SELECT pg_advisory_xact_lock(:key)")
CONTENT_LOCKS_MAX = 256  # contents locked one by one in a batch; more: the whole table (lock_contents)
_LOCK_CONTENTS = sa.text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS k")
_INSERT_RETURNING_ID = sa.insert(results).returning(results.c.id)
_SET_DUPLICATE = (sa.update(results).where(results.c.id == sa.bindparam("row_id"))
                  .values(duplicate_of=sa.bindparam("first_id")))
_SET_LOCATION = (sa.update(results).where(results.c.id == sa.bindparam("row_id"))
                 .values(location=sa.bindparam("new_location")))
_CORRECT_LOCATION = _SET_LOCATION.where(results.c.location == sa.bindparam("was"))


# PostgreSQL: a batch's values travel as one array per column, read back as rows by unnest(), so that each
# statement has the same text whatever the batch size. SQLAlchemy then compiles it once and psycopg
# converts it once (and prepares it on the server after a few runs). With a parameter per value
# (insertmanyvalues, an INSERT's VALUES list, IN lists), both did that work again for every batch, under the
# GIL of the thread that also commits: recording a batch of 64 took 15-16 ms, now 8-10 (on 2 cores, with the
# server on the same host).
def pg_array_type(column: sa.Column) -> str:
    """The PostgreSQL array type that carries `column`'s values through unnest(); TypeError for a column
    type without one here (text would not convert to it implicitly: every insert would fail)."""
    for kind, array in ((UTCDateTime, "timestamptz[]"), (sa.Float, "float8[]"),
                        (sa.Integer, "bigint[]"), (sa.String, "text[]")):  # BigInteger, Text: subclasses
        if isinstance(column.type, kind):
            return array
    raise TypeError(f"no PostgreSQL array type for column {column.name} of type {column.type!r}")


def pg_unnest(columns: list[sa.Column], alias: str) -> str:
    """`unnest(CAST(:a AS t[]), …) WITH ORDINALITY AS alias(a, …, n)`: one bound array per column."""
    arrays = ", ".join(f"CAST(:{c.name} AS {pg_array_type(c)})" for c in columns)
    return f"unnest({arrays}) WITH ORDINALITY AS {alias}({', '.join(c.name for c in columns)}, n)"


_INSERTED = [c for c in results.columns if c.name != "id"]
_PG_INSERT = sa.text(  # ORDER BY n: the ids come from the sequence in the order of the batch (see _insert)
    f"INSERT INTO results ({', '.join(c.name for c in _INSERTED)}) "
    f"SELECT {', '.join(c.name for c in _INSERTED)} FROM {pg_unnest(_INSERTED, 'batch')} ORDER BY n RETURNING id")
_PG_SET_LOCATIONS = sa.text(
    f"UPDATE results SET location = moved.location FROM {pg_unnest([results.c.id, results.c.location], 'moved')} "
    "WHERE results.id = moved.id")


def content_lock_keys(records: list[ResultRecord]) -> list[int]:
    """The advisory-lock keys (signed 64-bit: 8 bytes of a hash of the sha256 text) of the batch's contents,
    sorted."""
    return sorted({int.from_bytes(hashlib.blake2b(r.sha256.encode(), digest_size=8).digest(), "big", signed=True)
                   for r in records if r.sha256})


def lock_contents(conn: Connection, records: list[ResultRecord]) -> None:
    """PostgreSQL: serialise duplicate detection (which row is the first of a content) across workers, per
    content, until the transaction ends.

    Two batches with a content in common commit one after the other, so the second sees the first's row;
    batches with nothing in common commit at once. (One lock over the whole table, before, made every
    worker's commits wait for each other's; on an H100 host a batch's commit took 70 ms with one worker
    and 142 ms with four.) Locks are taken in key order, so two batches cannot wait for each other in a cycle. The
    table-wide key is taken shared, so a worker of an older version, which takes it exclusively, still
    excludes all others during a rolling upgrade.

    Each advisory lock takes an entry of PostgreSQL's shared lock table (max_locks_per_transaction x
    max_connections entries, 6,400 by default): a batch of more than CONTENT_LOCKS_MAX contents takes the
    table-wide key exclusively instead, as all batches did before.
    """
    keys = content_lock_keys(records)
    if len(keys) > CONTENT_LOCKS_MAX:
        conn.execute(_LOCK_RESULTS, {"key": RESULTS_LOCK_KEY})
        return
    conn.execute(_LOCK_RESULTS_SHARED, {"key": RESULTS_LOCK_KEY})
    if keys:
        conn.execute(_LOCK_CONTENTS, {"keys": keys})


def _find_drop_query(with_sha256: bool, with_ctime: bool) -> sa.Select:
    content = results.c.sha256 == sa.bindparam("sha256") if with_sha256 else results.c.sha256.is_(None)
    query = (sa.select(results.c.id)
             .where(results.c.file == sa.bindparam("file"), results.c.model_id == sa.bindparam("model_id"),
                    results.c.location == sa.bindparam("location"), content)
             .order_by(results.c.id.desc()).limit(1))
    if with_ctime:  # another ctime is another file, or one changed since: rows from before version 4 have none
        query = query.where(sa.or_(results.c.ctime_ns == sa.bindparam("ctime_ns"), results.c.ctime_ns.is_(None)))
    return query


_FIND_DROP = {(sha, ctime): _find_drop_query(sha, ctime) for sha in (True, False) for ctime in (True, False)}


@dataclass(kw_only=True)
class ResultRecord:
    """One image drop to record. `duplicate_of` is filled in by Store.add_results (input value ignored)."""

    file: str
    location: str
    status: str  # "ok" | "failed"
    model_id: str
    model_name: str
    worker: str
    sha256: str | None = None
    size_bytes: int | None = None
    category: str | None = None
    confidence: float | None = None
    top3: Sequence[tuple[str, float]] | None = None
    error: str | None = None
    duplicate_of: int | None = None
    decode_ms: float | None = None
    inference_ms: float | None = None
    total_ms: float | None = None
    created_at: datetime = field(default_factory=utcnow)
    host: str | None = None
    ctime_ns: int | None = None  # of the file that was read (st_ctime_ns); None when it was not looked at
    claim_key: str | None = None  # scale-out: the drop's claim (worker.claims), checked at commit; no column


@dataclass(frozen=True)
class StoredResult:
    """The first row recorded for some content (see Store.first_by_content)."""

    id: int
    file: str
    sha256: str
    model_id: str
    status: str
    category: str | None
    confidence: float | None
    top3: list[tuple[str, float]] | None
    error: str | None


def safe_text(value: str | None) -> str | None:
    """Make any Python str storable: undecodable file-name bytes (surrogate escapes) become \\xNN text and
    NUL becomes \\x00 (PostgreSQL text cannot hold it). Plain text passes unchanged."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value.replace("\x00", "\\x00")


def stored_names(text: str) -> list[str]:
    """The file names a stored name may stand for: itself, and, when it holds \\xNN escapes, the name with
    those turned back into the bytes safe_text escaped (undecodable bytes of a Latin-1 name, say). The
    first is tried first: a name may hold a literal "\\x41" of its own."""
    if "\\x" not in text:
        return [text]
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    decoded = os.fsdecode(raw)
    return [text] if decoded == text or "\x00" in decoded else [text, decoded]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)  # numpy scalars cannot be bound by sqlite3


def encode_top3(top3: Iterable[tuple[str, float]] | None) -> str | None:
    if top3 is None:
        return None
    return json.dumps([[str(label), float(p)] for label, p in top3], ensure_ascii=False)


def decode_top3(text: str | None) -> list[tuple[str, float]] | None:
    if text is None:
        return None
    return [(str(label), float(p)) for label, p in json.loads(text)]


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return " ".join(str(orig if orig is not None else exc).split())  # one line


def is_transient(exc: BaseException) -> bool:
    """Lock contention or a dropped connection: worth retrying the whole transaction."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate in ("40001", "40P01", "55P03"):  # serialization failure, deadlock, lock not available
        return True
    text = str(orig).lower()
    return "database is locked" in text or "database table is locked" in text or "database is busy" in text


def is_read_only(exc: BaseException) -> bool:
    """The connection refused a write because it is read-only: SQLite's SQLITE_READONLY family (a file it
    could not open for writing is opened read-only, and that connection stays so for good), or
    PostgreSQL's 25006 (a connection to a server that became a standby after a fail-over)."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_READONLY  # extended codes keep the primary one in their low byte
    return (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == "25006"


def _sqlite_setup(engine: Engine, busy_timeout_ms: int, readonly: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # pysqlite must not emit BEGIN/COMMIT itself; _on_begin does
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")  # first: the rest may wait
            if readonly:  # a reader changes nothing: it finds the journal mode the worker set
                record.info["journal_mode"] = cursor.execute("PRAGMA journal_mode").fetchone()[0]
                return
            record.info["journal_mode"] = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(BEGIN_MODE) == "immediate"
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def hide_password(url: str) -> str:
    """`url` with its password, if any, shown as *** (as Store.url is): for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _make_engine(url: str, busy_timeout_ms: int, readonly: bool = False) -> tuple[Engine, Path | None]:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(
            f"database URL {url!r} is not valid; expected e.g. sqlite:///data/results.db or "
            "postgresql+psycopg://user:password@host/dbname"
        ) from None
    masked = parsed.render_as_string(hide_password=True)
    problem = sqlite_url_problem(url)
    if problem is not None:
        raise StoreError(f"database URL {problem}")
    path: Path | None = None
    try:
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                path = Path(database).expanduser()
                if readonly:
                    if not path.is_file():
                        raise StoreError(f"database {path} does not exist (nothing recorded yet, or a wrong "
                                         "--db/--config)")
                    return _sqlite_reader(parsed, path, busy_timeout_ms), path
                try:
                    if not path.parent.is_dir():
                        path.parent.mkdir(parents=True, exist_ok=True)
                        log.info("created the database folder %s (it did not exist)", path.parent)  # or a typo
                except OSError as exc:
                    raise StoreError(
                        f"cannot create database folder {path.parent}: {exc.strerror or exc}"
                    ) from None
            engine = sa.create_engine(parsed, connect_args={"timeout": busy_timeout_ms / 1000})
            _sqlite_setup(engine, busy_timeout_ms)
        else:
            engine = sa.create_engine(parsed, pool_pre_ping=True)
    except NoSuchModuleError:
        raise StoreError(
            f"database URL {masked}: no SQLAlchemy dialect {parsed.drivername!r}; use sqlite:///PATH or "
            "postgresql+psycopg://..."
        ) from None
    except ImportError as exc:
        hint = (" (pip install -e '.[postgres]', or pip install 'psycopg[binary]')"
                if parsed.get_backend_name() == "postgresql" else "")
        raise StoreError(f"database URL {masked}: driver not installed: {exc}{hint}") from None
    return engine, path


def _sqlite_reader(url: sa.URL, path: Path, busy_timeout_ms: int) -> Engine:
    """An engine whose connections open the SQLite file read-only (`mode=ro`): readers need no write
    permission on it, and cannot change it.

    In WAL mode SQLite also needs the database's -shm file: the worker keeps one while it runs, and SQLite
    creates it when the folder is writable. In a folder the reader cannot write (a read-only mount, another
    user's folder), with no -wal file there (no worker has the database open, or the last one closed it
    cleanly, so every change is in the file itself), the file is read as `immutable` instead.
    """
    target = f"file:{quote(str(path.resolve()))}?mode=ro"
    wal = path.with_name(path.name + "-wal")

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(target, uri=True, timeout=busy_timeout_ms / 1000, check_same_thread=False)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # SQLite opens the file lazily
        except sqlite3.OperationalError as exc:
            if "unable to open" not in str(exc) or wal.exists():
                raise
            conn.close()
            conn = sqlite3.connect(target + "&immutable=1", uri=True, check_same_thread=False)
        return conn

    engine = sa.create_engine(url, creator=connect)
    _sqlite_setup(engine, busy_timeout_ms, readonly=True)
    return engine


class Store:
    """The results database. Thread-safe (a connection pool); open one per process.

    `readonly`: for commands that only read (results, stats): the database must already be a
    fashion-worker database at this schema version; it is never migrated, and SQLite files are opened
    read-only.
    """

    def __init__(self, url: str, *, busy_timeout_ms: int = 30_000, retry_s: float = 60.0,
                 readonly: bool = False) -> None:
        self.engine, self.path = _make_engine(url, busy_timeout_ms, readonly)
        self.url: str = self.engine.url.render_as_string(hide_password=True)  # safe to log
        self.dialect: str = self.engine.dialect.name
        self.retry_s = retry_s
        try:
            if readonly:
                self.schema_version: int = check_version(self.engine)
            else:
                self.schema_version = self._retry("migration", lambda: migrate(self.engine))
            if self.dialect == "sqlite" and not readonly:
                with self.engine.connect() as conn:
                    mode = conn.connection.info.get("journal_mode")
                if mode != "wal":
                    log.warning("database %s: journal_mode is %s, not wal (a network filesystem?); "
                                "readers may block the worker", self.url, mode)
        except StoreError as exc:
            self.engine.dispose()
            if "unable to open database file" in str(exc) and self.path is not None:
                raise StoreError(f"{exc} (is {self.path.parent} writable and {self.path} a file?)") from None
            raise
        except SQLAlchemyError as exc:
            self.engine.dispose()
            reason = _reason(exc)
            hint = ""
            if "unable to open database file" in reason and self.path is not None:
                hint = f" (is {self.path.parent} writable and {self.path} a file?)"
            raise StoreError(f"cannot open database {self.url}: {reason}{hint}") from None
        log.debug("database %s open at schema version %d", self.url, self.schema_version)

    # Lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r}, schema_version={self.schema_version})"

    # Transactions ---------------------------------------------------------------------------------
    def _retry(self, what: str, attempt: Callable[[], T]) -> T:
        """Run `attempt` (one whole transaction) again on transient errors, with exponential backoff."""
        deadline = time.monotonic() + self.retry_s
        delay, tries = 0.05, 0
        while True:
            tries += 1
            try:
                return attempt()
            except StoreError as exc:
                cause = exc.__cause__
                if cause is None or not is_transient(cause) or time.monotonic() + delay > deadline:
                    raise
                reason = _reason(cause)
            except DBAPIError as exc:
                if not is_transient(exc):
                    raise StoreError(f"database {self.url}: {what} failed: {_reason(exc)}") from exc
                reason = _reason(exc)
                if time.monotonic() + delay > deadline:
                    raise StoreError(
                        f"database {self.url}: {what} still failing after {tries} tries over "
                        f"{self.retry_s:g} s: {reason}"
                    ) from exc
            log.warning("database %s busy during %s (%s); retry %d in %.2f s",
                        self.url, what, reason, tries, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def write(self, what: str, body: Callable[[Connection], T]) -> T:
        """Run `body(conn)` as ONE write transaction, retried whole on transient errors like add_results
        (StoreError when it keeps failing); for other modules' tables (worker.claims)."""
        return self._write(what, body)

    def _write(self, what: str, body: Callable[[Connection], T]) -> T:
        def attempt() -> T:
            for fresh in (False, True):
                with self.engine.connect() as conn:
                    conn.execution_options(**{BEGIN_MODE: "immediate"})
                    try:
                        with conn.begin():
                            return body(conn)
                    except DBAPIError as exc:
                        if not is_read_only(exc):
                            raise
                        # A connection the pool opened while the database could not be written (for a read
                        # during a fault) would refuse every write once the fault is over: drop it and the
                        # pool's others (any of them may be such), and try once on a new connection.
                        conn.invalidate()
                        self.engine.dispose()
                        if fresh:
                            raise
            raise AssertionError("unreachable")

        try:
            return self._retry(what, attempt)
        except SQLAlchemyError as exc:  # not a DBAPI error: a bug or a schema mismatch
            raise StoreError(f"database {self.url}: {what} failed: {_reason(exc)}") from exc

    def _read(self, what: str, body: Callable[[Connection], T]) -> T:
        """Run `body(conn)` outside a write transaction, retried on transient errors like a write; any
        database error becomes a StoreError."""
        def attempt() -> T:
            with self.engine.connect() as conn:
                return body(conn)

        try:
            return self._retry(what, attempt)
        except SQLAlchemyError as exc:
            raise StoreError(f"database {self.url}: {what} failed: {_reason(exc)}") from exc

    # Results --------------------------------------------------------------------------------------
    def add_results(self, records: list[ResultRecord], claims: Claims | None = None) -> list[int | None]:
        """Insert a batch in ONE transaction; return the new ids in the order of `records`.

        Sets each record's `duplicate_of` (in the database and on the record object) to the id of the
        first row with the same (sha256, model_id), whether that row is duplicates or earlier in this batch;
        NULL for the first occurrence and for records without a sha256. The row's processed_at is the
        commit time. Raises StoreError (nothing written) if the database stays locked past retry_s.

        With `claims` (several workers on PostgreSQL), in the same transaction: the claims of the records'
        `claim_key`s are locked and checked, a record whose claim this worker no longer holds (its lease
        lapsed and another worker took the drop over) is not written and gets None instead of an id, and
        the claims held are marked as recorded (Claims.lock_held, Claims.mark_recorded).
        """
        if not records:
            return []
        for record in records:
            if record.status not in STATUSES:
                raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {record.status!r}")

        stamps: list[datetime] = []  # each attempt's processed_at

        def body(conn: Connection) -> list[tuple[int, int | None] | None]:
            if conn.dialect.name == "postgresql":  # serialise duplicate detection across workers
                lock_contents(conn, records)
            if stamps:  # a retry: an earlier attempt may have committed before its answer was lost
                earlier = self._written_before(conn, records, stamps)
                if earlier is not None:
                    return earlier
            stamps.append(utcnow())
            if claims is None:
                return list(insert_batch(conn, records))
            # With claims, only a record whose claim this process still holds is written: one without a
            # claim is treated as one whose claim was lost (never a row nobody else is kept from writing).
            held = claims.lock_held(conn, [r.claim_key for r in records if r.claim_key is not None])
            kept = [r for r in records if r.claim_key in held]
            written = iter(insert_batch(conn, kept) if kept else [])
            out = [next(written) if r.claim_key in held else None for r in records]
            claims.mark_recorded(conn, {r.claim_key: row[0] for r, row in zip(records, out, strict=True)
                                        if r.claim_key is not None and row is not None})
            return out

        def insert_batch(conn: Connection, batch: list[ResultRecord]) -> list[tuple[int, int | None]]:
            firsts = self._first_ids(conn, batch)
            processed_at = stamps[-1]
            rows, pending = [], []  # pending: (index, index of the first occurrence in this batch)
            duplicates: list[int | None] = []  # duplicate_of pointing at rows committed before this batch
            seen: dict[tuple[str, str], int] = {}
            for i, record in enumerate(batch):
                key = (record.sha256, record.model_id)
                duplicate_of = None
                if record.sha256 is not None:
                    if key in firsts:
                        duplicate_of = firsts[key]
                    elif key in seen:
                        pending.append((i, seen[key]))
                    else:
                        seen[key] = i
                duplicates.append(duplicate_of)
                rows.append(self._row(record, duplicate_of, processed_at))
            ids = self._insert(conn, rows)
            if pending:
                conn.execute(_SET_DUPLICATE, [{"row_id": ids[i], "first_id": ids[j]} for i, j in pending])
                for i, j in pending:
                    duplicates[i] = ids[j]
            return list(zip(ids, duplicates, strict=True))

        written = self._write(f"recording {len(records)} results", body)
        for record, row in zip(records, written, strict=True):  # after the commit only
            if row is not None:
                record.duplicate_of = row[1]
        return [None if row is None else row[0] for row in written]

    @staticmethod
    def _written_before(conn: Connection, records: list[ResultRecord],
                        stamps: list[datetime]) -> list[tuple[int, int | None] | None] | None:
        """The rows an earlier attempt of this batch committed (found by worker, file and that attempt's
        processed_at), in the order of `records` (None: not written, its claim was lost); None if it
        committed nothing. A dropped connection during COMMIT leaves that unknown, and inserting again
        would record every file twice."""
        found = {row.file: (row.id, row.duplicate_of) for row in conn.execute(
            sa.select(results.c.id, results.c.file, results.c.duplicate_of).where(
                results.c.worker.in_({safe_text(r.worker) for r in records}), results.c.processed_at.in_(stamps),
                results.c.file.in_([safe_text(r.file) for r in records])))}  # as the rows store them
        if not found:
            return None
        log.warning("an earlier attempt at recording %d results had committed %d of them; not recording "
                    "them again", len(records), len(found))
        return [found.get(safe_text(record.file)) for record in records]

    @staticmethod
    def _first_ids(conn: Connection, records: list[ResultRecord]) -> dict[tuple[str, str], int]:
        """{(sha256, model_id): id of the first row} for the batch's contents already in the database."""
        wanted: dict[str, set[str]] = {}
        for record in records:
            if record.sha256 is not None:
                wanted.setdefault(record.model_id, set()).add(record.sha256)
        found: dict[tuple[str, str], int] = {}
        query = _PG_FIRST_IDS if conn.dialect.name == "postgresql" else _FIRST_IDS
        for model_id, shas in wanted.items():
            for chunk in chunks(sorted(shas), _lookup_chunk(conn)):
                for sha, first in conn.execute(query, {"model_id": model_id, "shas": list(chunk)}):
                    found[(sha, model_id)] = int(first)
        return found

    @staticmethod
    def _row(record: ResultRecord, duplicate_of: int | None, processed_at: datetime) -> dict[str, Any]:
        return {
            "file": safe_text(record.file),
            "location": safe_text(record.location),
            "sha256": record.sha256,
            "size_bytes": None if record.size_bytes is None else int(record.size_bytes),
            "status": record.status,
            "category": safe_text(record.category),
            "confidence": _float(record.confidence),
            "top3": encode_top3(record.top3),
            "error": safe_text(record.error),
            "model_id": record.model_id,
            "model_name": safe_text(record.model_name),
            "duplicate_of": duplicate_of,
            "decode_ms": _float(record.decode_ms),
            "inference_ms": _float(record.inference_ms),
            "total_ms": _float(record.total_ms),
            "created_at": record.created_at,
            "processed_at": processed_at,
            "worker": safe_text(record.worker),
            "host": safe_text(record.host),
            "ctime_ns": None if record.ctime_ns is None else int(record.ctime_ns),
        }

    @staticmethod
    def _insert(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
        """Insert rows, return their ids in order."""
        if len(rows) == 1 and conn.dialect.insert_returning:  # a lone drop: one statement, not three
            return [int(conn.execute(_INSERT_RETURNING_ID, rows[0]).scalar_one())]
        if conn.dialect.name == "sqlite":
            # Fast path (one executemany, ~10x fewer round trips than ordered RETURNING, which SQLite
            # runs row by row): this transaction holds the write lock (BEGIN IMMEDIATE) and SQLite gives
            # each new row max(rowid) + 1, so the new ids are exactly those above the old maximum.
            before = conn.execute(_MAX_ID).scalar_one()
            conn.execute(_INSERT, rows)
            ids = list(conn.execute(_IDS_ABOVE, {"before": before}).scalars())
            if len(ids) != len(rows):  # cannot happen under the write lock; refuse rather than guess
                raise StoreError(f"inserted {len(rows)} rows but found {len(ids)} new ids")
            return ids
        if conn.dialect.name == "postgresql":
            # INSERT … SELECT … ORDER BY takes the ids from the sequence in that order, so sorted they are the
            # batch's in order: what SQLAlchemy's insertmanyvalues relies on for sort_by_parameter_order.
            arrays = {c.name: [row[c.name] for row in rows] for c in _INSERTED}
            for name in ("created_at", "processed_at"):  # what UTCDateTime does for a bound parameter
                arrays[name] = [None if v is None else as_utc(v) for v in arrays[name]]
            ids = sorted(int(row_id) for row_id in conn.execute(_PG_INSERT, arrays).scalars())
            if len(ids) != len(rows):
                raise StoreError(f"inserted {len(rows)} rows but got {len(ids)} ids back")
            return ids
        if conn.dialect.insert_executemany_returning_sort_by_parameter_order:
            statement = sa.insert(results).returning(results.c.id, sort_by_parameter_order=True)
            return [int(row_id) for row_id in conn.execute(statement, rows).scalars()]
        return [int(conn.execute(sa.insert(results), row).inserted_primary_key[0]) for row in rows]

    def first_by_content(self, sha256s: list[str], model_id: str) -> dict[str, StoredResult]:
        """{sha256: the first row recorded for that content under `model_id`} for those already seen.

        The worker uses it to skip classifying the same bytes again (it copies status, category,
        confidence, top3 and error from the first row).
        """
        shas = sorted({s for s in sha256s if s})

        def body(conn: Connection) -> dict[str, StoredResult]:
            out: dict[str, StoredResult] = {}
            query = _PG_FIRST_ROWS if conn.dialect.name == "postgresql" else _FIRST_ROWS
            for chunk in chunks(shas, _lookup_chunk(conn)):
                for row in conn.execute(query, {"model_id": model_id, "shas": list(chunk)}).mappings():
                    out[row["sha256"]] = StoredResult(
                        id=row["id"], file=row["file"], sha256=row["sha256"], model_id=row["model_id"],
                        status=row["status"], category=row["category"], confidence=row["confidence"],
                        top3=decode_top3(row["top3"]), error=row["error"],
                    )
            return out

        return self._read("looking up earlier results", body)

    def find_drop(self, file: str, sha256: str | None, model_id: str, location: str,
                  ctime_ns: int | None = None) -> int | None:
        """The id of a committed row for this exact drop (same name, content and model, and the same
        unchanged file by `ctime_ns`, when given and the row has one) whose location is still `location`,
        i.e. the row was committed but the file never moved (a crash in between), or None. The newest such
        row wins.

        The ctime tells the file recorded from a later upload of the same name and bytes when the row is
        stale (its file was moved away by a worker killed before it could record the move): the kernel sets
        it on every change to a file, its metadata included, and no tool sets it back, so a new upload has
        another even where it reuses the inode number or keeps the mtime (`cp -p`). It is the file server's
        for a network filesystem, so no clocks are compared."""
        params: dict[str, Any] = {"file": safe_text(file), "model_id": model_id, "location": safe_text(location)}
        if sha256 is not None:
            params["sha256"] = sha256
        if ctime_ns is not None:
            params["ctime_ns"] = int(ctime_ns)
        query = _FIND_DROP[sha256 is not None, ctime_ns is not None]
        found = self._read("looking up a recorded drop",
                           lambda conn: conn.execute(query, params).scalar_one_or_none())
        return None if found is None else int(found)

    def set_locations(self, pairs: list[tuple[int, str]], also: Callable[[Connection], object] | None = None) -> None:
        """Record where files are now, [(row id, absolute path)], in one transaction; `also(conn)` runs in the
        same transaction (the pipeline releases the files' claims with it)."""
        if not pairs and also is None:
            return
        located = {row_id: safe_text(location) for row_id, location in pairs}  # a row twice: the last one wins

        def body(conn: Connection) -> None:
            if located and conn.dialect.name == "postgresql":
                conn.execute(_PG_SET_LOCATIONS, {"id": list(located), "location": list(located.values())})
            elif located:
                conn.execute(_SET_LOCATION, [{"row_id": i, "new_location": loc} for i, loc in located.items()])
            if also is not None:
                also(conn)

        self._write(f"updating {len(pairs)} locations", body)

    def correct_locations(self, fixes: list[tuple[int, str, str]]) -> int:
        """Record where files went that a crashed worker moved without saying so, [(row id, the location
        the row was read naming, the file's place now)], each only while the row still names what was read:
        a live worker that recorded the move meanwhile (another instance's pipeline moving a drop it found
        committed) knows where it put the file. One transaction; returns how many rows changed."""
        def body(conn: Connection) -> int:
            return sum(conn.execute(_CORRECT_LOCATION, {"row_id": row_id, "was": safe_text(was),
                                                         "new_location": safe_text(now)}).rowcount
                       for row_id, was, now in fixes)

        return self._write(f"correcting {len(fixes)} locations", body) if fixes else 0

    # Workers --------------------------------------------------------------------------------------
    def heartbeat(self, worker_id: str, host: str, pid: int, processed: int, *,
                  started_at: datetime | None = None, stopped: bool = False,
                  folders: tuple[str, str] | None = None) -> None:
        """Upsert this worker's row: heartbeat_at = now, its processed count; `stopped=True` on a clean
        shutdown. started_at is kept across heartbeats of one process and reset when the pid changes
        (a restart under a configured worker id) after a stop, unless given; kept when the earlier process
        was never marked stopped (it crashed, and start-up recovery left it for later: a file of its run
        still waits in the inbox), so that recovery still looks at the id's rows since that run began.
        `folders`: (processed_dir, failed_dir) where it moves files, processed_dir "" when ok files stay or
        are deleted."""
        now = utcnow()

        def body(conn: Connection) -> None:
            current = conn.execute(
                sa.select(workers.c.pid, workers.c.started_at, workers.c.stopped_at)
                .where(workers.c.worker_id == worker_id)
            ).first()
            values = {
                "host": safe_text(host), "pid": int(pid), "heartbeat_at": now, "processed": int(processed),
                "stopped_at": now if stopped else None,
            }
            if folders is not None:
                values["processed_dir"], values["failed_dir"] = (safe_text(folder) for folder in folders)
            if current is None:
                conn.execute(sa.insert(workers).values(worker_id=worker_id, started_at=started_at or now,
                                                       **values))
            else:
                if started_at is not None:
                    values["started_at"] = started_at
                elif current.pid != int(pid) and current.stopped_at is not None:
                    values["started_at"] = now
                conn.execute(sa.update(workers).where(workers.c.worker_id == worker_id).values(**values))

        self._write("heartbeat", body)


def _lookup_chunk(conn: Connection) -> int:
    """Contents looked up per statement: SQLite binds each as a parameter (500 keeps far below its limit);
    PostgreSQL takes them all as one array."""
    return 1 << 30 if conn.dialect.name == "postgresql" else 500


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    """`items` in consecutive slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
