"""Reliability 6: storage faults while the worker runs, made for real:
- processed/ not writable: the folder made immutable (chattr +i through the ioctl; as root, plain chmod
  would not stop the worker) or, for a non-root run, chmod 0555;
- the database folder read-only: the folder and the database files made immutable (root only: a chmod
  does not stop writes through descriptors already open, so without root this case is skipped);
- a full disk under the database, and a full disk under processed/: a real 2 MB tmpfs mounted there and
  filled with a filler file (skipped with the reason where mounting is not permitted).
Each time: images dropped during the fault stay in the inbox (their rows may be committed, but no file is
moved before its row), the worker says what is wrong in clear one-line log messages (no traceback), and
once the fault is cleared it recovers by itself (its own back-off retries): every image ends with exactly
one row, in processed/, byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from workerproc import (
    Site,
    color_of,
    distinct_images,
    fill_disk,
    immutable_supported,
    move_into,
    report,
    set_immutable,
    sha256_file,
    tmpfs,
    wait_until,
    without_file_permission_override,
    workers,
)

__all__ = ["workers"]

IMAGES = 10


@contextlib.contextmanager
def unwritable_folder(folder: Path) -> Iterator[tuple[Callable[[], None], Callable[[], None], str]]:
    """(make it unwritable, make it writable again, how) for `folder`."""
    if immutable_supported(folder.parent) is None:
        yield (lambda: set_immutable(folder, True)), (lambda: set_immutable(folder, False)), "chattr +i"
        with contextlib.suppress(OSError):
            set_immutable(folder, False)
    else:
        yield (lambda: folder.chmod(0o555)), (lambda: folder.chmod(0o755)), "chmod 0555"
        folder.chmod(0o755)


def run_fault(site: Site, workers, capsys, name: str, inject: Callable[[], None], clear: Callable[[], None],
              *, rows_during_fault: bool, words: list[str], fault_s: float = 3.0) -> None:
    worker = workers(site).wait_ready()
    warm = distinct_images(site.root / "staging", 1, seed=1, prefix="warm")
    move_into(warm, site.inbox)
    wait_until(lambda: site.count() == 1 and not site.inbox_files(), 30, "the first image")
    staged = distinct_images(site.root / "staging", IMAGES, seed=2, prefix="during")
    expected = {p.name: sha256_file(p) for p in [*staged]} | {warm[0].name: sha256_file(site.processed / warm[0].name)}

    inject()
    injected = time.monotonic()
    try:
        move_into(staged, site.inbox)
        said_s = wait_until(lambda: all(w in worker.log for w in words), 30, f"the log to say {words}")
        time.sleep(max(0.0, fault_s - (time.monotonic() - injected)))
        in_inbox = len(site.inbox_files())
        rows_in_fault = site.count() - 1
        moved_in_fault = len([n for n in os.listdir(site.processed) if n != "filler.bin"]) - 1
    finally:
        clear()
    cleared = time.monotonic()
    wait_until(lambda: site.count() >= 1 + IMAGES and not site.inbox_files(), 90, "recovery")
    recovered_s = time.monotonic() - cleared
    time.sleep(0.5)
    assert worker.stop() == 0, worker.log
    log = worker.log
    error_lines = [line for line in log.splitlines() if " ERROR " in line or " WARNING " in line]
    rows = site.query("SELECT file, sha256, status, category FROM results")
    processed = {p.name: sha256_file(p) for p in site.processed.iterdir() if p.name != "filler.bin"}
    line = report(capsys, f"storage fault: {name}", fault_s=round(cleared - injected, 1),
                  said_so_after_s=round(said_s, 2), files_kept_in_inbox=in_inbox,
                  rows_committed_during_fault=rows_in_fault, files_moved_during_fault=moved_in_fault,
                  error_or_warning_lines=len(error_lines), recovered_after_clear_s=round(recovered_s, 1),
                  rows=len(rows), processed=len(processed), processed_match=processed == expected,
                  integrity=site.integrity(), example=(error_lines[0].split(": ", 1)[-1][:160] if error_lines else ""))
    assert in_inbox == IMAGES and moved_in_fault == 0, line  # nothing moved before its row, nothing lost
    assert rows_in_fault == (IMAGES if rows_during_fault else 0), line
    assert "Traceback" not in log, log
    assert len(rows) == 1 + IMAGES and all(r[1] == expected[r[0]] and r[2] == "ok" and r[3] == color_of(r[0])
                                             for r in rows), line
    assert processed == expected and site.integrity() == "ok", line


@pytest.mark.timeout(120)
def test_processed_folder_not_writable(tmp_path: Path, workers, capsys) -> None:
    site = Site(tmp_path / "site")
    site.processed.mkdir()
    with unwritable_folder(site.processed) as (inject, clear, how):
        run_fault(site, workers, capsys, f"processed/ not writable ({how})", inject, clear, rows_during_fault=True,
                  words=["cannot dispose of", "in the inbox"])


@pytest.mark.timeout(120)
def test_database_folder_read_only(tmp_path: Path, workers, capsys) -> None:
    site = Site(tmp_path / "site")
    why = immutable_supported(tmp_path)
    if why is not None:
        pytest.skip(f"{why}; a chmod would not stop writes through the descriptors the worker holds open")
    targets = lambda: [site.data, *[p for p in site.data.iterdir() if p.name.startswith("results.db")  # noqa: E731
                                    and not p.name.endswith("-shm")]]
    state: list[Path] = []

    def inject() -> None:
        state.extend(targets())
        for path in state:
            set_immutable(path, True)

    def clear() -> None:
        while state:
            set_immutable(state.pop(), False)

    try:
        run_fault(site, workers, capsys, "database folder read-only (chattr +i)", inject, clear,
                  rows_during_fault=False, words=["cannot record", "the files stay in the inbox"])
    finally:
        clear()


@pytest.mark.timeout(120)
def test_disk_full_under_the_database(tmp_path: Path, workers, capsys) -> None:
    site = Site(tmp_path / "site")
    with tmpfs(site.data, "2m"):
        filler: list[Path] = []
        run_fault(site, workers, capsys, "disk full under the database (2 MB tmpfs)",
                  lambda: filler.append(fill_disk(site.data)), lambda: filler and filler[0].unlink(),
                  rows_during_fault=False, words=["cannot record", "the files stay in the inbox"])


@pytest.mark.timeout(120)
def test_disk_full_under_processed(tmp_path: Path, workers, capsys) -> None:
    site = Site(tmp_path / "site")
    with tmpfs(site.processed, "2m"):
        filler: list[Path] = []
        run_fault(site, workers, capsys, "disk full under processed/ (2 MB tmpfs)",
                  lambda: filler.append(fill_disk(site.processed)), lambda: filler and filler[0].unlink(),
                  rows_during_fault=True, words=["cannot dispose of", "in the inbox"])


@pytest.mark.timeout(120)
def test_a_photo_the_worker_may_not_read_waits_in_the_inbox_until_it_may(tmp_path: Path, workers, capsys) -> None:
    """An upload the worker's user may not read (mode 000, or an upload server's umask that shuts the
    group out) is an operations fault, not a bad image. It used to get a `failed` row at once and go to
    failed/ for good; now it stays in the inbox without a row, is said so in one line, and is recorded
    once its permissions are fixed (the worker tries again with back-off: here the rescan is 5 minutes
    away). Root runs the worker without its permission override (setpriv), so the bits bind it."""
    prefix = without_file_permission_override()
    site = Site(tmp_path / "site")
    worker = workers(site, prefix=prefix).wait_ready()
    locked, other = distinct_images(site.root / "staging", 2, seed=3, prefix="perm")
    locked.chmod(0o000)
    move_into([locked, other], site.inbox)
    wait_until(lambda: site.count() == 1 and "may not read it" in worker.log, 30, "the readable photo and the line")
    time.sleep(3.0)  # retries meanwhile: still no row, still one line
    rows_while_locked = site.count()
    lines = [line for line in worker.log.splitlines() if "may not read it" in line]
    (site.inbox / locked.name).chmod(0o644)
    fixed = time.monotonic()
    wait_until(lambda: site.count() == 2 and not site.inbox_files(), 60, "the photo once readable")
    recovered_s = time.monotonic() - fixed
    assert worker.stop() == 0, worker.log
    rows = site.query("SELECT file, status FROM results ORDER BY id")
    line = report(capsys, "a photo the worker may not read", rows_while_locked=rows_while_locked,
                  lines=len(lines), recorded_after_chmod_s=round(recovered_s, 1), rows=rows,
                  example=lines[0].split(": ", 1)[-1] if lines else "")
    assert rows_while_locked == 1 and len(lines) == 1, line
    assert lines[0].endswith(f"skipping {locked.name}: cannot open the file: Permission denied (the worker's "
                             "user may not read it); left in the inbox and tried again"), line
    assert rows == [(other.name, "ok"), (locked.name, "ok")], line
    assert sorted(p.name for p in site.processed.iterdir()) == sorted([locked.name, other.name]), line
    assert "Traceback" not in worker.log, worker.log
