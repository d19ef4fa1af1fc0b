"""Reliability 4: slow and odd writers. Files are written the ways uploaders write them, all at the same
time, while the worker runs: several writers in chunks over seconds (fsync'ed, with pauses longer than
the settle time), copy to a temp name then rename, rsync's `.name.XXXXXX` temp names, SFTP `.filepart`,
browser `.crdownload`, `cp` of a large file, and folders moved in at once. No file may be read
half-written: each row's sha256 equals the sha256 of the final file, each file is classified once, and
no temp name ever gets a row. Run under inotify and under polling (the NFS/SMB mode, size+mtime settle).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from workerproc import Site, color_of, image_bytes, report, sha256_bytes, wait_until, workers

__all__ = ["workers"]


def chunked(path: Path, data: bytes, chunks: int, pause_s: float, seen_early: list[str], site: Site) -> None:
    """Write `data` in `chunks` pieces with fsync and a pause after each, checking no row appears early."""
    size = len(data) // chunks + 1
    with path.open("wb") as handle:
        for start in range(0, len(data), size):
            handle.write(data[start:start + size])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(pause_s)
            if site.count(f"file = '{path.name}'"):
                seen_early.append(path.name)


def write_all(site: Site, staging: Path, *, pause_s: float, rng: random.Random) -> tuple[dict[str, str], list[str]]:
    """Start every kind of writer at once; return ({final relative name: sha256}, names read early)."""
    inbox = site.inbox
    expected: dict[str, str] = {}
    seen_early: list[str] = []
    jobs: list[Callable[[], None]] = []

    def image(name: str, seed: int, size: tuple[int, int] = (400, 300)) -> bytes:
        data = image_bytes(color_of(name) or "red", seed, size)
        expected[name] = sha256_bytes(data)
        return data

    # Chunked writers, several at once: 8 chunks, pauses longer than settle_s between them.
    for i in range(4):
        name = f"slow-{i}-{['red', 'green', 'blue'][i % 3]}.jpg"
        data = image(name, 100 + i, (800, 600))
        jobs.append(lambda n=name, d=data: chunked(inbox / n, d, 8, pause_s, seen_early, site))

    # Copy to a temp name, then rename (upload servers, `cp x y.tmp && mv`).
    def copy_then_rename(name: str, temp: str, data: bytes, slow: bool) -> None:
        if slow:
            chunked(inbox / temp, data, 5, pause_s / 2, seen_early, site)
        else:
            (staging / name).write_bytes(data)
            shutil.copyfile(staging / name, inbox / temp)
        time.sleep(rng.uniform(0, 0.3))
        os.rename(inbox / temp, inbox / name)

    kinds = [("copied-{}-{}.jpg", "copied-{}-{}.jpg.tmp", False),
             ("rsync-{}-{}.jpg", ".rsync-{}-{}.jpg.a1B2c3", True),
             ("sftp-{}-{}.jpg", "sftp-{}-{}.jpg.filepart", True),
             ("browser-{}-{}.jpg", "browser-{}-{}.jpg.crdownload", True),
             ("part-{}-{}.jpg", "part-{}-{}.jpg.part", False)]
    for k, (final, temp, slow) in enumerate(kinds):
        for i in range(2):
            color = ["red", "green", "blue"][(k + i) % 3]
            name, temp_name = final.format(i, color), temp.format(i, color)
            data = image(name, 200 + 10 * k + i)
            jobs.append(lambda n=name, t=temp_name, d=data, s=slow: copy_then_rename(n, t, d, s))

    # `cp` of a large file (the real command: one open, many writes, one close).
    big = "big-cp-blue.jpg"
    big_data = image(big, 300, (3000, 2000))
    (staging / big).write_bytes(big_data)
    jobs.append(lambda: subprocess.run(["cp", str(staging / big), str(inbox / big)], check=True))

    # Folders of images moved in at once, one of them nested.
    def folder_moved_in(folder: str, count: int, seed: int) -> None:
        album = staging / folder
        for i in range(count):
            rel = f"{folder}/{'sub/' if i % 4 == 0 else ''}{i}-{['red', 'green', 'blue'][i % 3]}.png"
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            data = image_bytes(color_of(rel) or "red", seed + i, fmt="PNG")
            expected[rel] = sha256_bytes(data)
            target.write_bytes(data)
        time.sleep(rng.uniform(0, 0.5))
        os.rename(album, inbox / folder)

    jobs.append(lambda: folder_moved_in("album-a", 12, 400))
    jobs.append(lambda: folder_moved_in("album b", 8, 500))

    failures: list[str] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as exc:  # a writer that failed would drop its files from `expected` unnoticed
            failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures and not any(t.is_alive() for t in threads), failures
    return expected, seen_early


def check_writers(tmp_path: Path, workers, capsys, *args: str, settle_s: float, pause_s: float) -> None:
    site = Site(tmp_path / "site", settle_s=settle_s, poll_interval_s=0.2)
    staging = tmp_path / "staging"
    staging.mkdir()
    worker = workers(site, *args).wait_ready()
    started = time.monotonic()
    expected, seen_early = write_all(site, staging, pause_s=pause_s, rng=random.Random(4))
    wait_until(lambda: site.count() >= len(expected) and not site.inbox_files(), 60, f"{len(expected)} rows")
    time.sleep(max(1.0, 2 * settle_s))  # a late second row, or a row for a temp name, would show up now
    seconds = time.monotonic() - started
    assert worker.stop() == 0, worker.log
    rows = site.query("SELECT file, sha256, status, category FROM results")
    by_file = {r[0]: r for r in rows}
    half_read = [r[0] for r in rows if r[0] in expected and r[1] != expected[r[0]]]
    not_ok = [r for r in rows if r[2] != "ok" or r[3] != color_of(r[0])]
    unexpected = sorted(set(by_file) - set(expected))
    processed = {p.relative_to(site.processed).as_posix(): sha256_bytes(p.read_bytes())
                 for p in site.processed.rglob("*") if p.is_file()}
    mode = "polling" if "--polling" in args else "inotify"
    line = report(capsys, f"slow and odd writers ({mode})", files=len(expected), rows=len(rows),
                  distinct_files=len(by_file), read_half_written=len(half_read) + len(seen_early),
                  not_ok_or_wrong_category=len(not_ok), rows_for_temp_or_unknown_names=len(unexpected),
                  chunk_pause_s=pause_s, settle_s=settle_s, processed_match=processed == expected,
                  left_in_inbox=len(site.inbox_files()), seconds=round(seconds, 1))
    assert not seen_early, f"{line}\nrows appeared while these were still being written: {seen_early}"
    assert not half_read and not not_ok and not unexpected, f"{line}\n{half_read} {not_ok} {unexpected}"
    assert len(rows) == len(by_file) == len(expected), line
    assert processed == expected and not site.inbox_files(), line
    assert "Traceback" not in worker.log, worker.log


@pytest.mark.timeout(120)
def test_slow_and_odd_writers_under_inotify(tmp_path: Path, workers, capsys) -> None:
    # Pauses of 0.5 s between chunks, longer than settle_s: only the close event may make a file ready.
    check_writers(tmp_path, workers, capsys, settle_s=0.3, pause_s=0.5)


@pytest.mark.timeout(120)
def test_slow_and_odd_writers_under_polling(tmp_path: Path, workers, capsys) -> None:
    # Polling has no close events: a file is ready once unchanged for settle_s, so pauses must be shorter.
    check_writers(tmp_path, workers, capsys, "--polling", settle_s=1.5, pause_s=0.4)


@pytest.mark.timeout(120)
def test_writers_that_hold_a_file_open_past_the_settle_time(tmp_path: Path, workers, capsys) -> None:
    """Writers that pause with the file open for longer than settle_s, where the first close or a rescan
    used to make the worker read what was there: (1) a photo overwritten in place right after its upload
    (open with truncation, half written, a pause, the rest); (2) a file created, half written and held
    open across several rescans (rescan_interval_s = 0.5). A stalled upload was recorded `failed`
    (empty or truncated) and moved, and the rest of its bytes went after it into failed/: the photo never
    got a row. Now each finished photo gets exactly one `ok` row of its full bytes, and nothing partial is
    recorded or moved anywhere."""
    settle_s, pause_s = 0.3, 1.5
    site = Site(tmp_path / "site", settle_s=settle_s, rescan_interval_s=0.5)
    worker = workers(site).wait_ready()
    first, second, held = (image_bytes(color, seed, (400, 300)) for color, seed in
                           (("red", 1), ("green", 2), ("blue", 3)))

    def pause_with_open(handle, data: bytes) -> None:
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(pause_s)
        handle.write(data[len(data) // 2:])

    (site.inbox / "over.jpg").write_bytes(first)  # the upload, closed: reported at once
    with (site.inbox / "over.jpg").open("wb") as handle:  # overwritten in place by the next upload
        pause_with_open(handle, second)
    with (site.inbox / "held-blue.jpg").open("wb") as handle:
        pause_with_open(handle, held)
    wait_until(lambda: not site.inbox_files() and site.count(f"sha256 = '{sha256_bytes(held)}'"), 30,
               "both photos recorded")
    time.sleep(1.0)  # a late row would show up now
    assert worker.stop() == 0, worker.log
    rows = site.query("SELECT file, sha256, status, location FROM results ORDER BY id")
    shas = {sha256_bytes(data): name for name, data in (("first", first), ("second", second), ("held", held))}
    stored = {p.relative_to(site.root).as_posix(): sha256_bytes(p.read_bytes())
              for folder in (site.processed, site.failed) if folder.exists() for p in folder.rglob("*") if p.is_file()}
    line = report(capsys, "writers holding a file open past settle_s", rows=len(rows), settle_s=settle_s,
                  pause_s=pause_s, rows_of=[shas.get(r[1], "partial") for r in rows],
                  failed_rows=sum(r[2] != "ok" for r in rows), stored=sorted(stored))
    assert all(r[1] in shas and r[2] == "ok" for r in rows), line  # nothing partial was recorded
    assert [r[1] for r in rows].count(sha256_bytes(second)) == 1, line
    assert [r[1] for r in rows].count(sha256_bytes(held)) == 1, line
    # The first upload has a row only if it was read before the overwrite (its file is then gone).
    assert [r[3] for r in rows if r[1] == sha256_bytes(first)] in ([], [""]), line
    assert stored == {"processed/over.jpg": sha256_bytes(second), "processed/held-blue.jpg": sha256_bytes(held)}, line
    assert "Traceback" not in worker.log, worker.log
