"""From ready paths to committed rows: dynamic batching, parallel decoding, one transaction per batch.

    watcher ─submit(path)─▶ ReadyQueue ─feeder─▶ decode pool ─▶ inference threads ─▶ caller's thread
                            bounded,              read, sha256,   duplicates,          add_results,
                            de-duplicated,        decode, resize  onnxruntime; up to   dispose,
                            Triton-style batches                  concurrent_batches   set_locations
                                                                  at once, in order

- **Batching** (as Triton's dynamic batcher): a batch leaves the queue as soon as it holds `max_batch`
  paths, or when its oldest path has waited `max_wait_ms`; a single drop is answered quickly and a burst
  runs in full batches.
- **Overlap**: the feeder thread forms batch k+1 and hands it to the decode pool (Pillow releases the GIL)
  while batch k runs through onnxruntime (which releases it too) in an inference thread, and the caller's
  thread commits batch k-1. On the CPU two batches are inferred at once when work backs up, each on its
  share of the cores (`Model.concurrent_batches`); they are committed in the order they were formed.
  While a partial batch waits for its window to close, its files are already being read and decoded
  (not with claims), so a lone drop waits `max_wait_ms` for company, not `max_wait_ms` plus its
  decoding. Their content is looked up in the store then too (below), and known content is not decoded.
- **GPU decoding** (`batch.decode_on = "gpu"`, worker.gpudecode): the pool only reads, hashes and checks
  headers; plain JPEGs are decoded by nvJPEG in the (one) inference thread, one call per batch, and the
  model reads the pixels on the device.
- **Bounded memory**: at most `max_queue` paths wait, plus 2 + `concurrent_batches` batches of decoded
  pixels (one committing, the others handed off: decoding or in inference, and one being formed). A path
  that finds the queue full is dropped and the queue remembers it: once the backlog has drained, a
  rescan of the inbox picks the files up again. Nothing is lost, since files stay in the inbox until
  their row is committed.
- **Per batch**: content already classified under this model (`Store.first_by_content`) is not run
  through the model again: the new drop gets a row copying the first result (the store sets
  `duplicate_of`). A drop whose row was committed before a crash, but which was never moved
  (`Store.find_drop`), is only moved. All other files of the batch are inferred in one call, recorded in
  ONE `add_results` transaction, then disposed of (moved, left or deleted: only after the commit), then
  their new locations recorded in ONE `set_locations` call.
- **Several workers** (PostgreSQL, worker.claims): the feeder claims a batch's files in the database
  before they are read and keeps those it wins; see `Pipeline`.
- **Faults**: a file that cannot be decoded becomes a `failed` row and goes to `failed/`; one bad file
  never fails its batch. A FIFO, socket, symlink… (`FileSkipped`) is logged once and left alone; a file
  the worker may not read (`FileUnreadable`) too, and is tried again with back-off. A file a writer has
  open (the watcher's `being_written`) is set aside until its close. When the
  commit fails (the store already retried), the batch's files stay in the inbox and are retried after a
  back-off during which no new batch is formed (batches already formed still run, without lengthening
  the back-off). When a move fails (e.g. `processed/` not writable) the file stays in the inbox and is
  retried after a back-off; its row is not written twice, since the retry finds it with `find_drop`.
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from worker.claims import ClaimOutcome, Claims, Granted, drop_key
from worker.config import Config
from worker.disposition import FileChanged, dispose, left_in_place
from worker.exceptions import FileSkipped, FileUnreadable, ImageRejected, StoreError
from worker.files import file_signature, identity, lstat_or_none, read_image_file, relative_name, sha256_hex
from worker.model import Model, Prediction
from worker.preprocess import load_pixels, open_image
from worker.store import ResultRecord, Store, StoredResult

log = logging.getLogger(__name__)

#: Back-off after a failed commit or move: first delay, doubled per failure, capped.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
WRITING_RECHECK_S = 1.0  # a file set aside while being written is looked at again this often until closed
#: A retry that finds its path already queued (or the queue full) tries again after this long.
REQUEUE_AGAIN_S = 0.5
#: After the last path dropped by a full queue, wait settle_s plus this before the rescan that finds it.
RESCAN_MARGIN_S = 0.2
JPEG_END = b"\xff\xd9"  # decode_on = "gpu": a JPEG without its end marker near the end is truncated
TRAILER_LIMIT = 4096  # bytes after the end marker (cameras and editors append some) still eligible
#: `location` of a row whose file was deleted (files.on_success = "delete"), or vanished before its move.
DELETED = ""
GONE = ""
#: How many (path, inode, mtime) keys of skipped entries are remembered to log each only once.
SKIP_MEMORY = 10_000
#: New locations the database refused, kept to record with the next batch (the newest this many).
STALE_LOCATIONS_MAX = 100_000
#: How many committed files whose move failed (kept in the inbox for a retry) are remembered with their row.
UNMOVED_MAX = 100_000
#: Scale-out: a file another worker holds is looked at again this long after that worker's lease ends.
CLAIM_RECHECK_MARGIN_S = 0.5
#: Scale-out: when claims thin a batch out, top it up from the queue at most this many more times.
CLAIM_TOP_UP_ROUNDS = 3
#: How many files left in place after processing (on_success = "leave") are remembered, so that rescans
#: do not read them again while they are unchanged (a forgotten one is found by Store.find_drop anyway).
LEFT_MEMORY = 100_000


# ------------------------------------------------------------------------------------------------------
# The ready queue
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueuedFile:
    path: Path
    queued_at: float  # time.monotonic() when it was found ready


class ReadyQueue:
    """A bounded FIFO of ready paths that forms batches the way Triton's dynamic batcher does.

    A path is refused while it is already queued or in flight (taken but not yet `release`d), so the
    watcher, the rescan and retries may report the same file any number of times. A path refused because
    the queue is full sets `overflowed`; a rescan is then due (`take` returns early, `take_overflow` says
    so once) when the queue is down to `low_water` paths and no path was dropped for `rescan_delay_s`.
    The delay lets every dropped file age past the watcher's settle time, so that the scan reports it
    instead of deferring it (a scan only reports files whose mtime is older than `inbox.settle_s`).

    `defer(path, s)` gives a taken path back to be queued again `s` seconds later (scale-out: a file
    another worker holds a claim on is looked at again when that claim's lease ends); meanwhile the path
    still counts as in flight, so watcher reports of it are refused.
    """

    def __init__(self, max_queue: int, *, low_water: int = 0, rescan_delay_s: float = 0.0) -> None:
        self.max_queue = max_queue
        self.low_water = low_water
        self.rescan_delay_s = rescan_delay_s
        self._cond = threading.Condition(threading.RLock())  # RLock: wake() may run in a signal handler
        self._items: deque[QueuedFile] = deque()
        self._known: set[Path] = set()  # queued, in flight or deferred
        self._deferred: list[tuple[float, int, Path]] = []  # heap of (due, sequence, path)
        self._sequence = 0
        self._closed = False
        self._wakeups = 0
        self._paused_until = 0.0
        self.overflowed = False
        self.dropped = 0
        self._last_drop = 0.0

    def put(self, path: Path) -> bool:
        """Queue `path`; False when it is already queued or in flight, the queue is full, or closed."""
        with self._cond:
            if self._closed or path in self._known:
                return False
            if len(self._items) >= self.max_queue:
                self.overflowed = True
                self.dropped += 1
                self._last_drop = time.monotonic()
                return False
            self._items.append(QueuedFile(path, time.monotonic()))
            self._known.add(path)
            self._cond.notify_all()
            return True

    def take(self, max_batch: int, max_wait_s: float,
             waiting: Callable[[list[QueuedFile]], None] | None = None) -> list[QueuedFile]:
        """Block until a batch is due and return it; [] when closed, woken by `wake()`, or a rescan is
        due (see the class docstring).

        A batch is due when `max_batch` paths wait, or when the oldest has waited `max_wait_s`. Before
        each wait for a partial batch, `waiting` (if given) is called with the paths that will form it
        so far (under the queue's lock: it must be quick), so their work can start during the window.
        """
        with self._cond:
            wakeups = self._wakeups
            while True:
                if self._closed or self._wakeups != wakeups:
                    return []
                now = time.monotonic()
                self._promote_deferred(now)
                rescan_at = self._rescan_due_at()
                if rescan_at is not None and now >= rescan_at:
                    return []
                until_rescan = None if rescan_at is None else rescan_at - now
                if now < self._paused_until:
                    self._cond.wait(_earliest(self._paused_until - now, until_rescan))
                    continue
                if not self._items:
                    until_deferred = self._deferred[0][0] - now if self._deferred else None
                    self._cond.wait(until_rescan if until_deferred is None
                                    else _earliest(until_deferred, until_rescan))
                    continue
                due = self._items[0].queued_at + max_wait_s
                if len(self._items) >= max_batch or now >= due:
                    count = min(max_batch, len(self._items))
                    return [self._items.popleft() for _ in range(count)]
                if waiting is not None:
                    waiting(list(self._items))
                self._cond.wait(_earliest(due - now, until_rescan))

    def known(self, path: Path) -> bool:
        """Queued, in flight or deferred."""
        with self._cond:
            return path in self._known

    def take_ready(self, count: int) -> list[QueuedFile]:
        """Up to `count` paths that wait now, without waiting (tops up a batch the claims thinned out)."""
        with self._cond:
            now = time.monotonic()
            if self._closed or now < self._paused_until:
                return []
            self._promote_deferred(now)
            return [self._items.popleft() for _ in range(min(count, len(self._items)))]

    def defer(self, path: Path, delay_s: float) -> None:
        """A taken path goes back into the queue after `delay_s` seconds (it stays in flight until then)."""
        with self._cond:
            if self._closed or path not in self._known:
                return
            self._sequence += 1
            heapq.heappush(self._deferred, (time.monotonic() + max(0.0, delay_s), self._sequence, path))
            self._cond.notify_all()

    def _promote_deferred(self, now: float) -> None:
        while self._deferred and self._deferred[0][0] <= now:
            _, _, path = heapq.heappop(self._deferred)
            if path in self._known:
                self._items.append(QueuedFile(path, now))

    def _rescan_due_at(self) -> float | None:
        if not self.overflowed or len(self._items) > self.low_water:
            return None
        return self._last_drop + self.rescan_delay_s

    def release(self, paths: Iterable[Path]) -> None:
        """Paths taken earlier are done (or given back): they may be queued again."""
        with self._cond:
            for path in paths:
                self._known.discard(path)
            self._cond.notify_all()

    def pause(self, seconds: float) -> None:
        """Form no batch for `seconds` (back-off while the database refuses writes)."""
        with self._cond:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def take_overflow(self) -> bool:
        """True (once) when a rescan is due: paths were dropped, and the queue has drained since."""
        with self._cond:
            rescan_at = self._rescan_due_at()
            if rescan_at is not None and time.monotonic() >= rescan_at:
                self.overflowed = False
                return True
            return False

    def wake(self) -> None:
        """Make a blocked `take` return [] now (safe from a signal handler: the lock is re-entrant)."""
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._deferred.clear()
            self._cond.notify_all()

    @property
    def depth(self) -> int:
        """Paths waiting (not yet taken)."""
        return len(self._items)

    @property
    def pending(self) -> int:
        """Paths queued or in flight."""
        return len(self._known)


# ------------------------------------------------------------------------------------------------------
# One file through the pipeline
# ------------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A queued file after reading and decoding (done in the decode pool)."""

    item: QueuedFile
    file: str = ""  # name relative to the inbox, as dropped
    sha256: str | None = None
    size_bytes: int | None = None
    pixels: np.ndarray | None = None
    jpeg: bytes | None = None  # decode_on = "gpu": a plain JPEG left for the GPU to decode
    error: str | None = None  # set: the file becomes a failed row
    skipped: str | None = None  # set: logged once and left alone, no row
    gone: bool = False  # vanished before it was read (moved away, or already disposed of)
    writing: bool = False  # a writer had it open when it was read: set aside, its close reports it again
    skip_key: tuple[Any, ...] | None = None
    unreadable: bool = False  # skipped because the worker may not read it: tried again with back-off
    read_as: tuple[int, int, int, int] | None = None  # files.identity of the file that was read
    ctime_ns: int | None = None  # its ctime, recorded: tells it from a later file of the same name and bytes
    decode_ms: float = 0.0
    # Filled in by `_infer_batch`, or already by `_prepare` for a file read while its window is open:
    matched: bool = False  # row_id and same_as below have been looked up
    row_id: int | None = None  # an existing row for this very drop (crash between commit and move)
    same_as: StoredResult | None = None  # the first row with the same content under this model
    prediction: Prediction | None = None
    inference_ms: float | None = None  # the batch's inference time per image it ran on

    @property
    def outcome(self) -> str:
        """ok or failed: the row's status, and which folder the file goes to."""
        if self.same_as is not None:
            return self.same_as.status
        return "failed" if self.error is not None else "ok"


@dataclass
class Inferred:
    """A batch after its lookups and its inference (done in an inference thread), ready to commit."""

    batch: list[Prepared]
    error: StoreError | None = None  # the lookups failed: nothing is committed, the files are retried
    crash: Exception | None = None  # inference raised (e.g. onnxruntime): logged, the files are retried
    formed_at: float = 0.0  # monotonic time the batch was handed over


@dataclass
class Counters:
    """What the pipeline has done since start (for stats, STATUS= lines and metrics)."""

    batches: int = 0
    rows: int = 0  # result rows committed
    ok: int = 0
    failed: int = 0
    duplicates: int = 0  # rows copying an earlier result of the same content
    inferred: int = 0  # images run through the model
    gpu_decoded: int = 0  # of those, decoded on the GPU (batch.decode_on = "gpu")
    recovered: int = 0  # drops committed before a crash and only moved now
    skipped: int = 0  # FIFOs, symlinks… (each logged once)
    commit_errors: int = 0  # batches whose lookups or commit the database refused
    inference_errors: int = 0  # batches the model raised on
    disposition_errors: int = 0
    given_up: int = 0  # --once: files left in the inbox after repeated commit or move failures
    last_batch_at: datetime | None = None


@dataclass
class _Retry:
    attempts: int = 0
    due: float = 0.0  # time.monotonic()


# ------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------
class Pipeline:
    """Queue → decode pool → model → store → disposition, driven by `process_next()` from one thread.

    `submit(path)` is the watcher's callback (any thread). `start()` starts the feeder thread;
    `process_next(timeout)` waits for the next inferred batch and commits and disposes of it in the calling
    thread;
    `stop()` ends the feeder, the decode pool and the inference threads, leaving unprocessed files in the
    inbox (batches not yet committed are dropped: inference under way is waited for, decoding is cancelled).
    `max_attempts`: give up on a file after this many failed commits, inferences or moves (None = retry forever;
    `run --once` uses a small number so that it ends).
    `claims` (several workers on one PostgreSQL database, worker.claims): the feeder claims each batch's
    files before they are read and keeps only those it wins (topping the batch up from the queue);
    files held by other workers are looked at again when their lease ends. The batch's commit checks the
    claims (Store.add_results), a claim that carries a committed row only moves the file, and claims are
    released once the files are moved (or marked done when they are left in place).
    """

    def __init__(
        self,
        config: Config,
        model: Model,
        store: Store,
        *,
        worker_id: str,
        metrics: Any | None = None,
        rescan: Callable[[], object] | None = None,
        max_attempts: int | None = None,
        claims: Claims | None = None,
        host: str | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.store = store
        self.worker_id = worker_id
        self.metrics = metrics
        self.rescan = rescan
        self.max_attempts = max_attempts
        self.claims = claims
        self.host = host
        self._granted: dict[Path, Granted] = {}  # claims of the files in flight (scale-out)
        self._unclaimable: dict[Path, int] = {}  # files whose lstat failed when claiming: tries so far
        self.inbox = Path(os.path.realpath(config.inbox_path))  # as the watcher reports paths
        self.queue = ReadyQueue(
            config.batch.max_queue,
            low_water=min(config.batch.max_queue // 2, 2 * config.batch.max_batch),
            rescan_delay_s=config.inbox.settle_s + RESCAN_MARGIN_S,
        )
        self.counters = Counters()
        self._max_batch = config.batch.max_batch
        self._max_wait_s = config.batch.max_wait_ms / 1000
        self._pool = ThreadPoolExecutor(config.batch.decode_threads, thread_name_prefix="decode")
        # Batches inferred at once (Model.concurrent_batches; 1 on a GPU), and as many handed over ahead.
        # GPU decoding: one inference thread, the only user of the GpuDecoder.
        self._lanes = 1 if config.batch.decode_on == "gpu" else model.concurrent_batches
        self._inference = ThreadPoolExecutor(self._lanes, thread_name_prefix="inference")
        self._gpu = None
        if config.batch.decode_on == "gpu":
            from worker.gpudecode import GpuDecoder

            self._gpu = GpuDecoder(model.input_size, device="cuda" if model.device == "cuda" else "cpu")
        self._cond = threading.Condition(threading.RLock())  # guards the hand-off and the state below
        self._handoff: deque[tuple[list[QueuedFile], Future[Inferred]]] = deque()
        self._stopping = False
        self._wakeups = 0
        self._rescanning = False
        self._retries: dict[Path, _Retry] = {}
        self._given_up: set[Path] = set()
        self._left: OrderedDict[Path, tuple[int, int, int]] = OrderedDict()  # done, left in place
        self.accepted = 0  # paths queued by submit()
        self._skips_logged: set[tuple[Any, ...]] = set()
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic, rows) per batch, last minute
        self._feeder: threading.Thread | None = None
        self._taken: list[QueuedFile] = []  # what the feeder holds and has not handed over yet
        # Files whose reading and decoding started while their batch's window was still open (feeder
        # thread only). Not with claims: there a file is claimed before it is read.
        self._early: dict[QueuedFile, Future[Prepared]] = {}
        self._failures_in_a_row = 0
        self._stale_locations: dict[int, str] = {}  # row id -> where its file is now, not recorded yet
        # Committed files whose move failed, kept in the inbox for a retry: path -> (device, inode, sha256,
        # row id). The retry takes the file for its row by these, not by its ctime, which a chmod or touch
        # during the back-off changes (Store.find_drop would then see a later file).
        self._unmoved: dict[Path, tuple[int, int, str | None, int]] = {}
        # Rows whose file's disposal failed, until it succeeds (what a stop leaves, left_behind).
        self._stuck_rows: set[int] = set()
        # The watcher's InboxWatcher.being_written, set once it exists: a file a writer has open is not read.
        self.being_written: Callable[[Path, os.stat_result | None], bool] | None = None
        self._failed_at = float("-inf")  # monotonic time of the last failed commit or inference

    # Input -------------------------------------------------------------------------------------------
    def submit(self, path: Path) -> bool:
        """A file is ready (watcher callback, any thread). False when it was not queued (see ReadyQueue)."""
        path = Path(path)
        if not path.is_absolute():
            path = self.inbox / path
        if path in self._given_up:
            return False
        left = self._left.get(path)
        if left is not None and left == _signature(path):
            return False  # done and left in place (on_success = "leave"), unchanged since
        queued = self.queue.put(path)
        if queued:
            self.accepted += 1
            if self.metrics is not None:
                self.metrics.set_queue_depth(self.queue.depth)
        return queued

    # Life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._feeder is None:
            self._feeder = threading.Thread(target=self._feed, name="batcher", daemon=True)
            self._feeder.start()

    def stop(self) -> None:
        """Stop forming batches; batches decoded but not processed are dropped (their files stay)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.queue.close()
        if self._feeder is not None:
            self._feeder.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._inference.shutdown(wait=True, cancel_futures=True)  # their batches are dropped with the rest
        self._early.clear()
        with self._cond:
            left = list(self._handoff)
            self._handoff.clear()
        for items, _ in left:
            self.queue.release(item.path for item in items)
        if self._stale_locations:  # one last try; otherwise the rows keep naming the inbox (logged)
            try:
                self.store.set_locations(list(self._stale_locations.items()))
                self._stale_locations = {}
            except StoreError as exc:
                log.error("%d rows still name the inbox although their files were moved: %s",
                          len(self._stale_locations), exc)

    def left_behind(self) -> tuple[list[int], int]:
        """(rows committed whose file's move or delete failed and was not done since, by this worker; another
        may have done it: the database tells; rows whose file was moved but whose new place could not be
        recorded): what a stop leaves for the next run."""
        return list(self._stuck_rows), len(self._stale_locations)

    def wake(self) -> None:
        """Make a waiting `process_next` return at once (used by signal handlers)."""
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    # State -------------------------------------------------------------------------------------------
    @property
    def feeding(self) -> bool:
        """The batching thread runs (or was not started yet). It survives any Exception; only something
        like a BaseException from a library could end it, and then no batch would ever form again."""
        return self._feeder is None or self._feeder.is_alive() or self._stopping

    def busy(self) -> bool:
        """Anything queued, in flight, being rescanned or waiting for a retry."""
        return self.queue.pending > 0 or self._rescanning or bool(self._retries) or self.queue.overflowed

    @property
    def queue_depth(self) -> int:
        return self.queue.depth + len(self._retries)

    def throughput(self, window_s: float = 60.0) -> float:
        """Rows committed per second over the last `window_s` seconds (at most a minute)."""
        now = time.monotonic()
        with self._cond:
            self._forget_before(now - 60.0)
            rows = sum(n for t, n in self._recent if t >= now - window_s)
        return rows / window_s

    def _forget_before(self, moment: float) -> None:
        """Drop `_recent` entries older than `moment` (the caller holds `_cond`)."""
        while self._recent and self._recent[0][0] < moment:
            self._recent.popleft()

    def status_line(self) -> str:
        c = self.counters
        return (f"queue {self.queue_depth}; {self.throughput():.1f} images/s (last minute); "
                f"{c.rows} processed ({c.failed} failed, {c.duplicates} duplicates)")

    # The caller's loop --------------------------------------------------------------------------------
    def process_next(self, timeout: float | None = None, *, until_idle: bool = False) -> int:
        """Wait up to `timeout` s for a batch to be handed over, then for its inference, and commit and
        dispose of it here; return the files handled.

        Returns 0 on timeout or on `wake()`; with `until_idle`, also as soon as nothing is queued, in
        flight, rescanning or waiting for a retry (see `busy`).
        """
        self._requeue_due()
        wait = self._until_next_retry(timeout)
        with self._cond:
            wakeups = self._wakeups
            deadline = None if wait is None else time.monotonic() + wait
            while not self._handoff:
                if self._stopping or self._wakeups != wakeups or (until_idle and not self.busy()):
                    return 0
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return 0
                self._cond.wait(remaining)
            items, inferred = self._handoff.popleft()
            self._cond.notify_all()
        try:
            self._conclude(inferred.result())
        finally:
            for item in items:  # a retry that was queued and not rescheduled by this batch is over
                retry = self._retries.get(item.path)
                if retry is not None and retry.due == float("inf"):
                    del self._retries[item.path]
            if self.claims is not None:
                with self._cond:
                    for item in items:
                        self._granted.pop(item.path, None)
            self.queue.release(item.path for item in items)
            with self._cond:
                self._cond.notify_all()
        return len(items)

    # The feeder thread -------------------------------------------------------------------------------
    def _feed(self) -> None:
        while not self._stopping:
            self._taken = []
            try:
                if not self._feed_once():
                    return
            except Exception:  # a bug must not silently stop all work while the worker looks alive
                log.exception("unexpected error while forming a batch; its %d files stay in the inbox and are "
                              "offered again by a rescan", len(self._taken))
                self.queue.release(item.path for item in self._taken)
                for item in self._taken:
                    self._early.pop(item, None)
                self._start_rescan()
                with self._cond:
                    for item in self._taken:
                        self._granted.pop(item.path, None)
                    if not self._stopping:
                        self._cond.wait(RETRY_FIRST_S)

    def _feed_once(self) -> bool:
        """Take, claim and hand over one batch; False once stopping."""
        items = self.queue.take(self._max_batch, self._max_wait_s,
                                waiting=self._start_early if self.claims is None else None)
        self._taken = list(items)
        if self.queue.take_overflow():
            self._start_rescan()
        if items and self.claims is not None:
            items = self._claim_batch(items)
        if not items:
            return True
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.queue.depth)
        try:
            futures = [self._early.pop(item, None) or self._pool.submit(self._prepare, item) for item in items]
        except RuntimeError:  # the pool was shut down: we are stopping
            self.queue.release(item.path for item in items)
            return False
        with self._cond:
            while len(self._handoff) >= self._lanes and not self._stopping:
                self._cond.wait()
            if self._stopping:
                self.queue.release(item.path for item in items)
                return False
            try:
                inferred = self._inference.submit(self._lookup_and_infer, futures, time.monotonic())
            except RuntimeError:  # shut down: we are stopping
                self.queue.release(item.path for item in items)
                return False
            self._handoff.append((items, inferred))
            self._taken = []
            self._cond.notify_all()
        return True

    def _start_early(self, waiting: list[QueuedFile]) -> None:
        """Start reading and decoding the files of a partial batch while its window is open (a lone drop
        then waits max_wait_ms for company, not max_wait_ms plus its decoding)."""
        for item in waiting[: self._max_batch]:
            if item not in self._early:
                try:
                    self._early[item] = self._pool.submit(self._prepare, item, early=True)
                except RuntimeError:  # the pool was shut down: we are stopping
                    return

    # Claims (scale-out) ---------------------------------------------------------------------------------
    def _claim_batch(self, items: list[QueuedFile]) -> list[QueuedFile]:
        """The files of `items` this worker wins the claims of, topped up from the queue when others hold
        some; the rest are given back (gone), deferred (held elsewhere) or remembered as done."""
        won: list[QueuedFile] = []
        for top_ups in range(CLAIM_TOP_UP_ROUNDS + 1):
            won += self._claim(items)  # every path taken from the queue is claimed: won, deferred or released
            missing = self._max_batch - len(won)
            if missing <= 0 or self._stopping or top_ups == CLAIM_TOP_UP_ROUNDS:
                break
            items = self.queue.take_ready(missing)
            self._taken += items
            if not items:
                break
        return won

    def _claim(self, items: list[QueuedFile]) -> list[QueuedFile]:
        assert self.claims is not None
        won: list[QueuedFile] = []
        drops: dict[str, tuple[QueuedFile, str]] = {}
        for item in items:
            try:
                st = os.lstat(item.path)
                name = relative_name(self.inbox, item.path)
            except FileNotFoundError:  # moved away meanwhile (by the worker that had it): nothing to do
                self._unclaimable.pop(item.path, None)
                self.queue.release([item.path])
                continue
            except FileSkipped:  # not below the inbox: _prepare logs the skip, and no row is written
                won.append(item)
                continue
            except OSError as exc:
                # No claim without its drop key: read it only once claimed (a transient NFS error, a
                # folder not searchable for a moment), or another worker could record it too.
                tries = self._unclaimable[item.path] = self._unclaimable.get(item.path, 0) + 1
                delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (tries - 1))
                (log.warning if tries == 1 else log.debug)(
                    "cannot look at %s to claim it: %s; looking again in %g s", item.path,
                    exc.strerror or exc, delay)
                self.queue.defer(item.path, delay)
                continue
            self._unclaimable.pop(item.path, None)
            key = drop_key(name, st.st_size, st.st_mtime_ns, st.st_ino)
            if key in drops:  # two spellings of one file (a `..` or a symlinked inbox): claim it once
                self.queue.release([item.path])
                continue
            drops[key] = (item, name)
        if not drops:
            return won
        outcome = self._claim_with_retry({key: name for key, (_, name) in drops.items()})
        if outcome is None:  # stopping: the feeder releases what it returns
            self.queue.release(item.path for item, _ in drops.values())
            return won
        for key, (item, _) in drops.items():
            granted = outcome.granted.get(key)
            if granted is not None:
                with self._cond:
                    self._granted[item.path] = granted
                won.append(item)
                continue
            held = outcome.held[key]
            if held.done:  # recorded and left in place by another worker (on_success = "leave")
                self.queue.release([item.path])
                self._remember_left(item.path)
            else:
                log.debug("%s is claimed by %s on %s; looking again in %.1f s",
                          item.path, held.worker_id, held.host, held.retry_in_s + CLAIM_RECHECK_MARGIN_S)
                self.queue.defer(item.path, held.retry_in_s + CLAIM_RECHECK_MARGIN_S)
        return won

    def _claim_with_retry(self, drops: dict[str, str]) -> ClaimOutcome | None:
        """Claims.claim, retried with back-off while the database refuses (None once stopping)."""
        assert self.claims is not None
        delay = RETRY_FIRST_S
        while not self._stopping:
            try:
                return self.claims.claim(drops)
            except StoreError as exc:
                log.error("cannot claim %d files: %s; retrying in %g s (they stay in the inbox)",
                          len(drops), exc, delay)
            with self._cond:
                if not self._stopping:
                    self._cond.wait(delay)
            delay = min(RETRY_MAX_S, delay * 2)
        return None

    def _claim_key(self, p: Prepared) -> str | None:
        with self._cond:
            granted = self._granted.get(p.item.path)
        return None if granted is None else granted.key

    def _claim_keys(self, prepared: Iterable[Prepared]) -> list[str]:
        return [key for key in (self._claim_key(p) for p in prepared) if key is not None]

    def _release_claims(self, prepared: Iterable[Prepared]) -> None:
        """The files are done here without a row (vanished, skipped): release their claims. A failure is
        logged: the claims then lapse, and whoever takes them over finds the files gone, or skips them."""
        keys = self._claim_keys(prepared) if self.claims is not None else []
        if not keys:
            return
        assert self.claims is not None
        try:
            self.claims.release(keys)
        except StoreError as exc:
            log.warning("cannot release %d claims (they lapse by themselves): %s", len(keys), exc)

    def _start_rescan(self) -> None:
        if self.rescan is None:
            return
        with self._cond:
            if self._rescanning or self._stopping:
                return
            self._rescanning = True
        log.info("the queue overflowed (%d paths dropped so far); rescanning the inbox as it drains",
                 self.queue.dropped)
        threading.Thread(target=self._run_rescan, name="rescan", daemon=True).start()

    def _run_rescan(self) -> None:
        try:
            if self.rescan is not None:
                self.rescan()
        except Exception:
            log.exception("inbox rescan failed")
        finally:
            with self._cond:
                self._rescanning = False
                self._cond.notify_all()

    # Decode pool ------------------------------------------------------------------------------------
    def _prepare(self, item: QueuedFile, early: bool = False) -> Prepared:
        """Read, hash, decode and resize one file. Never raises: the outcome is in the result.

        `early`: the file's batch window is still open, so its content is also looked up in the store now
        rather than after the window (see `_match_early`); known content is then not decoded.
        """
        start = time.perf_counter()
        p = Prepared(item)
        try:
            p.file = relative_name(self.inbox, item.path)
            if self._being_written(p):
                return p
            data, st = read_image_file(self.inbox, item.path, self.config.files.max_file_bytes)
            if self._being_written(p, st):  # what was read may be partial
                return p
            p.read_as = identity(st)
            p.ctime_ns = st.st_ctime_ns
            p.size_bytes = st.st_size
            p.sha256 = sha256_hex(data)
            if early and self._match_early(p):
                pass  # recorded before: nothing to decode
            elif self._gpu is not None and self._gpu_eligible(data):
                p.jpeg = data
            else:
                p.pixels = self._pixels(data)
        except FileSkipped as exc:
            if not os.path.lexists(item.path):  # disposed of already, or moved away by someone: no news
                p.gone = True
            else:
                p.skipped = str(exc)
                p.skip_key = _skip_key(item.path)
                p.unreadable = isinstance(exc, FileUnreadable)
        except ImageRejected as exc:
            st = lstat_or_none(item.path)
            if not self._being_written(p, st):  # else refused for what a writer has not finished yet
                p.error = str(exc)
                if p.size_bytes is None and st is not None:  # refused before it was read (empty, too large…)
                    p.size_bytes, p.ctime_ns = st.st_size, st.st_ctime_ns
        except FileNotFoundError:
            p.gone = True
        except OSError as exc:
            p.skipped = f"cannot read: {exc.strerror or exc}"
            p.skip_key = _skip_key(item.path)
        except Exception as exc:  # a decoder bug must not take the batch down: the file fails alone
            log.exception("unexpected error decoding %s", item.path)
            p.error = f"unexpected decoder error: {type(exc).__name__}: {exc}"
        if not p.file:
            p.file = item.path.name
        p.decode_ms = (time.perf_counter() - start) * 1000
        return p

    def _being_written(self, p: Prepared, st: os.stat_result | None = None) -> bool:
        """A writer has `p`'s file open (InboxWatcher.being_written; `st`: as read): nothing of it is
        recorded or moved."""
        p.writing = self.being_written is not None and self.being_written(p.item.path, st)
        return p.writing

    def _match_early(self, p: Prepared) -> bool:
        """Look up `p`'s content while its batch window is open; True if it was recorded before.

        A lone drop then goes straight to inference when the window closes. The answer may be out of date
        by then only in one way: the same content committed meanwhile by a batch ahead of it. That file is
        then inferred once more, and `Store.add_results` still records it as a duplicate of the first row.
        """
        try:
            self._match_existing([p])
        except Exception as exc:  # e.g. the database is locked: the batch looks it up again and handles it
            log.debug("early lookup of %s failed (%s); done with its batch", p.item.path, exc)
            p.matched, p.row_id, p.same_as = False, None, None
            return False
        return p.row_id is not None or p.same_as is not None

    def _pixels(self, data: bytes) -> np.ndarray:
        """The CPU path: decode and resize for the model (ImageRejected for a bad image)."""
        return load_pixels(data, self.model.input_size, max_pixels=self.config.files.max_pixels,
                           policy=self.model.info.resize)

    def _gpu_eligible(self, data: bytes) -> bool:
        """A complete plain JPEG that nvJPEG decodes as the CPU path would (see worker.gpudecode)."""
        from worker.gpudecode import gpu_eligible

        if JPEG_END not in data[-TRAILER_LIMIT:]:  # truncated: the CPU path names the problem
            return False
        return gpu_eligible(open_image(data, max_pixels=self.config.files.max_pixels), self.model.input_size)

    # One batch -------------------------------------------------------------------------------------
    def _lookup_and_infer(self, futures: list[Future[Prepared]], formed_at: float) -> Inferred:
        """An inference thread's part of a batch: wait for its files to be decoded, then `_infer_batch`."""
        started = time.perf_counter()
        # _prepare never raises; a CancelledError here means stop() cancelled decoding: the batch is dropped
        batch = [future.result() for future in futures]
        self._stage("wait", started)
        try:
            inferred = self._infer_batch(batch)
        except Exception as exc:  # the caller's thread logs it and retries the batch's files
            inferred = Inferred(batch, crash=exc)
        inferred.formed_at = formed_at
        return inferred

    def _infer_batch(self, batch: list[Prepared]) -> Inferred:
        """Look up what the store already has of the batch, and run the model over the rest.

        Runs in an inference thread, up to `Model.concurrent_batches` batches at once, while the caller's
        thread commits the batches formed before. A lookup may therefore miss content one of those is
        about to commit: the file is inferred once more, and `Store.add_results` still records it as a
        duplicate.
        """
        rows = _rows(batch)
        if not rows:
            return Inferred(batch)
        for p in rows:  # scale-out: a worker that died between commit and move left this drop's row
            with self._cond:
                granted = self._granted.get(p.item.path)
            if granted is not None and granted.result_id is not None:
                p.row_id = granted.result_id
        started = time.perf_counter()
        try:
            self._match_existing(rows)
        except StoreError as exc:
            self.queue.pause(RETRY_FIRST_S)  # form no more batches now; _commit_failed sets the back-off
            return Inferred(batch, exc)
        started = self._stage("match", started)
        self._infer([p for p in rows if p.row_id is None and p.same_as is None])
        self._stage("inference", started)
        return Inferred(batch)

    def _conclude(self, inferred: Inferred) -> None:
        """The caller's thread: commit the batch's rows in one transaction, then dispose of its files."""
        batch = inferred.batch
        rows = _rows(batch)
        for p in batch:
            if p.skipped is not None:
                self._log_skip(p)
                if p.unreadable:  # its permissions may be fixed: not left to the next rescan alone
                    self._schedule_retry(p.item.path)
            elif p.gone:
                log.debug("%s is no longer in the inbox; nothing to do", p.item.path)
            elif p.writing:  # its close event queues it; looked at again meanwhile, in case that event
                # came while this batch still held the path (the queue refuses a path in flight)
                log.debug("%s is being written; set aside until it is closed", p.item.path)
                self._look_again(p.item.path, WRITING_RECHECK_S)
        self._release_claims(p for p in batch if p.skipped is not None or p.gone or p.writing)
        if not rows:
            return
        if inferred.crash is not None:
            self._inference_failed(rows, inferred.crash, inferred.formed_at)
            return
        if inferred.error is not None:
            self._commit_failed(rows, inferred.error, inferred.formed_at)
            return
        started = time.perf_counter()
        new = [p for p in rows if p.row_id is None]
        now = datetime.now(UTC)
        records = [self._record(p, now) for p in new]
        try:
            ids = self.store.add_results(records, claims=self.claims) if records else []
        except StoreError as exc:
            self._commit_failed(rows, exc, inferred.formed_at)
            return
        started = self._stage("commit", started)
        self._failures_in_a_row = 0
        for p, row_id in zip(new, ids, strict=True):
            p.row_id = row_id
        if None in ids:  # claims taken over by another worker meanwhile: that worker records and moves them
            lost = {id(p) for p in new if p.row_id is None}
            for p in new:  # unless it cannot or stops first: looked at again, claimed once its lease ends
                if p.row_id is None:
                    self._look_again(p.item.path)
            rows = [p for p in rows if id(p) not in lost]
            records = [r for p, r in zip(new, records, strict=True) if id(p) not in lost]
            new = [p for p in new if id(p) not in lost]
        committed = time.monotonic()
        self._count(new, records, rows, committed)
        self._dispose(rows)
        self._stage("dispose", started)

    def _stage(self, stage: str, started: float) -> float:
        """Record that this batch spent perf_counter() - `started` in `stage` (metrics); return now."""
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.observe_stage(stage, now - started)
        return now

    def _match_existing(self, rows: list[Prepared]) -> None:
        """Find content already classified under this model, and drops already committed (recovery)."""
        model_id = self.model.info.model_id
        rows = [p for p in rows if not p.matched]
        hashes = sorted({p.sha256 for p in rows if p.sha256})
        first = self.store.first_by_content(hashes, model_id) if hashes else {}
        for p in rows:
            p.matched = True
            if p.row_id is not None:
                continue  # recorded by a worker that died before moving the file (its claim says so)
            if p.sha256 is not None and p.sha256 not in first:
                continue  # new content: it cannot have been recorded before
            unmoved = self._unmoved.get(p.item.path)
            if unmoved is not None and p.read_as is not None and (*p.read_as[:2], p.sha256) == unmoved[:3]:
                p.row_id = unmoved[3]  # committed here, its move failed: the retry
                continue
            # Rows name the inbox for good when ok files are left there: a touch or chmod of such a file since
            # is not a new drop, and its ctime changed. Elsewhere a different ctime is a later file.
            leave = self.config.files.on_success == "leave"
            p.row_id = self.store.find_drop(p.file, p.sha256, model_id, str(p.item.path),
                                            None if leave else p.ctime_ns)
            if p.row_id in self._stale_locations:  # that row's file was moved on: this is another drop
                p.row_id = None
            if p.row_id is None and p.sha256 is not None:
                p.same_as = first[p.sha256]

    def _infer(self, todo: list[Prepared]) -> None:
        """Run the model once over the distinct contents of `todo`; set their predictions (or errors)."""
        unique: dict[str, Prepared] = {}
        for p in todo:
            if p.pixels is not None or p.jpeg is not None:
                unique.setdefault(p.sha256 or str(id(p)), p)
        if not unique:
            return
        start = time.perf_counter()
        if self._gpu is None:
            order = list(unique)
            predictions = self.model.predict(np.stack([p.pixels for p in unique.values()]))
        else:
            order, on_device = self._decode_on_gpu(unique)
            try:
                predictions = self.model.predict(on_device) if order else []
            finally:
                on_device = None  # free the device memory now, also when inference failed
        inference_s = time.perf_counter() - start
        by_hash = dict(zip(order, predictions, strict=True))
        for p in todo:
            key = p.sha256 or str(id(p))
            if key in by_hash and p.error is None:
                p.prediction = by_hash[key]
                p.inference_ms = round(1000 * inference_s / len(order), 3)
            elif key in unique and unique[key].error is not None:  # the GPU refused it, the CPU too
                p.error = unique[key].error
            p.pixels = p.jpeg = None  # free the memory now
        if not order:
            return
        with self._cond:  # inference threads count concurrently
            self.counters.inferred += len(order)
        if self.metrics is not None:
            self.metrics.observe_batch(len(order), inference_s)

    def _decode_on_gpu(self, unique: dict[str, Prepared]) -> tuple[list[str], Any]:
        """Decode the batch's JPEGs on the GPU (the rest were decoded by the pool); return the keys of
        `unique` in row order and the batch as one tensor on the device (None when empty). When nvJPEG
        refuses the batch, its files are decoded on the CPU here; those that fail there get their error
        (a failed row)."""
        assert self._gpu is not None
        jpegs = [key for key, p in unique.items() if p.jpeg is not None]
        parts, order = [], []
        if jpegs:
            try:
                parts.append(self._gpu.decode([unique[key].jpeg for key in jpegs]))
                order += jpegs
                self.counters.gpu_decoded += len(jpegs)
            except RuntimeError as exc:
                log.info("the GPU could not decode a batch of %d JPEGs (%s); decoding them on the CPU",
                         len(jpegs), str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                for key in jpegs:
                    p = unique[key]
                    try:
                        p.pixels = self._pixels(p.jpeg)
                    except ImageRejected as rejected:
                        p.error = str(rejected)
                    p.jpeg = None
        decoded = [key for key, p in unique.items() if p.pixels is not None]
        if decoded:
            parts.append(self._gpu.upload(np.stack([unique[key].pixels for key in decoded])))
            order += decoded
        on_device = self._gpu.concat(parts) if parts else None
        self._gpu.synchronize()
        return order, on_device

    def _record(self, p: Prepared, now: datetime) -> ResultRecord:
        info = self.model.info
        waited = time.monotonic() - p.item.queued_at
        category = confidence = top3 = None
        status, error = p.outcome, p.error
        if p.same_as is not None:
            first = p.same_as
            category, confidence, top3, error = first.category, first.confidence, first.top3, first.error
        elif p.prediction is not None:
            category, confidence, top3 = p.prediction.category, p.prediction.confidence, p.prediction.top3
        return ResultRecord(
            file=p.file,
            location=str(p.item.path),
            sha256=p.sha256,
            size_bytes=p.size_bytes,
            status=status,
            category=category,
            confidence=confidence,
            top3=top3,
            error=error,
            model_id=info.model_id,
            model_name=info.name,
            duplicate_of=None,  # the store fills it in
            decode_ms=round(p.decode_ms, 3),
            inference_ms=p.inference_ms,
            total_ms=round(waited * 1000, 3),
            created_at=now - timedelta(seconds=waited),  # when the file was found ready
            worker=self.worker_id,
            host=self.host,
            ctime_ns=p.ctime_ns,
            claim_key=self._claim_key(p),
        )

    def _count(self, new: list[Prepared], records: list[ResultRecord], rows: list[Prepared],
               committed: float) -> None:
        c = self.counters
        c.batches += 1
        c.rows += len(new)
        c.last_batch_at = datetime.now(UTC)
        for p, record in zip(new, records, strict=True):
            if record.duplicate_of is not None:  # set by the store at commit
                c.duplicates += 1
                status = "duplicate"
            else:
                status = p.outcome
            if p.outcome == "failed":
                c.failed += 1
                log.info("recorded %r as failed: %s", p.file, record.error)  # a bad upload: worth a line
            else:
                c.ok += 1
            if self.metrics is not None:
                self.metrics.observe_image(status, committed - p.item.queued_at)
        c.recovered += len(rows) - len(new)
        with self._cond:
            self._recent.append((committed, len(new)))
            self._forget_before(committed - 60.0)  # bounded also when nobody asks for the throughput

    def _dispose(self, rows: list[Prepared]) -> None:
        """Move / leave / delete each committed file, then record the new locations in one call (and, in
        scale-out, release the files' claims)."""
        locations: list[tuple[int, str]] = []
        finished: list[Prepared] = []  # moved, deleted or vanished: their claims are released
        left: list[Prepared] = []  # left in place: their claims are kept, marked done
        stuck: dict[tuple[Path, str, float | None], list[tuple[Prepared, str]]] = {}  # not moved, by cause
        for p in rows:
            assert p.row_id is not None
            seen = p.read_as  # the identity of the file left in place, for rescans to skip it
            try:
                if p.outcome == "ok" and self.config.files.on_success == "leave":
                    seen = left_in_place(p.item.path, self.inbox, p.read_as, p.sha256) or p.read_as
                    dest: Path | None = p.item.path
                else:
                    dest = dispose(p.item.path, self.inbox, p.outcome, self.config, expect=p.read_as,
                                   sha256=p.sha256)
            except FileChanged as exc:
                # Not the file that was read: left alone. Its row keeps what was read; a new file there
                # gets a row of its own once this batch lets go of the path.
                log.warning("%s; row %d keeps what was read%s", exc.strerror, p.row_id,
                            ", the file there now is queued" if exc.replaced else "")
                if self.claims is None or exc.copied_to is not None:
                    locations.append((p.row_id, GONE if exc.copied_to is None else str(exc.copied_to)))
                self._stuck_rows.discard(p.row_id)
                finished.append(p)
                if exc.replaced:
                    self._look_again(p.item.path)
                continue
            except OSError as exc:
                if not os.path.lexists(p.item.path):
                    log.warning("%s vanished from the inbox after its row %d was committed%s",
                                p.item.path, p.row_id, " (moved by a worker that took its claim over?)"
                                if self.claims is not None else "")
                    if self.claims is None:
                        locations.append((p.row_id, GONE))
                    self._stuck_rows.discard(p.row_id)
                    finished.append(p)  # with claims, the worker that moved it records where to
                    continue
                self.counters.disposition_errors += 1
                self._stuck_rows.add(p.row_id)
                if p.read_as is not None:
                    self._unmoved.pop(p.item.path, None)
                    self._unmoved[p.item.path] = (*p.read_as[:2], p.sha256, p.row_id)
                    if len(self._unmoved) > UNMOVED_MAX:
                        del self._unmoved[next(iter(self._unmoved))]
                delay = self._schedule_retry(p.item.path)
                target = self.config.failed_path if p.outcome == "failed" else self.config.processed_path
                cause = os.strerror(exc.errno) if exc.errno else str(exc)
                stuck.setdefault((target, cause, delay), []).append((p, str(exc.strerror or exc)))
                continue
            self._retries.pop(p.item.path, None)
            self._unmoved.pop(p.item.path, None)
            self._stuck_rows.discard(p.row_id)
            location = DELETED if dest is None else str(dest)
            if location != str(p.item.path):
                locations.append((p.row_id, location))
                finished.append(p)
            else:
                self._remember_left(p.item.path, seen)
                left.append(p)
        for (target, cause, delay), files in stuck.items():  # one line per batch and cause, not per file
            retry = f", retrying in {delay:g} s" if delay is not None else ", giving up"
            if len(files) == 1:
                (one, reason), = files
                log.error("cannot dispose of %s (row %d committed) into %s: %s; it stays in the inbox%s",
                          one.file, one.row_id, target, reason, retry)
            else:
                log.error("cannot dispose of %d files (%s, …; rows committed) into %s: %s; they stay in the "
                          "inbox%s", len(files), ", ".join(f.file for f, _ in files[:3]), target, cause, retry)
        release = None  # scale-out: the claims are released in the same transaction
        unmoved = [p for files in stuck.values() for p, _ in files]  # their claims go to whoever can move them
        if self.claims is not None and (finished or left or unmoved):
            claims, done, kept = self.claims, self._claim_keys(finished), self._claim_keys(left)
            handed_on = self._claim_keys(unmoved)
            release = lambda conn: claims.release_in(conn, done, left=kept, stuck=handed_on)  # noqa: E731
        stale = self._stale_locations
        locations = [*stale.items(), *locations]
        if locations or release is not None:
            try:
                self.store.set_locations(locations, also=release)
                if stale:
                    self._stale_locations = {}
            except StoreError as exc:  # the files are safe where they are; only `location` is stale
                log.error("cannot record the new location of %d files: %s; trying again with the next batch",
                          len(locations), exc)
                # Kept, retried, and meanwhile known to be stale: such a row still names the inbox, and a
                # later drop of the same name and bytes must not be taken for it (see _match_existing).
                self._stale_locations = dict(locations[-STALE_LOCATIONS_MAX:])
                if self.claims is not None:  # done with them all the same: release on their own
                    self.claims.release_later(self._claim_keys(finished), left=self._claim_keys(left))

    # Faults and retries -------------------------------------------------------------------------------
    def _commit_failed(self, rows: list[Prepared], exc: StoreError, formed_at: float) -> None:
        """The database refused the batch's lookups or its commit: its files stay in the inbox and are
        retried after `_back_off`."""
        self.counters.commit_errors += 1
        delay = self._back_off(rows, formed_at)
        log.error("cannot record %d results: %s; the files stay in the inbox, retrying in %g s",
                  len(rows), exc, delay)

    def _inference_failed(self, rows: list[Prepared], exc: Exception, formed_at: float) -> None:
        """The model raised on the batch (a model broken at run time, a GPU gone): as for a failed commit,
        its files stay in the inbox and are retried after `_back_off`; the error is logged with its
        traceback, since it is a fault of the model or the machine rather than of an image."""
        self.counters.inference_errors += 1
        delay = self._back_off(rows, formed_at)
        log.error("inference failed for a batch (%d files): %s; the files stay in the inbox, retrying in %g s",
                  len(rows), exc, delay, exc_info=exc)
        # Scale-out: let the other workers have them meanwhile. Kept and renewed, the claims of a worker
        # whose model keeps failing (a GPU gone) held its files from healthy workers until it stopped.
        # (A claim that carries a row is kept: its file is only to be moved, not classified again.)
        self._release_claims(p for p in rows if p.row_id is None)

    def _back_off(self, rows: list[Prepared], formed_at: float) -> float:
        """Form no batch for a delay that doubles with each failure in a row (a batch formed before the
        previous failure, already in flight then, keeps its delay), and retry `rows` after it."""
        if formed_at >= self._failed_at or not self._failures_in_a_row:
            self._failures_in_a_row += 1
        self._failed_at = time.monotonic()
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self._failures_in_a_row - 1))
        self.queue.pause(delay)
        for p in rows:
            self._schedule_retry(p.item.path, delay)
        return delay

    def _schedule_retry(self, path: Path, delay: float | None = None) -> float | None:
        """Retry `path` later; returns the delay, or None when it was given up (max_attempts)."""
        retry = self._retries.setdefault(path, _Retry())
        retry.attempts += 1
        if self.max_attempts is not None and retry.attempts >= self.max_attempts:
            del self._retries[path]
            self._given_up.add(path)
            self.counters.given_up += 1
            return None
        if delay is None:
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (retry.attempts - 1))
        retry.due = time.monotonic() + delay
        return delay

    def _requeue_due(self) -> None:
        now = time.monotonic()
        for path, retry in list(self._retries.items()):
            if retry.due == float("inf") and not self.queue.known(path):
                # Re-queued, then given back by the feeder without reaching a batch (gone, or recorded
                # by another worker): the retry is over.
                del self._retries[path]
                continue
            if retry.due > now:
                continue
            if self.queue.put(path):
                retry.due = float("inf")  # queued; rescheduled if it fails again
            else:  # already queued by the watcher, or the queue is full: try again shortly
                retry.due = now + REQUEUE_AGAIN_S

    def _until_next_retry(self, timeout: float | None) -> float | None:
        dues = [r.due for r in self._retries.values() if r.due != float("inf")]
        if not dues:
            return timeout
        until = max(0.0, min(dues) - time.monotonic())
        return until if timeout is None else min(timeout, until)

    def _look_again(self, path: Path, after_s: float = 0.0) -> None:
        """Queue `path` again as soon as its batch lets go of it, or `after_s` later (not counted as a
        failed attempt)."""
        self._retries.setdefault(path, _Retry()).due = time.monotonic() + after_s

    def _remember_left(self, path: Path, read_as: tuple[int, int, int, int] | None = None) -> None:
        """`path` is done and stays in the inbox: rescans skip it while it is unchanged. `read_as`: its
        identity when it was read (a file rewritten since is not taken for the one recorded)."""
        signature = _signature(path) if read_as is None else read_as[1:]
        if signature is None:
            return
        self._left[path] = signature
        self._left.move_to_end(path)
        while len(self._left) > LEFT_MEMORY:
            self._left.popitem(last=False)

    def _log_skip(self, p: Prepared) -> None:
        key = p.skip_key or (p.item.path,)
        if key in self._skips_logged:
            return
        if len(self._skips_logged) >= SKIP_MEMORY:
            self._skips_logged.clear()
        self._skips_logged.add(key)
        self.counters.skipped += 1
        log.warning("skipping %s: %s", p.file or p.item.path, p.skipped)


# ------------------------------------------------------------------------------------------------------
# Classifying files without a database (`fashion-worker classify`)
# ------------------------------------------------------------------------------------------------------
def classify_files(
    model: Model, paths: Iterable[Path], *, max_file_bytes: int, max_pixels: int, batch_size: int = 16
) -> Iterator[dict[str, Any]]:
    """Classify files in batches; yield one dict per file, in order.

    ok: {file, status, category, confidence, top3: [[label, p], ...], model}; a bad file:
    {file, status: "failed", error, model}.
    """
    model_name = f"{model.info.name} {model.info.version}"
    chunk: list[tuple[Path, np.ndarray | None, str | None]] = []

    def flush() -> Iterator[dict[str, Any]]:
        good = [pixels for _, pixels, _ in chunk if pixels is not None]
        predictions = iter(model.predict(np.stack(good)) if good else [])
        for path, pixels, error in chunk:
            if pixels is None:
                yield {"file": str(path), "status": "failed", "error": error, "model": model_name}
                continue
            pred = next(predictions)
            yield {"file": str(path), "status": "ok", "category": pred.category,
                   "confidence": pred.confidence, "top3": [[label, prob] for label, prob in pred.top3],
                   "model": model_name}
        chunk.clear()

    for path in paths:
        path = Path(path)
        chunk.append((path, *_load_for_classify(model, path, max_file_bytes, max_pixels)))
        if len(chunk) >= batch_size:
            yield from flush()
    if chunk:
        yield from flush()


def _rows(batch: list[Prepared]) -> list[Prepared]:
    """The files of `batch` that get a row (or are only moved): all but the skipped and the vanished."""
    return [p for p in batch if p.skipped is None and not p.gone and not p.writing]


def _earliest(first: float, second: float | None) -> float:
    return first if second is None else min(first, second)


def _load_for_classify(
    model: Model, path: Path, max_file_bytes: int, max_pixels: int
) -> tuple[np.ndarray | None, str | None]:
    """(pixels, None) or (None, why it cannot be classified)."""
    if not os.path.lexists(path):
        return None, "no such file"
    try:
        data, _ = read_image_file(path.parent, path, max_file_bytes)
        return load_pixels(data, model.input_size, max_pixels=max_pixels, policy=model.info.resize), None
    except (ImageRejected, FileSkipped) as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"


def _skip_key(path: Path) -> tuple[Any, ...]:
    st = lstat_or_none(path)
    return (path,) if st is None else (path, st.st_ino, st.st_mtime_ns)


def _signature(path: Path) -> tuple[int, int, int] | None:
    st = lstat_or_none(path)
    return None if st is None else file_signature(st)
