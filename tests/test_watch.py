"""worker.watch: the real watchdog observer on real temp folders reports each complete file once."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import write_image

from worker.config import Config, load
from worker.exceptions import ConfigError
from worker.watch import InboxWatcher

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]


class Reports:
    """Collects on_ready calls (path and the file's size at that moment), thread-safely."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[tuple[Path, int, float]] = []
        self._lock = threading.Lock()
        self._fail = fail_first

    def __call__(self, path: Path) -> None:
        with self._lock:
            self.calls.append((path, path.stat().st_size, time.monotonic()))
            if self._fail:
                self._fail -= 1
                raise RuntimeError("the worker's queue blew up")

    def names(self, inbox: Path) -> list[str]:
        with self._lock:
            return [p.relative_to(inbox.resolve()).as_posix() for p, _, _ in self.calls]

    def count(self, inbox: Path, name: str) -> int:
        return self.names(inbox).count(name)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def make_config(inbox: Path, **overrides: object) -> Config:
    values: dict[str, object] = {
        "inbox.path": str(inbox), "inbox.settle_s": 0.3, "inbox.poll_interval_s": 0.1,
        "inbox.rescan_interval_s": 0.0, "files.processed_dir": str(inbox.parent / "processed"),
        "files.failed_dir": str(inbox.parent / "failed"),
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load(None, values)


@pytest.fixture
def watch(inbox: Path) -> Iterator[Callable[..., tuple[InboxWatcher, Reports]]]:
    started: list[InboxWatcher] = []

    def start(reports: Reports | None = None, **overrides: object) -> tuple[InboxWatcher, Reports]:
        reports = reports or Reports()
        watcher = InboxWatcher(make_config(inbox, **overrides), reports)
        watcher.start()
        started.append(watcher)
        return watcher, reports

    yield start
    for watcher in started:
        watcher.stop()


def sentinel(inbox: Path, reports: Reports, name: str = "zz-sentinel.jpg") -> None:
    """Write one more file and wait for it: events are delivered in order, so earlier ones were handled."""
    write_image(inbox / name, noise_seed=999)
    assert wait_for(lambda: reports.count(inbox, name) >= 1), f"{name} was never reported"


def settle_pause(seconds: float = 0.8) -> None:
    """Let any late (unwanted) report arrive before asserting there was none: > settle_s + a poll."""
    time.sleep(seconds)


def test_file_written_with_one_close_is_reported_once(inbox: Path, watch) -> None:
    watcher, reports = watch()
    assert watcher.mode == "inotify"
    path = write_image(inbox / "a.jpg", noise_seed=1)
    assert wait_for(lambda: reports.count(inbox, "a.jpg") == 1)
    settle_pause()
    assert reports.names(inbox) == ["a.jpg"]
    assert reports.calls[0][1] == path.stat().st_size


def test_slow_writer_is_reported_once_after_the_close(inbox: Path, watch) -> None:
    # Pauses between chunks (0.45 s) are longer than settle_s (0.3 s): only the close event tells.
    _, reports = watch()
    payload = os.urandom(200_000)
    path = inbox / "slow.jpg"
    with open(path, "wb") as handle:
        for start in range(0, len(payload), 40_000):
            handle.write(payload[start:start + 40_000])
            handle.flush()
            time.sleep(0.45)
            assert reports.calls == [], "reported while still being written"
        closed_at = time.monotonic()
    assert wait_for(lambda: reports.count(inbox, "slow.jpg") == 1)
    settle_pause()
    assert reports.names(inbox) == ["slow.jpg"]
    _, size, at = reports.calls[0]
    assert size == len(payload) and at >= closed_at


def test_writer_that_stalls_before_its_first_byte_is_not_reported_early(inbox: Path, watch) -> None:
    watcher, reports = watch()
    with open(inbox / "late.jpg", "wb") as handle:
        assert wait_for(lambda: watcher.pending == 1)  # seen, waiting (what `run --once` waits for)
        time.sleep(0.8)  # created, empty, longer than settle_s
        assert reports.calls == []
        assert watcher.pending == 1
        handle.write(b"x" * 5000)
    assert wait_for(lambda: reports.count(inbox, "late.jpg") == 1)
    assert watcher.pending == 0
    assert reports.calls[0][1] == 5000


def test_a_file_written_again_after_its_report_waits_for_its_next_close(inbox: Path, watch) -> None:
    # A photo overwritten in place right after its upload (open with truncation, half written, a pause
    # longer than settle_s): being written until closed, whatever settling and a rescan see meanwhile.
    watcher, reports = watch()
    path = write_image(inbox / "a.jpg", noise_seed=1)
    assert wait_for(lambda: reports.count(inbox, "a.jpg") == 1)
    payload = os.urandom(60_000)
    with open(path, "wb") as handle:
        handle.write(payload[:30_000])
        handle.flush()
        assert wait_for(lambda: watcher.being_written(path))
        time.sleep(0.8)  # > settle_s
        watcher.scan()
        assert reports.count(inbox, "a.jpg") == 1 and watcher.being_written(path) and watcher.pending == 1
        handle.write(payload[30_000:])
    assert wait_for(lambda: reports.count(inbox, "a.jpg") == 2)
    assert reports.calls[1][1] == 60_000 and not watcher.being_written(path)


def test_a_file_in_a_folder_renamed_while_it_is_written_waits_for_its_close(inbox: Path, watch) -> None:
    watcher, reports = watch()
    (inbox / "d1").mkdir()
    time.sleep(0.2)  # the new folder's watch
    with open(inbox / "d1/open.jpg", "wb") as handle:
        handle.write(b"x" * 5000)
        handle.flush()
        assert wait_for(lambda: watcher.being_written(inbox / "d1/open.jpg"))
        (inbox / "d1").rename(inbox / "d2")
        assert wait_for(lambda: watcher.being_written(inbox / "d2/open.jpg"))
        time.sleep(0.8)  # > settle_s
        assert reports.calls == []
        handle.write(b"y" * 5000)
    assert wait_for(lambda: reports.count(inbox, "d2/open.jpg") == 1)
    settle_pause()
    assert reports.names(inbox) == ["d2/open.jpg"] and reports.calls[0][1] == 10_000


def test_a_folder_moved_in_from_outside_leaves_files_settling_elsewhere_alone(inbox: Path, watch,
                                                                              tmp_path: Path) -> None:
    # Found by the hostile-inputs test: a folder moved in from outside the inbox comes with no source path,
    # and the candidates "below" it (every one) were dropped: files found by the start-up scan and
    # settling then waited for the next rescan.
    write_image(inbox / "settling.jpg", noise_seed=1)  # young mtime: the start-up scan lets it settle
    watcher, reports = watch()
    assert watcher.pending == 1
    outside = tmp_path / "outside-folder"
    outside.mkdir()
    write_image(outside / "in-folder.jpg", noise_seed=2)
    outside.rename(inbox / "moved-in")
    assert wait_for(lambda: sorted(reports.names(inbox)) == ["moved-in/in-folder.jpg", "settling.jpg"])


def test_after_lost_events_a_file_held_open_settles(inbox: Path, watch) -> None:
    # An inotify queue overflow may have dropped the close event: settling decides again.
    watcher, reports = watch()
    with open(inbox / "held.jpg", "wb") as handle:
        handle.write(b"x" * 5000)
        handle.flush()
        assert wait_for(lambda: watcher.being_written(inbox / "held.jpg"))
        watcher.events_lost()
        assert not watcher.being_written(inbox / "held.jpg")
        assert wait_for(lambda: reports.count(inbox, "held.jpg") == 1)


def test_a_write_never_closed_is_taken_as_complete_once_idle(inbox: Path, watch, monkeypatch, caplog) -> None:
    # truncate(2) by path makes a write event and no close (so does a close lost in an overflow): after
    # WRITER_IDLE_S unchanged (60 s; 0.5 s here) the file is reported all the same, not held for good.
    from worker import watch as watch_mod

    monkeypatch.setattr(watch_mod, "WRITER_IDLE_S", 0.5)
    watcher, reports = watch()
    path = write_image(inbox / "a.jpg", noise_seed=1)
    assert wait_for(lambda: reports.count(inbox, "a.jpg") == 1)
    with caplog.at_level(logging.INFO, logger="worker.watch"):
        os.truncate(path, 100)
        assert wait_for(lambda: watcher.being_written(path), 5)
        assert wait_for(lambda: reports.count(inbox, "a.jpg") == 2, 5)
    assert reports.calls[1][1] == 100 and not watcher.being_written(path)
    assert "written to but not closed, and unchanged for 0.5 s: taken as complete" in caplog.text


def test_being_written_also_tells_a_change_whose_events_have_not_arrived(inbox: Path, watch) -> None:
    # Given the file as just read, a change since its report less than settle_s old counts as being
    # written: its write events may still be on their way through watchdog's threads. Made certain here
    # by stopping the watcher before the change (no event can arrive).
    watcher, reports = watch()
    path = write_image(inbox / "a.jpg", noise_seed=1)
    assert wait_for(lambda: reports.count(inbox, "a.jpg") == 1)
    watcher.stop()
    assert not watcher.being_written(path, path.stat())  # as reported
    with open(path, "ab") as handle:
        handle.write(b"more")
    assert not watcher.being_written(path) and watcher.being_written(path, path.stat())
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))  # a change long ago (a touch, say): no writer to wait for
    assert not watcher.being_written(path, path.stat())
    in_an_hour = time.time() + 3600  # stamped by a clock ahead of ours (scp -p): no writer either
    os.utime(path, (in_an_hour, in_an_hour))
    assert not watcher.being_written(path, path.stat())


def test_copy_to_part_then_rename(inbox: Path, watch, tmp_path: Path) -> None:
    _, reports = watch()
    source = write_image(tmp_path / "src.jpg", noise_seed=2)
    shutil.copyfile(source, inbox / "x.part")
    time.sleep(0.5)  # longer than settle_s: an ignored name is never reported, however old
    assert reports.calls == []
    os.rename(inbox / "x.part", inbox / "x.jpg")
    assert wait_for(lambda: reports.count(inbox, "x.jpg") == 1)
    settle_pause()
    assert reports.names(inbox) == ["x.jpg"]


def test_rsync_style_temp_name_then_rename(inbox: Path, watch) -> None:
    _, reports = watch()
    write_image(inbox / "sub" / ".x.jpg.AbCd12", fmt="JPEG", noise_seed=3)
    time.sleep(0.5)
    assert reports.calls == []
    os.rename(inbox / "sub" / ".x.jpg.AbCd12", inbox / "sub" / "x.jpg")
    assert wait_for(lambda: reports.count(inbox, "sub/x.jpg") == 1)
    settle_pause()
    assert reports.names(inbox) == ["sub/x.jpg"]


def test_file_moved_in_from_outside(inbox: Path, watch, tmp_path: Path) -> None:
    _, reports = watch()
    source = write_image(tmp_path / "outside.jpg", noise_seed=4)
    os.rename(source, inbox / "moved in.jpg")
    assert wait_for(lambda: reports.count(inbox, "moved in.jpg") == 1)
    settle_pause()
    assert reports.names(inbox) == ["moved in.jpg"]


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_file_moved_out_and_back_is_reported_again(inbox: Path, watch, tmp_path: Path, polling: bool) -> None:
    """The same file (same inode, size and mtime) coming back, as an operator's `mv processed/a.jpg inbox/`
    does, is a new arrival: it used to be taken for the report already made (until the next rescan under
    inotify, for good when polling)."""
    _, reports = watch(inbox__polling=polling)
    path = write_image(inbox / "a.jpg", noise_seed=1)
    assert wait_for(lambda: reports.count(inbox, "a.jpg") == 1)
    os.rename(path, tmp_path / "a.jpg")
    sentinel(inbox, reports)  # the move out has been seen
    os.rename(tmp_path / "a.jpg", path)
    assert wait_for(lambda: reports.count(inbox, "a.jpg") == 2)
    settle_pause()
    assert reports.count(inbox, "a.jpg") == 2


def test_folder_of_images_moved_in_at_once(inbox: Path, watch, tmp_path: Path) -> None:
    _, reports = watch()
    folder = tmp_path / "batch"
    names = [f"img{i:02d}.jpg" for i in range(12)] + ["deeper/x.png"]
    for i, name in enumerate(names):
        write_image(folder / name, noise_seed=10 + i, fmt="PNG" if name.endswith("png") else None)
    (folder / ".DS_Store").write_bytes(b"junk")
    os.rename(folder, inbox / "batch")
    expected = sorted(f"batch/{name}" for name in names)
    assert wait_for(lambda: sorted(set(reports.names(inbox))) == expected)
    settle_pause()
    assert sorted(reports.names(inbox)) == expected  # each once


def test_ignored_names_are_never_reported(inbox: Path, watch) -> None:
    _, reports = watch()
    for name in (".hidden.jpg", "a.tmp", "b.jpg.part", "c.crdownload", "d.filepart", "~e.jpg",
                 ".sync/f.jpg", "sub/.cache/g.jpg"):
        write_image(inbox / name, fmt="JPEG", noise_seed=5)
    settle_pause()
    sentinel(inbox, reports)
    assert reports.names(inbox) == ["zz-sentinel.jpg"]


def test_odd_names_are_reported(inbox: Path, watch) -> None:
    _, reports = watch()
    names = ["with space.jpg", "new\nline.jpg", "ünïcødé 画像.jpg", "it's \"quoted\"; --.jpg"]
    for i, name in enumerate(names):
        write_image(inbox / name, fmt="JPEG", noise_seed=i)
    assert wait_for(lambda: sorted(reports.names(inbox)) == sorted(names))


def test_files_present_before_start_are_reported_by_the_initial_scan(inbox: Path, watch) -> None:
    old = write_image(inbox / "old.jpg", noise_seed=6)
    write_image(inbox / "sub" / "old2.jpg", noise_seed=7)
    past = time.time() - 3600  # older than MTIME_TRUSTED_AGE_S: reported at once
    for path in (old, inbox / "sub" / "old2.jpg"):
        os.utime(path, (past, past))
    write_image(inbox / "young.jpg", noise_seed=8)  # written just now: re-checked after settle_s
    write_image(inbox / ".ignored.jpg", noise_seed=9)
    _, reports = watch()
    assert sorted(reports.names(inbox)) == ["old.jpg", "sub/old2.jpg"]  # reported during start()
    assert wait_for(lambda: reports.count(inbox, "young.jpg") == 1)
    settle_pause()
    assert sorted(reports.names(inbox)) == ["old.jpg", "sub/old2.jpg", "young.jpg"]


def test_an_upload_stamped_by_a_clock_behind_ours_is_not_reported_while_written(inbox: Path) -> None:
    # The inbox on a file server whose clock is 5 s behind this host's: a file still being uploaded has an
    # mtime that looks 5 s old, older than settle_s. A scan (at start-up, a rescan) used to report it at
    # once, and the worker read it half-written. The skewed clock is made by stamping each write's mtime
    # 5 s back (os.utime), the way that server would; the writes and the scans are real.
    config = make_config(inbox)
    reports = Reports()
    watcher = InboxWatcher(config, reports)
    path = inbox / "upload.jpg"
    payload = write_image(inbox.parent / "upload-source.jpg", noise_seed=3).read_bytes()
    with open(path, "wb") as handle:
        for offset in range(0, len(payload), len(payload) // 8 + 1):
            handle.write(payload[offset:offset + len(payload) // 8 + 1])
            handle.flush()
            skewed = time.time() - 5
            os.utime(path, (skewed, skewed))
            watcher.scan()  # as a rescan would, while the upload goes on
            assert reports.calls == [], "reported while still being written"
            time.sleep(config.inbox.settle_s / 2)
    assert watcher.scan() == 0  # done now, but not seen unchanged for settle_s yet
    deadline = time.monotonic() + 10
    while not reports.calls:  # the timer thread is not running here: check the candidates by hand
        watcher._check_candidates()
        assert time.monotonic() < deadline, "never reported"
        time.sleep(0.05)
    assert [(Path(c[0]).name, c[1]) for c in reports.calls] == [("upload.jpg", len(payload))]


def test_scan_returns_the_count(inbox: Path) -> None:
    for i in range(3):
        path = write_image(inbox / f"{i}.jpg", noise_seed=i)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    reports = Reports()
    watcher = InboxWatcher(make_config(inbox), reports)
    assert watcher.scan() == 3  # works without start() too
    assert sorted(reports.names(inbox)) == ["0.jpg", "1.jpg", "2.jpg"]


@pytest.mark.parametrize("recursive", [True, False])
def test_recursive_on_and_off(inbox: Path, watch, recursive: bool) -> None:
    old = write_image(inbox / "sub" / "before.jpg", noise_seed=1)
    os.utime(old, (time.time() - 60, time.time() - 60))
    _, reports = watch(inbox__recursive=recursive)
    write_image(inbox / "sub" / "deep" / "after.jpg", noise_seed=2)
    settle_pause()
    sentinel(inbox, reports)
    expected = ["sub/before.jpg", "sub/deep/after.jpg", "zz-sentinel.jpg"] if recursive else ["zz-sentinel.jpg"]
    assert sorted(reports.names(inbox)) == expected


def test_processed_and_failed_inside_the_inbox_are_excluded(inbox: Path, watch) -> None:
    old = write_image(inbox / "processed" / "done.jpg", noise_seed=1)
    os.utime(old, (time.time() - 60, time.time() - 60))
    watcher, reports = watch(files__processed_dir=str(inbox / "processed"),
                             files__failed_dir=str(inbox / "failed"))
    assert sorted(watcher.excluded) == [inbox.resolve() / "failed", inbox.resolve() / "processed"]
    write_image(inbox / "processed" / "sub" / "new.jpg", noise_seed=2)
    write_image(inbox / "failed" / "bad.jpg", noise_seed=3)
    os.rename(inbox / "failed" / "bad.jpg", inbox / "failed" / "bad2.jpg")
    settle_pause()
    sentinel(inbox, reports)
    assert reports.names(inbox) == ["zz-sentinel.jpg"]
    # A file an operator moves back out of processed/ into the inbox is new work.
    os.rename(inbox / "processed" / "done.jpg", inbox / "again.jpg")
    assert wait_for(lambda: reports.count(inbox, "again.jpg") == 1)


def test_processed_dir_equal_to_inbox_is_a_config_error(inbox: Path) -> None:
    with pytest.raises(ConfigError, match=r"files\.processed_dir must not be the inbox itself"):
        InboxWatcher(make_config(inbox, files__processed_dir=str(inbox)), Reports())


def test_missing_inbox_is_a_config_error(tmp_path: Path) -> None:
    watcher = InboxWatcher(make_config(tmp_path / "nope"), Reports())
    with pytest.raises(ConfigError, match="does not exist"):
        watcher.start()


def test_polling_mode_waits_for_size_and_mtime_to_settle(inbox: Path, watch) -> None:
    # Chunks every 0.15 s, settle 0.6 s: reported once, after the last chunk, with the full size.
    watcher, reports = watch(inbox__polling=True, inbox__settle_s=0.6)
    assert watcher.mode == "polling"
    payload = os.urandom(100_000)
    path = inbox / "polled.jpg"
    with open(path, "wb") as handle:
        for start in range(0, len(payload), 10_000):
            handle.write(payload[start:start + 10_000])
            handle.flush()
            time.sleep(0.15)
        last_write = time.monotonic()
    assert reports.calls == []
    assert wait_for(lambda: reports.count(inbox, "polled.jpg") == 1)
    _, size, at = reports.calls[0]
    assert size == len(payload) and at - last_write >= 0.3
    os.rename(path, inbox / "renamed.jpg")  # a rename is final in polling mode too
    write_image(inbox / "x.part", fmt="JPEG", noise_seed=1)
    assert wait_for(lambda: reports.count(inbox, "renamed.jpg") == 1)
    settle_pause(1.2)
    assert sorted(reports.names(inbox)) == ["polled.jpg", "renamed.jpg"]


def test_polling_mode_folder_moved_in(inbox: Path, watch, tmp_path: Path) -> None:
    _, reports = watch(inbox__polling=True)
    for i in range(5):
        write_image(tmp_path / "batch" / f"{i}.jpg", noise_seed=i)
    os.rename(tmp_path / "batch", inbox / "batch")
    expected = [f"batch/{i}.jpg" for i in range(5)]
    assert wait_for(lambda: sorted(set(reports.names(inbox))) == expected)
    settle_pause()
    assert sorted(reports.names(inbox)) == expected


def test_a_handler_that_raises_does_not_stop_later_events(inbox: Path, watch, caplog) -> None:
    _, reports = watch(Reports(fail_first=1))
    with caplog.at_level(logging.ERROR, logger="worker.watch"):
        write_image(inbox / "first.jpg", noise_seed=1)
        assert wait_for(lambda: reports.count(inbox, "first.jpg") == 1)
        write_image(inbox / "second.jpg", noise_seed=2)
        assert wait_for(lambda: reports.count(inbox, "second.jpg") == 1)
    failure = [r for r in caplog.records if "on_ready failed" in r.getMessage()]
    assert failure and failure[0].exc_info is not None  # logged with its traceback


def test_an_error_inside_event_handling_is_logged_and_delivery_goes_on(inbox: Path, watch, caplog,
                                                                       monkeypatch) -> None:
    _, reports = watch()
    # An unexpected failure inside the watcher's own event code (here: the ignore matcher on one name).
    # Patched, because a bug cannot be written into the real code on purpose; the rest is real.
    import worker.watch as watch_module
    real = watch_module.is_ignored

    def flaky(name: str, patterns: list[str]) -> bool:
        if "boom" in name:
            raise ValueError("unexpected")
        return real(name, patterns)

    monkeypatch.setattr(watch_module, "is_ignored", flaky)
    with caplog.at_level(logging.ERROR, logger="worker.watch"):
        write_image(inbox / "boom.jpg", noise_seed=1)
        sentinel(inbox, reports)
    assert any("event delivery goes on" in r.getMessage() and r.exc_info for r in caplog.records)


def test_hard_link_made_into_the_inbox_is_reported_after_settle(inbox: Path, watch, tmp_path: Path) -> None:
    # link() creates the name with content already there and no write/close: settle decides.
    _, reports = watch()
    source = write_image(tmp_path / "src.jpg", noise_seed=1)
    linked_at = time.monotonic()
    os.link(source, inbox / "linked.jpg")
    os.unlink(source)
    assert wait_for(lambda: reports.count(inbox, "linked.jpg") == 1)
    reported_at = next(at for path, _, at in reports.calls if path.name == "linked.jpg")
    assert reported_at - linked_at >= 0.25  # settle_s (0.3) after the content was written, just before
    settle_pause()
    assert reports.count(inbox, "linked.jpg") == 1  # and once


def test_symlinks_and_fifos_are_skipped_and_logged_once(inbox: Path, watch, caplog) -> None:
    (inbox / "passwd.jpg").symlink_to("/etc/passwd")
    with caplog.at_level(logging.WARNING, logger="worker.watch"):
        watcher, reports = watch()
        os.mkfifo(inbox / "pipe.jpg")
        (inbox / "photo.jpg").mkdir()  # a folder named like an image: walked, never reported
        settle_pause()
        watcher.scan()
        sentinel(inbox, reports)
    assert reports.names(inbox) == ["zz-sentinel.jpg"]
    skips = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert sum("passwd.jpg" in m and "symlink" in m for m in skips) == 1
    assert sum("pipe.jpg" in m and "FIFO" in m for m in skips) == 1


def test_rescan_catches_files_the_observer_missed(inbox: Path, watch) -> None:
    watcher, reports = watch(inbox__rescan_interval_s=0.5)
    observer = watcher._observer
    assert observer is not None
    observer.stop()  # simulates lost events: an observer that died (or a watch limit hit in a subfolder)
    observer.join()
    write_image(inbox / "missed.jpg", noise_seed=1)
    assert wait_for(lambda: reports.count(inbox, "missed.jpg") >= 1)
    # The timer thread noticed the dead observer and restarted it: close events flow again.
    assert wait_for(lambda: watcher._observer is not observer and watcher._observer_alive())


def test_overflow_warning_from_watchdog_triggers_a_rescan(inbox: Path, watch) -> None:
    # A real inotify queue overflow cannot be provoked reliably (watchdog drains the kernel queue in its own
    # thread), so the kernel's IN_Q_OVERFLOW event itself is handed to watchdog's real inotify reader, the
    # one the observer runs on: its own handling logs the overflow, the one signal the watcher can see. A
    # watchdog that words it differently, or stops logging it, fails here.
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD

    _, reports = watch()
    old = write_image(inbox / "lost.jpg", noise_seed=1)
    assert wait_for(lambda: reports.count(inbox, "lost.jpg") == 1)
    os.utime(old, (time.time() - 60, time.time() - 60))
    InotifyFD.get_instance().handle_event(
        InotifyEvent(wd=-1, mask=InotifyConstants.IN_Q_OVERFLOW, cookie=0, name=b""))
    assert wait_for(lambda: reports.count(inbox, "lost.jpg") == 2)


def test_stop_is_idempotent_and_stops_reporting(inbox: Path) -> None:
    reports = Reports()
    watcher = InboxWatcher(make_config(inbox), reports)
    watcher.start()
    watcher.stop()
    watcher.stop()
    write_image(inbox / "after-stop.jpg")
    settle_pause()
    assert reports.calls == []
    assert not any(t.name == "inbox-timer" and t.is_alive() for t in threading.enumerate())


def test_fallback_to_polling_when_inotify_start_fails(inbox: Path, watch, caplog, monkeypatch) -> None:
    # Injected: provoking the per-user inotify limit for real would starve every other process of this user
    # (test_fallback_for_real_in_a_user_namespace does it in an isolated namespace where it can).
    import errno

    from watchdog.observers.inotify import InotifyObserver

    def refuse(self) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(InotifyObserver, "start", refuse)
    with caplog.at_level(logging.WARNING, logger="worker.watch"):
        watcher, reports = watch()
    assert watcher.mode == "polling"
    lines = [r.getMessage() for r in caplog.records if "falling back to polling" in r.getMessage()]
    assert len(lines) == 1 and "watch limit" in lines[0] and "max_user_watches" in lines[0]
    write_image(inbox / "a.jpg")
    assert wait_for(lambda: reports.count(inbox, "a.jpg") == 1)


FALLBACK_SCRIPT = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    from worker.config import load
    from worker.watch import InboxWatcher
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
    inbox = Path(sys.argv[1])
    seen = []
    watcher = InboxWatcher(load(None, {"inbox.path": str(inbox), "inbox.settle_s": 0.2,
                                       "inbox.poll_interval_s": 0.1, "inbox.rescan_interval_s": 0.0}),
                           seen.append)
    watcher.start()
    print("MODE", watcher.mode, flush=True)
    (inbox / "a.jpg").write_bytes(b"x" * 100)
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher.stop()
    print("SEEN", [p.name for p in seen], flush=True)
""")


@pytest.mark.parametrize(("limit", "reason"), [("max_inotify_instances", "instance limit"),
                                                ("max_inotify_watches", "watch limit")])
def test_fallback_for_real_in_a_user_namespace(inbox: Path, limit: str, reason: str) -> None:
    """Real EMFILE/ENOSPC from the kernel: inotify limits are per user namespace, so a fresh one with its
    limit set to 0 makes inotify fail for that process only."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed")
    probe = subprocess.run([unshare, "--user", "--map-root-user", "sh", "-c", f"echo 0 > /proc/sys/user/{limit}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a user namespace with its own inotify limits: {probe.stderr.strip()}")
    command = f'echo 0 > /proc/sys/user/{limit} && exec "$0" -c "$1" "$2"'
    result = subprocess.run([unshare, "--user", "--map-root-user", "sh", "-c", command, sys.executable,
                             FALLBACK_SCRIPT, str(inbox)], capture_output=True, text=True, timeout=30,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "falling back to polling" in line]
    assert len(warnings) == 1 and reason in warnings[0], result.stdout
    assert "MODE polling" in result.stdout
    assert "SEEN ['a.jpg']" in result.stdout
