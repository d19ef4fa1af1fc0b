"""Crash recovery of `results.location`: where a file went when its worker died before saying so.

The pipeline commits a batch's rows, moves the files, then records their new places in one
`set_locations` call. A worker killed between the moves and that call leaves rows whose `location` still
names the inbox although the file is in processed/ or failed/ (found by tests/test_reliability_crash.py:
42 such rows after 25 SIGKILLs over 2,000 images). Nothing is lost, but the row no longer says where the
file is.

`recover_locations` runs at start-up, before the first heartbeat. It looks only at workers of this host
whose row was never marked stopped and whose process is gone, and only at their rows that still name a
path inside this inbox where no file is, or another file than the one recorded (another ctime: a later
upload of the same name, see Store.find_drop); the index on processed_at bounds the search to those runs. For
each, the file is looked for where disposition puts it: the same relative name under that worker's
processed/ (or failed/) folder, as its workers row records it (this worker's own for rows from before
schema version 3), or a numbered variant "name (n).ext", with the same sha256 and not already named by another
row. Found: the row gets that location; not found: the row gets "" (gone), with a warning.

Where the filesystem has no renameat2 (NFS), disposition moves by link then unlink; a worker killed
between the two leaves the inbox name as a second link to the file in processed/ (or failed/), which the
next pass would refuse as a hard-linked file and record again as `failed`. Recovery finishes such a
move: it removes the inbox name once it has checked it is the same file (device and inode) as a name
disposition gives that file, and records that place. Then the dead
workers are marked stopped, so that the next start does not look again; except a dead worker with a
recorded file still waiting in the inbox (killed between its commit and its move). The pipeline of this
worker moves that file (Store.find_drop finds its row), and a kill between that move and its
`set_locations` would leave the row naming the inbox; with the dead worker marked stopped, no later start
would look at its rows again (the crash soak found it). So it stays unstopped, shown "stale" by `workers`,
until a start finds none of its files waiting. A stable worker id keeps such a run's started_at
(Store.heartbeat), so that its rows since then are still looked at, and the process that took the id
over does not mark it stopped at its clean stop while those files still wait (`still_waiting`); nor
does a worker whose own moves failed (its files wait in the inbox for the next run to move). A dead
worker with no rows naming this inbox and other folders than this worker's is another inbox's (one
database can serve several): it is left for that inbox's workers. Best effort: a database error
is logged and start-up goes on (the files themselves are safe either way).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from worker.config import Config
from worker.disposition import _candidates, _rename_noreplace, unique_destination
from worker.exceptions import StoreError
from worker.files import FILE_FLAGS, lstat_or_none
from worker.migrations import BEGIN_MODE
from worker.store import Store, chunks, results, safe_text, stored_names, workers

log = logging.getLogger(__name__)

GONE = ""  # as worker.pipeline.GONE: the file is nowhere to be found
MAX_NUMBERED = 10_000  # how many "name (n).ext" variants are looked at, at most
# A process that started this long after a worker's last heartbeat holds that worker's pid anew. The slack
# covers /proc/stat's whole-second boot time and forward steps of the clock (a live worker whose clock
# jumped further since its last heartbeat looks dead until its next one); a pid handed out again within it
# of the dead worker's last heartbeat (it would take pid_max forks in between) goes unnoticed.
PID_REUSE_SLACK_S = 60.0


@dataclass(frozen=True)
class Folders:
    """Where a worker moves files: `processed` None when ok files are not moved (leave, delete)."""

    processed: Path | None
    failed: Path


def worker_folders(config: Config) -> tuple[str, str]:
    """(processed_dir, failed_dir) as a worker records them in the workers table (Store.heartbeat):
    processed_dir "" when ok files are not moved."""
    processed = str(config.processed_path) if config.files.on_success == "move" else ""
    return processed, str(config.failed_path)


def _folders(processed_dir: str | None, failed_dir: str | None, config: Config) -> Folders:
    """A dead worker's folders from its workers row; this worker's own for a row from before schema
    version 3, which has none."""
    if processed_dir is None or failed_dir is None:
        processed_dir, failed_dir = worker_folders(config)
    return Folders(Path(processed_dir) if processed_dir else None, Path(failed_dir))


@dataclass(frozen=True)
class Recovered:
    """What start-up recovery did: `fixed` rows got the place their file went; `inherited`: the rows of
    this worker id's own dead run whose files still wait in the inbox (a stable id: this process takes
    that run's workers row over, and must not mark it stopped while they wait, see `still_waiting`)."""

    fixed: int = 0
    inherited: tuple[int, ...] = ()


def recover_locations(store: Store, config: Config, host: str, own_id: str = "") -> Recovered:
    """Fix rows left naming the inbox by workers of `host` that died. `own_id`: this worker's id, whose row
    (if any, before this process's first heartbeat) is an earlier, dead process of that id, whatever its
    pid says now (a stable id, run --instance or service.worker_id)."""
    try:
        return _recover(store, config, host, own_id)
    except (SQLAlchemyError, StoreError) as exc:
        log.warning("cannot check the locations recorded by crashed workers: %s", " ".join(str(exc).split()))
        return Recovered()


def still_waiting(store: Store, config: Config, row_ids: tuple[int, ...]) -> int:
    """How many of `row_ids` still name a place in the inbox (their files not moved yet); all of them when
    the database cannot say (logged)."""
    if not row_ids:
        return 0
    ids = sorted(set(row_ids))
    try:
        with store.engine.connect() as conn:
            return sum(conn.execute(sa.select(sa.func.count()).select_from(results).where(
                results.c.id.in_(chunk), _names_the_inbox(config),
            )).scalar_one() for chunk in chunks(ids, 500))  # 500 bound parameters a statement: far below SQLite's limit
    except SQLAlchemyError as exc:
        log.warning("cannot check whether recorded files still wait in the inbox: %s", " ".join(str(exc).split()))
        return len(row_ids)


def _names_the_inbox(config: Config) -> sa.ColumnElement[bool]:
    """Rows whose location is a path in the inbox (the pipeline records paths under its real path)."""
    return results.c.location.startswith(os.path.realpath(config.inbox_path) + os.sep, autoescape=True)


def _recover(store: Store, config: Config, host: str, own_id: str) -> Recovered:
    ours = _folders(*worker_folders(config), config)
    with store.engine.connect() as conn:
        dead = [
            (row.worker_id, row.pid, row.started_at, _folders(row.processed_dir, row.failed_dir, config))
            for row in conn.execute(
                sa.select(workers.c.worker_id, workers.c.pid, workers.c.started_at, workers.c.heartbeat_at,
                          workers.c.processed_dir, workers.c.failed_dir)
                .where(workers.c.stopped_at.is_(None), workers.c.host == host)
            )
            if row.worker_id == own_id or not pid_alive(row.pid, seen_at=row.heartbeat_at)
        ]
        if not dead:
            return Recovered()
        stale = []
        half_moved = []  # (row, lstat of its inbox name): a move by link then unlink cut between the two
        waiting: dict[str, list[int]] = {}  # dead worker -> its rows whose file still waits in the inbox
        seen: set[str] = set()  # dead workers with rows naming this inbox
        deletes = config.files.on_success == "delete"
        in_inbox = _names_the_inbox(config)
        for worker_id, _, started_at, folders in dead:
            query = sa.select(results.c.id, results.c.file, results.c.sha256, results.c.status,
                              results.c.location, results.c.ctime_ns).where(
                results.c.worker == worker_id,
                results.c.processed_at >= started_at,
                in_inbox,
            )
            for row in conn.execute(query):
                seen.add(worker_id)
                spellings = _spellings(row.location, row.file)
                location, file, left = next(((loc, name, st) for loc, name in spellings
                                             if (st := lstat_or_none(loc)) is not None), (row.location, row.file, None))
                if left is not None and stat.S_ISREG(left.st_mode) and left.st_nlink > 1:
                    half_moved.append((row, location, file, left, folders))  # (linking changed its ctime)
                elif left is None or (row.ctime_ns is not None and left.st_ctime_ns != row.ctime_ns
                                      and (folders.processed is not None or row.status == "failed")):
                    # Gone, or the name now holds a later drop; except where the worker left ok files in the
                    # inbox for good (or deleted them: the two look alike here), whose ctime a chmod changes.
                    stale.append((row, [name for _, name in spellings] if left is None else [file], folders))
                elif folders.processed is not None or row.status == "failed" or deletes:
                    # Committed, not moved yet: a worker will move (or delete) it.
                    waiting.setdefault(worker_id, []).append(row.id)

        assigned: set[Path] = set()

        def named(path: Path) -> bool:
            if path in assigned:
                return True
            query = sa.select(results.c.id).where(results.c.location == safe_text(str(path))).limit(1)
            return conn.execute(query).first() is not None

        fixes = []
        for row, names, folders in stale:
            found = next((f for name in names if (f := _find(name, row.sha256, row.status, folders, named))), None)
            fixes.append((row.id, row.location, GONE if found is None else str(found)))
            if found is not None:
                assigned.add(found)
            else:
                folder = folders.failed if row.status == "failed" else folders.processed
                log.warning("%s (row %d) was recorded in the inbox by a worker that crashed, and is neither "
                            "there nor in %s", row.file, row.id,
                            "its processed folder (it did not move ok files)" if folder is None else folder)
        for row, location, file, left, folders in half_moved:
            found = _finish_move(Path(location), left, file, row.status, folders, named)
            if found is not None:
                fixes.append((row.id, row.location, str(found)))
                assigned.add(found)
    fixed = store.correct_locations(fixes)
    if fixed:
        log.info("recorded where %d file(s) went that a crashed worker had moved without saying so", fixed)
    with store.engine.connect() as conn:
        conn.execution_options(**{BEGIN_MODE: "immediate"})
        with conn.begin():
            for worker_id, pid, started_at, folders in dead:  # the very run found dead, not a later one of its id
                if worker_id in waiting or (worker_id not in seen and folders != ours):
                    continue  # files of it wait here; or, by its folders, another inbox's worker: left to them
                conn.execute(
                    sa.update(workers)
                    .where(workers.c.worker_id == worker_id, workers.c.pid == pid,
                           workers.c.started_at == started_at, workers.c.stopped_at.is_(None))
                    .values(stopped_at=workers.c.heartbeat_at)
                )
    return Recovered(fixed, tuple(waiting.get(own_id, ())))


def _spellings(location: str, file: str) -> list[tuple[str, str]]:
    """(location, file name) as a row stores them, then as names on disk where they differ: a name that is
    not UTF-8 is stored with \\xNN escapes (worker.store.stored_names)."""
    locations, names = stored_names(location), stored_names(file)
    return list(zip(locations, names, strict=True)) if len(locations) == len(names) else [(location, file)]


def _find(file: str, sha256: str | None, status: str, folders: Folders,
          named: Callable[[Path], bool]) -> Path | None:
    """Where disposition would have put `file`: the first existing candidate with the same content that no
    other row names; None when there is none (or the file was deleted: on_success = "delete")."""
    def same(path: Path) -> bool:
        if sha256 is not None:
            return _sha256(path) == sha256  # None for anything but a regular file
        st = lstat_or_none(path)
        return st is not None and stat.S_ISREG(st.st_mode)

    return _placed(file, status, folders, named, same)


def _placed(file: str, status: str, folders: Folders, named: Callable[[Path], bool],
            same: Callable[[Path], bool]) -> Path | None:
    """The first of the names disposition gives `file` (in the worker's processed/, or failed/ for a
    failed row; "a.jpg", "a (1).jpg", … up to the first that does not exist) that no other row names and
    for which `same` holds; None if there is none (or ok files are not moved)."""
    folder = folders.failed if status == "failed" else folders.processed
    if folder is None:
        return None
    try:
        candidates = _candidates(folder, file)
    except ValueError:
        return None
    for index, candidate in enumerate(candidates):
        if index > MAX_NUMBERED or not os.path.lexists(candidate):
            return None
        if not named(candidate) and same(candidate):
            return candidate
    return None  # pragma: no cover - _candidates never ends


def _finish_move(inbox_name: Path, left: os.stat_result, file: str, status: str, folders: Folders,
                 named: Callable[[Path], bool]) -> Path | None:
    """Finish a move that disposition made by link then unlink (filesystems without renameat2, NFS) and a
    crash cut between the two: the inbox name is a second link to a file in processed/ (or failed/).
    The inbox name is removed only while it is that same file (device and inode): it is first renamed to a
    hidden name, so an upload that takes the name meanwhile is never the one removed. Returns the file's
    place, or None where the inbox name is not such a link (a user's own hard link: left as it is)."""
    candidate = _placed(file, status, folders, named, lambda path: _same_file(path, left))
    if candidate is None:
        return None
    aside = inbox_name.with_name(f".{inbox_name.name}.{secrets.token_hex(4)}.recovering")
    try:
        _rename_noreplace(inbox_name, aside)
    except OSError as exc:
        log.warning("cannot remove the inbox name %s of %s left by a crashed move: %s", inbox_name, candidate, exc)
        return None
    if _same_file(aside, left):
        os.unlink(aside)
        log.info("removed %s, a second name of %s left by a move a crash cut short", inbox_name, candidate)
        return candidate
    # An upload took the name between our look and the rename (and so unlinked the second name itself):
    # give it its name back, for a row of its own.
    try:
        _rename_noreplace(aside, inbox_name)
    except FileExistsError:
        _rename_noreplace(aside, unique_destination(inbox_name.parent, inbox_name.name))
    return candidate


def _same_file(path: Path, left: os.stat_result) -> bool:
    there = lstat_or_none(path)
    return there is not None and (there.st_dev, there.st_ino) == (left.st_dev, left.st_ino)


def _sha256(path: Path) -> str | None:
    """The sha256 of the regular file at `path`; None for anything else (a FIFO there must not block
    start-up: opened non-blocking, like the pipeline's reads) or when it cannot be read."""
    digest = hashlib.sha256()
    try:
        fd = os.open(path, FILE_FLAGS)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return digest.hexdigest()


def pid_alive(pid: int, *, seen_at: datetime | None = None) -> bool:
    """Whether the worker process `pid` of this host still runs: not when no process has that pid, nor
    when it is a zombie (killed, not yet reaped), nor when the worker was last `seen_at` (its heartbeat,
    by this host's clock) before this host booted, or more than PID_REUSE_SLACK_S before the process now
    holding the pid started: the pid is then another process's (the kernel hands pids out again once they
    wrap at pid_max). A process this one may not look at (another user's, hidden by ProtectProc=invisible)
    is taken as running."""
    seen = booted = None
    if seen_at is not None:
        seen = (seen_at if seen_at.tzinfo else seen_at.replace(tzinfo=UTC)).timestamp()
        booted = _boot_time()
        if booted is not None and seen < booted:
            return False
    fields = _process_fields(pid)
    if fields is None:
        return False
    if fields and seen is not None and booted is not None:
        started = booted + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks since boot
        if started > seen + PID_REUSE_SLACK_S:
            return False
    return True


def same_process(pid: int, start_ticks: int) -> bool:
    """Whether `pid` is still the very process that started at `start_ticks` (process_start) on this boot:
    exact, no clock involved. False also for a process this one may not look at (another user's, hidden by
    ProtectProc=invisible): the caller, a start finding its worker id held, then waits for the session to
    end, which is safe, rather than refusing for good."""
    fields = _process_fields(pid)
    return bool(fields) and int(fields[19]) == start_ticks


def process_start(pid: int | None = None) -> int | None:
    """When process `pid` (this one by default) started, in clock ticks since boot (/proc/PID/stat field
    22): with boot_id(), it names one process for good, whatever the pid becomes later. None if unknown."""
    fields = _process_fields(os.getpid() if pid is None else pid)
    return int(fields[19]) if fields else None


def boot_id() -> str:
    """This boot of the host (/proc/sys/kernel/random/boot_id), "" if unknown."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _process_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (field 3 at index 0) of a running process; None when no
    process has that pid or it is a zombie; [] when it runs but cannot be looked at (another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # someone else's process: running
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []
    if not fields:
        return []
    if fields[0] in ("Z", "X"):
        return None
    return fields if len(fields) > 19 else []


def _boot_time() -> int | None:
    """When this host booted, seconds since the epoch by its clock (/proc/stat btime); None if unknown."""
    with contextlib.suppress(OSError, ValueError, StopIteration, IndexError):
        return next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    return None
