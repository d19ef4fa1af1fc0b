"""Watch the inbox and report each file once it is complete.

A file is ready (``on_ready(path)`` is called) when:

- inotify: its close-after-write event arrived (IN_CLOSE_WRITE, watchdog's FileClosedEvent). A file
  written to again after it was reported (rewritten in place, truncated, appended to) is being written
  until its next close: `being_written(path)` says so, and the worker sets aside what it read of it
  meanwhile. Neither settling nor a rescan reports it before that close, unless it stays unchanged for
  WRITER_IDLE_S (its close event was lost, or its writer hangs) or a scan finds its mtime older than
  MTIME_TRUSTED_AGE_S; after an inotify queue overflow, close events may have been lost, and settling
  decides again;
- it was renamed or moved into the inbox under a name that is not ignored (a temp name renamed to a final
  name counts; a folder moved in is scanned and all its files reported);
- polling (``inbox.polling``, or inotify could not start): its size and mtime stayed unchanged for
  ``inbox.settle_s``. Close events do not exist there, so created and modified files are tracked as
  candidates and checked by a timer thread;
- inotify, a created entry with content that nobody wrote to through a descriptor (a hard link made into
  the inbox, a file in a folder created before its watch existed): also settle;
- a scan (at start, and every ``inbox.rescan_interval_s``) finds it with an mtime older than ``settle_s``;
  younger files found by a scan are re-checked after ``settle_s``.

Ignored names (``inbox.ignore``: temp and hidden names, any ignored folder on the way) are never reported;
nor is anything below the processed/failed folders when they are inside the inbox, nor anything that is
not a regular file (symlinks, FIFOs, sockets, devices: logged once and left alone). Nothing is followed
through a symlink.

``on_ready`` is called from the observer thread, the timer thread or the caller of ``scan()``, possibly
concurrently; it should be quick (put the path on a queue). Duplicate reports are rare but possible (the
periodic rescan reports everything still in the inbox): the worker de-duplicates by path in flight and by
content in the database. Every handler and timer step is wrapped: an exception is logged with its
traceback and never stops event delivery. Idle means idle: the timer thread sleeps until the next due
check, and a stopped observer thread is restarted (followed by a rescan) on the next timer wake.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from worker.config import Config
from worker.disposition import prune_empty_dirs
from worker.exceptions import ConfigError
from worker.files import describe_entry, file_signature, is_ignored

log = logging.getLogger(__name__)

INOTIFY_HINT = (
    "raise the limits, e.g. `sysctl -w fs.inotify.max_user_watches=524288 "
    "fs.inotify.max_user_instances=1024` (persist in /etc/sysctl.d/)"
)
SUPERVISE_INTERVAL_S = 60.0  # how often the timer thread checks that the observer thread is alive
RECENT_TTL_MIN_S = 10.0  # a report is not repeated for the same file (same inode, size, mtime) this long
EMPTY_DIR_PRUNE_AGE_S = 60.0  # periodic rescans remove inbox subfolders empty and unchanged this long
MIN_RECHECK_S = 0.05  # shortest delay between two checks of one candidate
#: inotify: a file written to and not closed, unchanged this long (or settle_s, if longer), is taken as
#: complete after all: its close event was lost (a queue overflow, an observer restart), it was changed
#: without a descriptor (truncate(2) by path), or its writer hangs. Before, such a file was read after
#: settle_s; a writer pausing longer than this with the file open is still read half-written.
WRITER_IDLE_S = 60.0
#: A scan reports a file at once only when its mtime is older than this; a younger one is reported once
#: seen unchanged for settle_s by this host's own clock. The mtime comes from the file server's clock: one
#: behind this host's by more than settle_s made files still being uploaded look settled (read half-written,
#: recorded as failed). Only a skew beyond this allowance (a host without NTP) can do that now.
MTIME_TRUSTED_AGE_S = 600.0
SKIP_MEMORY = 10_000  # how many skipped entries are remembered so each is logged once
# watchdog holds an unmatched IN_MOVED_FROM for 0.5 s to pair it with an IN_MOVED_TO, and every event queued
# behind it waits too. Each file the worker moves out of the inbox is such an event, so under a steady
# trickle of drops every close event would wait up to 0.5 s. The kernel queues the two halves of a rename
# back to back; 50 ms is ample to pair them (and an unpaired move-in is still caught by the settle check).
MOVE_PAIRING_DELAY_S = 0.05
# The events _on_event acts on. Passing them to watchdog narrows the inotify mask: without it, every open
# and read-only close reaches three watchdog threads and our handler, and the worker's own read of each
# file makes two such events (measured: the watchdog threads took a fifth of the worker's CPU in a burst).
HANDLED_EVENTS = (FileClosedEvent, FileMovedEvent, FileCreatedEvent, FileModifiedEvent, FileDeletedEvent,
                  DirMovedEvent, DirCreatedEvent, DirDeletedEvent)


@dataclass
class _Candidate:
    signature: tuple[int, int, int]  # inode, size, mtime_ns
    stable_since: float  # monotonic time the signature was first seen unchanged
    check_at: float  # monotonic time of the next check; inf = wait for the close event
    written: bool  # inotify: someone opened it for writing, its close event will come
    scanned: bool = False  # found by a scan, not by an event: no close event is to be waited for


class _Handler(FileSystemEventHandler):
    """Forwards every event to the watcher, logging (never raising) whatever goes wrong."""

    def __init__(self, watcher: InboxWatcher) -> None:
        self._watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(event)
        except Exception:
            log.exception("error while handling %r; event delivery goes on", event)


class _OverflowHook(logging.Handler):
    """Asks for a rescan when watchdog reports an inotify queue overflow (events were lost).

    watchdog handles IN_Q_OVERFLOW internally and only logs it; its log record is the one public signal.
    The periodic rescan remains the backstop if a future watchdog words it differently.
    """

    def __init__(self, watcher: InboxWatcher) -> None:
        super().__init__(logging.WARNING)
        self._watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            if "overflow" in str(record.msg).lower():
                log.warning("inotify events were lost (queue overflow); rescanning %s", self._watcher.inbox)
                self._watcher.events_lost()


WATCHDOG_INOTIFY_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


def _drop_stop_race(record: logging.LogRecord) -> bool:
    """Filters out the ERROR watchdog (7.1) logs when its emitter thread, between two reads, finds the
    inotify watch already closed by `stop()`: a harmless race at every stop, not an error of the inbox."""
    return "called when the thread is inactive" not in str(record.msg)


class InboxWatcher:
    """Watches `config.inbox_path` and calls `on_ready(path)` for each complete file (see module docs)."""

    def __init__(self, config: Config, on_ready: Callable[[Path], None]) -> None:
        self.config = config
        self._on_ready = on_ready
        self.inbox = Path(os.path.realpath(config.inbox_path))
        self._root = str(self.inbox)
        self._patterns = list(config.inbox.ignore)
        self._recursive = config.inbox.recursive
        self._settle = config.inbox.settle_s
        self._rescan_interval = config.inbox.rescan_interval_s
        self._excluded = self._exclusions()
        self._recent_ttl = max(RECENT_TTL_MIN_S, 5 * self._settle)
        self._recheck = max(self._settle, MIN_RECHECK_S)  # never re-check in a tight loop, even at settle 0
        self._writer_idle = max(WRITER_IDLE_S, self._settle)

        self._cond = threading.Condition()
        self._candidates: dict[str, _Candidate] = {}
        self._recent: dict[str, tuple[tuple[int, int, int], float]] = {}
        self._recent_pruned = time.monotonic()
        self._skipped: dict[tuple[str, int], None] = {}
        self._stopping = False
        self._rescan_now = False
        self._next_rescan = float("inf")
        self._next_supervise = float("inf")
        self._observer: BaseObserver | None = None
        self._mode: str | None = None
        self._thread: threading.Thread | None = None
        self._overflow_hook = _OverflowHook(self)

    # Public API ------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """Where the observer runs: "inotify" or "polling" (before start: the configured mode)."""
        if self._mode is not None:
            return self._mode
        return "polling" if self.config.inbox.polling else "inotify"

    @property
    def pending(self) -> int:
        """Files seen but not reported yet: being written (waiting for their close) or settling."""
        with self._cond:
            return len(self._candidates)

    def being_written(self, path: Path | str, st: os.stat_result | None = None) -> bool:
        """inotify: `path` was written to since its last close, so a writer still has it open: it is not
        complete, whatever its size or age, and its close event reports it. Always False when polling.

        `st`, the file as just read: also True when it differs from what was reported and changed less than
        settle_s ago. Its write events may still be on their way through the observer's threads (a
        photo overwritten in place right after its upload is read before they arrive)."""
        with self._cond:
            candidate = self._candidates.get(os.fspath(path))
            if candidate is not None and self._writing(candidate, time.monotonic()):
                return True
            recent = self._recent.get(os.fspath(path))
        if st is None or recent is None or self._mode != "inotify":
            return False
        if time.monotonic() - recent[1] >= self._recent_ttl:
            return False  # reported too long ago to compare with
        return (recent[0] != file_signature(st)
                and 0 <= time.time() - st.st_mtime < max(self._settle, MIN_RECHECK_S))

    def _writing(self, candidate: _Candidate, now: float) -> bool:
        """A writer has the candidate open: written to since its last close, and not idle for WRITER_IDLE_S."""
        return candidate.written and now - candidate.stable_since < self._writer_idle

    @property
    def excluded(self) -> list[Path]:
        """Folders inside the inbox that are never reported (processed/failed when configured there)."""
        return [Path(p) for p in self._excluded]

    def start(self) -> None:
        """Start the observer and the timer thread, then scan what is already in the inbox."""
        if not self.inbox.is_dir():
            raise ConfigError(f"inbox {self.inbox} does not exist or is not a folder (inbox.path)")
        with self._cond:
            self._stopping = False
        for name in WATCHDOG_INOTIFY_LOGGERS:
            logging.getLogger(name).addHandler(self._overflow_hook)
            logging.getLogger(name).addFilter(_drop_stop_race)  # once per process (a second add is ignored)
        self._start_observer()
        now = time.monotonic()
        with self._cond:
            self._next_rescan = self._after_rescan_interval(now)
            self._next_supervise = now + SUPERVISE_INTERVAL_S
        self._thread = threading.Thread(target=self._run, name="inbox-timer", daemon=True)
        self._thread.start()
        reported, settling = self._scan()
        log.info("watching %s (%s, recursive=%s); %d file(s) already there reported, %d more once they "
                 "settle (%ss)", self.inbox, self.mode, self._recursive, reported, settling, self._settle)

    def stop(self) -> None:
        """Stop the observer and the timer thread; safe to call twice."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for name in WATCHDOG_INOTIFY_LOGGERS:
            logging.getLogger(name).removeHandler(self._overflow_hook)
        thread, self._thread = self._thread, None  # first, so it cannot restart the observer meanwhile
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        observer, self._observer = self._observer, None
        if observer is not None:
            _stop_observer(observer)

    def scan(self) -> int:
        """Walk the inbox and report files that look complete: unchanged for settle_s by this host's clock
        (or with an mtime older than MTIME_TRUSTED_AGE_S); the others are reported once they have settled.
        Returns how many were reported now."""
        return self._scan()[0]

    def _scan(self) -> tuple[int, int]:
        """`scan`, returning (files reported, files left to settle)."""
        reported = settling = 0
        now_wall = time.time()
        for path, st in self._walk():
            old = now_wall - st.st_mtime >= max(self._settle, MTIME_TRUSTED_AGE_S)  # a writer, if any, is gone
            if old or self._settled(path, st):
                if self._report(path, force=True, closed=old):
                    reported += 1
            else:
                self._track(path, st, written=False, scanned=True)
                settling += 1
        return reported, settling

    def _settled(self, path: str, st: os.stat_result) -> bool:
        """`path` is as it was when reported before (a report the full queue dropped: rescans are how
        those files come back), or a candidate seen unchanged for settle_s."""
        signature = file_signature(st)
        now = time.monotonic()
        with self._cond:
            candidate = self._candidates.get(path)
            if candidate is not None and candidate.written:  # a writer has it open: its close reports it
                return candidate.signature == signature and not self._writing(candidate, now)
            recent = self._recent.get(path)
            if recent is not None and recent[0] == signature:
                return True
            return (candidate is not None and candidate.signature == signature
                    and now - candidate.stable_since >= self._settle)

    def request_rescan(self) -> None:
        """Ask the timer thread for a full rescan now (e.g. after events were lost)."""
        with self._cond:
            self._rescan_now = True
            self._cond.notify_all()

    def events_lost(self) -> None:
        """inotify dropped events: close events may be among them, so files waiting for one settle instead
        (unchanged for settle_s), and a full rescan looks for what else was missed."""
        now = time.monotonic()
        with self._cond:
            for candidate in self._candidates.values():
                if candidate.written:
                    candidate.written, candidate.check_at = False, now + self._settle
        self.request_rescan()

    # Observer ----------------------------------------------------------------------------------------
    def _exclusions(self) -> list[str]:
        excluded = []
        for key, path in (("files.processed_dir", self.config.processed_path),
                          ("files.failed_dir", self.config.failed_path)):
            resolved = os.path.realpath(path)
            if resolved == self._root:
                raise ConfigError(f"{key} must not be the inbox itself ({path})")
            if resolved.startswith(self._root + os.sep):
                excluded.append(resolved)
        return excluded

    def _start_observer(self) -> None:
        handler = _Handler(self)
        if not self.config.inbox.polling:
            try:
                from watchdog.observers.inotify import InotifyObserver
                from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

                InotifyMoveEventGrouper.delay = MOVE_PAIRING_DELAY_S
            except ImportError as exc:  # not Linux
                log.warning("inotify is not available here (%s); polling %s every %.1f s instead",
                            exc, self.inbox, self.config.inbox.poll_interval_s)
            else:
                observer: BaseObserver | None = None
                try:
                    # Full events: a file moved in from outside arrives as a FileMovedEvent, not a creation.
                    observer = InotifyObserver(generate_full_events=True)
                    observer.schedule(handler, self._root, recursive=self._recursive, event_filter=HANDLED_EVENTS)
                    observer.start()
                except OSError as exc:
                    if observer is not None:
                        _stop_observer(observer)
                    why = {errno.ENOSPC: "the inotify watch limit is reached",
                           errno.EMFILE: "the inotify instance limit is reached"}.get(exc.errno, exc.strerror)
                    log.warning("inotify cannot watch %s (%s: %s); falling back to polling every %.1f s; "
                                "to use inotify, %s", self.inbox, why, exc, self.config.inbox.poll_interval_s,
                                INOTIFY_HINT)
                else:
                    self._observer, self._mode = observer, "inotify"
                    return
        interval = self.config.inbox.poll_interval_s
        observer = PollingObserverVFS(os.lstat, os.scandir, polling_interval=interval)
        observer.schedule(handler, self._root, recursive=self._recursive)
        observer.start()
        self._observer, self._mode = observer, "polling"

    def _observer_alive(self) -> bool:
        observer = self._observer
        return observer is not None and observer.is_alive() and all(e.is_alive() for e in observer.emitters)

    def _supervise(self) -> bool:
        """Restart a dead observer (e.g. the inbox was deleted and recreated); True if it was restarted."""
        if self._observer_alive() or self._stopping:
            return False
        if not self.inbox.is_dir():
            log.error("inbox %s is gone; waiting for it to come back", self.inbox)
            return False
        log.warning("the %s observer of %s stopped; restarting it and rescanning", self.mode, self.inbox)
        old, self._observer = self._observer, None
        if old is not None:
            _stop_observer(old)
        self._start_observer()
        return True

    # Events --------------------------------------------------------------------------------------------
    def _on_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirMovedEvent):
            dest = os.fsdecode(event.dest_path) if event.dest_path else ""
            self._move_written(os.fsdecode(event.src_path), dest)
            if dest:
                self._scan_moved_folder(dest)
            return
        if isinstance(event, DirCreatedEvent) or event.is_directory:
            return  # a new folder's files arrive as their own events (watchdog walks new folders)
        src = os.fsdecode(event.src_path)
        if isinstance(event, FileClosedEvent):
            if self._accepts(src):
                self._report(src, closed=True)
        elif isinstance(event, FileMovedEvent):
            moved = self._forget(src, gone=True)
            dest = os.fsdecode(event.dest_path) if event.dest_path else ""
            if dest and self._accepts(dest):
                if moved is not None and moved.written:  # renamed while a writer has it open
                    self._track(dest, None, written=True)
                else:
                    self._report(dest)
        elif isinstance(event, FileCreatedEvent):
            if self._accepts(src):
                self._track(src, None, written=False)
        elif isinstance(event, FileModifiedEvent):
            # Polling: a change, settling decides. inotify: data written through an open descriptor, so a
            # close will come; also for a file reported before (rewritten in place, or appended to).
            if self._accepts(src):
                self._track(src, None, written=self._mode != "polling")
        elif isinstance(event, FileDeletedEvent):
            self._forget(src, gone=True)

    def _move_written(self, src: str, dest: str) -> None:
        """A folder was renamed: files in it that a writer has open are still being written under their new
        names (the other candidates are dropped: the moved folder is scanned). A folder moved in from
        outside has no `src` here (nothing of it was known)."""
        if not src or not self._within(src):
            return
        prefix = src + os.sep
        with self._cond:
            for path in [p for p in self._candidates if p.startswith(prefix)]:
                candidate = self._candidates.pop(path)
                if candidate.written and dest and self._accepts(dest + path[len(src):]):
                    self._candidates[dest + path[len(src):]] = candidate

    def _scan_moved_folder(self, folder: str) -> None:
        if not self._within(folder) or not self._recursive or self._excluded_path(folder):
            return
        rel = os.path.relpath(folder, self._root)
        if is_ignored(rel, self._patterns):
            return
        count = sum(1 for path, _ in self._walk(folder) if self._report(path))
        log.debug("folder %s moved in: %d file(s) reported", rel, count)

    # Filters ---------------------------------------------------------------------------------------------
    def _within(self, path: str) -> bool:
        return path.startswith(self._root + os.sep)

    def _excluded_path(self, path: str) -> bool:
        return any(path == ex or path.startswith(ex + os.sep) for ex in self._excluded)

    def _accepts(self, path: str) -> bool:
        if not self._within(path) or self._excluded_path(path):
            return False
        rel = path[len(self._root) + 1:]
        if not self._recursive and os.sep in rel:
            return False
        return not is_ignored(rel, self._patterns)

    # Candidates and reports ------------------------------------------------------------------------------
    def _track(self, path: str, st: os.stat_result | None, *, written: bool, scanned: bool = False) -> None:
        if st is None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
        now = time.monotonic()
        signature = file_signature(st)
        with self._cond:
            recent = self._recent.get(path)
            if not written and recent is not None and recent[0] == signature and now - recent[1] < self._recent_ttl:
                return  # just reported as it is now (a write event, though, came after that report's close)
            candidate = self._candidates.get(path)
            if candidate is not None:
                if candidate.signature != signature:
                    candidate.signature, candidate.stable_since = signature, now
                    if not candidate.written and not written:
                        candidate.check_at = now + self._recheck
                if written or candidate.written:  # its close reports it; else the idle check
                    candidate.written, candidate.check_at = True, candidate.stable_since + self._writer_idle
                return
            check_at = now + (self._writer_idle if written else self._settle)
            self._candidates[path] = _Candidate(signature, now, check_at, written, scanned)
            self._cond.notify_all()

    def _forget(self, path: str, *, gone: bool = False) -> _Candidate | None:
        """Stop watching `path` settle (returns its candidate, if any); `gone`: it left the inbox (moved
        away, deleted), so a file that comes back under that name, even the same one, is a new arrival."""
        with self._cond:
            if gone:
                self._recent.pop(path, None)
            return self._candidates.pop(path, None)

    def _report(self, path: str, *, force: bool = False, closed: bool = False) -> bool:
        """Call on_ready for a regular file; False if it is gone, not regular, just reported as is, or
        being written (unless `closed`: its writer closed it, or left it too long ago to wait for)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._forget(path)
            return False
        except OSError as exc:
            log.warning("cannot stat %r: %s", path, exc.strerror)
            return False
        if not stat.S_ISREG(st.st_mode):
            self._forget(path)
            self._log_skip(path, st)
            return False
        signature = file_signature(st)
        now = time.monotonic()
        with self._cond:
            candidate = self._candidates.get(path)
            if candidate is not None and not closed and self._writing(candidate, now):
                return False
            recent = self._recent.get(path)
            fresh = recent is not None and recent[0] == signature and now - recent[1] < self._recent_ttl
            if fresh and not force:
                self._candidates.pop(path, None)
                return False
            self._recent[path] = (signature, now)
            self._candidates.pop(path, None)
            if now - self._recent_pruned > self._recent_ttl:
                self._recent = {p: v for p, v in self._recent.items() if now - v[1] < self._recent_ttl}
                self._recent_pruned = now
        try:
            self._on_ready(Path(path))
        except Exception:
            log.exception("on_ready failed for %r; watching goes on", path)
        return True

    def _log_skip(self, path: str, st: os.stat_result) -> None:
        key = (path, st.st_ino)
        with self._cond:
            if key in self._skipped:
                return
            if len(self._skipped) >= SKIP_MEMORY:
                self._skipped.clear()
            self._skipped[key] = None
        log.warning("skipping %r: %s, not a regular file; left alone", path, describe_entry(st.st_mode))

    def _check_candidates(self) -> None:
        now = time.monotonic()
        with self._cond:
            due = [(p, c) for p, c in self._candidates.items() if c.check_at <= now]
        for path, candidate in due:
            try:
                self._check_candidate(path, candidate, now)
            except Exception:
                log.exception("checking %r failed; retrying later", path)
                with self._cond:  # never retried in a tight loop
                    candidate.check_at = time.monotonic() + self._recheck

    def _check_candidate(self, path: str, candidate: _Candidate, now: float) -> None:
        try:
            st = os.lstat(path)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("cannot stat %r: %s; the next rescan retries it", path, exc.strerror)
            self._forget(path)
            return
        if not stat.S_ISREG(st.st_mode):
            self._forget(path)
            self._log_skip(path, st)
            return
        signature = file_signature(st)
        with self._cond:
            if self._candidates.get(path) is not candidate:
                return
            if signature != candidate.signature:
                candidate.signature, candidate.stable_since = signature, now
                candidate.check_at = now + (self._writer_idle if candidate.written else self._recheck)
                return
            if candidate.written:  # only here once idle for WRITER_IDLE_S: taken as complete
                if self._writing(candidate, now):
                    candidate.check_at = candidate.stable_since + self._writer_idle
                    return
                log.info("%r was written to but not closed, and unchanged for %g s: taken as complete",
                         path, self._writer_idle)
            elif now - candidate.stable_since < self._settle:
                candidate.check_at = candidate.stable_since + self._recheck
                return
            elif self._mode == "inotify" and signature[1] == 0 and not candidate.scanned:
                # Created but nothing written yet: a writer may not have started; its close event decides.
                # (One a scan found has had its close event before the watch, if it had one: reported.)
                candidate.check_at = float("inf")
                return
        self._report(path)

    # Walking ---------------------------------------------------------------------------------------------
    def _walk(self, top: str | None = None) -> Iterator[tuple[str, os.stat_result]]:
        """Regular, non-ignored files below `top` (default: the inbox): os.scandir, no symlink following,
        respecting recursive, ignore patterns and the processed/failed exclusions."""
        stack = [top or self._root]
        while stack and not self._stopping:
            folder = stack.pop()
            try:
                with os.scandir(folder) as entries:
                    items = list(entries)
            except OSError as exc:
                log.warning("cannot list %r: %s", folder, exc.strerror)
                continue
            for entry in items:
                path = entry.path
                rel = path[len(self._root) + 1:]
                if is_ignored(rel, self._patterns) or self._excluded_path(path):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if self._recursive:
                            stack.append(path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished meanwhile
                if stat.S_ISREG(st.st_mode):
                    yield path, st
                else:
                    self._log_skip(path, st)

    # Timer thread ----------------------------------------------------------------------------------------
    def _after_rescan_interval(self, now: float) -> float:
        return now + self._rescan_interval if self._rescan_interval > 0 else float("inf")

    def _next_due(self) -> float:
        due = min(self._next_rescan, self._next_supervise)
        for candidate in self._candidates.values():
            due = min(due, candidate.check_at)
        return due

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                rescan = self._rescan_now or now >= self._next_rescan
                supervise = rescan or now >= self._next_supervise
                due = self._next_due()
                if not rescan and not supervise and due > now:
                    self._cond.wait(min(due - now, SUPERVISE_INTERVAL_S))
                    continue
                # Reschedule before the work, so a failing step can never make this loop spin.
                self._rescan_now = False
                if rescan:
                    self._next_rescan = self._after_rescan_interval(now)
                if supervise:
                    self._next_supervise = now + SUPERVISE_INTERVAL_S
            if supervise:
                try:
                    rescan = self._supervise() or rescan
                except Exception:
                    log.exception("restarting the inbox observer failed; retrying on schedule")
            for step, wanted in ((self._rescan, rescan), (self._check_candidates, True)):
                if wanted:
                    try:
                        step()
                    except Exception:
                        log.exception("inbox timer step %s failed; it runs again on schedule", step.__name__)

    def _rescan(self) -> None:
        count = self.scan()
        if count:
            log.info("rescan of %s reported %d file(s)", self.inbox, count)
        with contextlib.suppress(OSError):
            prune_empty_dirs(self.inbox, self.excluded, EMPTY_DIR_PRUNE_AGE_S)


def _stop_observer(observer: BaseObserver) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=10)
    except Exception:
        log.exception("error while stopping the %s", type(observer).__name__)
