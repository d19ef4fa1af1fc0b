"""`fashion-worker bench`: speed figures for this machine, measured on the real worker.

1. Model throughput: onnxruntime on pre-decoded batches, per batch size and thread count.
2. Decode-and-resize throughput of one core, for listing photos and for 12-megapixel phone photos, and of
   all the decode threads together (how far decoding scales with cores).
3. End to end: the real worker (`python -m worker run`, a subprocess) on a temp inbox; a burst of N
   distinct images is renamed in and timed until the last row is committed; single drops give the latency
   from the file's close to its committed row (p50/p95); a burst of 12 MP photos gives their cost per
   image; the worker's peak RSS and its CPU use while idle are read from /proc.
4. The reduced-precision model against fp32 (int8 on the CPU, fp16 on a GPU); optionally the naive
   approach (a per-image Python loop with PyTorch eager) for comparison, and the pipeline's ceiling: the
   same end-to-end burst with a model that does no work (needs the `onnx` package), which shows what
   decoding and per-file bookkeeping alone allow.
5. Where the bottleneck sits: the slowest of decoding (all decode threads), inference and the rest.
6. Optionally (`workers` > 1, with a PostgreSQL database) several worker processes on one shared inbox,
   as `install-service --instances N` runs them: the same burst, timed until its last row is committed,
   with each worker's share and a check that every photo got exactly one row. One Python process tops
   out below what a GPU can classify (the README's GPU section); this measures how far more processes go.

Where more images are needed than the folder holds, distinct files are made by appending a trailer after
the JPEG's end (decoders ignore it): new bytes, so the worker's duplicate detection does not short-cut the
work, and a full decode each. 12-megapixel photos are re-encoded with one pixel changed.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from PIL import Image

from worker.exceptions import ConfigError
from worker.metrics import STAGES
from worker.model import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_FP32,
    DEFAULT_MODEL_GPU,
    Model,
    choose_providers,
    model_file,
)
from worker.preprocess import load_pixels
from worker.store import results

log = logging.getLogger(__name__)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_PIXELS = 100_000_000
MAX_WORKERS = 64  # bench --workers: more processes than any host here has cores
PER_BATCH_LINE = ("    per batch ({images_per_batch} images): waiting for decoding {wait_ms} ms, earlier results "
                  "{match_ms} ms, inference {inference_ms} ms, commit {commit_ms} ms, moves {dispose_ms} ms")


@dataclass
class BenchOptions:
    images: Path  # folder of real images (searched recursively), e.g. the validation set
    burst: int = 500  # images in the end-to-end burst
    large: int = 40  # 12-megapixel photos in the large-photo burst
    drops: int = 20  # single drops timed for latency
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    threads: list[int] = field(default_factory=lambda: [1, os.cpu_count() or 1])
    model: Path | None = None  # None = the shipped default for the providers
    int8_model: Path | None = None  # compared with fp32 when given (or shipped beside the default)
    providers: list[str] = field(default_factory=lambda: ["auto"])  # onnxruntime execution providers
    max_batch: int = 16
    max_wait_ms: int = 20
    decode_threads: int = 2
    max_queue: int = 1024
    decode_on: str = "cpu"  # the worker's batch.decode_on: cpu | gpu (nvJPEG)
    spin_wait: bool = False  # the worker's model.spin_wait
    intra_op_threads: int = 0  # the worker's model.intra_op_threads (0 = its default for the device)
    concurrent_batches: int = 0  # the worker's model.concurrent_batches (0 = 2 on 2 cores or more)
    idle_seconds: float = 10.0
    naive: bool = False  # also time a per-image PyTorch eager loop (needs the train extra)
    ceiling: bool = False  # also run the burst with a model that does no work (needs onnx)
    workers: int = 1  # > 1: also the burst with this many worker processes sharing the inbox (needs database)
    database: str | None = None  # the PostgreSQL URL those workers share (its results table gets their rows)
    workdir: Path | None = None  # where the temp inbox goes; None = a temp folder
    progress: Callable[[str], None] = lambda message: None


def run(options: BenchOptions) -> dict:
    check_workers(options)
    files = image_files(options.images)
    providers = choose_providers(options.providers)
    model_path = model_file(options.model, providers)
    model = Model(model_path, providers=providers)
    gpu = model.device != "cpu"
    if gpu:
        options.threads = [max(options.threads)]  # onnxruntime's CPU threads play no part on a GPU
    size = model.input_size
    say = options.progress
    report: dict = {"machine": machine(), "model": {"path": str(model_path), "name": model.info.name,
                                                   "version": model.info.version, "input_size": list(size),
                                                   "providers": model.providers}}

    say("model throughput (pre-decoded batches)")
    batch = np.stack([load_pixels(f.read_bytes(), size, max_pixels=MAX_PIXELS) for f in files[:32]])
    report["model_throughput"] = model_throughput(model_path, batch, options.batch_sizes, options.threads,
                                                  providers, concurrent=1 if gpu else options.concurrent_batches)
    single = [r for r in report["model_throughput"]
              if r["batch"] == 1 and r["threads"] == max(options.threads) and "concurrent" not in r]
    report["single_image_inference_ms"] = round(1000 / single[0]["images_per_s"], 2) if single else None

    say("decode and resize throughput (one core, then all decode threads)")
    large_bytes = [make_large(f) for f in files[:4]]
    listing = [f.read_bytes() for f in files[:64]]
    report["decode"] = {
        "listing_images_per_s": decode_rate(listing, size),
        "large_12mp_images_per_s": decode_rate(large_bytes, size),
        "threads": options.decode_threads,
        "listing_images_per_s_all_threads": decode_rate(listing, size, options.decode_threads),
    }
    if options.decode_on == "gpu":
        say("decode and resize throughput on the GPU (nvJPEG, batches of max_batch)")
        report["decode"]["gpu_listing_images_per_s"] = gpu_decode_rate(listing, size, options.max_batch)

    pair = precision_pair(options, gpu)
    if pair is not None:
        reference, reduced, name = pair
        say(f"{name} against fp32")
        best = max(b for b in options.batch_sizes if b <= max(options.max_batch, min(options.batch_sizes)))
        threads = max(options.threads)
        fp32 = model_throughput(reference, batch, [best], [threads], providers)[0]["images_per_s"]
        fast = model_throughput(reduced, batch, [best], [threads], providers)[0]["images_per_s"]
        report[name] = {"model": str(reduced), "batch": best, "fp32_images_per_s": fp32,
                        f"{name}_images_per_s": fast, "speedup": round(fast / fp32, 2)}

    with tempfile.TemporaryDirectory(dir=options.workdir, prefix="fashion-bench-") as tmp:
        report["end_to_end"] = end_to_end(Path(tmp), files, model_path, options)
    if options.ceiling:
        with tempfile.TemporaryDirectory(dir=options.workdir, prefix="fashion-bench-") as tmp:
            report["ceiling"] = ceiling(Path(tmp), files, model, options)
    if options.workers > 1:
        with tempfile.TemporaryDirectory(dir=options.workdir, prefix="fashion-bench-") as tmp:
            report["workers"] = several_workers(Path(tmp), files, model_path, options)

    if options.naive:
        say("naive baseline: per-image PyTorch eager loop")
        report["naive"] = naive_baseline(files[:24], model)

    report["bottleneck"] = bottleneck(report, options)
    report["targets"] = targets(report, options)
    return report


def check_workers(options: BenchOptions) -> None:
    """Several workers share an inbox through PostgreSQL only (SQLite keeps one worker per inbox)."""
    if options.workers < 1 or options.workers > MAX_WORKERS:
        raise ConfigError(f"--workers must be 1 to {MAX_WORKERS}, got {options.workers}")
    if options.workers == 1:
        return
    if not options.database:
        raise ConfigError(f"--workers {options.workers} needs --database URL: several workers share an inbox "
                          "through PostgreSQL only, e.g. --database postgresql+psycopg://user@host/dbname")
    try:
        backend = sa.engine.make_url(options.database).get_backend_name()
    except sa.exc.ArgumentError:
        backend = None
    if backend != "postgresql":
        raise ConfigError(f"--database {redacted(options.database)}: --workers {options.workers} needs a "
                          "PostgreSQL URL (postgresql+psycopg://user@host/dbname)")
    engine = sa.create_engine(options.database, poolclass=sa.pool.NullPool)
    try:  # before minutes of other measurements, not after them
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--database {redacted(options.database)}: cannot connect: {first}") from None
    finally:
        engine.dispose()


def redacted(url: str) -> str:
    """`url` with its password hidden, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} " + ("is not a folder" if folder.exists() else "does not exist"))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise ConfigError(f"no images ({', '.join(EXTENSIONS)}) under {folder}")
    return files


def precision_pair(options: BenchOptions, gpu: bool) -> tuple[Path, Path, str] | None:
    """(fp32, reduced, "int8" | "fp16") to compare: int8 on the CPU, fp16 on a GPU; the shipped pair, or
    the given model and its sibling (`--int8-model` names the CPU one)."""
    name = "fp16" if gpu else "int8"
    if options.model is None:
        reduced = DEFAULT_MODEL_GPU if gpu else options.int8_model or DEFAULT_MODEL
        reference = DEFAULT_MODEL_FP32
    else:
        reference = options.model
        if reference.name.endswith((".int8.onnx", ".fp16.onnx")):
            reference = reference.with_name(reference.name.rsplit(".", 2)[0] + ".onnx")
        reduced = reference.with_suffix(f".{name}.onnx")
        if not gpu and options.int8_model is not None:
            reduced = options.int8_model
    if reference == reduced or not reference.exists() or not reduced.exists():
        return None
    return reference, reduced, name


def machine() -> dict:
    import onnxruntime as ort

    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu_name(), "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "python": sys.version.split()[0]}


def gpu_name() -> str | None:
    """The NVIDIA GPU's name from nvidia-smi, or None."""
    try:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = found.stdout.strip().splitlines()
    return names[0].strip() if found.returncode == 0 and names else None


def model_throughput(path: Path, decoded: np.ndarray, batch_sizes: list[int], threads: list[int],
                     providers: list[str] | None = None, concurrent: int = 1) -> list[dict]:
    """Images/s of onnxruntime alone, per (threads, batch size), each timed for about a second.

    `concurrent` (a model.concurrent_batches value, 0 = auto): unless 1, also the worker's way on the CPU
    with the most threads, several batches at once from as many threads, each on its share of the cores
    (rows with "concurrent": how many at once). On a GPU this includes copying the batch to the device
    and the probabilities back, as the worker does.
    """
    rows = []
    for count in threads:
        model = Model(path, intra_op_threads=count, providers=providers)
        rows += [{"threads": count, "batch": size, "images_per_s": timed(model, decoded, size, 1)}
                 for size in batch_sizes]
    if concurrent != 1:
        model = Model(path, intra_op_threads=max(threads), providers=providers, concurrent_batches=concurrent)
        if model.concurrent_batches > 1:
            rows += [{"threads": max(threads), "concurrent": model.concurrent_batches, "batch": size,
                      "images_per_s": timed(model, decoded, size, model.concurrent_batches)}
                     for size in batch_sizes]
    return rows


def timed(model: Model, decoded: np.ndarray, size: int, callers: int) -> float:
    """Images/s of `model` on batches of `size`, run back to back from `callers` threads for about 1 s."""
    batch = np.resize(decoded, (size, *decoded.shape[1:]))

    def loop(_: int) -> int:
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < 1.0:
            model.probabilities(batch)
            runs += 1
        return runs

    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(lambda _: model.probabilities(batch), range(callers)))  # every session meets this size
        started = time.perf_counter()
        runs = sum(pool.map(loop, range(callers)))
    return round(runs * size / (time.perf_counter() - started), 1)


def decode_rate(blobs: list[bytes], size: tuple[int, int], threads: int = 1) -> float:
    """Images/s of the worker's decode + resize on `threads` threads (as the worker's decode pool runs it)."""
    load_pixels(blobs[0], size, max_pixels=MAX_PIXELS)

    def work(start: int) -> int:
        count, started = 0, time.perf_counter()
        while count < len(blobs) or time.perf_counter() - started < 1.0:
            load_pixels(blobs[(start + count) % len(blobs)], size, max_pixels=MAX_PIXELS)
            count += 1
        return count

    started = time.perf_counter()
    if threads <= 1:
        done = work(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            done = sum(pool.map(work, range(threads)))
    return round(done / (time.perf_counter() - started), 1)


def gpu_decode_rate(blobs: list[bytes], size: tuple[int, int], batch: int) -> float:
    """Images/s of worker.gpudecode on batches of `batch` listing photos (decode, resize, synchronise)."""
    from worker.gpudecode import GpuDecoder

    decoder = GpuDecoder(size)
    chunk = [blobs[i % len(blobs)] for i in range(batch)]
    decoder.decode(chunk)
    decoder.synchronize()
    count, started = 0, time.perf_counter()
    while count < 3 * batch or time.perf_counter() - started < 1.0:
        decoder.decode(chunk)
        decoder.synchronize()
        count += batch
    return round(count / (time.perf_counter() - started), 1)


def distinct(data: bytes, index: int, large: bool = False) -> bytes:
    """A re-encoded copy of `data` with one pixel changed: new bytes and new content."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if large:
        image = image.resize((4000, 3000), Image.Resampling.BILINEAR)
    image.putpixel((index % image.width, (index // image.width) % image.height),
                   (index % 256, (index // 256) % 256, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def make_large(path: Path) -> bytes:
    return distinct(path.read_bytes(), 0, large=True)


def with_trailer(data: bytes, tag: str) -> bytes:
    """`data` with a trailer after the image's end: new bytes (a new sha256), the same decoding work."""
    return data + f"fashion-bench {tag}".encode()


def generate(files: list[Path], count: int, folder: Path, prefix: str, large: bool = False) -> list[Path]:
    """`count` files with distinct bytes made from `files` (12 MP photos from the first four when `large`)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [(f.suffix.lower(), f.read_bytes()) for f in files[: min(count, 4 if large else count)]]
    if large:
        sources = [(".jpg", distinct(data, 0, large=True)) for _, data in sources]
    out = []
    for i in range(count):
        suffix, data = sources[i % len(sources)]
        path = folder / f"{prefix}{i:05d}{suffix}"
        path.write_bytes(with_trailer(data, f"{prefix}{i}"))
        out.append(path)
    return out


class WorkerProcess:
    """The real worker as a subprocess on a temp inbox and SQLite file."""

    def __init__(self, root: Path, model: Path, options: BenchOptions) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.db = root / "data" / "results.db"
        self.inbox.mkdir(parents=True)
        self.metrics_port = free_port()
        config = write_config(root, model, options, "sqlite:///data/results.db", self.metrics_port)
        self.log = open(root / "worker.log", "w")  # noqa: SIM115 (closed in stop())
        self._reader: sqlite3.Connection | None = None
        self.process = subprocess.Popen([sys.executable, "-m", "worker", "run", "--config", str(config)],
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=root)

    def rows(self) -> int:
        """Rows committed so far. One read-only connection, kept open in autocommit mode (each query sees
        the latest commit): polling every 10 ms through a new connection each time took enough CPU to
        slow the worker it measures."""
        if self._reader is None:
            if not self.db.exists():
                return 0
            self._reader = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5, isolation_level=None,
                                           check_same_thread=False)
        try:
            return self._reader.execute("select count(*) from results").fetchone()[0]
        except sqlite3.OperationalError:  # the worker has not created the table yet
            return 0

    def stage_totals(self) -> dict[str, tuple[float, float]]:
        """{stage: (seconds, batches)} so far, from the worker's Prometheus metrics, plus "images" as
        (images in batches, batches)."""
        return stage_totals(self.metrics_port)

    def commits_after(self, count: float, timeout: float = 5.0) -> dict[str, tuple[float, float]]:
        """stage_totals() once more than `count` commit stages are in: the worker records a batch's commit
        time just after the commit, so a row can be visible a moment before its timing is."""
        deadline = time.monotonic() + timeout
        while True:
            totals = self.stage_totals()
            if totals.get("commit", (0.0, 0.0))[1] > count or time.monotonic() > deadline:
                return totals
            time.sleep(0.001)

    def processed_at(self, names: list[str]) -> dict[str, float]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
            marks = ",".join("?" * len(names))
            found = db.execute(f"select file, processed_at from results where file in ({marks})", names)
            return {name: parse_time(value) for name, value in found}

    def wait_rows(self, count: int, timeout: float) -> None:
        wait_for_rows(self.rows, self._check_alive, count, timeout, interval=0.01)

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}; see {self.root / 'worker.log'}")

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def peak_rss_mb(self) -> float:
        return process_peak_rss_mb(self.process.pid)

    def stop(self) -> int:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        try:
            return stop_processes([self.process])[0]
        finally:
            self.log.close()


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> list[int]:
    """SIGTERM the workers still running, wait up to 30 s for each (then SIGKILL); their exit codes. None is
    left running, also when a second Ctrl-C interrupts the wait."""
    try:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(timeout=30))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def wait_for_rows(rows: Callable[[], int], check_alive: Callable[[], None], count: int, timeout: float,
                  interval: float) -> None:
    """Poll `rows()` every `interval` s until it reaches `count`; `check_alive` raises if a worker died."""
    deadline = time.monotonic() + timeout
    while (have := rows()) < count:
        check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {count} rows (have {have})")
        time.sleep(interval)


def write_config(root: Path, model: Path, options: BenchOptions, database_url: str, metrics_port: int,
                 worker_id: str = "") -> Path:
    """The config.toml of the bench's worker(s): inbox `root`/inbox, the options' batch and model settings;
    `worker_id` as service.worker_id (empty: the worker's default)."""
    config = root / "config.toml"
    config.write_text(
        f'[inbox]\npath = "inbox"\n\n'
        f'[model]\npath = "{model}"\nproviders = {json.dumps(options.providers)}\n'
        f"spin_wait = {str(options.spin_wait).lower()}\nconcurrent_batches = {options.concurrent_batches}\n"
        f"intra_op_threads = {options.intra_op_threads}\n\n"
        f"[batch]\nmax_batch = {options.max_batch}\nmax_wait_ms = {options.max_wait_ms}\n"
        f"decode_threads = {options.decode_threads}\nmax_queue = {options.max_queue}\n"
        f'decode_on = "{options.decode_on}"\n\n'
        f"[database]\nurl = {json.dumps(database_url)}\n\n[service]\nlog_level = \"WARNING\"\n"
        f"metrics_port = {metrics_port}\nworker_id = {json.dumps(worker_id)}\n"
    )
    return config


def settled(read: Callable[[], dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """`read()` (stage totals) once the last batch's timings are in: a worker records a batch's commit and
    moves just after them, so its last rows can be visible before their timing. Read until every timed
    commit has its timed moves and their number stays the same for 0.2 s (5 s at most)."""
    deadline = time.monotonic() + 5.0
    last = read()
    while True:
        time.sleep(0.2)
        now = read()
        disposed = now.get("dispose", (0.0, 0.0))[1]
        if ((last.get("dispose") == now.get("dispose") and disposed >= now.get("commit", (0.0, 0.0))[1])
                or time.monotonic() > deadline):
            return now
        last = now


def stage_totals(metrics_port: int) -> dict[str, tuple[float, float]]:
    """{stage: (seconds, batches)} so far, from a worker's Prometheus metrics, plus "images" as (images in
    batches, batches)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "fashion_worker_batch_stage_seconds" and sample.name.endswith(("_sum", "_count")):
                key = sample.labels["stage"]
            elif family.name == "fashion_worker_batch_size" and sample.name.endswith(("_sum", "_count")):
                key = "images"
            else:
                continue
            totals.setdefault(key, [0.0, 0.0])[0 if sample.name.endswith("_sum") else 1] = sample.value
    return {key: (value[0], value[1]) for key, value in totals.items()}


class WorkerGroup:
    """`count` real workers (`python -m worker run --instance i`, as `install-service --instances N` starts
    them) on one temp inbox, sharing a PostgreSQL database: worker ids TAG@1..N (never a production worker's
    HOST@i), metrics ports base..+N-1. Rows are told apart from other runs' by the file-name prefix `tag`
    and, once the workers are ready, by ids above the table's highest (the primary key's index: polling
    does not scan a large production table)."""

    def __init__(self, root: Path, model: Path, options: BenchOptions, count: int, tag: str) -> None:
        self.root, self.tag = root, tag
        self.inbox = root / "inbox"
        self.inbox.mkdir(parents=True)
        self.ports = free_ports(count)
        self.after_id = 0
        config = write_config(root, model, options, str(options.database), self.ports[0], tag.rstrip("-"))
        # One connection, kept: a new one per poll starts a server process each time.
        self.engine = sa.create_engine(str(options.database), pool_size=1, max_overflow=0)
        self.logs: list[Any] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        try:
            for i in range(1, count + 1):
                self.logs.append(open(root / f"worker-{i}.log", "w"))  # noqa: SIM115 (closed in stop())
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-m", "worker", "run", "--config", str(config), "--instance", str(i)],
                    stdout=self.logs[-1], stderr=subprocess.STDOUT, cwd=root))
        except BaseException:  # a failed start, or Ctrl-C meanwhile: none of those started is left running
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        """Until every worker's /healthz answers 200 (model warmed up, watching the inbox)."""
        deadline = time.monotonic() + timeout
        waiting = dict(enumerate(self.ports, start=1))
        while waiting:
            for instance, port in list(waiting.items()):
                self._check_alive()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                        if reply.status == 200:
                            del waiting[instance]
                except (OSError, http.client.HTTPException):
                    # not listening yet, or 503 while starting. A connect to a loopback port nobody listens
                    # on can also meet itself (the kernel picks that port as the source: TCP self-connect)
                    # and read back its own request: BadStatusLine, seen once on a 16-core host.
                    pass
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(waiting)} not ready after {timeout:.0f} s; see {self.root}")
            time.sleep(0.05)
        with self.engine.connect() as conn:  # the workers have made the tables by now
            self.after_id = conn.execute(sa.select(sa.func.coalesce(sa.func.max(results.c.id), 0))).scalar_one()

    def _check_alive(self) -> None:
        for instance, process in enumerate(self.processes, start=1):
            if process.poll() is not None:
                raise RuntimeError(f"worker {instance} exited with {process.returncode}; "
                                   f"see {self.root / f'worker-{instance}.log'}")

    def _mine(self, prefix: str = "") -> sa.ColumnElement[bool]:
        return sa.and_(results.c.id > self.after_id, results.c.file.startswith(self.tag + prefix, autoescape=True))

    def rows(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(results).where(self._mine())).scalar_one()

    def wait_rows(self, count: int, timeout: float) -> None:
        wait_for_rows(self.rows, self._check_alive, count, timeout, interval=0.05)

    def summary(self, prefix: str) -> dict:
        """Rows, distinct files, failed rows, rows per worker and the last commit time of this run's files
        whose names start with `prefix` (after the tag)."""
        with self.engine.connect() as conn:
            mine = self._mine(prefix)
            rows, files, failed, last = conn.execute(
                sa.select(sa.func.count(), sa.func.count(sa.distinct(results.c.file)),
                          sa.func.count().filter(results.c.status != "ok"), sa.func.max(results.c.processed_at))
                .where(mine)).one()
            shares = dict(conn.execute(sa.select(results.c.worker, sa.func.count()).where(mine)
                                       .group_by(results.c.worker).order_by(results.c.worker)).all())
        return {"rows": rows, "files": files, "failed_rows": failed, "rows_per_worker": shares,
                "last_commit": parse_time(last) if last is not None else None}

    def stage_totals(self) -> dict[str, tuple[float, float]]:
        """stage_totals() summed over the workers, once their timings are all in (see `settled`)."""
        def summed() -> dict[str, tuple[float, float]]:
            out: dict[str, tuple[float, float]] = {}
            for port in self.ports:
                for key, (seconds, count) in stage_totals(port).items():
                    before = out.get(key, (0.0, 0.0))
                    out[key] = (before[0] + seconds, before[1] + count)
            return out

        return settled(summed)

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(p.pid) for p in self.processes)

    def peak_rss_mb(self) -> float:
        return max(process_peak_rss_mb(p.pid) for p in self.processes)

    def stop(self) -> list[int]:
        try:
            return stop_processes(self.processes)
        finally:
            for log in self.logs:
                log.close()
            self.engine.dispose()


def several_workers(root: Path, files: list[Path], model: Path, options: BenchOptions) -> dict:
    """The end-to-end burst with `options.workers` worker processes sharing one inbox through PostgreSQL."""
    count = options.workers
    tag = f"bench-{os.getpid()}-{int(time.time())}-"
    say = options.progress
    say(f"{count} workers sharing the inbox: burst of {options.burst}")
    staging = root / "staging"
    burst = generate(files, options.burst, staging / "burst", f"{tag}burst-")
    warm = generate(files, count, staging / "warm", f"{tag}warm-")
    group = WorkerGroup(root, model, options, count, tag)
    try:
        group.wait_ready(timeout=300)
        for path in warm:  # first batches through the claims table and the first commits (whichever
            os.rename(path, group.inbox / path.name)  # workers take them; each warmed its model at start)
        group.wait_rows(len(warm), timeout=120)
        before, cpu = group.stage_totals(), group.cpu_seconds()
        started = time.time()
        for path in burst:
            os.rename(path, group.inbox / path.name)
        group.wait_rows(len(warm) + len(burst), timeout=60 + 2 * len(burst))
        cpu = group.cpu_seconds() - cpu
        totals = group.stage_totals()
        summary = group.summary("burst-")
        peak = group.peak_rss_mb()
    finally:
        codes = group.stop()
    seconds = summary["last_commit"] - started
    return {"workers": count, "images": len(burst), "seconds": round(seconds, 2),
            "images_per_s": round(len(burst) / seconds, 1),
            "rows": summary["rows"], "files": summary["files"],
            "failed_rows": summary["failed_rows"], "rows_per_worker": summary["rows_per_worker"],
            "cpu_ms_per_image": round(1000 * cpu / len(burst), 2), "per_batch": per_batch(before, totals),
            "peak_rss_mb_per_worker": peak, "worker_exit_codes": codes}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def free_ports(count: int) -> list[int]:
    """`count` consecutive free loopback ports (instance i listens on base + i - 1), below the kernel's
    ephemeral range where it has room there: a port of that range, free now, can become the source port of
    a worker's own connection (to the database) before that worker listens on it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    for attempt in range(100):
        base = random.randrange(10000, low - count) if low - count > 10000 and attempt < 90 else free_port()
        if base + count > 65536:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + count))
    raise RuntimeError(f"found no {count} consecutive free ports")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def per_batch(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict:
    """Mean images per batch and milliseconds per batch in each stage between two stage_totals()."""
    def delta(key: str) -> tuple[float, float]:
        total, count = after.get(key, (0.0, 0.0))
        earlier = before.get(key, (0.0, 0.0))
        return total - earlier[0], count - earlier[1]

    images, batches = delta("images")
    out: dict[str, float] = {"batches": int(batches), "images_per_batch": round(images / batches, 1) if batches else 0}
    for stage in STAGES:
        seconds, count = delta(stage)
        out[f"{stage}_ms"] = round(1000 * seconds / count, 2) if count else 0.0
    return out


def parse_time(value: str | datetime) -> float:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def end_to_end(root: Path, files: list[Path], model: Path, options: BenchOptions) -> dict:
    say = options.progress
    say(f"preparing {options.burst} listing photos and {options.large} 12-megapixel photos")
    staging = root / "staging"
    burst = generate(files, options.burst, staging / "burst", "burst-")
    large = generate(files, options.large, staging / "large", "large-", large=True)
    warm = generate(files, 1, staging / "warm", "warm-")
    worker = WorkerProcess(root, model, options)
    try:
        say("starting the worker")
        os.rename(warm[0], worker.inbox / warm[0].name)
        worker.wait_rows(1, timeout=120)
        expected = 1

        say(f"single-drop latency over {options.drops} drops")
        latencies = []
        totals = worker.commits_after(0)  # the warm-up batch's commit timing is in
        for i in range(options.drops):
            name = f"drop-{i:03d}.jpg"
            data = with_trailer(files[i % len(files)].read_bytes(), name)
            with open(worker.inbox / name, "wb") as handle:
                handle.write(data)
            closed = time.time()
            expected += 1
            worker.wait_rows(expected, timeout=60)
            # processed_at is stamped inside the transaction, before the insert and the commit: adding the
            # whole commit stage of the drop's batch (the worker's own timing) bounds close -> commit from
            # above, without polling that would take CPU from the worker while it is being timed.
            seconds_before, batches_before = totals.get("commit", (0.0, 0.0))
            totals = worker.commits_after(batches_before)
            commit_s = totals.get("commit", (0.0, 0.0))[0] - seconds_before
            latencies.append(1000 * (worker.processed_at([name])[name] - closed + commit_s))
            time.sleep(0.05)

        results = {"latency_ms": {"p50": round(percentile(latencies, 50), 1),
                                  "p95": round(percentile(latencies, 95), 1), "drops": len(latencies)}}
        for label, batch in (("burst", burst), ("large_burst", large)):
            say(f"{label.replace('_', ' ')}: {len(batch)} images")
            expected += len(batch)
            results[label] = time_burst(worker, batch, expected)

        say(f"idle CPU over {options.idle_seconds:.0f} s")
        time.sleep(2.0)
        before = worker.cpu_seconds()
        time.sleep(options.idle_seconds)
        results["idle_cpu_percent"] = round(100 * (worker.cpu_seconds() - before) / options.idle_seconds, 2)
        results["peak_rss_mb"] = worker.peak_rss_mb()
        results["failed_rows"] = failed_rows(worker.db)
    finally:
        results_code = worker.stop()
    results["worker_exit_code"] = results_code
    return results


def time_burst(worker: WorkerProcess, batch: list[Path], expected_rows: int) -> dict:
    """Rename `batch` into the worker's inbox at once and time it until its last row is committed (the
    worker then holds `expected_rows` rows); with the worker's per-batch stage times for the burst."""
    before = settled(worker.stage_totals)  # the warm-up batch's moves are not the burst's
    started = time.time()
    for path in batch:
        os.rename(path, worker.inbox / path.name)
    worker.wait_rows(expected_rows, timeout=60 + 2 * len(batch))
    seconds = max(worker.processed_at([p.name for p in batch]).values()) - started
    return {"images": len(batch), "seconds": round(seconds, 2), "images_per_s": round(len(batch) / seconds, 1),
            "ms_per_image": round(1000 * seconds / len(batch), 2),
            "per_batch": per_batch(before, settled(worker.stage_totals))}


def ceiling(root: Path, files: list[Path], model: Model, options: BenchOptions) -> dict:
    """The end-to-end burst again with a model that does no work: what decoding and bookkeeping allow."""
    try:
        noop = noop_model(root / "noop.onnx", model)
    except ImportError:
        return {"skipped": "needs the onnx package (the test or train extra)"}
    options.progress(f"ceiling: the burst of {options.burst} with a model that does no work")
    staging = root / "staging"
    burst = generate(files, options.burst, staging / "burst", "ceiling-")
    warm = generate(files, 1, staging / "warm", "ceiling-warm-")
    cheap = BenchOptions(**{**options.__dict__, "model": noop})
    worker = WorkerProcess(root, noop, cheap)
    try:
        os.rename(warm[0], worker.inbox / warm[0].name)
        worker.wait_rows(1, timeout=120)
        cpu = worker.cpu_seconds()
        figures = time_burst(worker, burst, 1 + len(burst))
        cpu = worker.cpu_seconds() - cpu
    finally:
        worker.stop()
    per_batch = figures["per_batch"]
    # CPU the worker spent per photo besides the model: all its threads' CPU time over the burst, less the
    # do-nothing model's own time (it still averages the pixels, on one core).
    rest_ms = 1000 * cpu / len(burst) - per_batch["inference_ms"] / max(per_batch["images_per_batch"], 1)
    return {**{key: figures[key] for key in ("images", "seconds", "images_per_s")},
            "cpu_ms_per_image_besides_the_model": round(max(rest_ms, 0.0), 2)}


def noop_model(path: Path, like: Model) -> Path:
    """A contract-honouring model of `like`'s input size and labels that only averages the pixels."""
    import onnx
    from onnx import TensorProto, helper

    height, width = like.input_size
    labels = like.info.labels
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "weight"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    weight = np.full((3, len(labels)), 0.01, dtype=np.float32)
    graph = helper.make_graph(
        nodes, "noop", [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", height, width, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(labels)])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
                     helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.flatten().tolist())],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    meta = {key: like.info.metadata[key] for key in ("labels", "input_size", "resize")}
    helper.set_model_props(proto, {**meta, "name": "noop", "version": "0"})
    onnx.save(proto, path)
    return path


def model_alone(report: dict, options: BenchOptions) -> float | None:
    """Images/s of the model alone at the worker's batch size with all the threads: the better of one batch
    at a time and the worker's several at once. What the end-to-end burst is compared with."""
    threads = max(options.threads)
    size = max((b for b in options.batch_sizes if b <= options.max_batch), default=None)
    rates = [r["images_per_s"] for r in report["model_throughput"] if r["threads"] == threads and r["batch"] == size]
    return max(rates, default=None)


def bottleneck(report: dict, options: BenchOptions) -> dict:
    """Which stage limits the end-to-end burst: decoding, inference or per-file bookkeeping."""
    model = [r["images_per_s"] for r in report["model_throughput"] if r["batch"] <= options.max_batch]
    decode = report["decode"]
    stages = {"decode": decode.get("gpu_listing_images_per_s", decode["listing_images_per_s_all_threads"]),
              "inference": max(model) if model else None}
    if "images_per_s" in report.get("ceiling", {}):
        stages["decode_and_bookkeeping"] = report["ceiling"]["images_per_s"]
    known = {k: v for k, v in stages.items() if v}
    slowest = min(known, key=known.get)
    end_to_end = report["end_to_end"]["burst"]["images_per_s"]
    if end_to_end < 0.5 * known[slowest]:  # no stage measured alone explains the end-to-end rate
        slowest = "the worker between the stages (per-file and per-batch work, contention)"
    out = {"stages_images_per_s": stages, "end_to_end_images_per_s": end_to_end, "slowest": slowest}
    rest_ms = report.get("ceiling", {}).get("cpu_ms_per_image_besides_the_model")
    model_rate = model_alone(report, options)
    if rest_ms and model_rate and report["model"]["providers"][0] == "CPUExecutionProvider":
        # On the CPU the model and the rest share every core: per photo the model costs cores/model_rate
        # core-ms and the rest what the ceiling run's worker spent, so both cores together finish at most
        # cores / (model + rest) photos a second, this share of the model alone.
        cores = report["machine"]["cores"]
        model_ms = 1000 * cores / model_rate
        out["best_possible_ratio"] = round(model_ms / (model_ms + rest_ms), 3)
    return out


def failed_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("select count(*) from results where status != 'ok'").fetchone()[0]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def naive_baseline(files: list[Path], model: Model) -> dict:
    """The textbook loop: PIL open, torchvision transforms, PyTorch eager forward, one image at a time."""
    try:
        import torch
        from torchvision.transforms import v2

        from train.model import ModelSpec, build
    except ImportError:
        return {"skipped": "needs the train extra (torch, torchvision)"}
    arch = model.info.metadata.get("architecture", "efficientnet-lite0")
    height, _ = model.input_size
    network = build(ModelSpec(arch, len(model.info.labels), height), pretrained=True).eval()
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((height, height), antialias=True),
                            v2.ToDtype(torch.float32)])
    started = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            pixels = transform(Image.open(path).convert("RGB")).unsqueeze(0)
            torch.softmax(network(pixels), 1)
    rate = len(files) / (time.perf_counter() - started)
    return {"images_per_s": round(rate, 1), "images": len(files), "threads": torch.get_num_threads()}


def targets(report: dict, options: BenchOptions) -> dict:
    """The performance issue's targets, as ratios measured in this run."""
    e2e = report["end_to_end"]
    alone = model_alone(report, options)
    out = {}
    if alone:
        ratio = e2e["burst"]["images_per_s"] / alone
        out["burst_vs_model"] = {"ratio": round(ratio, 3), "target": ">= 0.85", "met": ratio >= 0.85}
    if report.get("single_image_inference_ms"):
        bound = options.max_wait_ms + 2 * report["single_image_inference_ms"]
        p50 = e2e["latency_ms"]["p50"]
        out["latency_p50"] = {"ms": p50, "bound_ms": round(bound, 1), "met": p50 <= bound}
    if "int8" in report:
        speedup = report["int8"]["speedup"]
        out["int8_speedup"] = {"ratio": speedup, "target": ">= 1.6", "met": speedup >= 1.6}
    if report["model"]["providers"][0] != "CPUExecutionProvider":
        rate, workers = e2e["burst"]["images_per_s"], 1
        if report.get("workers", {}).get("images_per_s", 0) > rate:
            rate, workers = report["workers"]["images_per_s"], report["workers"]["workers"]
        out["gpu_end_to_end"] = {"images_per_s": rate, "workers": workers, "target": ">= 3000", "met": rate >= 3000}
    out["idle_cpu"] = {"percent": e2e["idle_cpu_percent"], "target": "< 1", "met": e2e["idle_cpu_percent"] < 1}
    ratio = e2e["large_burst"]["ms_per_image"] / e2e["burst"]["ms_per_image"]
    out["large_vs_listing"] = {"ratio": round(ratio, 2), "target": "<= 3", "met": ratio <= 3}
    return out


def format_report(report: dict) -> str:
    """Human-readable lines for the terminal."""
    gpu = report["machine"].get("gpu")
    lines = [f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores"
             + (f", {gpu}" if gpu else "") + f", onnxruntime {report['machine']['onnxruntime']}",
             f"model: {report['model']['name']} {report['model']['version']} "
             f"{report['model']['input_size'][0]}x{report['model']['input_size'][1]} "
             f"on {report['model']['providers'][0]}", "",
             "model throughput (images/s, pre-decoded):"]
    setups = sorted({(r["threads"], r.get("concurrent", 1)) for r in report["model_throughput"]})
    sizes = sorted({r["batch"] for r in report["model_throughput"]})
    lines.append("  threads " + "".join(f"{'batch ' + str(s):>11}" for s in sizes))
    for t, at_once in setups:
        cells = {r["batch"]: r["images_per_s"] for r in report["model_throughput"]
                 if r["threads"] == t and r.get("concurrent", 1) == at_once}
        lines.append(f"  {t:>7} " + "".join(f"{cells[s]:>11.1f}" for s in sizes)
                     + (f"   ({at_once} batches at once, {t // at_once or 1} thread(s) each)" if at_once > 1 else ""))
    decode = report["decode"]
    lines += ["", f"decode+resize, one core: {decode['listing_images_per_s']:.1f} listing photos/s, "
                  f"{decode['large_12mp_images_per_s']:.1f} 12 MP photos/s; {decode['threads']} threads: "
                  f"{decode['listing_images_per_s_all_threads']:.1f} listing photos/s"]
    if "gpu_listing_images_per_s" in decode:
        lines.append(f"decode+resize on the GPU (nvJPEG): {decode['gpu_listing_images_per_s']:.1f} listing photos/s")
    for name in ("int8", "fp16"):
        if name in report:
            low = report[name]
            lines.append(f"{name}: {low[name + '_images_per_s']:.1f} images/s vs fp32 {low['fp32_images_per_s']:.1f} "
                         f"({low['speedup']}x, batch {low['batch']})")
    e2e = report["end_to_end"]
    lines += ["", "end to end (real worker, inbox -> committed row):",
              f"  burst of {e2e['burst']['images']}: {e2e['burst']['images_per_s']:.1f} images/s",
              PER_BATCH_LINE.format(**e2e["burst"]["per_batch"]),
              f"  12 MP burst of {e2e['large_burst']['images']}: {e2e['large_burst']['images_per_s']:.1f} images/s",
              f"  single-drop latency: p50 {e2e['latency_ms']['p50']:.1f} ms, p95 {e2e['latency_ms']['p95']:.1f} ms",
              f"  idle CPU: {e2e['idle_cpu_percent']:.2f} %   peak RSS: {e2e['peak_rss_mb']:.0f} MB"]
    if "ceiling" in report:
        top = report["ceiling"]
        lines.append("  ceiling (same burst, a model doing no work): "
                     + (f"{top['images_per_s']:.1f} images/s" if "images_per_s" in top else top["skipped"]))
    if "workers" in report:
        group = report["workers"]
        shares = " / ".join(str(n) for n in group["rows_per_worker"].values())
        one_each = group["rows"] == group["files"] == group["images"]
        lines += [f"  {group['workers']} workers sharing the inbox (PostgreSQL), burst of {group['images']}: "
                  f"{group['images_per_s']:.1f} images/s; rows per worker {shares}; "
                  + ("one row per photo" if one_each else f"{group['rows']} rows for {group['files']} of "
                                                          f"{group['images']} photos"),
                  PER_BATCH_LINE.format(**group["per_batch"]),
                  f"    CPU: {group['cpu_ms_per_image']} core-ms a photo (all workers); "
                  f"peak RSS {group['peak_rss_mb_per_worker']:.0f} MB per worker"]
    slow = report["bottleneck"]
    lines.append("  stages (images/s): " + ", ".join(f"{k} {v:.0f}" for k, v in slow["stages_images_per_s"].items()
                                                     if v) + f"; slowest: {slow['slowest']}")
    if "best_possible_ratio" in slow:
        lines.append(f"  besides the model the worker needs {report['ceiling']['cpu_ms_per_image_besides_the_model']}"
                     f" core-ms a photo (ceiling run); sharing the cores, the burst can reach at most "
                     f"{slow['best_possible_ratio']} x the model alone")
    if "naive" in report:
        naive = report["naive"]
        lines.append(f"naive per-image PyTorch eager loop: {naive.get('images_per_s', naive.get('skipped'))}"
                     + (" images/s" if "images_per_s" in naive else ""))
    lines += ["", "targets:"]
    for name, target in report["targets"].items():
        shown = {k: v for k, v in target.items() if k != "met"}
        lines.append(f"  {'met ' if target['met'] else 'MISS'} {name}: {json.dumps(shown)}")
    return "\n".join(lines)
