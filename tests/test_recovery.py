"""worker/recovery.py: rows a crashed worker left naming the inbox get the place their file went.

The crash itself is made for real in tests/test_reliability_crash.py (SIGKILL at random moments); here
each outcome is set up exactly: a real SQLite file with the rows and the workers row a killed worker leaves
(its pid one of a process that has exited), and the real files where disposition would have put them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import dead_pid

from worker import config as config_mod
from worker import recovery
from worker.config import Config
from worker.recovery import recover_locations
from worker.store import ResultRecord, Store

HOST = "host-a"


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    config = config_mod.load(None, {"inbox.path": str(tmp_path / "inbox"),
                                    "files.processed_dir": str(tmp_path / "processed"),
                                    "files.failed_dir": str(tmp_path / "failed")})
    for folder in (config.inbox_path, config.processed_path, config.failed_path):
        folder.mkdir(parents=True)
    return config


@pytest.fixture
def store(tmp_path: Path):
    with Store(f"sqlite:///{tmp_path}/results.db") as opened:
        yield opened


def crashed_worker(store: Store, cfg: Config, rows: dict[str, bytes], *, worker: str = "host-a:1",
                   host: str = HOST, pid: int | None = None, status: str = "ok",
                   folders: tuple[str, str] | None = None,
                   ctimes: dict[str, int] | None = None) -> dict[str, int]:
    """A worker that recorded `rows` (name -> content) with their inbox location, then died: its workers
    row was never marked stopped. `folders`: the (processed, failed) folders its row records (None: a row
    from before schema version 3). `ctimes`: the ctime each row records of the file it read (none: rows
    from before schema version 4). Returns each name's row id."""
    store.heartbeat(worker, host, dead_pid() if pid is None else pid, len(rows), folders=folders)
    ids = {}
    for name, content in rows.items():
        fields = {"category": "red", "confidence": 0.9, "top3": [("red", 0.9)]} if status == "ok" else {
            "error": "not an image"}
        (record_id,) = store.add_results([ResultRecord(
            file=name, location=str(Path(os.path.realpath(cfg.inbox_path)) / name), status=status,
            sha256=hashlib.sha256(content).hexdigest(), model_id="m" * 64, model_name="tiny", worker=worker,
            ctime_ns=(ctimes or {}).get(name), **fields)])
        ids[name] = record_id
    return ids


def locations(store: Store) -> dict[int, str]:
    with sqlite3.connect(store.path) as db:
        return dict(db.execute("SELECT id, location FROM results"))


def stopped(store: Store, worker: str) -> bool:
    with sqlite3.connect(store.path) as db:
        return db.execute("SELECT stopped_at FROM workers WHERE worker_id = ?", (worker,)).fetchone()[0] is not None


def test_a_moved_file_gets_its_place_and_the_worker_is_marked_stopped(store: Store, cfg: Config) -> None:
    ids = crashed_worker(store, cfg, {"a.jpg": b"a", "sub/b.jpg": b"b"})
    (cfg.processed_path / "sub").mkdir()
    (cfg.processed_path / "a.jpg").write_bytes(b"a")
    (cfg.processed_path / "sub" / "b.jpg").write_bytes(b"b")
    assert recover_locations(store, cfg, HOST).fixed == 2
    assert locations(store) == {ids["a.jpg"]: str(cfg.processed_path / "a.jpg"),
                                ids["sub/b.jpg"]: str(cfg.processed_path / "sub" / "b.jpg")}
    assert stopped(store, "host-a:1")
    assert recover_locations(store, cfg, HOST).fixed == 0  # looked at once: the next start does not look again


def test_the_numbered_copy_with_the_same_content_is_chosen(store: Store, cfg: Config) -> None:
    (cfg.processed_path / "a.jpg").write_bytes(b"an earlier drop of another photo")
    (cfg.processed_path / "a (1).jpg").write_bytes(b"this one")
    ids = crashed_worker(store, cfg, {"a.jpg": b"this one"})
    assert recover_locations(store, cfg, HOST).fixed == 1
    assert locations(store)[ids["a.jpg"]] == str(cfg.processed_path / "a (1).jpg")


def test_a_failed_row_is_looked_for_in_failed(store: Store, cfg: Config) -> None:
    ids = crashed_worker(store, cfg, {"bad.jpg": b"text"}, status="failed")
    (cfg.failed_path / "bad.jpg").write_bytes(b"text")
    assert recover_locations(store, cfg, HOST).fixed == 1
    assert locations(store)[ids["bad.jpg"]] == str(cfg.failed_path / "bad.jpg")


def test_a_file_found_nowhere_is_recorded_as_gone_with_a_warning(store: Store, cfg: Config,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    ids = crashed_worker(store, cfg, {"lost.jpg": b"x"})
    (cfg.processed_path / "lost.jpg").write_bytes(b"other content")  # same name, not the same photo
    with caplog.at_level(logging.WARNING, logger="worker.recovery"):
        assert recover_locations(store, cfg, HOST).fixed == 1
    assert locations(store)[ids["lost.jpg"]] == ""
    assert caplog.messages == [f"lost.jpg (row {ids['lost.jpg']}) was recorded in the inbox by a worker that "
                               f"crashed, and is neither there nor in {cfg.processed_path}"]


def test_a_dead_worker_s_files_are_looked_for_in_its_own_folders(store: Store, cfg: Config,
                                                                   tmp_path: Path) -> None:
    # Two workers on one host, each with its own processed/ and failed/; the one that starts after the
    # other died used to look in its own folders only, and record the dead one's files as gone.
    theirs = {name: tmp_path / f"their-{name}" for name in ("processed", "failed")}
    for folder in theirs.values():
        folder.mkdir()
    ok = crashed_worker(store, cfg, {"a.jpg": b"a"}, worker="host-a:1",
                        folders=(str(theirs["processed"]), str(theirs["failed"])))
    bad = crashed_worker(store, cfg, {"bad.jpg": b"text"}, worker="host-a:2", status="failed",
                         folders=(str(theirs["processed"]), str(theirs["failed"])))
    (theirs["processed"] / "a.jpg").write_bytes(b"a")
    (theirs["failed"] / "bad.jpg").write_bytes(b"text")
    (cfg.processed_path / "a.jpg").write_bytes(b"a")  # the same bytes in this worker's folder: not its file
    assert recover_locations(store, cfg, HOST).fixed == 2
    assert locations(store) == {ok["a.jpg"]: str(theirs["processed"] / "a.jpg"),
                                bad["bad.jpg"]: str(theirs["failed"] / "bad.jpg")}


def test_a_worker_that_did_not_move_ok_files_is_not_given_one(store: Store, cfg: Config,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    # It deleted its ok files (on_success = "delete"), and a file of the same name and bytes is in this
    # worker's processed/: that one is another row's, or none.
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, folders=("", str(cfg.failed_path)))
    (cfg.processed_path / "a.jpg").write_bytes(b"a")
    with caplog.at_level(logging.WARNING, logger="worker.recovery"):
        assert recover_locations(store, cfg, HOST).fixed == 1
    assert locations(store)[ids["a.jpg"]] == ""
    assert caplog.messages == [f"a.jpg (row {ids['a.jpg']}) was recorded in the inbox by a worker that crashed, "
                               "and is neither there nor in its processed folder (it did not move ok files)"]


def test_a_worker_records_processed_dir_empty_when_it_does_not_move_ok_files(cfg: Config) -> None:
    from worker.recovery import worker_folders

    assert worker_folders(cfg) == (str(cfg.processed_path), str(cfg.failed_path))
    leave = config_mod.load(None, {"inbox.path": str(cfg.inbox_path), "files.on_success": "leave",
                                   "files.failed_dir": str(cfg.failed_path)})
    assert worker_folders(leave) == ("", str(cfg.failed_path))


def test_a_row_whose_file_is_still_in_the_inbox_is_left_alone(store: Store, cfg: Config) -> None:
    ids = crashed_worker(store, cfg, {"waiting.jpg": b"w"})
    (cfg.inbox_path / "waiting.jpg").write_bytes(b"w")  # never moved: the next pass moves it
    assert recover_locations(store, cfg, HOST).fixed == 0
    assert locations(store)[ids["waiting.jpg"]] == str(cfg.inbox_path / "waiting.jpg")


@pytest.mark.parametrize("worker_ids", ["host:pid", "stable"])
def test_a_crashed_worker_s_file_still_in_the_inbox_is_looked_at_again_once_moved(
        store: Store, cfg: Config, worker_ids: str) -> None:
    """Found by the crash soak in CI: worker A recorded a.jpg and was killed before moving it; B's start-up
    recovery found the file still in the inbox and marked A stopped; B moved the file and was killed before
    recording where. The next start looked only at B's rows, and A's row named the inbox for good. A dead
    run with a file still waiting is not marked stopped, so the run after the one that moves it looks again.
    With a stable id (run --instance, service.worker_id) the next process's heartbeat keeps the dead run's
    started_at, so that the id's rows since then are still looked at."""
    first, second, third = ("host-a:1", "host-a:2", "host-a:3") if worker_ids == "host:pid" else ("host-a@1",) * 3
    own = (lambda worker: worker) if worker_ids == "stable" else (lambda worker: "")
    folders = (str(cfg.processed_path), str(cfg.failed_path))
    path = cfg.inbox_path / "a.jpg"
    path.write_bytes(b"a")
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, worker=first, folders=folders,
                         ctimes={"a.jpg": path.stat().st_ctime_ns})
    with sqlite3.connect(store.path) as db:
        started_a = db.execute("SELECT started_at FROM workers WHERE worker_id = ?", (first,)).fetchone()[0]
    assert recover_locations(store, cfg, HOST, own(second)).fixed == 0  # B starts: the file waits, B will move it
    assert not stopped(store, first)
    store.heartbeat(second, HOST, dead_pid(), 0, folders=folders)  # B runs, moves a.jpg, is killed
    path.rename(cfg.processed_path / "a.jpg")
    with sqlite3.connect(store.path) as db:
        started = dict(db.execute("SELECT worker_id, started_at FROM workers").fetchall())
    assert started[second] == started_a or worker_ids == "host:pid"
    assert recover_locations(store, cfg, HOST, own(third)).fixed == 1
    assert locations(store) == {ids["a.jpg"]: str(cfg.processed_path / "a.jpg")}
    assert stopped(store, first) and stopped(store, second)


@pytest.mark.parametrize(("on_success", "status", "with_ctime", "waits"), [
    ("move", "ok", True, True),
    ("move", "ok", False, True),  # a row from before schema version 4: no ctime to compare
    ("move", "failed", True, True),
    ("delete", "ok", True, True),
    ("leave", "failed", True, True),
    ("leave", "ok", True, False),  # left in the inbox for good: nothing to move, the worker is done
])
def test_a_dead_worker_stays_unstopped_while_a_file_of_it_waits_to_be_moved(
        store: Store, tmp_path: Path, on_success: str, status: str, with_ctime: bool, waits: bool) -> None:
    cfg = config_mod.load(None, {"inbox.path": str(tmp_path / "inbox"), "files.on_success": on_success,
                                 "files.processed_dir": str(tmp_path / "processed"),
                                 "files.failed_dir": str(tmp_path / "failed")})
    cfg.inbox_path.mkdir()
    path = cfg.inbox_path / "a.jpg"
    path.write_bytes(b"a")
    crashed_worker(store, cfg, {"a.jpg": b"a"}, status=status, folders=recovery.worker_folders(cfg),
                   ctimes={"a.jpg": path.stat().st_ctime_ns} if with_ctime else None)
    recovered = recover_locations(store, cfg, HOST)
    assert (recovered.fixed, recovered.inherited) == (0, ())  # not this worker's own id
    assert stopped(store, "host-a:1") is not waits


def test_a_dead_worker_of_another_inbox_is_left_to_that_inbox_s_workers(store: Store, cfg: Config,
                                                                           tmp_path: Path) -> None:
    """One database, two inboxes: a worker of the other inbox sees none of this dead worker's rows, which
    name its own inbox, so it cannot tell whether a file of it waits there. Its folders say it is not of
    this inbox: it is left unstopped for its own inbox's next start."""
    other = {"inbox.path": str(tmp_path / "two" / "inbox"), "files.processed_dir": str(tmp_path / "two" / "processed"),
             "files.failed_dir": str(tmp_path / "two" / "failed")}
    two = config_mod.load(None, other)
    two.inbox_path.mkdir(parents=True)
    path = cfg.inbox_path / "a.jpg"
    path.write_bytes(b"a")
    crashed_worker(store, cfg, {"a.jpg": b"a"}, folders=recovery.worker_folders(cfg),
                   ctimes={"a.jpg": path.stat().st_ctime_ns})
    crashed_worker(store, two, {}, worker="host-a:2", folders=recovery.worker_folders(two))
    assert recover_locations(store, two, HOST).fixed == 0
    assert not stopped(store, "host-a:1")  # another inbox's, with a file waiting there
    assert stopped(store, "host-a:2")  # this inbox's (its folders), nothing of it waits
    path.rename(cfg.processed_path / "a.jpg")  # moved by the next worker of inbox one, killed before recording
    assert recover_locations(store, cfg, HOST).fixed == 1
    assert stopped(store, "host-a:1")


def test_a_dead_worker_with_other_folders_but_rows_here_is_this_inbox_s(store: Store, cfg: Config,
                                                                         tmp_path: Path) -> None:
    """Its folders changed since (another processed_dir), but its rows name this inbox: it is this inbox's
    worker, its file is found in its own folder, and it is marked stopped."""
    old = tmp_path / "old-processed"
    old.mkdir()
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, folders=(str(old), str(cfg.failed_path)))
    (old / "a.jpg").write_bytes(b"a")
    assert recover_locations(store, cfg, HOST).fixed == 1
    assert locations(store) == {ids["a.jpg"]: str(old / "a.jpg")}
    assert stopped(store, "host-a:1")


def test_the_rows_of_this_id_s_crashed_run_still_waiting_are_handed_over(store: Store, cfg: Config) -> None:
    """A stable id: the process that takes the id over learns which of its crashed run's files still wait,
    so that it can tell at its clean stop whether they were moved (`still_waiting`)."""
    for name in ("a.jpg", "b.jpg"):
        (cfg.inbox_path / name).write_bytes(name.encode())
    ids = crashed_worker(store, cfg, {"a.jpg": b"a.jpg", "b.jpg": b"b.jpg"}, worker="host-a@1",
                         folders=recovery.worker_folders(cfg))
    recovered = recover_locations(store, cfg, HOST, own_id="host-a@1")
    assert recovered == recovery.Recovered(0, (ids["a.jpg"], ids["b.jpg"]))
    assert recovery.still_waiting(store, cfg, recovered.inherited) == 2
    store.set_locations([(ids["a.jpg"], str(cfg.processed_path / "a.jpg"))])
    assert recovery.still_waiting(store, cfg, recovered.inherited) == 1
    assert recovery.still_waiting(store, cfg, ()) == 0


def test_names_that_are_not_utf8_are_found_on_disk(store: Store, cfg: Config,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Such a name is stored with \\xNN escapes (store.safe_text); recovery looked for the escaped text on
    disk, found nothing, said so in a false warning, and gave the row an empty location while its file
    waited in the inbox to be recorded a second time."""
    waiting, moved = os.fsdecode(b"caf\xe9.jpg"), os.fsdecode(b"sub/\xff.jpg")
    ids = crashed_worker(store, cfg, {waiting: b"w", moved: b"m"})
    (cfg.inbox_path / waiting).write_bytes(b"w")  # never moved: the next pass moves it
    (cfg.processed_path / "sub").mkdir()
    (cfg.processed_path / moved).write_bytes(b"m")
    with caplog.at_level(logging.WARNING, logger="worker.recovery"):
        assert recover_locations(store, cfg, HOST).fixed == 1
    assert caplog.messages == []
    assert locations(store) == {ids[waiting]: str(cfg.inbox_path / "caf\\xe9.jpg"),
                                ids[moved]: str(cfg.processed_path / "sub" / "\\xff.jpg")}


def test_a_row_whose_file_is_still_in_the_inbox_unchanged_is_left_alone(store: Store, cfg: Config) -> None:
    path = cfg.inbox_path / "a.jpg"
    path.write_bytes(b"a")
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, ctimes={"a.jpg": path.stat().st_ctime_ns})
    assert recover_locations(store, cfg, HOST).fixed == 0
    assert locations(store)[ids["a.jpg"]] == str(path)


def test_a_left_file_whose_metadata_changed_is_left_alone(store: Store, cfg: Config) -> None:
    # A worker that left ok files in the inbox (on_success = "leave"): its rows name them for good, and a chmod
    # since (another ctime) does not make them another file.
    path = cfg.inbox_path / "a.jpg"
    path.write_bytes(b"a")
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, ctimes={"a.jpg": path.stat().st_ctime_ns},
                         folders=("", str(cfg.failed_path)))
    path.chmod(0o600)
    assert recover_locations(store, cfg, HOST).fixed == 0
    assert locations(store)[ids["a.jpg"]] == str(path)


@pytest.mark.parametrize("upload", ["cp", "cp -p"])
def test_a_later_upload_of_the_same_name_and_bytes_is_not_taken_for_the_moved_file(
        store: Store, cfg: Config, upload: str) -> None:
    # The worker moved a.jpg and died before recording the move; then the same photo was uploaded again
    # under the same name: another file, with another ctime even when the copy keeps the mtime (cp -p). The
    # row is the moved file's, and the new upload is left in the inbox for a row of its own.
    moved = cfg.processed_path / "a.jpg"
    moved.write_bytes(b"a")
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, ctimes={"a.jpg": moved.stat().st_ctime_ns})
    upload_path = cfg.inbox_path / "a.jpg"
    (shutil.copy2 if upload == "cp -p" else shutil.copyfile)(moved, upload_path)
    assert recover_locations(store, cfg, HOST).fixed == 1
    assert locations(store)[ids["a.jpg"]] == str(moved)
    assert upload_path.read_bytes() == b"a"


def test_live_workers_and_other_hosts_are_not_touched(store: Store, cfg: Config) -> None:
    alive = subprocess.Popen(["sleep", "60"])
    try:
        live = crashed_worker(store, cfg, {"a.jpg": b"a"}, worker="host-a:live", pid=alive.pid)
        other = crashed_worker(store, cfg, {"b.jpg": b"b"}, worker="host-b:1", host="host-b")
        (cfg.processed_path / "a.jpg").write_bytes(b"a")
        (cfg.processed_path / "b.jpg").write_bytes(b"b")
        assert recover_locations(store, cfg, HOST).fixed == 0
        assert locations(store) == {live["a.jpg"]: str(cfg.inbox_path / "a.jpg"),
                                    other["b.jpg"]: str(cfg.inbox_path / "b.jpg")}
        assert not stopped(store, "host-a:live") and not stopped(store, "host-b:1")
    finally:
        alive.kill()
        alive.wait()


def test_an_earlier_process_of_this_worker_s_own_id_is_dead_whatever_its_pid(store: Store, cfg: Config) -> None:
    """A stable id (run --instance, service.worker_id): the row of the id this worker holds is its earlier
    process, even when that pid runs again now (reused by another process, the new worker's own after a
    reboot) and started before the row said it did."""
    alive = subprocess.Popen(["sleep", "60"])
    try:
        ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, worker="host-a@1", pid=alive.pid)
        (cfg.processed_path / "a.jpg").write_bytes(b"a")
        assert recover_locations(store, cfg, HOST).fixed == 0  # for another worker, a live process
        assert recover_locations(store, cfg, HOST, own_id="host-a@1").fixed == 1
        assert locations(store) == {ids["a.jpg"]: str(cfg.processed_path / "a.jpg")}
        assert stopped(store, "host-a@1")
    finally:
        alive.kill()
        alive.wait()


def test_a_pid_last_seen_before_this_host_booted_is_another_process_s(store: Store, cfg: Config) -> None:
    """The row's pid runs now, but the worker's last heartbeat is older than this boot (a reset host gave
    its pid to another process): dead, even where that process may not be looked at (another user's)."""
    later = subprocess.Popen(["sleep", "60"])
    try:
        ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, worker="host-a:9", pid=later.pid)
        (cfg.processed_path / "a.jpg").write_bytes(b"a")
        assert recover_locations(store, cfg, HOST).fixed == 0  # seen since the boot: its process runs
        booted = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                      if line.startswith("btime "))
        before_boot = datetime.fromtimestamp(booted - 60, UTC)
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE workers SET heartbeat_at = ?", (before_boot.replace(tzinfo=None).isoformat(" "),))
        assert recovery.pid_alive(later.pid) and not recovery.pid_alive(later.pid, seen_at=before_boot)
        assert recover_locations(store, cfg, HOST).fixed == 1
        assert locations(store) == {ids["a.jpg"]: str(cfg.processed_path / "a.jpg")}
    finally:
        later.kill()
        later.wait()


def test_a_pid_last_seen_before_its_process_started_is_another_process_s(store: Store, cfg: Config) -> None:
    """The row's pid runs now, but that process started after the worker's last heartbeat (the kernel
    handed the dead worker's pid out again): dead. Seen within the slack of that start: taken as running."""
    before = datetime.now(UTC)
    later = subprocess.Popen(["sleep", "60"])
    try:
        ids = crashed_worker(store, cfg, {"a.jpg": b"a"}, worker="host-a:9", pid=later.pid)
        (cfg.processed_path / "a.jpg").write_bytes(b"a")
        assert recover_locations(store, cfg, HOST).fixed == 0  # heartbeat after its start: its process runs
        last_seen = before - timedelta(seconds=recovery.PID_REUSE_SLACK_S + 5)
        if last_seen.timestamp() <= recovery._boot_time():  # the boot-time rule would decide instead
            pytest.skip("this host booted too recently to place a heartbeat after the boot and before the slack")
        assert recovery.pid_alive(later.pid, seen_at=before - timedelta(seconds=recovery.PID_REUSE_SLACK_S - 2))
        assert not recovery.pid_alive(later.pid, seen_at=last_seen)
        with sqlite3.connect(store.path) as db:
            db.execute("UPDATE workers SET heartbeat_at = ?", (last_seen.replace(tzinfo=None).isoformat(" "),))
        assert recover_locations(store, cfg, HOST).fixed == 1
        assert locations(store) == {ids["a.jpg"]: str(cfg.processed_path / "a.jpg")}
        assert stopped(store, "host-a:9")
    finally:
        later.kill()
        later.wait()


@pytest.mark.timeout(30)
def test_a_fifo_under_the_name_looked_at_does_not_block_start_up(store: Store, cfg: Config) -> None:
    """A FIFO in processed/ under the name disposition would have given the file: skipped, not opened for
    reading (which blocks until someone writes), and the numbered name after it is found."""
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"})
    os.mkfifo(cfg.processed_path / "a.jpg")
    (cfg.processed_path / "a (1).jpg").write_bytes(b"a")
    assert recover_locations(store, cfg, HOST).fixed == 1
    assert locations(store) == {ids["a.jpg"]: str(cfg.processed_path / "a (1).jpg")}


def test_with_on_success_delete_an_ok_row_is_recorded_as_gone(store: Store, tmp_path: Path) -> None:
    cfg = config_mod.load(None, {"inbox.path": str(tmp_path / "inbox"), "files.on_success": "delete"})
    cfg.inbox_path.mkdir()
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"})
    assert recover_locations(store, cfg, HOST).fixed == 1
    assert locations(store)[ids["a.jpg"]] == ""


def test_a_database_error_is_logged_and_start_up_goes_on(store: Store, cfg: Config,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    crashed_worker(store, cfg, {"a.jpg": b"a"})
    with sqlite3.connect(store.path) as db:
        db.execute("ALTER TABLE workers RENAME TO workers_gone")  # what recovery reads is not there
    with caplog.at_level(logging.WARNING, logger="worker.recovery"):
        assert recover_locations(store, cfg, HOST).fixed == 0
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith("cannot check the locations recorded by crashed workers: ")
    assert "no such table: workers" in caplog.messages[0]


@pytest.mark.parametrize("with_ctimes", [True, False], ids=["rows with ctimes", "rows from before version 4"])
def test_a_move_cut_between_link_and_unlink_is_finished(store: Store, cfg: Config,
                                                        caplog: pytest.LogCaptureFixture, with_ctimes: bool) -> None:
    # What a kill between disposition's link and unlink leaves where there is no renameat2 (NFS): the
    # inbox name and the processed/ name are two links to one file. The next pass would refuse it as
    # hard-linked and record a second, failed row. (The link changed the file's ctime since it was read.)
    (cfg.inbox_path / "sub").mkdir()
    (cfg.processed_path / "sub").mkdir()
    (cfg.processed_path / "a.jpg").write_bytes(b"an earlier photo of the same name")
    (cfg.inbox_path / "a.jpg").write_bytes(b"a")
    (cfg.inbox_path / "sub" / "b.jpg").write_bytes(b"b")
    ctimes = {name: (cfg.inbox_path / name).stat().st_ctime_ns for name in ("a.jpg", "sub/b.jpg")}
    ids = crashed_worker(store, cfg, {"a.jpg": b"a", "sub/b.jpg": b"b"}, ctimes=ctimes if with_ctimes else None)
    os.link(cfg.inbox_path / "a.jpg", cfg.processed_path / "a (1).jpg")
    os.link(cfg.inbox_path / "sub" / "b.jpg", cfg.processed_path / "sub" / "b.jpg")
    with caplog.at_level(logging.INFO, logger="worker.recovery"):
        assert recover_locations(store, cfg, HOST).fixed == 2
    assert sorted(p.name for p in cfg.inbox_path.rglob("*")) == ["sub"]  # no hidden name left behind either
    assert locations(store) == {ids["a.jpg"]: str(cfg.processed_path / "a (1).jpg"),
                                ids["sub/b.jpg"]: str(cfg.processed_path / "sub" / "b.jpg")}
    assert (cfg.processed_path / "a (1).jpg").read_bytes() == b"a"
    assert os.stat(cfg.processed_path / "a (1).jpg").st_nlink == 1
    assert (cfg.processed_path / "a.jpg").read_bytes() == b"an earlier photo of the same name"
    assert caplog.messages[:2] == [
        f"removed {cfg.inbox_path / 'a.jpg'}, a second name of {cfg.processed_path / 'a (1).jpg'} left by a "
        "move a crash cut short",
        f"removed {cfg.inbox_path / 'sub' / 'b.jpg'}, a second name of {cfg.processed_path / 'sub' / 'b.jpg'} "
        "left by a move a crash cut short"]


def test_a_hard_link_of_the_users_own_is_left_alone(store: Store, cfg: Config, tmp_path: Path) -> None:
    # The inbox name is hard-linked, but not to where disposition puts the file: the user's own link.
    # Same name and content in processed/, but another file (inode): not ours to remove either.
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"})
    (tmp_path / "elsewhere.jpg").write_bytes(b"a")
    os.link(tmp_path / "elsewhere.jpg", cfg.inbox_path / "a.jpg")
    (cfg.processed_path / "a.jpg").write_bytes(b"a")
    assert recover_locations(store, cfg, HOST).fixed == 0
    assert os.stat(cfg.inbox_path / "a.jpg").st_nlink == 2
    assert locations(store)[ids["a.jpg"]] == str(cfg.inbox_path / "a.jpg")
    assert stopped(store, "host-a:1")


def test_an_upload_that_takes_the_name_meanwhile_is_kept(store: Store, cfg: Config, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The upload is real; only its moment is arranged (a hook on the rename, the one thing not real here):
    # it lands between recovery's look at the inbox name and its rename aside, which by chance would take
    # millions of tries. The upload must come back under its name, for a row of its own.
    ids = crashed_worker(store, cfg, {"a.jpg": b"a"})
    (cfg.inbox_path / "a.jpg").write_bytes(b"a")
    os.link(cfg.inbox_path / "a.jpg", cfg.processed_path / "a.jpg")
    upload = tmp_path / "upload.jpg"
    upload.write_bytes(b"a new upload of the same name")
    real = recovery._rename_noreplace

    def upload_then_rename(src: Path | str, dst: Path | str) -> None:
        if upload.exists():
            os.rename(upload, cfg.inbox_path / "a.jpg")
        real(src, dst)

    monkeypatch.setattr(recovery, "_rename_noreplace", upload_then_rename)
    assert recover_locations(store, cfg, HOST).fixed == 1
    assert sorted(p.name for p in cfg.inbox_path.iterdir()) == ["a.jpg"]
    assert (cfg.inbox_path / "a.jpg").read_bytes() == b"a new upload of the same name"
    assert (cfg.processed_path / "a.jpg").read_bytes() == b"a"
    assert os.stat(cfg.processed_path / "a.jpg").st_nlink == 1  # the upload replaced the second name
    assert locations(store)[ids["a.jpg"]] == str(cfg.processed_path / "a.jpg")
