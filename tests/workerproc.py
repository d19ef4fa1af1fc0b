"""Shared helpers for the reliability tests (tests/test_reliability_*.py).

- `Site`: a folder laid out as `fashion-worker run` expects (config.toml, a generated model, inbox/,
  processed/, failed/, data/results.db), with read-only queries through plain sqlite3.
- `WorkerProc`: `python -m worker run` as a real subprocess (log file, ready wait, SIGKILL/SIGTERM,
  peak RSS from /proc/<pid>/status VmHWM).
- `distinct_images`: real JPEG/PNG files with distinct pixels, the dominant colour in the name (so the
  category of every row can be checked against its file).
- `report`: prints one summary line of figures straight to the terminal (also under plain `pytest`,
  where output is captured) and returns it for assertion messages; with $FW_RELIABILITY_FIGURES set, the
  figures are also appended there as JSON lines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_model
from PIL import Image

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


# Figures --------------------------------------------------------------------------------------------------
def report(capsys: pytest.CaptureFixture[str] | None, name: str, **figures: Any) -> str:
    """Print `RELIABILITY <name>: k=v, ...` on the terminal (bypassing capture) and return the line."""
    parts = []
    for key, value in figures.items():
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    line = f"RELIABILITY {name}: " + ", ".join(parts)
    if capsys is not None:
        with capsys.disabled():
            sys.stdout.write("\n" + line + "\n")
            sys.stdout.flush()
    else:
        print(line)
    target = os.environ.get("FW_RELIABILITY_FIGURES")
    if target:
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": name, **figures}, default=str) + "\n")
    return line


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.05) -> float:
    """Poll `predicate` until true; return the seconds it took; AssertionError naming `what` on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


# Files ------------------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(Path(path).read_bytes())


def files_below(folder: Path) -> list[Path]:
    """Every non-folder entry below `folder` (regular files, links, FIFOs…), without following symlinks."""
    out = []
    for current, dirs, files in os.walk(folder):
        out.extend(Path(current) / name for name in files)
        out.extend(Path(current) / name for name in dirs if os.path.islink(Path(current) / name))
    return sorted(out)


def tree_hashes(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of the regular files below `folder`."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files_below(folder) if p.is_file()}


def image_bytes(color: str, seed: int, size: tuple[int, int] = (96, 72), fmt: str = "JPEG") -> bytes:
    """A real image whose dominant channel is `color`, with per-seed noise (distinct pixels and bytes)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
    array[..., list(COLORS).index(color)] += 160
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def distinct_images(folder: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (96, 72),
                    prefix: str = "img") -> list[Path]:
    """`count` distinct images named `<prefix>-<n>-<color>.<ext>` (JPEG, every 7th PNG) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        color = list(COLORS)[i % 3]
        fmt, ext = ("PNG", "png") if i % 7 == 3 else ("JPEG", "jpg")
        path = folder / f"{prefix}-{i:05}-{color}.{ext}"
        path.write_bytes(image_bytes(color, seed * 1_000_003 + i, size, fmt))
        paths.append(path)
    return paths


def color_of(name: str) -> str | None:
    """The colour encoded in a name made by `distinct_images`."""
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    color = stem.rsplit("-", 1)[-1]
    return color if color in COLORS else None


def move_into(paths: list[Path], inbox: Path) -> None:
    for path in paths:
        os.rename(path, inbox / path.name)


# The site ---------------------------------------------------------------------------------------------
CONFIG = """\
[inbox]
path = "inbox"
settle_s = {settle_s}
poll_interval_s = {poll_interval_s}
rescan_interval_s = {rescan_interval_s}
[files]
processed_dir = "processed"
failed_dir = "failed"
[model]
path = "model.onnx"
intra_op_threads = 1
[batch]
max_queue = {max_queue}
[database]
url = "sqlite:///data/results.db"
busy_timeout_ms = {busy_timeout_ms}
"""


class Site:
    """A worker's folder: config.toml, model.onnx, inbox/, processed/, failed/, data/results.db."""

    def __init__(self, root: Path, *, settle_s: float = 0.3, poll_interval_s: float = 0.2,
                 rescan_interval_s: float = 300.0, max_queue: int = 1024, busy_timeout_ms: int = 30_000,
                 model_size: tuple[int, int] = (32, 32)) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.toml").write_text(CONFIG.format(
            settle_s=settle_s, poll_interval_s=poll_interval_s, rescan_interval_s=rescan_interval_s,
            max_queue=max_queue, busy_timeout_ms=busy_timeout_ms))
        make_model(root / "model.onnx", size=model_size)
        self.inbox.mkdir(exist_ok=True)

    inbox = property(lambda self: self.root / "inbox")
    processed = property(lambda self: self.root / "processed")
    failed = property(lambda self: self.root / "failed")
    data = property(lambda self: self.root / "data")
    db = property(lambda self: self.root / "data" / "results.db")

    def query(self, sql: str, params: tuple[Any, ...] = (), timeout: float = 10.0) -> list[tuple[Any, ...]]:
        """Read-only query through plain sqlite3; [] before the worker created the database/table."""
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=timeout)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def count(self, where: str = "1") -> int:
        rows = self.query(f"SELECT count(*) FROM results WHERE {where}")
        return rows[0][0] if rows else 0

    def inbox_files(self) -> list[Path]:
        return files_below(self.inbox)

    def integrity(self) -> str:
        conn = sqlite3.connect(str(self.db), timeout=30)
        try:
            return ";".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        finally:
            conn.close()


class WorkerProc:
    """`python -m worker run [args]` in a site, stdout+stderr in a log file."""

    def __init__(self, site: Site, *args: str, env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        self.site = site
        self.log_path = site.root / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "worker", "run", *args], cwd=site.root,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> WorkerProc:
        wait_until(lambda: "watching inbox" in self.log or not self.alive(), timeout, "the worker to start")
        assert self.alive(), f"the worker exited with {self.proc.returncode}:\n{self.log}"
        return self

    def status(self, key: str) -> int:
        """A kB figure from /proc/<pid>/status (VmHWM = peak RSS, VmRSS = current RSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()


@pytest.fixture
def workers() -> Iterator[Callable[..., WorkerProc]]:
    """Start workers with `workers(site, *args)`; any still running at the end are killed."""
    started: list[WorkerProc] = []

    def start(site: Site, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> WorkerProc:
        proc = WorkerProc(site, *args, env=env, prefix=prefix)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


# Faults the tests inject for real ----------------------------------------------------------------------
def without_file_permission_override() -> tuple[str, ...]:
    """A command prefix under which file permission bits bind the process: for root, setpriv drops
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set (so from what the command gets); a
    normal user is bound anyway. Skips the test where root has no setpriv."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv: a chmod 000 file would still be readable")
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--")


FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


def set_immutable(path: Path, on: bool) -> None:
    """chattr +i / -i through the ioctl (root only; ext4, xfs, btrfs… have it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        buf = bytearray(struct.pack("i", 0))
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        flags = struct.unpack("i", buf)[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    finally:
        os.close(fd)


def immutable_supported(folder: Path) -> str | None:
    """None when `set_immutable` works on `folder`'s filesystem, else why not."""
    if os.geteuid() != 0:
        return "not root: chattr +i needs CAP_LINUX_IMMUTABLE"
    probe = folder / ".immutable-probe"
    probe.mkdir(exist_ok=True)
    try:
        set_immutable(probe, True)
        set_immutable(probe, False)
    except OSError as exc:
        return f"chattr +i not supported here: {exc.strerror}"
    finally:
        with contextlib.suppress(OSError):
            set_immutable(probe, False)
        probe.rmdir()
    return None


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """Mount a real tmpfs of `size` on `folder` (pytest.skip naming the reason when not permitted)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); "
                    "the full-disk case needs root or CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def fill_disk(folder: Path) -> Path:
    """Write a filler file in `folder` until the filesystem is full (ENOSPC); return it."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 16, 4096, 512, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler
