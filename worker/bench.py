"""`fashion-worker bench`: speed figures for this machine, measured on the real worker.

1. Model throughput: onnxruntime on pre-decoded batches, per batch size and thread count.
2. Decode-and-resize throughput of one core, for listing photos and for 12-megapixel phone photos.
3. End to end: the real worker (`python -m worker run`, a subprocess) on a temp inbox; a burst of N
   distinct images is renamed in and timed until the last row is committed; single drops give the latency
   from the file's close to its committed row (p50/p95); a burst of 12 MP photos gives their cost per
   image; the worker's peak RSS and its CPU use while idle are read from /proc.
4. Optional: the int8 model's throughput against fp32, and the naive approach (a per-image Python loop
   with PyTorch eager) for comparison.

Where more images are needed than the folder holds, distinct content is made by changing one pixel and
re-encoding, so the worker's duplicate detection does not short-cut the work.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from worker.exceptions import ConfigError
from worker.model import DEFAULT_MODEL, DEFAULT_MODEL_FP32, Model, model_file
from worker.preprocess import load_pixels

log = logging.getLogger(__name__)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_PIXELS = 100_000_000


@dataclass
class BenchOptions:
    images: Path  # folder of real images (searched recursively), e.g. the validation set
    burst: int = 500  # images in the end-to-end burst
    large: int = 40  # 12-megapixel photos in the large-photo burst
    drops: int = 20  # single drops timed for latency
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    threads: list[int] = field(default_factory=lambda: [1, os.cpu_count() or 1])
    model: Path | None = None  # fp32 model; None = the shipped default
    int8_model: Path | None = None  # compared with fp32 when given (or shipped beside the default)
    max_batch: int = 16
    max_wait_ms: int = 20
    decode_threads: int = 2
    idle_seconds: float = 10.0
    naive: bool = False  # also time a per-image PyTorch eager loop (needs the train extra)
    workdir: Path | None = None  # where the temp inbox goes; None = a temp folder
    progress: Callable[[str], None] = lambda message: None


def run(options: BenchOptions) -> dict:
    files = image_files(options.images)
    model_path = model_file(options.model)
    model = Model(model_path)
    size = model.input_size
    say = options.progress
    report: dict = {"machine": machine(), "model": {"path": str(model_path), "name": model.info.name,
                                                   "version": model.info.version, "input_size": list(size)}}

    say("model throughput (pre-decoded batches)")
    batch = np.stack([load_pixels(f.read_bytes(), size, max_pixels=MAX_PIXELS) for f in files[:32]])
    report["model_throughput"] = model_throughput(model_path, batch, options.batch_sizes, options.threads)
    single = [r for r in report["model_throughput"] if r["batch"] == 1 and r["threads"] == max(options.threads)]
    report["single_image_inference_ms"] = round(1000 / single[0]["images_per_s"], 2) if single else None

    say("decode and resize throughput (one core)")
    large_bytes = [make_large(f) for f in files[:4]]
    report["decode"] = {
        "listing_images_per_s": decode_rate([f.read_bytes() for f in files[:50]], size),
        "large_12mp_images_per_s": decode_rate(large_bytes, size),
    }

    fp32_path, int8_path = precision_pair(options)
    if int8_path is not None and int8_path.exists() and fp32_path.exists():
        say("int8 against fp32")
        best = max(options.batch_sizes)
        threads = max(options.threads)
        fp32 = model_throughput(fp32_path, batch, [best], [threads])[0]["images_per_s"]
        int8 = model_throughput(int8_path, batch, [best], [threads])[0]["images_per_s"]
        report["int8"] = {"model": str(int8_path), "fp32_images_per_s": fp32, "int8_images_per_s": int8,
                          "speedup": round(int8 / fp32, 2)}

    with tempfile.TemporaryDirectory(dir=options.workdir, prefix="fashion-bench-") as tmp:
        report["end_to_end"] = end_to_end(Path(tmp), files, model_path, options)

    if options.naive:
        say("naive baseline: per-image PyTorch eager loop")
        report["naive"] = naive_baseline(files[:24], model)

    report["targets"] = targets(report, options)
    return report


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise ConfigError(f"no images ({', '.join(EXTENSIONS)}) under {folder}")
    return files


def precision_pair(options: BenchOptions) -> tuple[Path, Path | None]:
    """(fp32, int8) models to compare: the shipped pair, or the given model and its .int8.onnx sibling."""
    if options.model is None:
        return DEFAULT_MODEL_FP32, options.int8_model or DEFAULT_MODEL
    sibling = options.model.with_suffix(".int8.onnx")
    return options.model, options.int8_model or (sibling if sibling.exists() else None)


def machine() -> dict:
    import onnxruntime as ort

    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "python": sys.version.split()[0]}


def model_throughput(path: Path, decoded: np.ndarray, batch_sizes: list[int], threads: list[int]) -> list[dict]:
    """Images/s of onnxruntime alone, per (threads, batch size), each timed for about a second."""
    rows = []
    for count in threads:
        model = Model(path, intra_op_threads=count)
        for size in batch_sizes:
            batch = np.resize(decoded, (size, *decoded.shape[1:]))
            model.probabilities(batch)
            runs, started = 0, time.perf_counter()
            while runs < 3 or time.perf_counter() - started < 1.0:
                model.probabilities(batch)
                runs += 1
            rate = runs * size / (time.perf_counter() - started)
            rows.append({"threads": count, "batch": size, "images_per_s": round(rate, 1)})
    return rows


def decode_rate(blobs: list[bytes], size: tuple[int, int]) -> float:
    """Images/s of the worker's decode + resize on one thread."""
    load_pixels(blobs[0], size, max_pixels=MAX_PIXELS)
    count, started = 0, time.perf_counter()
    while count < len(blobs) or time.perf_counter() - started < 1.0:
        load_pixels(blobs[count % len(blobs)], size, max_pixels=MAX_PIXELS)
        count += 1
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


def generate(files: list[Path], count: int, folder: Path, prefix: str, large: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        source = files[i % len(files)]
        data = distinct(source.read_bytes(), i + 1, large=large) if large or i >= len(files) else source.read_bytes()
        path = folder / f"{prefix}{i:05d}.jpg"
        path.write_bytes(data)
        out.append(path)
    return out


class WorkerProcess:
    """The real worker as a subprocess on a temp inbox and SQLite file."""

    def __init__(self, root: Path, model: Path, options: BenchOptions) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.db = root / "data" / "results.db"
        self.inbox.mkdir(parents=True)
        config = root / "config.toml"
        config.write_text(
            f'[inbox]\npath = "inbox"\n\n'
            f'[model]\npath = "{model}"\n\n'
            f"[batch]\nmax_batch = {options.max_batch}\nmax_wait_ms = {options.max_wait_ms}\n"
            f"decode_threads = {options.decode_threads}\n\n"
            f'[database]\nurl = "sqlite:///data/results.db"\n\n[service]\nlog_level = "WARNING"\n'
        )
        self.log = open(root / "worker.log", "w")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen([sys.executable, "-m", "worker", "run", "--config", str(config)],
                                        stdout=self.log, stderr=subprocess.STDOUT, cwd=root)

    def rows(self) -> int:
        if not self.db.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
                return db.execute("select count(*) from results").fetchone()[0]
        except sqlite3.OperationalError:  # the worker has not created the table yet
            return 0

    def processed_at(self, names: list[str]) -> dict[str, float]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
            marks = ",".join("?" * len(names))
            found = db.execute(f"select file, processed_at from results where file in ({marks})", names)
            return {name: parse_time(value) for name, value in found}

    def wait_rows(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.rows() < count:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}; see {self.root / 'worker.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {count} rows (have {self.rows()})")
            time.sleep(0.01)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        return code


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
        for i in range(options.drops):
            name = f"drop-{i:03d}.jpg"
            data = files[i % len(files)].read_bytes() if i < len(files) else distinct(files[0].read_bytes(), 10**6 + i)
            with open(worker.inbox / name, "wb") as handle:
                handle.write(data)
            closed = time.time()
            expected += 1
            worker.wait_rows(expected, timeout=60)
            latencies.append(1000 * (worker.processed_at([name])[name] - closed))
            time.sleep(0.05)

        results = {"latency_ms": {"p50": round(percentile(latencies, 50), 1),
                                  "p95": round(percentile(latencies, 95), 1), "drops": len(latencies)}}
        for label, batch in (("burst", burst), ("large_burst", large)):
            say(f"{label.replace('_', ' ')}: {len(batch)} images")
            started = time.time()
            for path in batch:
                os.rename(path, worker.inbox / path.name)
            expected += len(batch)
            worker.wait_rows(expected, timeout=60 + 2 * len(batch))
            finished = max(worker.processed_at([p.name for p in batch]).values())
            seconds = finished - started
            results[label] = {"images": len(batch), "seconds": round(seconds, 2),
                              "images_per_s": round(len(batch) / seconds, 1),
                              "ms_per_image": round(1000 * seconds / len(batch), 2)}

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
    threads = max(options.threads)
    at_budget = [r["images_per_s"] for r in report["model_throughput"]
                 if r["threads"] == threads and r["batch"] == max(b for b in options.batch_sizes
                                                                  if b <= options.max_batch)]
    out = {}
    if at_budget:
        ratio = e2e["burst"]["images_per_s"] / at_budget[0]
        out["burst_vs_model"] = {"ratio": round(ratio, 3), "target": ">= 0.85", "met": ratio >= 0.85}
    if report.get("single_image_inference_ms"):
        bound = options.max_wait_ms + 2 * report["single_image_inference_ms"]
        p50 = e2e["latency_ms"]["p50"]
        out["latency_p50"] = {"ms": p50, "bound_ms": round(bound, 1), "met": p50 <= bound}
    if "int8" in report:
        speedup = report["int8"]["speedup"]
        out["int8_speedup"] = {"ratio": speedup, "target": ">= 1.6", "met": speedup >= 1.6}
    out["idle_cpu"] = {"percent": e2e["idle_cpu_percent"], "target": "< 1", "met": e2e["idle_cpu_percent"] < 1}
    ratio = e2e["large_burst"]["ms_per_image"] / e2e["burst"]["ms_per_image"]
    out["large_vs_listing"] = {"ratio": round(ratio, 2), "target": "<= 3", "met": ratio <= 3}
    return out


def format_report(report: dict) -> str:
    """Human-readable lines for the terminal."""
    lines = [f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"onnxruntime {report['machine']['onnxruntime']}",
             f"model: {report['model']['name']} {report['model']['version']} "
             f"{report['model']['input_size'][0]}x{report['model']['input_size'][1]}", "",
             "model throughput (images/s, pre-decoded):"]
    threads = sorted({r["threads"] for r in report["model_throughput"]})
    sizes = sorted({r["batch"] for r in report["model_throughput"]})
    lines.append("  threads " + "".join(f"{'batch ' + str(s):>11}" for s in sizes))
    for t in threads:
        cells = {r["batch"]: r["images_per_s"] for r in report["model_throughput"] if r["threads"] == t}
        lines.append(f"  {t:>7} " + "".join(f"{cells[s]:>11.1f}" for s in sizes))
    decode = report["decode"]
    lines += ["", f"decode+resize, one core: {decode['listing_images_per_s']:.1f} listing photos/s, "
                  f"{decode['large_12mp_images_per_s']:.1f} 12 MP photos/s"]
    if "int8" in report:
        i8 = report["int8"]
        lines.append(f"int8: {i8['int8_images_per_s']:.1f} images/s vs fp32 {i8['fp32_images_per_s']:.1f} "
                     f"({i8['speedup']}x)")
    e2e = report["end_to_end"]
    lines += ["", "end to end (real worker, inbox -> committed row):",
              f"  burst of {e2e['burst']['images']}: {e2e['burst']['images_per_s']:.1f} images/s",
              f"  12 MP burst of {e2e['large_burst']['images']}: {e2e['large_burst']['images_per_s']:.1f} images/s",
              f"  single-drop latency: p50 {e2e['latency_ms']['p50']:.1f} ms, p95 {e2e['latency_ms']['p95']:.1f} ms",
              f"  idle CPU: {e2e['idle_cpu_percent']:.2f} %   peak RSS: {e2e['peak_rss_mb']:.0f} MB"]
    if "naive" in report:
        naive = report["naive"]
        lines.append(f"naive per-image PyTorch eager loop: {naive.get('images_per_s', naive.get('skipped'))}"
                     + (" images/s" if "images_per_s" in naive else ""))
    lines += ["", "targets:"]
    for name, target in report["targets"].items():
        shown = {k: v for k, v in target.items() if k != "met"}
        lines.append(f"  {'met ' if target['met'] else 'MISS'} {name}: {json.dumps(shown)}")
    return "\n".join(lines)
