"""worker/pipeline.py: batching, decoding, duplicates, crash recovery and fault handling.

Everything is real: image files in a temp inbox, a SQLite file through worker.store, onnxruntime on a
generated model. The watcher is replaced by direct `submit()` calls (what its callback does), so each test
controls exactly which paths arrive and when.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import make_model, unwritable, write_image

from worker import config as config_mod
from worker.config import Config
from worker.daemon import make_model as model_for
from worker.model import Model
from worker.pipeline import Pipeline, ReadyQueue, classify_files
from worker.store import ResultRecord, Store

if TYPE_CHECKING:
    from worker.claims import Claims


# Helpers -------------------------------------------------------------------------------------------------
def make_config(tmp_path: Path, **overrides: object) -> Config:
    values = {"inbox.path": str(tmp_path / "inbox"), "files.processed_dir": str(tmp_path / "processed"),
              "files.failed_dir": str(tmp_path / "failed"), "database.url": f"sqlite:///{tmp_path}/db.sqlite",
              "model.path": str(tmp_path / "model.onnx")}
    values.update(overrides)
    cfg = config_mod.load(None, values)
    cfg.inbox_path.mkdir(parents=True, exist_ok=True)
    if not Path(cfg.model.path).exists():
        make_model(Path(cfg.model.path))
    return cfg


class Harness:
    """A pipeline over a real store and model, driven like the daemon's loop."""

    def __init__(self, cfg: Config, store: Store | None = None, **kwargs: object) -> None:
        self.cfg = cfg
        self.store = store or Store(cfg.database_url)
        self.model = model_for(cfg)  # as the daemon makes it: two batches at once on 2 cores or more
        self.pipeline = Pipeline(cfg, self.model, self.store, worker_id="test", **kwargs)
        self.pipeline.start()

    def submit_all(self) -> int:
        return sum(self.pipeline.submit(p) for p in sorted(self.cfg.inbox_path.rglob("*")) if not p.is_dir())

    def drain(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pipeline.busy():
            assert time.monotonic() < deadline, "pipeline did not go idle"
            self.pipeline.process_next(0.5, until_idle=True)

    def rows(self, where: str = "1") -> list[tuple]:
        with sqlite3.connect(self.store.path) as db:
            return db.execute(
                f"SELECT file, status, category, duplicate_of, location, error FROM results WHERE {where} "
                "ORDER BY id").fetchall()

    def close(self) -> None:
        self.pipeline.stop()
        self.store.close()


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
def harness(cfg: Config):
    h = Harness(cfg)
    yield h
    h.close()


# The ready queue -----------------------------------------------------------------------------------------
class LookupLog(Store):
    """The real store, noting which thread looks content up (what is asserted is where, not what)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.lookups: list[str] = []

    def first_by_content(self, sha256s: list[str], model_id: str):  # type: ignore[no-untyped-def]
        self.lookups.append(threading.current_thread().name)
        return super().first_by_content(sha256s, model_id)


def wait_early(harness: Harness, name: str, seconds: float = 1.5):  # type: ignore[no-untyped-def]
    """The Prepared of `name` once its early read has finished (inside a window longer than `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        for item, future in list(harness.pipeline._early.items()):
            if item.path.name == name and future.done():
                return future.result()
        assert time.monotonic() < deadline, "reading did not start during the batching window"
        time.sleep(0.01)


def test_queue_forms_full_batches_at_once_and_partial_ones_after_max_wait() -> None:
    queue = ReadyQueue(max_queue=10)
    for i in range(5):
        assert queue.put(Path(f"/in/{i}"))
    # A full batch does not wait for max_wait: with an hour's window, the test's timeout would end it.
    assert [q.path.name for q in queue.take(max_batch=3, max_wait_s=3600)] == ["0", "1", "2"]
    batch = queue.take(max_batch=3, max_wait_s=0.05)  # two left: they go once the oldest waited 50 ms
    assert [q.path.name for q in batch] == ["3", "4"]
    assert time.monotonic() - batch[0].queued_at >= 0.05


def test_queue_refuses_paths_queued_or_in_flight_until_released() -> None:
    queue = ReadyQueue(max_queue=10)
    assert queue.put(Path("/in/a"))
    assert not queue.put(Path("/in/a"))
    (item,) = queue.take(max_batch=4, max_wait_s=0)
    assert not queue.put(Path("/in/a"))  # in flight
    assert queue.pending == 1 and queue.depth == 0
    queue.release([item.path])
    assert queue.put(Path("/in/a"))


def test_queue_is_bounded_and_asks_for_a_rescan_once_drained_and_settled() -> None:
    queue = ReadyQueue(max_queue=3, low_water=1, rescan_delay_s=0.2)
    accepted = [queue.put(Path(f"/in/{i}")) for i in range(5)]
    dropped_at = time.monotonic()
    assert accepted == [True, True, True, False, False]
    assert (queue.depth, queue.dropped, queue.overflowed) == (3, 2, True)
    assert not queue.take_overflow()  # still 3 waiting
    assert len(queue.take(max_batch=2, max_wait_s=0)) == 2
    assert queue.take(max_batch=2, max_wait_s=60) == []  # returns early: the rescan is due
    assert time.monotonic() - dropped_at >= 0.2  # not before the dropped files have settled
    assert queue.take_overflow()
    assert not queue.take_overflow()  # reported once
    assert [q.path.name for q in queue.take(max_batch=2, max_wait_s=0)] == ["2"]


def test_queue_take_returns_empty_on_wake_and_close() -> None:
    queue = ReadyQueue(max_queue=3)
    result: list[list] = []
    thread = threading.Thread(target=lambda: result.append(queue.take(2, 0.01)))
    thread.start()
    deadline = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < deadline:  # a wake before take() starts waiting is
        queue.wake()  # not for it (take counts the wakes from its start), so wake until it has returned
        thread.join(timeout=0.01)
    assert not thread.is_alive()
    assert result == [[]]
    queue.close()
    assert queue.take(2, 0.01) == []
    assert not queue.put(Path("/in/x"))


def test_queue_shows_a_partial_batch_to_the_caller_before_waiting_for_its_window() -> None:
    queue = ReadyQueue(max_queue=10)
    queue.put(Path("/in/a"))
    shown: list[list[str]] = []
    batch = queue.take(max_batch=4, max_wait_s=0.05, waiting=lambda items: shown.append([q.path.name for q in items]))
    assert [q.path.name for q in batch] == ["a"]
    assert shown and shown[0] == ["a"]  # before the 50 ms window closed
    queue.put(Path("/in/b"))
    for name in "cdef":
        queue.put(Path(f"/in/{name}"))
    shown.clear()
    assert len(queue.take(max_batch=4, max_wait_s=60, waiting=lambda items: shown.append(items))) == 4
    assert shown == []  # a full batch is due at once: nothing to start early


def test_a_lone_drop_is_read_and_decoded_while_its_batching_window_is_open(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"batch.max_wait_ms": 2000})
    harness = Harness(cfg)
    try:
        path = write_image(cfg.inbox_path / "lone.png", (20, 20, 230))
        assert harness.pipeline.submit(path)
        assert wait_early(harness, "lone.png").pixels is not None
        assert harness.pipeline.queue.depth == 1  # the batch itself has not been formed yet
        assert harness.pipeline.process_next(10) == 1
        assert harness.rows() == [("lone.png", "ok", "blue", None, str(cfg.processed_path / "lone.png"), None)]
        assert harness.pipeline._early == {}
    finally:
        harness.close()


def test_known_content_dropped_alone_is_looked_up_in_its_window_and_not_decoded(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"batch.max_wait_ms": 2000})
    store = LookupLog(cfg.database_url)
    harness = Harness(cfg, store=store)
    try:
        first = write_image(cfg.inbox_path / "first.png", (20, 20, 230))
        assert harness.pipeline.submit(first) and harness.pipeline.process_next(10) == 1
        store.lookups.clear()
        (cfg.inbox_path / "copy.png").write_bytes((cfg.processed_path / "first.png").read_bytes())
        assert harness.pipeline.submit(cfg.inbox_path / "copy.png")
        early = wait_early(harness, "copy.png")
        assert early.matched and early.same_as is not None and early.same_as.id == 1
        assert early.pixels is None  # known content: not decoded
        assert store.lookups and all(name.startswith("decode") for name in store.lookups)
        assert harness.pipeline.process_next(10) == 1
        assert all(name.startswith("decode") for name in store.lookups)  # the batch did not ask again
        assert harness.rows() == [
            ("first.png", "ok", "blue", None, str(cfg.processed_path / "first.png"), None),
            ("copy.png", "ok", "blue", 1, str(cfg.processed_path / "copy.png"), None),
        ]
        assert harness.pipeline.counters.inferred == 1 and harness.pipeline.counters.duplicates == 1
    finally:
        harness.close()


def test_content_recorded_after_its_early_lookup_is_still_recorded_as_a_duplicate(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"batch.max_wait_ms": 2000})
    harness = Harness(cfg)
    try:
        path = write_image(cfg.inbox_path / "late.png", (230, 20, 20))
        assert harness.pipeline.submit(path)
        early = wait_early(harness, "late.png")
        assert early.matched and early.same_as is None and early.pixels is not None  # new content then
        # The batch before commits the same content while this one's window is still open.
        from worker.files import sha256_hex

        info = harness.model.info
        harness.store.add_results([ResultRecord(
            file="twin.png", location="/elsewhere/twin.png", status="ok", model_id=info.model_id,
            model_name=info.name, worker="test", sha256=sha256_hex(path.read_bytes()), category="red",
            confidence=0.9)])
        assert harness.pipeline.process_next(10) == 1
        rows = harness.rows()
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("twin.png", "ok", "red", None),
                                                            ("late.png", "ok", "red", 1)]
        assert harness.pipeline.counters.inferred == 1  # inferred once more, with the same answer
    finally:
        harness.close()


# Processing ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_mixed_batch_good_bad_and_odd_files(harness: Harness, cfg: Config,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.pipeline")
    inbox = cfg.inbox_path
    write_image(inbox / "red.jpg", (255, 0, 0))
    write_image(inbox / "sub" / "green shirt.png", (0, 255, 0))
    write_image(inbox / "blue.webp", (0, 0, 255), fmt="WEBP")
    big = write_image(inbox.parent / "big.jpg", (255, 0, 0), size=(400, 300), noise_seed=3).read_bytes()
    (inbox / "corrupt.jpg").write_bytes(big[: len(big) // 2])
    (inbox / "empty.jpg").write_bytes(b"")
    (inbox / "notes.jpg").write_text("not an image\n")
    os.mkfifo(inbox / "pipe.jpg")
    (inbox / "link.jpg").symlink_to("/etc/passwd")
    assert harness.submit_all() == 8
    harness.drain()
    rows = {r[0]: r for r in harness.rows()}
    assert {f: (r[1], r[2]) for f, r in rows.items()} == {
        "red.jpg": ("ok", "red"),
        "sub/green shirt.png": ("ok", "green"),
        "blue.webp": ("ok", "blue"),
        "corrupt.jpg": ("failed", None),
        "empty.jpg": ("failed", None),
        "notes.jpg": ("failed", None),
    }
    assert rows["empty.jpg"][5] == "empty file (0 bytes)"
    assert "not a supported image" in rows["notes.jpg"][5]
    assert "corrupt or truncated JPEG" in rows["corrupt.jpg"][5]
    # Files went where their rows say; the FIFO and the symlink were left alone, without rows.
    assert rows["sub/green shirt.png"][4] == str(cfg.processed_path / "sub" / "green shirt.png")
    assert rows["notes.jpg"][4] == str(cfg.failed_path / "notes.jpg")
    for row in rows.values():
        assert Path(row[4]).is_file()
    assert sorted(p.name for p in inbox.rglob("*") if not p.is_dir() or p.is_symlink()) == ["link.jpg", "pipe.jpg"]
    assert harness.pipeline.counters.skipped == 2
    # Skips are logged once per file, however often the file is reported again.
    harness.pipeline.submit(inbox / "pipe.jpg")
    harness.drain()
    assert sum("skipping pipe.jpg" in m for m in caplog.messages) == 1
    assert harness.pipeline.counters.rows == 6
    # Each failed file is one INFO line with its reason (an operator following the log sees bad uploads).
    assert sorted(r.getMessage() for r in caplog.records if "as failed" in r.getMessage()) == [
        f"recorded {name!r} as failed: {rows[name][5]}" for name in ("corrupt.jpg", "empty.jpg", "notes.jpg")]


@pytest.mark.timeout(60)
def test_same_content_is_recorded_as_duplicate_without_inference(harness: Harness, cfg: Config) -> None:
    inbox = cfg.inbox_path
    write_image(inbox / "a.jpg", (255, 0, 0), noise_seed=1)
    data = (inbox / "a.jpg").read_bytes()
    (inbox / "a-copy.jpg").write_bytes(data)  # same bytes in the same batch: inferred once
    harness.submit_all()
    harness.drain()
    assert harness.pipeline.counters.inferred == 1
    (inbox / "again.jpg").write_bytes(data)  # same bytes later: copied from the first row
    harness.submit_all()
    harness.drain()
    assert harness.pipeline.counters.inferred == 1
    rows = harness.rows()
    first_id = 1
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("a-copy.jpg", "ok", "red", None), ("a.jpg", "ok", "red", first_id), ("again.jpg", "ok", "red", first_id)
    ]  # submitted in name order: a-copy.jpg comes first
    assert harness.pipeline.counters.duplicates == 2
    assert sorted(p.name for p in cfg.processed_path.iterdir()) == ["a-copy.jpg", "a.jpg", "again.jpg"]


def break_model_for_red(cfg: Config) -> None:
    """Rewrite cfg's model so that it loads, but fails at run time (a class index out of range) for any
    batch with an image that is mostly red."""
    import onnx
    from onnx import helper

    proto = onnx.load(cfg.model.path)
    softmax = next(node for node in proto.graph.node if node.op_type == "Softmax")
    softmax.input[0] = "picked"
    # Gather columns [0, 7, 2] of 3 when class 0 (red) wins for some image of the batch, else [0, 1, 2].
    ints = {"t_zero": [0], "t_one": [1], "t_two": [2], "t_seven": [7]}
    proto.graph.initializer.extend(helper.make_tensor(name, onnx.TensorProto.INT64, [1], value)
                                   for name, value in ints.items())
    nodes = [helper.make_node("ArgMax", ["logits"], ["t_winner"], axis=1, keepdims=0),
             helper.make_node("ReduceMin", ["t_winner"], ["t_lowest"], keepdims=1),
             helper.make_node("Equal", ["t_lowest", "t_zero"], ["t_red"]),
             helper.make_node("Where", ["t_red", "t_seven", "t_one"], ["t_middle"]),
             helper.make_node("Concat", ["t_zero", "t_middle", "t_two"], ["t_columns"], axis=0),
             helper.make_node("Gather", ["logits", "t_columns"], ["picked"], axis=1)]
    at = list(proto.graph.node).index(softmax)
    for offset, node in enumerate(nodes):
        proto.graph.node.insert(at + offset, node)
    onnx.save(proto, cfg.model.path)


def test_an_inference_error_is_logged_and_the_batch_is_retried_after_a_back_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Inference runs in an inference thread: when onnxruntime raises there (a model that loads but fails
    at run time: it picks a class index out of range for any image that is mostly red), the caller's
    thread logs it with its traceback and the batch's skipped files; nothing is recorded, the image stays
    in the inbox and is retried after the back-off, and the other batches go on being recorded."""
    cfg = make_config(tmp_path, **{"batch.max_batch": 1})
    break_model_for_red(cfg)
    write_image(cfg.inbox_path / "a-red.jpg", (255, 0, 0))
    write_image(cfg.inbox_path / "b-green.jpg", (0, 255, 0))
    os.mkfifo(cfg.inbox_path / "pipe.jpg")
    h = Harness(cfg)
    try:
        assert h.submit_all() == 3
        deadline = time.monotonic() + 10
        while not h.rows() and time.monotonic() < deadline:
            h.pipeline.process_next(0.5)
        assert [row[:3] for row in h.rows()] == [("b-green.jpg", "ok", "green")]
        assert h.pipeline.counters.inference_errors == 1
        failure = next(r for r in caplog.records if r.getMessage().startswith("inference failed"))
        assert failure.levelname == "ERROR" and failure.exc_info is not None
        assert re.fullmatch(r"inference failed for a batch \(1 files\): .*out of.*; the files stay in the "
                            r"inbox, retrying in 1 s", failure.getMessage(), re.DOTALL)
        assert (cfg.inbox_path / "a-red.jpg").exists() and h.pipeline.busy()  # waiting for its retry
        before = h.pipeline.counters.inference_errors
        deadline = time.monotonic() + 10
        while h.pipeline.counters.inference_errors == before and time.monotonic() < deadline:
            h.pipeline.process_next(0.5)
        assert h.pipeline.counters.inference_errors == before + 1  # retried (and failing again)
    finally:
        h.close()
    assert sum("skipping pipe.jpg" in m for m in caplog.messages) == 1
    assert (cfg.inbox_path / "a-red.jpg").exists() and [p.name for p in cfg.processed_path.glob("*")] == [
        "b-green.jpg"]


def test_the_throughput_window_stays_bounded_when_nobody_reads_it(harness: Harness, cfg: Config) -> None:
    # `_recent` keeps (time, rows) per batch for `throughput()`, which only the systemd watchdog's status
    # line asks for: without it, entries older than the one-minute window must still go (white-box: the
    # leak is only visible as memory after days, so the test looks at the window itself).
    harness.pipeline._recent.append((time.monotonic() - 3600, 5))  # a batch of an hour ago
    write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
    assert harness.submit_all() == 1
    harness.drain()
    assert [rows for _, rows in harness.pipeline._recent] == [1]
    assert harness.pipeline.throughput() == pytest.approx(1 / 60)


def test_a_burst_over_concurrent_batches_gives_every_file_one_row_and_repeats_are_duplicates(
        tmp_path: Path) -> None:
    """Batches of 4, two inferred at once (a lookup can then miss content the batch before is committing):
    every file still gets exactly one row, each content one first row, every repeat a duplicate of it."""
    cfg = make_config(tmp_path, **{"batch.max_batch": 4, "model.concurrent_batches": 2})
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i in range(30):  # 10 distinct contents, each dropped 3 times, spread over different batches
        write_image(cfg.inbox_path / f"f{i:02d}.jpg", colours[i % 10 % 3], noise_seed=i % 10)
    h = Harness(cfg)
    try:
        assert h.submit_all() == 30
        h.drain()
        rows = h.rows()
    finally:
        h.close()
    assert sorted(r[0] for r in rows) == [f"f{i:02d}.jpg" for i in range(30)]
    firsts = [r for r in rows if r[3] is None]
    assert len(firsts) == 10 and all(r[1] == "ok" for r in rows)
    with sqlite3.connect(tmp_path / "db.sqlite") as db:
        by_content = dict(db.execute("SELECT sha256, min(id) FROM results GROUP BY sha256").fetchall())
        for row_id, sha, duplicate_of, category in db.execute(
                "SELECT id, sha256, duplicate_of, category FROM results"):
            first = by_content[sha]
            first_category = db.execute("SELECT category FROM results WHERE id = ?", (first,)).fetchone()
            assert duplicate_of == (None if row_id == first else first) and category == first_category[0]
    assert 10 <= h.pipeline.counters.inferred <= 30
    assert len(list(cfg.processed_path.iterdir())) == 30 and not list(cfg.inbox_path.iterdir())


@pytest.mark.timeout(60)
def record_drop(harness: Harness, location: Path, content: Path, **extra: object) -> None:
    """The row a worker that crashed left: `content`'s bytes recorded as blue, naming `location` (the inbox:
    killed between its commit and its move, or between its move and recording it). `extra`: more fields."""
    from worker.files import sha256_hex

    info = harness.model.info
    harness.store.add_results([ResultRecord(**{
        "file": location.name, "location": str(location), "status": "ok", "model_id": info.model_id,
        "model_name": info.name, "worker": "crashed", "sha256": sha256_hex(content.read_bytes()),
        "category": "blue", "confidence": 0.9, **extra})])


@pytest.mark.parametrize("with_ctime", [True, False], ids=["row with its ctime", "row from before version 4"])
def test_drop_committed_before_a_crash_is_only_moved(harness: Harness, cfg: Config, with_ctime: bool) -> None:
    path = write_image(cfg.inbox_path / "x.jpg", (0, 0, 255))
    # What a worker killed between its commit and the move leaves behind: a row pointing into the inbox.
    record_drop(harness, path, path, ctime_ns=path.stat().st_ctime_ns if with_ctime else None)
    harness.submit_all()
    harness.drain()
    assert harness.rows() == [("x.jpg", "ok", "blue", None, str(cfg.processed_path / "x.jpg"), None)]
    assert harness.pipeline.counters.recovered == 1 and harness.pipeline.counters.inferred == 0
    assert not path.exists()


@pytest.mark.parametrize("upload", ["cp", "cp -p", "recreated"])
def test_a_later_drop_of_the_same_name_and_bytes_is_not_taken_for_a_stale_row(harness: Harness, cfg: Config,
                                                                               upload: str) -> None:
    # A worker (on another host: recovery here does not repair its rows) recorded x.jpg, moved it (or, for
    # "recreated", deleted it: on_success = "delete", or a move to another filesystem), and was killed before
    # recording that: its row still names the inbox, with the ctime of the file it read.
    path = cfg.inbox_path / "x.jpg"
    original = write_image(path if upload == "recreated" else cfg.processed_path / "x.jpg", (0, 0, 255))
    content = original.read_bytes()
    record_drop(harness, path, original, worker="elsewhere", host="host-b", ctime_ns=original.stat().st_ctime_ns)
    # The same photo uploaded again under the same name: another file, a new drop. A copy that keeps the
    # mtime (cp -p), or a file written where the first was deleted (ext4 then usually gives it the same
    # inode number), still has another ctime.
    if upload == "recreated":
        os.unlink(path)
        path.write_bytes(content)
    else:
        (shutil.copy2 if upload == "cp -p" else shutil.copyfile)(original, path)
    harness.submit_all()
    harness.drain()
    assert harness.rows() == [
        ("x.jpg", "ok", "blue", None, str(path), None),  # the stale row, left as it was
        ("x.jpg", "ok", "blue", 1, str(cfg.processed_path / ("x.jpg" if upload == "recreated" else "x (1).jpg")),
         None),  # its own row
    ]
    assert harness.pipeline.counters.recovered == 0
    assert not path.exists()


def test_a_later_file_refused_unread_is_not_taken_for_a_stale_row_of_the_same_name(tmp_path: Path) -> None:
    # Files refused before they are read (too large, empty, hard-linked) have no sha256 to tell them apart:
    # their ctime does. A stale row of an earlier too-large x.jpg must not take a later one.
    h = Harness(make_config(tmp_path, **{"files.max_file_bytes": 100}))
    try:
        path = h.cfg.inbox_path / "x.jpg"
        path.write_bytes(b"a" * 200)
        h.submit_all()
        h.drain()
        assert [r[:2] for r in h.rows()] == [("x.jpg", "failed")] and not path.exists()
        with sqlite3.connect(h.store.path) as db:  # as if its worker had died before recording the move
            db.execute("UPDATE results SET location = ?", (str(path),))
        (h.cfg.failed_path / "x.jpg").rename(h.cfg.failed_path / "elsewhere.jpg")
        path.write_bytes(b"b" * 300)  # a later, other file of the same name, refused too
        h.submit_all()
        h.drain()
        rows = h.rows()
        assert [(r[0], r[1], r[4]) for r in rows] == [
            ("x.jpg", "failed", str(path)),  # the stale row, left as it was
            ("x.jpg", "failed", str(h.cfg.failed_path / "x.jpg")),  # its own row
        ]
        assert [r[5] for r in rows] == [
            "file is 200 bytes, above the limit of 100 bytes (files.max_file_bytes)",
            "file is 300 bytes, above the limit of 100 bytes (files.max_file_bytes)"]
    finally:
        h.close()


@pytest.mark.timeout(60)
def test_move_failure_keeps_the_file_and_retries_without_a_second_row(
    harness: Harness, cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    # processed/ cannot be created: a plain file is in its place (works as root too, unlike chmod).
    cfg.processed_path.write_text("in the way")
    path = write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
    harness.submit_all()
    harness.pipeline.process_next(5)
    assert path.exists()
    assert [r[:2] for r in harness.rows()] == [("a.jpg", "ok")]
    assert any("cannot dispose of a.jpg" in m and "retrying in 1 s" in m for m in caplog.messages)
    assert harness.pipeline.busy()  # a retry is scheduled
    cfg.processed_path.unlink()  # the fault clears
    harness.drain()
    assert not path.exists()
    assert harness.rows() == [("a.jpg", "ok", "red", None, str(cfg.processed_path / "a.jpg"), None)]
    assert harness.pipeline.counters.disposition_errors == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change", ["chmod", "touch"])
def test_a_file_whose_metadata_changed_while_its_move_waited_keeps_its_one_row(
        harness: Harness, cfg: Config, change: str) -> None:
    # The retry of a failed move reads the file again; a chmod or touch during the back-off changed its ctime,
    # by which Store.find_drop tells a later file: the retry still takes it for its row.
    cfg.processed_path.write_text("in the way")
    path = write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
    harness.submit_all()
    harness.pipeline.process_next(5)
    assert path.exists() and [r[:2] for r in harness.rows()] == [("a.jpg", "ok")]
    ctime = path.stat().st_ctime_ns
    if change == "chmod":
        path.chmod(0o600)
    else:
        os.utime(path)
    assert path.stat().st_ctime_ns != ctime
    cfg.processed_path.unlink()  # the fault clears
    harness.drain()
    assert harness.rows() == [("a.jpg", "ok", "red", None, str(cfg.processed_path / "a.jpg"), None)]
    assert not path.exists()


@pytest.mark.timeout(60)
def test_commit_failure_keeps_files_in_the_inbox_and_retries(cfg: Config, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    store = Store(cfg.database_url, busy_timeout_ms=50, retry_s=0.2)
    h = Harness(cfg, store=store)
    try:
        paths = [write_image(cfg.inbox_path / f"{i}.jpg", (0, 255, 0), noise_seed=i) for i in range(3)]
        other = sqlite3.connect(store.path, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the database
        h.submit_all()
        h.pipeline.process_next(5)
        assert all(p.exists() for p in paths)
        assert any("cannot record 3 results" in m for m in caplog.messages)
        other.execute("ROLLBACK")
        other.close()
        h.drain()
        assert sorted(r[0] for r in h.rows()) == ["0.jpg", "1.jpg", "2.jpg"]
        assert not any(p.exists() for p in paths)
        assert h.pipeline.counters.commit_errors >= 1
    finally:
        h.close()


def test_batches_formed_before_a_commit_failure_do_not_lengthen_its_back_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With batches of 2, the batches after the first are already formed (and inferred) when its commit
    fails; their own failures, during its back-off, keep its delay instead of doubling it each time."""
    from worker.pipeline import RETRY_FIRST_S

    cfg = make_config(tmp_path, **{"batch.max_batch": 2})
    store = Store(cfg.database_url, busy_timeout_ms=50, retry_s=0.1)
    h = Harness(cfg, store=store)
    try:
        for i in range(6):
            write_image(cfg.inbox_path / f"{i}.jpg", (0, 255, 0), noise_seed=i)
        other = sqlite3.connect(store.path, isolation_level=None, timeout=0)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the database
        assert h.submit_all() == 6
        handled = [h.pipeline.process_next(5) for _ in range(1 + h.model.concurrent_batches)]
        failures = [m for m in caplog.messages if m.startswith("cannot record 2 results")]
        assert handled == [2] * len(handled) and len(failures) == len(handled)
        assert all(m.endswith(f"retrying in {RETRY_FIRST_S:g} s") for m in failures), failures
        other.execute("ROLLBACK")
        other.close()
        h.drain()
        assert sorted(r[0] for r in h.rows()) == [f"{i}.jpg" for i in range(6)]
    finally:
        h.close()


@pytest.mark.timeout(60)
def test_overflowing_queue_drops_paths_and_rescans_them_later(cfg: Config) -> None:
    cfg.batch.max_queue, cfg.batch.max_batch, cfg.inbox.settle_s = 4, 2, 0.05
    for i in range(20):
        write_image(cfg.inbox_path / f"{i:02}.png", (255, 0, 0), size=(8, 8), noise_seed=i)
    rescans = []
    h: Harness

    def rescan() -> None:
        rescans.append(1)
        h.submit_all()

    h = Harness(cfg, rescan=rescan)
    try:
        accepted = h.submit_all()  # 4, plus any the batcher took meanwhile; the rest stays in the inbox
        assert accepted < 20 and h.pipeline.queue.dropped == 20 - accepted
        h.drain()
        assert len(h.rows()) == 20 and len({r[0] for r in h.rows()}) == 20
        assert rescans and not any(cfg.inbox_path.iterdir())
    finally:
        h.close()


class ReplacedAfterCommit(Store):
    """The real store; right after its first commit, the first file is replaced by a new upload under the
    same name (real files: only the moment is arranged, the worst one, between commit and move)."""

    def __init__(self, url: str, path: Path, upload: Path) -> None:
        super().__init__(url)
        self.replaced, self.upload = path, upload

    def add_results(self, records, **kwargs):  # type: ignore[no-untyped-def]
        ids = super().add_results(records, **kwargs)
        if self.upload.exists():
            os.rename(self.upload, self.replaced)
        return ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["move", "leave", "delete"])
def test_a_file_replaced_while_processed_gets_its_own_row(tmp_path: Path, action: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(tmp_path, **{"files.on_success": action})
    path = write_image(cfg.inbox_path / "photo.jpg", (255, 0, 0))
    upload = write_image(tmp_path / "upload.jpg", (0, 0, 255))
    blue = upload.read_bytes()
    h = Harness(cfg, store=ReplacedAfterCommit(cfg.database_url, path, upload))
    try:
        h.submit_all()
        h.drain()
        rows = h.rows()
        assert [r[:4] for r in rows] == [("photo.jpg", "ok", "red", None), ("photo.jpg", "ok", "blue", None)]
        # The red photo's row says it is gone (its bytes were replaced); the blue one is where it went.
        where = {"move": str(cfg.processed_path / "photo.jpg"), "leave": str(path), "delete": ""}[action]
        assert [r[4] for r in rows] == ["", where]
        if action == "move":
            assert (cfg.processed_path / "photo.jpg").read_bytes() == blue
            assert sorted(p.name for p in cfg.processed_path.iterdir()) == ["photo.jpg"]
        assert path.exists() is (action == "leave")
        assert any("'photo.jpg' was replaced or rewritten since it was read; row 1 keeps what was read" in m
                   for m in caplog.messages)
    finally:
        h.close()


class TouchedAfterCommit(Store):
    """The real store; right after its first commit, the file's mtime is set a second later (what `touch` or
    a sync tool setting times does; only the moment is arranged, between commit and move)."""

    def __init__(self, url: str, path: Path) -> None:
        super().__init__(url)
        self.touched, self.done = path, False

    def add_results(self, records, **kwargs):  # type: ignore[no-untyped-def]
        ids = super().add_results(records, **kwargs)
        if not self.done:
            self.done = True
            mtime = self.touched.stat().st_mtime_ns + 1_000_000_000
            os.utime(self.touched, ns=(mtime, mtime))
        return ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["move", "leave", "delete"])
def test_a_file_touched_while_processed_keeps_its_one_row(tmp_path: Path, action: str) -> None:
    cfg = make_config(tmp_path, **{"files.on_success": action})
    path = write_image(cfg.inbox_path / "photo.jpg", (255, 0, 0))
    red = path.read_bytes()
    h = Harness(cfg, store=TouchedAfterCommit(cfg.database_url, path))
    try:
        h.submit_all()
        h.drain()
        batches = h.pipeline.counters.batches
        # What a rescan would report now: nothing (a file left in place is known by its touched identity,
        # so it is not read and matched to its row again).
        assert h.submit_all() == 0
        h.drain()
        assert (h.pipeline.counters.batches, h.pipeline.counters.recovered) == (batches, 0)
        where = {"move": str(cfg.processed_path / "photo.jpg"), "leave": str(path), "delete": ""}[action]
        assert [r[:5] for r in h.rows()] == [("photo.jpg", "ok", "red", None, where)]
        if action == "move":
            assert (cfg.processed_path / "photo.jpg").read_bytes() == red
        assert path.exists() is (action == "leave")
    finally:
        h.close()


class LockedAfterFirstCommit(Store):
    """The real store; right after its first commit another connection takes SQLite's write lock (a real
    lock: the location update that follows fails), until `unlock()`."""

    def __init__(self, url: str) -> None:
        super().__init__(url, busy_timeout_ms=20, retry_s=0.2)
        self.holder: sqlite3.Connection | None = None
        self.commits = 0

    def add_results(self, records, **kwargs):  # type: ignore[no-untyped-def]
        ids = super().add_results(records, **kwargs)
        self.commits += 1
        if self.commits == 1:
            self.holder = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.holder.execute("BEGIN IMMEDIATE")
        return ids

    def unlock(self) -> None:
        assert self.holder is not None
        self.holder.execute("ROLLBACK")
        self.holder.close()


def test_a_refused_location_update_is_retried_and_never_swallows_a_later_drop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_config(tmp_path)
    store = LockedAfterFirstCommit(cfg.database_url)
    h = Harness(cfg, store=store)
    try:
        path = write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
        content = path.read_bytes()
        h.submit_all()
        h.drain()
        assert any("cannot record the new location of 1 files" in m for m in caplog.messages)
        store.unlock()
        assert h.rows() == [("a.jpg", "ok", "red", None, str(path), None)]  # stale: names the inbox
        path.write_bytes(content)  # the same name and bytes dropped again: a new drop, its own row
        h.submit_all()
        h.drain()
        assert h.rows() == [
            ("a.jpg", "ok", "red", None, str(cfg.processed_path / "a.jpg"), None),  # recorded at last
            ("a.jpg", "ok", "red", 1, str(cfg.processed_path / "a (1).jpg"), None),
        ]
    finally:
        h.close()


def test_leave_and_delete_dispositions(tmp_path: Path) -> None:
    for action in ("leave", "delete"):
        cfg = make_config(tmp_path / action, **{"files.on_success": action})
        h = Harness(cfg)
        try:
            path = write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
            h.submit_all()
            h.drain()
            assert path.exists() is (action == "leave")
            assert not cfg.processed_path.exists()
            assert h.rows()[0][4] == (str(path) if action == "leave" else "")
            if action == "leave":
                assert not h.pipeline.submit(path)  # a file left in place is not read again
        finally:
            h.close()


def test_a_left_file_whose_metadata_changed_is_not_recorded_again_after_a_restart(tmp_path: Path) -> None:
    # on_success = "leave": rows name the inbox for good. A chmod changes the file's ctime, which elsewhere
    # tells a later file of the same name and bytes; here it is still the file recorded.
    cfg = make_config(tmp_path, **{"files.on_success": "leave"})
    h = Harness(cfg)
    path = write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
    try:
        h.submit_all()
        h.drain()
    finally:
        h.close()
    ctime = path.stat().st_ctime_ns
    path.chmod(0o600)
    assert path.stat().st_ctime_ns != ctime
    h = Harness(cfg)  # a restart: the start-up scan reads every file in the inbox again
    try:
        assert h.submit_all() == 1
        h.drain()
        assert h.rows() == [("a.jpg", "ok", "red", None, str(path), None)]
        assert h.pipeline.counters.recovered == 1
    finally:
        h.close()


def test_classify_files_keeps_order_and_reports_bad_files(tmp_path: Path, tiny_model: Path) -> None:
    good = write_image(tmp_path / "g.png", (0, 255, 0))
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    results = list(classify_files(Model(tiny_model), [good, bad, tmp_path / "missing.jpg", good],
                                  max_file_bytes=1 << 20, max_pixels=10**6, batch_size=2))
    assert [(r["file"], r["status"], r.get("category")) for r in results] == [
        (str(good), "ok", "green"), (str(bad), "failed", None), (str(tmp_path / "missing.jpg"), "failed", None),
        (str(good), "ok", "green"),
    ]
    assert results[2]["error"] == "no such file"


def test_an_unexpected_error_while_forming_a_batch_loses_nothing_and_the_feeder_carries_on(
        cfg: Config, caplog: pytest.LogCaptureFixture) -> None:
    from worker.metrics import Metrics

    class FailsOnceInTheFeeder(Metrics):
        """A bug cannot be written into the real code on purpose: this real Metrics raises once, on the
        batching thread, where an unexpected error used to end the thread (and all work) silently."""

        failed = False

        def set_queue_depth(self, depth: int) -> None:
            if threading.current_thread().name == "batcher" and not self.failed:
                self.failed = True
                raise RuntimeError("boom")
            super().set_queue_depth(depth)

    holder: dict[str, Harness] = {}
    h = Harness(cfg, metrics=FailsOnceInTheFeeder(), rescan=lambda: holder["h"].submit_all())
    holder["h"] = h
    try:
        write_image(cfg.inbox_path / "a.jpg", (250, 0, 0))
        assert h.submit_all() == 1
        h.drain()
        deadline = time.monotonic() + 10
        while not h.rows() and time.monotonic() < deadline:  # the rescan offers the file again
            h.pipeline.process_next(0.5)
        assert [r[:3] for r in h.rows()] == [("a.jpg", "ok", "red")]
        assert "unexpected error while forming a batch; its 1 files stay in the inbox" in caplog.text
        write_image(cfg.inbox_path / "b.jpg", (0, 250, 0))  # the feeder is still alive
        assert h.submit_all() == 1
        h.drain()
        assert [r[:3] for r in h.rows()][-1] == ("b.jpg", "ok", "green")
    finally:
        h.close()


@contextlib.contextmanager
def scale_out(tmp_path: Path, *, lease_s: float = 30.0, store: Callable[[str], Store] | None = None,
              prepare: Callable[[Config], None] | None = None, **settings: object
              ) -> Iterator[tuple[Config, Harness, Claims]]:
    """A pipeline with claims (worker "w1" on "host-1") over a real PostgreSQL server of its own: `store`
    makes the store from the URL (default: Store with a 2 s retry window), `prepare` edits the config's
    files (the model) before the pipeline loads them, `settings` are config overrides."""
    from pgserver import postgres_server

    from worker.claims import Claims

    with postgres_server() as url:
        cfg = make_config(tmp_path, **{"database.url": url, **settings})
        if prepare is not None:
            prepare(cfg)
        opened = Store(url, retry_s=2) if store is None else store(url)
        claims = Claims(opened, "w1", "host-1", lease_s=lease_s)
        harness = Harness(cfg, store=opened, claims=claims)
        try:
            yield cfg, harness, claims
        finally:
            claims.close()
            harness.close()


def pg_query(store: Store, sql: str) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(sql)]


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_scale_out_a_refused_location_update_still_releases_the_batch_claims(tmp_path: Path) -> None:
    from pgserver import refuse

    # A 1.5 s lease: renewals (and retried releases) every 0.5 s.
    with scale_out(tmp_path, lease_s=1.5) as (cfg, harness, claims):
        store = harness.store
        claims.start()
        write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
        write_image(cfg.inbox_path / "b.png", (0, 0, 255))
        refuse(store.engine, "UPDATE", "results")  # set_locations fails; the claims table works
        assert harness.submit_all() == 2
        harness.drain()
        deadline = time.monotonic() + 10
        # Released by the renewal thread, not by the failing batch itself.
        while pg_query(store, "SELECT count(*) FROM claims") != [(0,)]:
            assert time.monotonic() < deadline, "the batch's claims were never released"
            time.sleep(0.1)
        rows = pg_query(store, "SELECT file, category, location FROM results ORDER BY file")
        # Recorded and moved; the rows' locations are stale (the inbox), and no claim is left behind
        # to be renewed and to keep other workers away until a restart.
        assert [(r[0], r[1]) for r in rows] == [("a.jpg", "red"), ("b.png", "blue")]
        assert [r[2] for r in rows] == [str(cfg.inbox_path / "a.jpg"), str(cfg.inbox_path / "b.png")]
        assert sorted(p.name for p in cfg.processed_path.iterdir()) == ["a.jpg", "b.png"]
        assert claims.held == 0


class TakenOverBeforeCommit(Store):
    """The real store; before its first commit, this worker's lease lapses, another worker takes the claim
    over and then stops without recording it (deleting its claim). Real claims in a real PostgreSQL: only
    the moment is arranged, the worst one, between this worker's claim and its commit."""

    def __init__(self, url: str) -> None:
        super().__init__(url, retry_s=2)
        self.done = False

    def add_results(self, records, **kwargs):  # type: ignore[no-untyped-def]
        if not self.done:
            from worker.claims import Claims

            self.done = True
            time.sleep(0.8)  # this worker's lease (0.5 s) lapses: it is not renewing it
            other = Claims(self, "w2", "host-2", lease_s=30)
            taken = other.claim({record.claim_key: record.file for record in records})
            assert taken.granted and all(g.taken_over for g in taken.granted.values())
            other.close()  # stops before recording: its claims are deleted
        return super().add_results(records, **kwargs)


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_scale_out_a_file_whose_claim_was_taken_over_is_looked_at_again(tmp_path: Path) -> None:
    # The worker that took the claim over may never record the file (it stops, or cannot infer): the file
    # must not wait for the next rescan (or, with rescans off, for a restart).
    with scale_out(tmp_path, lease_s=0.5, store=TakenOverBeforeCommit,
                   **{"inbox.rescan_interval_s": 0}) as (cfg, harness, _):
        write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
        assert harness.submit_all() == 1
        harness.drain()
        assert pg_query(harness.store, "SELECT file, category, worker FROM results") == [("a.jpg", "red", "test")]
        assert sorted(p.name for p in cfg.processed_path.iterdir()) == ["a.jpg"]


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_scale_out_a_file_that_cannot_be_looked_at_is_not_read_without_a_claim(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # lstat fails once for the file when it is claimed (ESTALE, as an NFS client can answer for a moment);
    # reading it works. It used to be read and recorded without a claim: another worker could record it
    # too. The fault is injected (the one thing not real here): a real ESTALE needs an NFS server.
    import errno

    from worker import pipeline as pipeline_mod

    real_os = os
    failed: list[str] = []

    class FlakyOs:
        def __getattr__(self, name: str) -> object:
            return getattr(real_os, name)

        @staticmethod
        def lstat(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            if str(path).endswith("a.jpg") and not failed:
                failed.append(str(path))
                raise OSError(errno.ESTALE, real_os.strerror(errno.ESTALE), str(path))
            return real_os.lstat(path, *args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "os", FlakyOs())
    caplog.set_level(logging.WARNING, logger="worker.pipeline")
    with scale_out(tmp_path) as (cfg, harness, _):
        write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
        assert harness.submit_all() == 1
        harness.drain()
        assert failed and pg_query(harness.store, "SELECT file, category FROM results") == [("a.jpg", "red")]
        assert pg_query(harness.store, "SELECT count(*) FROM claims") == [(0,)]  # claimed, recorded, released
        assert f"cannot look at {cfg.inbox_path / 'a.jpg'} to claim it: Stale file handle; looking again " \
               "in 1 s" in caplog.messages


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_scale_out_a_batch_the_model_failed_on_gives_its_claims_back(tmp_path: Path) -> None:
    # A worker whose model keeps failing (a GPU gone) used to keep, and renew, the claims of the files it
    # could not classify: a healthy worker beside it never got them until it stopped.
    from worker.claims import Claims, drop_key

    with scale_out(tmp_path, prepare=break_model_for_red, **{"batch.max_batch": 1}) as (cfg, harness, claims):
        write_image(cfg.inbox_path / "a-red.jpg", (255, 0, 0))
        assert harness.submit_all() == 1
        deadline = time.monotonic() + 10
        while harness.pipeline.counters.inference_errors == 0:
            assert time.monotonic() < deadline, "the model never failed"
            harness.pipeline.process_next(0.5)
        assert claims.held == 0
        healthy = Claims(harness.store, "w2", "host-2", lease_s=30)  # a healthy worker gets the file at once
        st = (cfg.inbox_path / "a-red.jpg").stat()
        key = drop_key("a-red.jpg", st.st_size, st.st_mtime_ns, st.st_ino)
        granted = healthy.claim({key: "a-red.jpg"}).granted
        assert list(granted) == [key] and not granted[key].taken_over
        healthy.close()


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_scale_out_a_file_this_worker_cannot_move_is_handed_to_one_that_can(tmp_path: Path) -> None:
    # This worker's processed/ refuses the move after the commit. Its claim used to be renewed as long as
    # the fault lasted, so a worker beside it that could move the file never got it.
    import dataclasses

    from worker.claims import Claims

    with scale_out(tmp_path, lease_s=30.0) as (cfg, harness, claims):
        claims.start()
        write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
        cfg.processed_path.mkdir(parents=True, exist_ok=True)
        with unwritable(cfg.processed_path):
            assert harness.submit_all() == 1
            deadline = time.monotonic() + 10
            while harness.pipeline.counters.disposition_errors == 0:
                assert time.monotonic() < deadline, "the move never failed"
                harness.pipeline.process_next(0.5)
            store = harness.store
            (row_id, location), = pg_query(store, "SELECT id, location FROM results")
            assert location == str(cfg.inbox_path / "a.jpg")
            # The claim keeps the row, its lease has ended, and this worker's renewals leave it so.
            assert claims.renew() == 0
            assert pg_query(store, "SELECT result_id, lease_until <= now() FROM claims") == [(row_id, True)]
            # Another worker, with a processed/ of its own, takes it over at once and only moves it.
            other_cfg = dataclasses.replace(cfg, files=dataclasses.replace(cfg.files, processed_dir=str(
                tmp_path / "other-processed")))
            other = Harness(other_cfg, store=Store(store.url, retry_s=2),
                            claims=Claims(Store(store.url, retry_s=2), "w2", "host-2", lease_s=30))
            try:
                assert other.submit_all() == 1
                other.drain()
            finally:
                other.close()
        moved = tmp_path / "other-processed" / "a.jpg"
        assert moved.exists() and not (cfg.inbox_path / "a.jpg").exists()
        assert pg_query(store, "SELECT id, category, location FROM results") == [(row_id, "red", str(moved))]
        assert pg_query(store, "SELECT count(*) FROM claims") == [(0,)]
        # This worker's own retry then finds the file gone: no second row, nothing left to renew.
        deadline = time.monotonic() + 15
        while harness.pipeline.busy() or claims.held:
            assert time.monotonic() < deadline, "the retry never concluded"
            harness.pipeline.process_next(0.5, until_idle=True)
        assert pg_query(store, "SELECT count(*) FROM results") == [(1,)]


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_scale_out_a_file_this_worker_could_not_move_is_moved_by_it_once_it_can(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.claims")
    with scale_out(tmp_path, lease_s=30.0) as (cfg, harness, claims):
        write_image(cfg.inbox_path / "a.jpg", (255, 0, 0))
        cfg.processed_path.mkdir(parents=True, exist_ok=True)
        with unwritable(cfg.processed_path):
            assert harness.submit_all() == 1
            deadline = time.monotonic() + 10
            while harness.pipeline.counters.disposition_errors < 2:  # handed on, taken back, handed on
                assert time.monotonic() < deadline, "the move did not fail twice"
                harness.pipeline.process_next(0.5)
            # Taking its own file back is no takeover, in the database's count either (stats shows it).
            assert pg_query(harness.store, "SELECT takeovers FROM claims") == [(0,)]
        harness.drain()  # the retry takes its own claim back (with the row) and moves the file
        assert pg_query(harness.store, "SELECT count(*), max(location) FROM results") == [
            (1, str(cfg.processed_path / "a.jpg"))]
        assert (cfg.processed_path / "a.jpg").exists()
        assert pg_query(harness.store, "SELECT count(*) FROM claims") == [(0,)] and claims.held == 0
        assert not [m for m in caplog.messages if "took over" in m]  # its own file, not a takeover


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_scale_out_a_stale_row_of_a_worker_on_another_host_does_not_take_a_later_drop(tmp_path: Path) -> None:
    with scale_out(tmp_path) as (cfg, harness, claims):
        claims.start()
        # web9 on another host recorded x.jpg, moved it, and was killed before recording the move; its claim
        # was purged an hour later. Its row still names the inbox, with the ctime of the file it read.
        moved = write_image(tmp_path / "host-b-processed" / "x.jpg", (0, 0, 255))
        record_drop(harness, cfg.inbox_path / "x.jpg", moved, worker="web9", host="host-b",
                    ctime_ns=moved.stat().st_ctime_ns)
        path = cfg.inbox_path / "x.jpg"
        path.write_bytes(moved.read_bytes())  # the same photo uploaded again: another file
        assert harness.submit_all() == 1
        harness.drain()
        assert pg_query(harness.store, "SELECT file, category, duplicate_of, location, worker FROM results "
                                       "ORDER BY id") == [
            ("x.jpg", "blue", None, str(path), "web9"),
            ("x.jpg", "blue", 1, str(cfg.processed_path / "x.jpg"), "test"),  # a row of its own
        ]
        assert not path.exists()
