"""The worker process: start up, loop over batches, shut down cleanly.

    Worker(config).run()            the daemon (`fashion-worker run`)
    Worker(config).run(once=True)   process what is in the inbox now, then return (`run --once`)

`run` is a short loop of named steps inside try/finally:

- `start_up`: create the folders, take the inbox lock, open the database (migrating it), load and warm up
  the model, start the metrics endpoint (if a port is set), start the pipeline, start the watcher and
  scan what is already in the inbox, then tell systemd READY=1. On PostgreSQL the inbox lock gives way
  to a worker-id lock and the claims of worker.claims, so that several workers can share an inbox.
- the loop: `work` blocks until an inferred batch is ready (an idle worker sleeps in a condition wait: no
  polling), commits and disposes of it, and `housekeeping` sends WATCHDOG=1 and STATUS= on systemd's watchdog interval
  and a heartbeat to the database every HEARTBEAT_S seconds.
- `shut_down`: STOPPING=1, stop the watcher and the pipeline (unprocessed files stay in the inbox; batches
  not yet committed are dropped: inference under way is waited for, decoding cancelled), record
  the stop (giving back the claims first), close the database, release the lock.

Signals: the first SIGTERM or SIGINT lets the batch in progress finish (it is committed and its files
disposed of), then the loop ends and `run` returns 0. A second signal exits at once with 128 + signal
(130 for SIGINT, 143 for SIGTERM); whatever was committed but not yet moved is moved by the next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import onnxruntime as ort

from worker.claims import Claims
from worker.config import Config
from worker.exceptions import ConfigError, FashionWorkerError, InboxLocked, StoreError
from worker.lock import InboxLock, WorkerIdLock, sqlite_file, uses_claims
from worker.metrics import Metrics
from worker.model import Model
from worker.notify import Notifier
from worker.pipeline import Pipeline
from worker.recovery import recover_locations, still_waiting, worker_folders
from worker.store import Store
from worker.watch import InboxWatcher

log = logging.getLogger(__name__)

STORE_RETRY_S = 60.0  # how long one database write is retried on lock errors before the pipeline backs off
HEARTBEAT_S = 10.0  # database heartbeat (workers table) and the longest the main loop sleeps
ONCE_MAX_ATTEMPTS = 3  # run --once: give up on a file after this many failed commits or moves
ONCE_SETTLE_POLL_S = 0.1  # run --once, while the watcher holds files that are settling
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def layout_problems(config: Config) -> list[str]:
    """Folder settings that would make the worker feed on its own output; [] when the layout is sound."""
    inbox = Path(os.path.abspath(config.inbox_path))
    problems = []
    folders = (("files.processed_dir", config.processed_path), ("files.failed_dir", config.failed_path))
    for name, path in folders:
        if name == "files.processed_dir" and config.files.on_success != "move":
            continue
        resolved = Path(os.path.abspath(path))
        if resolved == inbox or inbox in resolved.parents:
            problems.append(f"{name} ({resolved}) must not be the inbox or inside it ({inbox}): "
                            "the worker would pick its own output up again")
    return problems


def make_model(config: Config, *, one_caller: bool = False) -> Model:
    """The model the config names (or the shipped default), with its execution providers and threads.
    `one_caller`: for a single thread running batches one after another (`classify`), no sessions for
    batches at once."""
    return Model(
        config.model_path,
        providers=config.model.providers,
        intra_op_threads=config.model.intra_op_threads,
        inter_op_threads=config.model.inter_op_threads,
        spin_wait=config.model.spin_wait,
        concurrent_batches=1 if one_caller else config.model.concurrent_batches,
    )


class Worker:
    """One worker process over one inbox and one database."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.host = socket.gethostname()
        self.worker_id = config.service.worker_id or f"{self.host}:{os.getpid()}"
        self.notifier = Notifier.from_environment()
        self.metrics = Metrics()
        self.lock: InboxLock | None = None
        self.worker_lock: WorkerIdLock | None = None  # PostgreSQL: one live process per worker id
        self.claims: Claims | None = None  # PostgreSQL: files are claimed in the database (scale-out)
        self.store: Store | None = None
        self.model: Model | None = None
        self.pipeline: Pipeline | None = None
        self.watcher: InboxWatcher | None = None
        self.stop_requested = False
        self._signals = 0
        self._watchdog_s = self.notifier.watchdog_interval()
        self._next_watchdog = 0.0
        self._next_heartbeat = 0.0
        self._feeder_dead_logged = False
        self._started = False  # start-up completed: its end is logged too
        self.id_taken: str | None = None  # why the worker stopped: another process took its worker id
        self._reported = False  # this process has named itself in the workers row
        self._inherited: tuple[int, ...] = ()  # rows of this id's crashed run whose files waited at start-up

    # The whole run ------------------------------------------------------------------------------------
    def run(self, once: bool = False) -> int:
        """Run until stopped (or, with `once`, until the inbox as it is now is done); the exit code."""
        previous = self._install_signal_handlers()
        try:
            self.start_up(once=once)
            if once:
                code = self.drain()
            else:
                while not self.stop_requested:
                    self.work()
                    self.housekeeping()
                code = 0
            if self.id_taken is not None:
                raise InboxLocked(self.id_taken)
            return code
        finally:
            self.shut_down()
            self._restore_signal_handlers(previous)

    def start_up(self, once: bool = False) -> None:
        config = self.config
        # First the checks that refuse a second worker (one line, before anything is loaded); then the
        # model, so that a bad one stops start-up before folders and a SQLite database are made.
        if uses_claims(config.database_url):  # scale-out: claims instead of the inbox lock
            self.store = self.open_store()
            if config.service.lock:
                self.worker_lock = WorkerIdLock(self.store, self.worker_id, stopping=lambda: self.stop_requested)
                self.worker_lock.acquire()
            # Before this process's first heartbeat, which would name it in the id's row: recovery reads
            # there the run of this id that crashed (its pid, its start).
            self._inherited = recover_locations(self.store, config, self.host, self.worker_id).inherited
            if config.service.lock:
                # The id's row names this process from now on, not only once the model is warm (tens of
                # seconds on a GPU): a restart after a host reset during start-up then finds a gone process
                # holding the id and waits for its session to end, instead of refusing an unknown holder.
                self._heartbeat()
            self.claims = Claims(self.store, self.worker_id, self.host, lease_s=config.database.claim_lease_s)
            self.claims.start()
        elif config.service.lock:
            self.lock = InboxLock(config.inbox_path, config.database_url)
            self.lock.acquire()
        self.model = make_model(config)
        if config.batch.decode_on == "gpu" and self.model.device != "cuda":
            raise ConfigError(gpu_decode_problem(self.model))
        self.make_folders()
        if self.store is None:
            self.store = self.open_store()
            # Rows a crashed worker left naming the inbox.
            self._inherited = recover_locations(self.store, config, self.host, self.worker_id).inherited
        self.model.warm_up(config.batch.max_batch)
        info = self.model.info
        self.metrics.set_model(info.model_id, info.name, info.version)
        if config.service.metrics_port:
            try:
                self.metrics.start_server(config.service.metrics_host, config.service.metrics_port)
            except OSError as exc:
                raise ConfigError(f"cannot serve metrics on {config.service.metrics_host}:"
                                  f"{config.service.metrics_port}: {exc.strerror or exc}") from None
        self.pipeline = Pipeline(
            config, self.model, self.store, worker_id=self.worker_id, metrics=self.metrics,
            rescan=self._rescan, max_attempts=ONCE_MAX_ATTEMPTS if once else None,
            claims=self.claims, host=self.host,
        )
        self.pipeline.start()
        self.watcher = InboxWatcher(config, self.pipeline.submit)
        self.pipeline.being_written = self.watcher.being_written
        # The watcher also runs in --once mode: files still being written, or closed less than
        # inbox.settle_s ago, are reported by it once complete.
        self.watcher.start()  # starts the observer, then scans what is already there
        log.info("worker %s %s inbox %s (%s); model %s %s; database %s%s",
                 self.worker_id, "processing" if once else "watching", config.inbox_path,
                 self.watcher.mode, info.name, info.version, self.store.url,
                 f" (shared: files are claimed, lease {self.claims.lease_s:g} s)" if self.claims else "")
        self._heartbeat()
        self.metrics.set_ready(True)
        self.metrics.heartbeat()
        self.notifier.ready(self.pipeline.status_line())
        self._next_watchdog = time.monotonic()
        self._started = True

    def open_store(self) -> Store:
        """The database. Under a systemd watchdog, one write may block the loop (lock waits and retries)
        for at most about a third of the ping interval each, so a database held by another writer never
        gets the worker killed: the write fails, the pipeline backs off and retries, and pings go on."""
        busy_ms, retry_s = self.config.database.busy_timeout_ms, STORE_RETRY_S
        if self._watchdog_s is not None:
            bound = max(1.0, self._watchdog_s / 3)
            busy_ms, retry_s = min(busy_ms, int(bound * 1000)), bound
        return Store(self.config.database_url, busy_timeout_ms=busy_ms, retry_s=retry_s)

    def make_folders(self) -> None:
        config = self.config
        problems = layout_problems(config)
        if problems:
            raise ConfigError(problems[0])
        folders = [config.inbox_path, config.failed_path]
        if config.files.on_success == "move":
            folders.append(config.processed_path)
        for folder in folders:
            if folder.exists() and not folder.is_dir():
                raise ConfigError(f"{folder} is not a folder")
            if folder == config.inbox_path and not folder.exists():
                log.info("created the inbox %s (it did not exist)", folder)  # a first start, or a typo: say so
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create folder {folder}: {exc.strerror or exc}") from None

    def work(self) -> int:
        """Wait for the next decoded batch (blocking, at most until housekeeping is due) and process it.

        An unexpected error (a bug) is logged and the loop goes on: the batch's files stay in the inbox
        (or, if their rows were committed, are moved by the next pass over them) and the periodic rescan
        offers them again.
        """
        assert self.pipeline is not None
        try:
            return self.pipeline.process_next(timeout=self._until_housekeeping())
        except Exception:
            log.exception("unexpected error while processing a batch; its files stay in the inbox")
            return 0

    def drain(self) -> int:
        """run --once: process until nothing is queued, in flight, waiting for a retry or settling."""
        assert self.pipeline is not None and self.watcher is not None
        pipeline, watcher = self.pipeline, self.watcher
        recheck_s = max(self.config.inbox.settle_s, ONCE_SETTLE_POLL_S)
        last_scan = time.monotonic()
        while not self.stop_requested:
            if pipeline.busy():
                pipeline.process_next(self._until_housekeeping(), until_idle=True)
            elif self._watcher_pending() and time.monotonic() - last_scan < recheck_s:
                # Files being written or settling: wait for the watcher to report them.
                pipeline.process_next(min(ONCE_SETTLE_POLL_S, self._until_housekeeping()))
            else:
                # A scan reports what has settled meanwhile (also an empty file whose close event came
                # before the watcher started), and closes the gap between a report and its submit.
                accepted = pipeline.accepted
                watcher.scan()
                last_scan = time.monotonic()
                if pipeline.accepted == accepted and not pipeline.busy() and not self._watcher_pending():
                    break
            self.housekeeping()
        counters = self.pipeline.counters
        log.info("done: %d results recorded (%d failed, %d duplicates), %d moved after a crash, %d skipped",
                 counters.rows, counters.failed, counters.duplicates, counters.recovered, counters.skipped)
        if counters.given_up:
            log.error("%d files stay in the inbox: their results could not be recorded or they could not "
                      "be moved (see the errors above)", counters.given_up)
            return 1
        return 0

    def housekeeping(self) -> None:
        """Cheap unless due: WATCHDOG=1 + STATUS= (systemd), the database heartbeat, metrics."""
        assert self.pipeline is not None
        now = time.monotonic()
        self.metrics.heartbeat()
        self.metrics.set_queue_depth(self.pipeline.queue_depth)
        if self._watchdog_s is not None and now >= self._next_watchdog:
            if self.pipeline.feeding:
                self.notifier.watchdog()
                self.notifier.status(self.pipeline.status_line())
            elif not self._feeder_dead_logged:  # no more pings: systemd's watchdog restarts the worker
                self._feeder_dead_logged = True
                log.error("the batching thread has ended; no batch can form, so the worker stops telling "
                          "systemd it is alive (WatchdogSec restarts it)")
                self.notifier.status("batching thread ended; waiting for the watchdog restart")
            self._next_watchdog = now + self._watchdog_s
        if now >= self._next_heartbeat:
            self._check_worker_id()
            self._heartbeat()

    def shut_down(self) -> None:
        """Stop everything that start_up started, in reverse order; safe after a partial start-up."""
        self.metrics.set_ready(False)
        status = self.pipeline.status_line() if self.pipeline is not None else "stopping"
        self.notifier.stopping(status)
        if self.watcher is not None:
            with _logged("stopping the watcher"):
                self.watcher.stop()
        if self.pipeline is not None:
            with _logged("stopping the pipeline"):
                self.pipeline.stop()
        if self.claims is not None:
            with _logged("giving back claims"):
                self.claims.close()
        if self.store is not None:
            # Only a process that named itself in the workers row records its stop there: a second process
            # refused the id would otherwise mark the running one's row stopped; and after id_taken the row
            # is the other process's.
            if self._reported and self.id_taken is None:
                with _logged("recording the stop"):
                    self._heartbeat(stopped=self._nothing_waiting())
            if self.worker_lock is not None:
                self.worker_lock.release()
            self.store.close()
        self.metrics.stop()
        if self.lock is not None:
            self.lock.release()
        self.notifier.close()
        if self._started and self.pipeline is not None:
            log.info("stopped; %d results recorded since start", self.pipeline.counters.rows)

    def _nothing_waiting(self) -> bool:
        """At a clean stop: whether no recorded file of this run (or of the crashed run of this id it took
        over) waits in the inbox, and every moved file's place is recorded. Otherwise the workers row is
        left unstopped: the next start's recovery then looks at its rows again (worker.recovery), since the
        run that moves those files could be killed before recording where."""
        assert self.store is not None
        stuck, unrecorded = self.pipeline.left_behind() if self.pipeline is not None else ([], 0)
        waiting = still_waiting(self.store, self.config, (*self._inherited, *stuck))
        if waiting or unrecorded:
            log.info("%d recorded file(s) still wait in the inbox and %d moved file(s) have no recorded place: "
                     "the next start looks at this worker's rows again", waiting, unrecorded)
        return not (waiting or unrecorded)

    def request_stop(self) -> None:
        """Finish the batch in progress, then leave the loop (what SIGTERM does; also for tests)."""
        self.stop_requested = True
        if self.pipeline is not None:
            self.pipeline.wake()

    # Helpers -------------------------------------------------------------------------------------------
    def _rescan(self) -> int:
        """The pipeline asks for a rescan after its queue overflowed and drained."""
        return self.watcher.scan() if self.watcher is not None else 0

    def _watcher_pending(self) -> int:
        """Files the watcher has seen but not reported yet (being written, or settling)."""
        return self.watcher.pending if self.watcher is not None else 0

    def _until_housekeeping(self) -> float:
        due = self._next_heartbeat
        if self._watchdog_s is not None:
            due = min(due, self._next_watchdog)
        return max(0.0, due - time.monotonic())

    def _check_worker_id(self) -> None:
        """PostgreSQL: still the one process under this worker id? A worker that lost the lock's connection
        (a network cut long enough to end its session) while another process started under its id stops
        after the batch in progress, so that one worker runs under each id."""
        lock = self.worker_lock
        if lock is None or self.id_taken is not None or lock.check() or not lock.taken:
            return
        self.id_taken = (f"another process took worker id {self.worker_id!r} while this one had lost its "
                         f"database connection; this one stopped (give each worker its own service.worker_id)")
        self.request_stop()

    def _heartbeat(self, stopped: bool = False) -> None:
        self._next_heartbeat = time.monotonic() + HEARTBEAT_S
        if self.store is None or self.id_taken is not None:
            return
        processed = self.pipeline.counters.rows if self.pipeline is not None else 0
        try:
            self.store.heartbeat(self.worker_id, self.host, os.getpid(), processed, stopped=stopped,
                                 folders=worker_folders(self.config))
            self._reported = True
        except StoreError as exc:
            log.warning("cannot record the heartbeat: %s", exc)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals > 1:
            log.warning("%s again: exiting now", name)
            os._exit(128 + signum)
        log.info("%s: finishing the current batch, then stopping (send it again to exit at once)", name)
        self.request_stop()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread (tests call run in threads)
        return {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _logged(what: str) -> Any:
    try:
        yield
    except Exception:
        log.exception("error while %s", what)


# ------------------------------------------------------------------------------------------------------
# Pre-flight checks (`fashion-worker doctor`): what start_up needs, checked without starting
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'OK' if self.ok else 'FAIL':<4}  {self.name}: {self.detail}"


def gpu_decode_problem(model: Model) -> str:
    return (f'batch.decode_on = "gpu" needs the model on CUDA; it runs on {", ".join(model.providers)} '
            '(install onnxruntime-gpu, or use "cpu")')


def _check_decode(config: Config, model: Model) -> Check:
    threads = config.batch.decode_threads
    if config.batch.decode_on == "cpu":
        return Check("decode", True, f"on the CPU, {threads} thread(s)")
    if model.device != "cuda":
        return Check("decode", False, gpu_decode_problem(model))
    try:
        from worker.gpudecode import GpuDecoder

        GpuDecoder(model.input_size)
    except ConfigError as exc:
        return Check("decode", False, str(exc))
    return Check("decode", True, f"JPEGs on the GPU (nvJPEG), other formats on the CPU; {threads} thread(s) read")


def run_checks(load_config: Callable[[], Config], config_source: str = "") -> Iterator[Check]:
    """Yield one Check per item: config, folders, model, providers, database, lock, inotify limits.

    `load_config` is called once; when it raises, the config check fails and nothing else is checked.
    """
    try:
        config = load_config()
    except FashionWorkerError as exc:
        yield Check("config", False, " ".join(str(exc).split()))
        return
    yield Check("config", True, config_source or "loaded")
    problems = layout_problems(config)
    yield Check("folders", not problems, problems[0] if problems else "inbox, processed and failed are distinct")
    folders = [("inbox", config.inbox_path), ("failed", config.failed_path)]
    if config.files.on_success == "move":
        folders.insert(1, ("processed", config.processed_path))
    for name, folder in folders:
        yield _check_folder(name, folder)
    model: Model | None = None
    try:
        model = make_model(config, one_caller=True)
    except FashionWorkerError as exc:
        yield Check("model", False, " ".join(str(exc).split()))
    if model is not None:
        info = model.info
        yield Check("model", True, f"{info.path} ({info.name} {info.version}, {len(info.labels)} labels, "
                                   f"input {info.input_size[0]}x{info.input_size[1]}, id {info.model_id[:12]})")
        available = ", ".join(ort.get_available_providers())
        yield Check("providers", True, f"using {', '.join(model.providers)} (available: {available})")
        yield _check_decode(config, model)
    yield _check_database(config)
    yield _check_lock(config)
    yield _check_inotify(config)


def _check_folder(name: str, folder: Path) -> Check:
    if folder.is_dir():
        if os.access(folder, os.W_OK | os.X_OK):
            return Check(name, True, f"{folder} exists and is writable")
        return Check(name, False, f"{folder} is not writable by uid {os.geteuid()}")
    if folder.exists():
        return Check(name, False, f"{folder} exists but is not a folder")
    parent = next((p for p in folder.parents if p.exists()), None)
    if parent is not None and parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return Check(name, True, f"{folder} does not exist yet; the worker creates it")
    return Check(name, False, f"{folder} does not exist and cannot be created ({parent} is not writable)")


def _check_database(config: Config) -> Check:
    url = config.database_url
    path = sqlite_file(url)
    if path is not None and not path.exists():
        check = _check_folder("database", path.parent)
        if not check.ok:
            return check
        return Check("database", True, f"{path} does not exist yet; the worker creates it")
    try:
        store = Store(url, busy_timeout_ms=config.database.busy_timeout_ms)
    except FashionWorkerError as exc:
        return Check("database", False, " ".join(str(exc).split()))
    try:
        if path is not None:  # SQLite opens a file it cannot write read-only, and says so only at a write
            for what, where in (("file", path), ("folder", path.parent)):
                if not os.access(where, os.W_OK):
                    return Check("database", False, f"{store.url} opens, but its {what} {where} is not writable "
                                 f"by uid {os.geteuid()}: the worker could not record results")
        return Check("database", True, f"{store.url} opens, schema version {store.schema_version}")
    finally:
        store.close()


def _check_lock(config: Config) -> Check:
    if not config.service.lock:
        return Check("lock", True, "disabled (service.lock = false)")
    if uses_claims(config.database_url):
        return _check_worker_id(config)
    lock = InboxLock(config.inbox_path, config.database_url)
    if not lock.path.exists():  # nobody holds it; checked without creating the file (or its folder)
        folder = _check_folder("lock", lock.path.parent)
        if not folder.ok:
            return folder
        return Check("lock", True, f"free ({lock.path} does not exist yet; the worker creates it)")
    try:
        lock.acquire()
    except InboxLocked as exc:
        return Check("lock", True, f"a worker is running: {exc}")
    except FashionWorkerError as exc:
        return Check("lock", False, " ".join(str(exc).split()))
    lock.release()
    return Check("lock", True, f"free ({lock.path})")


def _check_worker_id(config: Config) -> Check:
    """PostgreSQL: no inbox lock (files are claimed); a configured worker id must not be in use."""
    shared = f"no inbox lock: workers share inboxes through claims (lease {config.database.claim_lease_s:g} s)"
    worker_id = config.service.worker_id
    if not worker_id:
        return Check("lock", True, f"{shared}; worker id HOST:PID")
    try:
        store = Store(config.database_url, busy_timeout_ms=config.database.busy_timeout_ms, retry_s=0)
    except FashionWorkerError as exc:
        return Check("lock", False, " ".join(str(exc).split()))
    try:
        with WorkerIdLock(store, worker_id, wait_s=0):  # a check: no waiting for a gone process's session
            pass
    except InboxLocked as exc:
        return Check("lock", True, f"{shared}; a worker is running: {' '.join(str(exc).split())}")
    except FashionWorkerError as exc:
        return Check("lock", False, " ".join(str(exc).split()))
    finally:
        store.close()
    return Check("lock", True, f"{shared}; worker id {worker_id!r} is free")


def _check_inotify(config: Config) -> Check:
    if config.inbox.polling:
        return Check("inotify", True, "not used (inbox.polling = true)")
    limits = {}
    for key in ("max_user_watches", "max_user_instances"):
        try:
            limits[key] = int(Path(f"/proc/sys/fs/inotify/{key}").read_text())
        except (OSError, ValueError):
            return Check("inotify", True, "no inotify here; the worker polls the inbox")
    folders = 1
    if config.inbox.recursive and config.inbox_path.is_dir():
        folders += sum(len(dirs) for _, dirs, _ in os.walk(config.inbox_path))
    detail = (f"max_user_watches {limits['max_user_watches']}, max_user_instances "
              f"{limits['max_user_instances']}; the inbox needs {folders} watch(es)")
    if folders >= limits["max_user_watches"]:
        return Check("inotify", False, detail + "; raise fs.inotify.max_user_watches (or use polling)")
    return Check("inotify", True, detail)
