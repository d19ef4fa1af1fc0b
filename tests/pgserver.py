"""A real, throw-away PostgreSQL server on loopback for the scale-out tests.

`initdb` and `pg_ctl` come from Debian's `postgresql` package (which `.ci/run` installs). The cluster lives
in a fresh temp folder, listens on 127.0.0.1 at a free port and is stopped and deleted afterwards.
PostgreSQL refuses to run as root, so as root the server runs as the `postgres` system user.
Without the binaries the tests skip with the reason, except under CI (CI=true), where they must run.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url


def find_bin() -> Path | None:
    for name in ("pg_ctl", "initdb"):
        if not shutil.which(name):
            break
    else:
        return Path(shutil.which("pg_ctl")).resolve().parent  # /usr/local/bin may hold symlinks
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def require_bin() -> Path:
    bindir = find_bin()
    if bindir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must run the scale-out tests)")
        pytest.skip(reason)
    return bindir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server; yield a SQLAlchemy URL (psycopg) for a fresh database; stop and delete it after."""
    bindir = require_bin()
    root = Path(tempfile.mkdtemp(prefix="fashion-pg-"))
    os.chmod(root, 0o755)
    data, port = root / "data", free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True, cwd=root)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "fashion", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "fashion", "fashion")
        yield f"postgresql+psycopg://fashion@127.0.0.1:{port}/fashion"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str) -> str:
    """A new empty database on the server; its URL."""
    name = f"t_{secrets.token_hex(6)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def refuse(engine: sa.Engine, operation: str, table: str) -> None:
    """Make the real server refuse `operation` (INSERT, UPDATE, DELETE) on `table` with an error, through a
    trigger: a database failing one kind of write, as a revoked privilege or a full disk would."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                             "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$")
        conn.exec_driver_sql(f"CREATE TRIGGER refuse_{operation.lower()} BEFORE {operation} ON {table} "
                             "FOR EACH ROW EXECUTE FUNCTION refuse()")


def allow(engine: sa.Engine, operation: str, table: str) -> None:
    """Undo `refuse`."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TRIGGER refuse_{operation.lower()} ON {table}")
