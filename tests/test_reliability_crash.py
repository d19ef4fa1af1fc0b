"""Reliability 1: crash safety. A worker processing a burst of distinct images is SIGKILLed at random
moments and restarted each time; in the end every image has exactly one `ok` row, nothing is left in the
inbox, nothing is lost or overwritten in processed/, and the database passes `PRAGMA integrity_check`.

Kill moments are random (seeded, the seed is in the figures): most land while batches are being
decoded, committed and moved (after a random share of the rows still to come, then a random 0-150 ms
more), some during
start-up (a random 0-0.8 s after the process was spawned: imports, migrations, model load, first scan).
The burst arrives in random chunks, before a start (the start-up scan finds them) or while the worker
runs (the watcher does).
After each kill the test counts the rows committed whose file was still in the inbox: the crash window
between commit and move that the next run must close without a second row.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import dead_pid
from workerproc import Site, color_of, distinct_images, image_bytes, move_into, report, sha256_file, wait_until, workers

from worker import config as config_mod
from worker.daemon import Worker

__all__ = ["workers"]  # the fixture, imported for pytest


def crash_run(site: Site, workers, capsys, *, images: int, kills: int, seed: int) -> str:
    rng = random.Random(seed)
    staged = distinct_images(site.root / "staging", images, seed=seed)
    expected = {p.name: sha256_file(p) for p in staged}

    # The burst arrives in kills + 1 chunks of random sizes: one before each start (found by the start-up
    # scan) or a random moment after it (found by the watcher), the last one for the final run.
    cuts = sorted(rng.sample(range(1, images), kills))
    chunks = [staged[a:b] for a, b in zip([0, *cuts], [*cuts, images], strict=True)]
    start = time.monotonic()
    startup_kills = processing_kills = in_window = 0
    committed_at_kill = []
    procs = []
    for kill in range(kills):
        before = site.count()
        chunk = chunks[kill]
        early = rng.random() < 0.5
        if early:
            move_into(chunk, site.inbox)
        proc = workers(site)
        procs.append(proc)
        if not early:
            time.sleep(rng.uniform(0.0, 1.0))
            move_into(chunk, site.inbox)
        if rng.random() < 0.2:  # during start-up: imports, migrations, model load, first scan
            time.sleep(rng.uniform(0.0, 0.8))
            startup_kills += 1
        else:  # after a random share of the files waiting, plus up to 150 ms
            waiting = len(site.inbox_files())
            threshold = before + rng.randint(1, max(1, waiting * 3 // 4))
            wait_until(lambda t=threshold, p=proc: site.count() >= t or not p.alive(), 120, f"{threshold} rows")
            assert proc.alive(), proc.log
            time.sleep(rng.uniform(0.0, 0.15))
            processing_kills += 1
        proc.kill()
        assert proc.proc.returncode == -9
        # Rows committed whose file had not been moved yet: the crash window the next run must close.
        rows = site.query("SELECT file, location FROM results")
        committed_at_kill.append(len(rows))
        in_window += sum(1 for file, location in rows
                         if location == str(site.inbox / file) and (site.inbox / file).exists())
        assert "Traceback" not in proc.log, proc.log
    move_into(chunks[-1], site.inbox)

    final = workers(site).wait_ready()
    wait_until(lambda: site.count() >= images and not site.inbox_files(), 180, f"all {images} rows")
    time.sleep(0.5)  # a second row for anything would show up now
    assert final.stop() == 0, final.log
    elapsed = time.monotonic() - start
    # Rows whose file was moved but whose new place was not recorded, fixed at the next start (recovery.py).
    relocated = sum(int(n) for p in [*procs, final] for n in re.findall(r"recorded where (\d+) file", p.log))

    # Every image: exactly one row, ok, the right category, recorded where the file now is.
    rows = site.query("SELECT file, sha256, status, category, location, duplicate_of FROM results")
    by_file: dict[str, list[tuple]] = {}
    for row in rows:
        by_file.setdefault(row[0], []).append(row)
    doubled = sorted(f for f, r in by_file.items() if len(r) > 1)
    missing = sorted(set(expected) - set(by_file))
    wrong = [r for r in rows if (r[1], r[2], r[3], r[5]) != (expected.get(r[0]), "ok", color_of(r[0]), None)]
    stale = [r for r in rows if r[4] != str(site.processed / r[0])]
    processed = {p.name: sha256_file(p) for p in site.processed.iterdir()}
    integrity = site.integrity()
    line = report(
        capsys, f"crash safety ({images} images, {kills} kills, seed {seed})",
        images=images, kills=kills, kills_during_startup=startup_kills, kills_during_processing=processing_kills,
        rows_at_each_kill="/".join(map(str, committed_at_kill)), committed_but_unmoved_at_kill=in_window,
        moved_but_location_unrecorded_fixed_at_start=relocated,
        rows=len(rows), images_with_one_ok_row=sum(1 for r in by_file.values() if len(r) == 1 and r[0][2] == "ok"),
        doubled=len(doubled), missing=len(missing), wrong_rows=len(wrong), stale_locations=len(stale),
        left_in_inbox=len(site.inbox_files()), processed_files=len(processed),
        processed_sha256_match=processed == expected, failed_files=len(list(site.failed.iterdir())),
        integrity_check=integrity, seconds=round(elapsed, 1),
    )
    assert len(rows) == images and not doubled and not missing, line
    assert not wrong, f"{line}\nrows that do not match their file: {wrong[:5]}"
    assert not stale, f"{line}\nrows whose location is not where the file is: {stale[:5]}"
    assert not site.inbox_files(), line
    assert processed == expected, line  # same names, same bytes: nothing lost, renamed or overwritten
    assert not list(site.failed.iterdir()), line
    assert integrity == "ok", line
    return line


@pytest.mark.timeout(240)
def test_sigkill_at_random_moments_loses_and_doubles_nothing(tmp_path: Path, workers, capsys) -> None:
    crash_run(Site(tmp_path, settle_s=0.2), workers, capsys, images=300, kills=5, seed=5)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_soak_sigkill_2000_images_25_kills(tmp_path: Path, workers, capsys) -> None:
    crash_run(Site(tmp_path, settle_s=0.2), workers, capsys, images=2000, kills=25, seed=2000)


@pytest.mark.timeout(60)
def test_rows_left_naming_the_inbox_by_a_crash_after_the_move_are_fixed_at_start(tmp_path: Path) -> None:
    """The crash window the soak found: files moved, the worker killed before `set_locations`. The rows are
    put back in that state by hand (the real window is a few milliseconds wide), with the worker's row
    unstopped and its pid that of a process that has exited; the next start records where each file is."""
    site = Site(tmp_path)
    cfg = config_mod.load(site.root / "config.toml")
    (site.inbox / "a.jpg").write_bytes(image_bytes("red", 1))
    (site.inbox / "b.jpg").write_bytes(image_bytes("green", 2))
    (site.inbox / "bad.jpg").write_bytes(b"not an image")
    assert Worker(cfg).run(once=True) == 0
    (site.inbox / "a.jpg").write_bytes(image_bytes("blue", 3))  # the same name again, other bytes
    (site.inbox / "b.jpg").write_bytes(image_bytes("green", 2))  # the same name and bytes again
    assert Worker(cfg).run(once=True) == 0
    truth = dict(site.query("SELECT id, location FROM results"))
    assert sorted(Path(p).name for p in truth.values()) == ["a (1).jpg", "a.jpg", "b (1).jpg", "b.jpg", "bad.jpg"]

    dead = dead_pid()
    with sqlite3.connect(site.db) as conn:
        conn.execute("UPDATE results SET location = ? || '/' || file", (os.path.realpath(site.inbox),))
        conn.execute("UPDATE workers SET stopped_at = NULL, pid = ?", (dead,))
    assert Worker(cfg).run(once=True) == 0
    fixed = dict(site.query("SELECT id, location FROM results"))
    assert fixed == truth
    assert site.query("SELECT count(*) FROM workers WHERE stopped_at IS NULL") == [(0,)]
