"""Settings: typed dataclasses, loaded from config.toml, overridden by flags.

Every default lives here, once; `config.toml` at the repo root repeats them as documentation and a test
checks that the two agree. Relative paths resolve against the folder of the config file (or the current
folder when there is none).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.exceptions import ConfigError

ON_SUCCESS = ("move", "leave", "delete")
DECODE_ON = ("cpu", "gpu")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass
class InboxConfig:
    path: str = "inbox"  # the folder sellers' images are dropped into
    recursive: bool = True  # also process images in subfolders
    polling: bool = False  # poll instead of inotify (NFS, SMB); chosen automatically if inotify fails
    poll_interval_s: float = 1.0  # polling mode: how often the folder is listed
    settle_s: float = 2.0  # polling mode and rescans: size and mtime unchanged this long = complete
    rescan_interval_s: float = 300.0  # full rescan catching anything the watcher missed; 0 = never
    ignore: list[str] = field(
        default_factory=lambda: [".*", "*.part", "*.tmp", "*.crdownload", "*.filepart", "~*"]
    )  # temporary names, processed only once renamed to a final name


@dataclass
class FilesConfig:
    on_success: str = "move"  # move | leave | delete, done only after the result row is committed
    processed_dir: str = "processed"  # where classified files go (on_success = "move")
    failed_dir: str = "failed"  # where files that cannot be classified go
    max_file_bytes: int = 64 * 1024 * 1024  # larger files fail without being read
    max_pixels: int = 64_000_000  # decompression-bomb guard: width x height above this fails


@dataclass
class ModelConfig:
    path: str = ""  # ONNX model file; empty = the default model shipped inside the worker package
    providers: list[str] = field(default_factory=lambda: ["auto"])  # auto = TensorRT, CUDA, then CPU
    intra_op_threads: int = 0  # threads inside one operator; 0 = one per physical core, each pinned to its own
    inter_op_threads: int = 1  # operators run in parallel; 1 suits these sequential CNNs
    spin_wait: bool = False  # onnxruntime threads also spin between batches (within one they always do)
    concurrent_batches: int = 0  # CPU: batches run at once, each on its share of the cores; 0 = 2 (1 on a GPU)


@dataclass
class BatchConfig:
    max_batch: int = 16  # images per inference call at most
    max_wait_ms: int = 20  # a batch is run when its oldest image has waited this long
    max_queue: int = 1024  # ready files held in memory; beyond, the next rescan picks them up
    decode_threads: int = 2  # threads decoding and resizing images in parallel with inference
    decode_on: str = "cpu"  # cpu | gpu: JPEGs decoded and resized by nvJPEG on the model's GPU (gpu extra)


@dataclass
class DatabaseConfig:
    url: str = "sqlite:///data/results.db"  # any SQLAlchemy URL; relative SQLite paths resolve as above
    busy_timeout_ms: int = 30_000  # SQLite: how long a writer waits for a lock before retrying
    claim_lease_s: float = 30.0  # PostgreSQL: a dead worker's files are taken over this long after it stopped


@dataclass
class ServiceConfig:
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR
    lock: bool = True  # refuse to start a second worker on the same inbox and database
    metrics_port: int = 0  # Prometheus metrics and /healthz on 127.0.0.1:PORT; 0 = off
    metrics_host: str = "127.0.0.1"
    worker_id: str = ""  # name in results and heartbeats; empty = HOST:PID


@dataclass
class Config:
    inbox: InboxConfig = field(default_factory=InboxConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths resolve against this

    # Resolved paths -------------------------------------------------------------------------------
    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def inbox_path(self) -> Path:
        return self.resolve(self.inbox.path)

    @property
    def processed_path(self) -> Path:
        return self.resolve(self.files.processed_dir)

    @property
    def failed_path(self) -> Path:
        return self.resolve(self.files.failed_dir)

    @property
    def model_path(self) -> Path | None:
        return self.resolve(self.model.path) if self.model.path else None

    @property
    def database_url(self) -> str:
        """The URL with a relative SQLite file path made absolute against base_dir."""
        url = self.database.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.resolve(url[len(prefix):]))
        return url


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "base_dir"}


def load(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (TOML) if given, then apply `overrides` {"section.key": value}; validate."""
    config = Config(base_dir=Path.cwd())
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        config.base_dir = path.resolve().parent
        apply(config, raw, source=str(path))
        validate(config, source=str(path))
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        apply(config, {section: {key: value}}, source="command line")
    validate(config, source="command line" if overrides else "")
    return config


def for_instance(config: Config, instance: int, host: str) -> None:
    """Make `config` that of worker `instance` (1, 2, ...) of several started on one host from one config
    file (the systemd template unit, fashion-worker@N.service): worker id WORKER_ID@N (HOST@N when
    service.worker_id is empty), the same at every restart, so that a restarted instance takes back its
    own claims at once; metrics port metrics_port + N - 1, when one is set."""
    if instance < 1:
        raise ConfigError(f"--instance must be at least 1, got {instance}")
    config.service.worker_id = f"{config.service.worker_id or host}@{instance}"
    if config.service.metrics_port:
        port = instance_metrics_port(config.service.metrics_port, instance)
        if port > 65535:
            raise ConfigError(f"--instance {instance}: its metrics port, service.metrics_port "
                              f"{config.service.metrics_port} + {instance - 1}, is past 65535")
        config.service.metrics_port = port


def instance_metrics_port(metrics_port: int, instance: int) -> int:
    """The metrics port of worker `instance` of several from one config whose service.metrics_port is set."""
    return metrics_port + instance - 1


def apply(config: Config, raw: dict[str, Any], source: str) -> None:
    """Copy values from a parsed TOML dict into `config`, naming any unknown key or wrong type."""
    for section, values in raw.items():
        if section not in SECTIONS and not isinstance(values, dict):
            raise ConfigError(f"{source}: unknown key {section} outside any section; settings go in the "
                              f"sections {', '.join(f'[{name}]' for name in SECTIONS)}")
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]; valid: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        target = getattr(config, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; valid: {', '.join(fields)}"
                )
            setattr(target, key, _coerce(f"{section}.{key}", getattr(target, key), value, source))


def _coerce(name: str, default: Any, value: Any, source: str) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is list:  # (an array of mixed types is a list too)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    elif isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {name} must be {TOML_TYPES[expected]}, got {_toml(value)}")


#: How a setting's type is named in messages: in TOML's words, as the user wrote the file.
TOML_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
              list: "an array of strings"}


def _toml(value: Any) -> str:
    """`value` as TOML writes it (true, not True; [..] for arrays; strings quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def sqlite_url_problem(url: str) -> str | None:
    """What is wrong with a SQLite URL of two slashes ("sqlite://data/results.db" names a host, "data"), or
    None; checked by the config and by the store."""
    if re.fullmatch(r"sqlite(\+\w+)?://(/:memory:)?(\?.*)?", url):
        return (f"{url!r} is a database in memory, gone when the worker stops (and one per connection): name a "
                "file (sqlite:///data/results.db)")
    if not re.match(r"sqlite(\+\w+)?://[^/]", url):
        return None
    return (f"{url!r} has two slashes: a SQLite URL has three before a relative path (sqlite:///data/results.db) "
            "and four before an absolute one (sqlite:////var/lib/fashion-worker/r.db)")


#: Upper bounds of the settings that have no natural one: far above any sensible value, below what hangs
#: the worker (onnxruntime starting 100,000 threads; a batch window past time_t; a settle time of inf).
MAX_THREADS = 1024
MAX_WAIT_MS = 60_000
MAX_SECONDS = 86_400


def validate(config: Config, source: str = "") -> None:
    """Check the values' ranges and choices; `source` (the file, or "command line") prefixes the message."""
    def ranged(name: str, low: float, high: float, bounds: str = "") -> tuple[bool, str]:
        """The check that setting `name` ("section.key") is within low..high (False for nan and inf too)."""
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        return low <= value <= high, f"{name} must be {bounds or f'{low}..{high}'}, got {value}"

    checks = [
        *[(bool(folder.strip()), f"{name} must not be empty (it would be the config file's own folder)")
          for name, folder in (("inbox.path", config.inbox.path), ("files.processed_dir", config.files.processed_dir),
                               ("files.failed_dir", config.files.failed_dir))],
        (config.files.on_success in ON_SUCCESS,
         f"files.on_success must be one of {', '.join(ON_SUCCESS)}, got {config.files.on_success!r}"),
        (config.service.log_level.upper() in LOG_LEVELS,
         f"service.log_level must be one of {', '.join(LOG_LEVELS)}, got {config.service.log_level!r}"),
        (config.batch.max_batch >= 1, f"batch.max_batch must be at least 1, got {config.batch.max_batch}"),
        ranged("batch.max_wait_ms", 0, MAX_WAIT_MS),
        (config.batch.max_queue >= config.batch.max_batch,
         f"batch.max_queue ({config.batch.max_queue}) must be >= batch.max_batch ({config.batch.max_batch})"),
        ranged("batch.decode_threads", 1, MAX_THREADS),
        (config.batch.decode_on in DECODE_ON,
         f"batch.decode_on must be one of {', '.join(DECODE_ON)}, got {config.batch.decode_on!r}"),
        (config.files.max_pixels > 0, f"files.max_pixels must be positive, got {config.files.max_pixels}"),
        (config.files.max_file_bytes > 0,
         f"files.max_file_bytes must be positive, got {config.files.max_file_bytes}"),
        ranged("inbox.settle_s", 0, MAX_SECONDS),
        ranged("database.claim_lease_s", 0.001, MAX_SECONDS, f"positive, at most {MAX_SECONDS}"),
        ranged("inbox.poll_interval_s", 0.001, MAX_SECONDS, f"positive, at most {MAX_SECONDS}"),
        ranged("inbox.rescan_interval_s", 0, MAX_SECONDS),
        (0 <= config.service.metrics_port <= 65535,
         f"service.metrics_port must be 0..65535, got {config.service.metrics_port}"),
        ranged("model.intra_op_threads", 0, MAX_THREADS),
        ranged("model.inter_op_threads", 0, MAX_THREADS),
        ranged("model.concurrent_batches", 0, MAX_THREADS),
        ranged("database.busy_timeout_ms", 0, MAX_SECONDS * 1000),
        (sqlite_url_problem(config.database.url) is None,
         f"database.url {sqlite_url_problem(config.database.url)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}" if source else message)
    config.service.log_level = config.service.log_level.upper()
