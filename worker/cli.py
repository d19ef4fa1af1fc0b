"""`fashion-worker`: the command line, thin over the library (parse, call, print).

Each subcommand takes those of the shared flags --config, --inbox, --db, --model and --log-level that it
uses (GLOBAL_FLAGS). A user's mistake (FashionWorkerError) prints `fashion-worker: error: <message>` on
stderr and exits 2, without a traceback; a bad flag prints one line, `fashion-worker COMMAND: error:
<argparse's message> (see … --help)`, also exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from worker import config as config_mod
from worker.config import LOG_LEVELS, Config
from worker.exceptions import ConfigError, FashionWorkerError

PROG = "fashion-worker"
DEFAULT_CONFIG = Path("config.toml")

log = logging.getLogger(__name__)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (each option's help names its default itself)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (the full usage is one --help away)."""

    commands: dict[str, argparse.ArgumentParser]  # the top-level parser's subcommand parsers, by name

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Config -----------------------------------------------------------------------------------------------
def database_url(value: str) -> str:
    """--db takes a SQLAlchemy URL or a plain file path (a SQLite database, relative to the current folder)."""
    if "://" in value:
        return value
    return "sqlite:///" + os.path.abspath(os.path.expanduser(value))


def load_config(args: argparse.Namespace) -> Config:
    """config.toml (--config, else ./config.toml if it exists, else defaults) with the flags applied.

    Paths given as flags are relative to the current folder; those in the file to the file's folder.
    """
    path = getattr(args, "config", None)
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    overrides: dict[str, Any] = {}
    inbox, db, model = (getattr(args, name, None) for name in ("inbox", "db", "model"))
    for flag, value in (("--inbox", inbox), ("--db", db), ("--model", model)):
        if value is not None and not value.strip():
            raise ConfigError(f"{flag} must not be empty")
    if inbox is not None:
        overrides["inbox.path"] = os.path.abspath(os.path.expanduser(inbox))
    if db is not None:
        overrides["database.url"] = database_url(db)
    if model is not None:
        overrides["model.path"] = os.path.abspath(os.path.expanduser(model))
    if args.log_level is not None:
        overrides["service.log_level"] = args.log_level
    for key, value in getattr(args, "extra_overrides", {}).items():
        overrides[key] = value
    return config_mod.load(path, overrides)


def setup(args: argparse.Namespace, *, quiet: bool = True) -> Config:
    """Load the config and set up logging. `quiet` commands (all but `run`) log warnings and errors
    only, unless --log-level asks for more, so that their output stays clean."""
    from worker.logs import setup_logging

    cfg = load_config(args)
    level = cfg.service.log_level
    if quiet and args.log_level is None and LOG_LEVELS.index(level) < LOG_LEVELS.index("WARNING"):
        level = "WARNING"
    setup_logging(level)
    return cfg


def setup_instance(args: argparse.Namespace, *, quiet: bool = True) -> Config:
    """setup(), then --instance N (run, doctor): worker N's id and metrics port (config.for_instance)."""
    cfg = setup(args, quiet=quiet)
    if args.instance is not None:
        config_mod.for_instance(cfg, args.instance, socket.gethostname())
    return cfg


def open_existing_store(cfg: Config) -> Any:
    """The results database for reading: never created, migrated or written (SQLite: opened read-only)."""
    from worker.store import Store

    return Store(cfg.database_url, busy_timeout_ms=cfg.database.busy_timeout_ms, readonly=True)


# Commands ---------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from worker.daemon import Worker

    if args.polling:
        args.extra_overrides = {"inbox.polling": True}
    return Worker(setup_instance(args, quiet=False)).run(once=args.once)


def cmd_classify(args: argparse.Namespace) -> int:
    from worker.daemon import make_model
    from worker.pipeline import classify_files

    cfg = setup(args)
    model = make_model(cfg, one_caller=True)
    failed = 0
    for result in classify_files(model, [Path(f) for f in args.files], max_file_bytes=cfg.files.max_file_bytes,
                                 max_pixels=cfg.files.max_pixels, batch_size=cfg.batch.max_batch):
        failed += result["status"] != "ok"
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return 1 if failed else 0


def cmd_results(args: argparse.Namespace) -> int:
    from worker.output import render
    from worker.query import RESULT_KEYS, SUMMARY_COLUMNS, ResultFilter, results

    cfg = setup(args)
    store = open_existing_store(cfg)
    try:
        category = args.category and _category(args.category, store, cfg)
        flt = ResultFilter(
            category=category, status=args.status, min_confidence=args.min_confidence,
            max_confidence=args.max_confidence, since=args.since, until=args.until, file=args.file,
            limit=args.limit,
        )
        rows = results(store, flt)
    finally:
        store.close()
    columns = SUMMARY_COLUMNS if args.format == "table" else RESULT_KEYS  # CSV: a header also for no rows
    sys.stdout.write(render(rows, args.format, columns))
    return 0


def _category(name: str, store: Any, cfg: Config) -> str:
    """--category as recorded (any case); a name neither recorded nor a label of the configured model is
    an error listing the valid ones."""
    from worker.model import model_file, model_labels
    from worker.query import categories, resolve_category

    recorded = categories(store)
    try:
        return resolve_category(name, recorded, [])
    except ConfigError:  # not recorded yet: a label of the model, or a mistake (the model is read only now)
        return resolve_category(name, recorded, model_labels(model_file(cfg.model_path, cfg.model.providers)))


def cmd_stats(args: argparse.Namespace) -> int:
    from worker.output import render_stats
    from worker.query import stats

    cfg = setup(args)
    store = open_existing_store(cfg)
    try:
        data = stats(store)
    finally:
        store.close()
    if args.format == "json":
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(render_stats(data))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from worker.daemon import run_checks

    failures = 0
    for check in run_checks(lambda: setup_instance(args), config_source=_config_source(args)):
        failures += not check.ok
        print(check.line(), flush=True)
    return 1 if failures else 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from worker.service import install_service

    plan = install_service(
        args.config, venv=args.venv, user=args.user, uploaders_group=args.uploaders_group, inbox=args.inbox,
        memory_max=args.memory_max, network=args.network, start=not args.no_start, dry_run=args.dry_run,
        gpu=None if args.gpu is None else args.gpu == "yes", instances=args.instances,
    )
    _print_plan(plan, args.dry_run, "installed")
    return 0


def cmd_uninstall_service(args: argparse.Namespace) -> int:
    from worker.service import uninstall_service

    plan = uninstall_service(user=args.user, remove_user=args.remove_user, dry_run=args.dry_run)
    _print_plan(plan, args.dry_run, "uninstalled")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from worker.bench import BenchOptions, format_report, run

    cfg = setup(args)
    if args.int8_model and not Path(args.int8_model).is_file():
        raise ConfigError(f"--int8-model {args.int8_model} does not exist")
    if args.json and not os.access(Path(args.json).absolute().parent, os.W_OK):
        raise ConfigError(f"--json {args.json}: its folder does not exist or is not writable")
    options = BenchOptions(
        images=Path(args.images), burst=args.burst, large=args.large, drops=args.drops,
        batch_sizes=args.batch_sizes, threads=args.threads or [1, os.cpu_count() or 1], model=cfg.model_path,
        int8_model=Path(args.int8_model) if args.int8_model else None, providers=cfg.model.providers,
        max_batch=args.max_batch or cfg.batch.max_batch, max_wait_ms=cfg.batch.max_wait_ms,
        decode_threads=args.decode_threads or cfg.batch.decode_threads, max_queue=cfg.batch.max_queue,
        decode_on=cfg.batch.decode_on, spin_wait=cfg.model.spin_wait, intra_op_threads=cfg.model.intra_op_threads,
        concurrent_batches=cfg.model.concurrent_batches, idle_seconds=args.idle_seconds, naive=args.naive,
        ceiling=args.ceiling, workers=args.workers, database=args.database,
        progress=lambda message: print(f"bench: {message}", file=sys.stderr, flush=True),
    )
    report = run(options)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _print_plan(plan: Any, dry_run: bool, done: str) -> None:
    if dry_run:
        sys.stdout.write(plan.script())
        return
    for warning in plan.warnings:
        print(f"warning: {warning}")
    paths = [plan.unit_path, *([plan.target_path] if plan.target_path else [])]
    print(f"{plan.unit_name}: {done} ({', '.join(map(str, paths))})")
    for note in plan.notes:
        print(note)


def _config_source(args: argparse.Namespace) -> str:
    if args.config is not None:
        return str(args.config)
    return str(DEFAULT_CONFIG.resolve()) if DEFAULT_CONFIG.is_file() else "built-in defaults"


# Parser -----------------------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROG)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _level(value: str) -> str:
    upper = value.upper()
    if upper not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"invalid level {value!r}; valid: {', '.join(LOG_LEVELS)}")
    return upper


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected a number of at least {minimum}, got {number}")
        return number
    return parse


def _instance(value: str) -> int:
    """--instance: 1, 2, ... written plainly (systemd's fashion-worker@01 would be another unit with worker 1's
    id)."""
    if not re.fullmatch(r"[1-9][0-9]*", value):
        raise argparse.ArgumentTypeError(f"expected a worker number 1, 2, ... without leading zeros, got {value!r}")
    return int(value)


def _number(value: str, ok: Callable[[float], bool], expected: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if not ok(number):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return number


def _seconds(value: str) -> float:
    return _number(value, lambda n: n > 0, "more than 0 seconds")


def _probability(value: str) -> float:
    return _number(value, lambda n: 0.0 <= n <= 1.0, "a number from 0 to 1")


def _time(value: str) -> datetime:
    from worker.query import parse_time

    try:
        return parse_time(value, name="")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None


def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {value!r}") from None
    if not numbers or min(numbers) < 1 or max(numbers) > MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"expected numbers from 1 to {MAX_BATCH_SIZE}, got {value!r}")
    return numbers


MAX_BATCH_SIZE = 4096  # bench --batch-sizes: far above any useful batch, below an allocation of terabytes


#: The shared options each command takes: only those it uses, so that none is silently ignored.
GLOBAL_FLAGS: dict[str, tuple[str, ...]] = {
    "run": ("--config", "--inbox", "--db", "--model", "--log-level"),
    "classify": ("--config", "--model", "--log-level"),
    "results": ("--config", "--db", "--model", "--log-level"),  # --model: its labels check --category
    "stats": ("--config", "--db", "--log-level"),
    "doctor": ("--config", "--inbox", "--db", "--model", "--log-level"),
    "bench": ("--config", "--model", "--log-level"),  # its worker gets a temp inbox and database
    "install-service": ("--config", "--inbox", "--log-level"),
    "uninstall-service": ("--log-level",),
}


def _common(command: str) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("shared options")
    options: dict[str, tuple[dict[str, Any], str]] = {
        "--config": ({"type": Path, "metavar": "FILE"},
                     "the service's config file (default: /etc/fashion-worker/config.toml, written with system "
                     "paths if it does not exist)" if command == "install-service" else
                     "config file (default: ./config.toml if it exists, else built-in defaults)"),
        "--inbox": ({"metavar": "DIR"}, "inbox folder (default: inbox.path of the config, 'inbox')"),
        "--db": ({"metavar": "URL|FILE"}, "SQLAlchemy URL or SQLite file path (default: database.url of the "
                                          "config, sqlite:///data/results.db)"),
        "--model": ({"metavar": "FILE"},
                    "ONNX model file (default: model.path of the config; empty = the shipped model)"),
        "--log-level": ({"type": _level, "metavar": "LEVEL"},
                        f"{' | '.join(LOG_LEVELS)} (default: "
                        + ("service.log_level of the config, INFO)" if command == "run" else
                           "WARNING)" if "--config" not in GLOBAL_FLAGS[command] else
                           "WARNING, or service.log_level of the config if that is higher)")),
    }
    for flag in GLOBAL_FLAGS[command]:
        extra, text = options[flag]
        group.add_argument(flag, default=None, help=text, **extra)
    return common


COMMANDS: list[tuple[str, str, str]] = [
    ("run", "Watch the inbox and classify new images (the daemon).",
     "examples:\n  fashion-worker run\n  fashion-worker run --once --inbox ./inbox --db data/results.db\n"
     "  fashion-worker run --polling   # NFS/SMB inbox\n"
     "  fashion-worker run --instance 2   # worker 2 of several on this host (PostgreSQL)"),
    ("classify", "Classify image files and print JSON lines (no database).",
     "examples:\n  fashion-worker classify photo.jpg shoes/*.png\n"
     "  fashion-worker classify --model my.onnx a.jpg | jq .category\n\n"
     "exit status: 0 when every file was classified, 1 when any failed"),
    ("results", "Query recorded results.",
     "examples:\n  fashion-worker results --category dress --min-confidence 0.9\n"
     "  fashion-worker results --status failed --since 1h --format json\n"
     "  fashion-worker results --file '*.png' --since 2025-01-31 --format csv --limit 0"),
    ("stats", "Counts per category and status, throughput, last activity, workers.",
     "examples:\n  fashion-worker stats\n  fashion-worker stats --format json"),
    ("doctor", "Check the config, model, providers, folders, database and inotify limits.",
     "examples:\n  fashion-worker doctor\n  fashion-worker doctor --config /etc/fashion-worker/config.toml\n"
     "  fashion-worker doctor --config /etc/fashion-worker/config.toml --instance 2\n\n"
     "prints one line per check (OK or FAIL); exit status 1 when any check fails"),
    ("bench", "Measure speed on this machine: model, decoding, the real worker end to end.",
     "examples:\n  fashion-worker bench ../shared/data/clothing-dataset-small/validation\n"
     "  fashion-worker bench photos/ --burst 2000 --json bench.json --naive\n"
     "  fashion-worker bench photos/ --config gpu.toml --workers 4 --database postgresql+psycopg://fw@db/bench\n\n"
     "runs the real worker (a subprocess) on a temp inbox; batch settings come from the config"),
    ("install-service", "Install, enable and start the systemd service (as root).",
     "examples:\n  sudo fashion-worker install-service --dry-run\n"
     "  sudo fashion-worker install-service --config /etc/fashion-worker/config.toml\n"
     "  sudo fashion-worker install-service --instances 4   # 4 workers on one GPU (PostgreSQL)\n\n"
     "--config here names the config file the service runs with (default: /etc/fashion-worker/config.toml,\n"
     "written with system paths if it does not exist); --inbox overrides its inbox for the service"),
    ("uninstall-service", "Stop, disable and remove the systemd service (data is kept).",
     "examples:\n  sudo fashion-worker uninstall-service\n  sudo fashion-worker uninstall-service --remove-user"),
]
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "classify": cmd_classify, "results": cmd_results, "stats": cmd_stats,
    "doctor": cmd_doctor, "bench": cmd_bench, "install-service": cmd_install_service,
    "uninstall-service": cmd_uninstall_service,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, formatter_class=_Formatter,
        description="Classify clothing photos dropped into an inbox folder and record the results.",
        epilog="examples:\n  fashion-worker run\n  fashion-worker results --since 1h\n"
               "  fashion-worker COMMAND --help",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub = {name: commands.add_parser(name, help=text, description=text, epilog=epilog,
                                     parents=[_common(name)], formatter_class=_Formatter)
           for name, text, epilog in COMMANDS}
    for name, command in sub.items():
        command.set_defaults(handler=HANDLERS[name])
    parser.commands = sub

    run = sub["run"]
    run.add_argument("--once", action="store_true",
                     help="process what is in the inbox, wait until it is all recorded and moved, then exit")
    run.add_argument("--polling", action="store_true",
                     help="poll the inbox instead of inotify (NFS, SMB); overrides inbox.polling")
    for name in ("run", "doctor"):
        sub[name].add_argument(
            "--instance", type=_instance, default=None, metavar="N",
            help="worker N of several run on this host from one config (PostgreSQL; systemd: "
                 "fashion-worker@N.service): worker id HOST@N, or WORKER_ID@N when service.worker_id is set; "
                 "metrics port service.metrics_port + N - 1 (default: a lone worker)")

    sub["classify"].add_argument("files", nargs="+", metavar="FILE", help="image files to classify")

    res = sub["results"]
    res.add_argument("--category", help="only this category (a label, in any case)")
    res.add_argument("--status", choices=("ok", "failed"), help="only this status")
    res.add_argument("--min-confidence", type=_probability, metavar="P", help="confidence at least P (0..1)")
    res.add_argument("--max-confidence", type=_probability, metavar="P", help="confidence at most P (0..1)")
    res.add_argument("--since", type=_time, metavar="TIME",
                     help="processed at or after TIME: ISO 8601 (2025-01-31T12:00, UTC unless it names an "
                          "offset) or ago (90s, 30m, 1h, 7d)")
    res.add_argument("--until", type=_time, metavar="TIME", help="processed before TIME (same forms as --since)")
    # argparse takes "-1h" for an option unless it looks like a negative number; let it take a negative
    # duration as a value too (no option of `results` looks like one).
    res._negative_number_matcher = re.compile(r"^-\d+(\.\d+)?[smhdwSMHDW]?$|^-\d*\.\d+$")
    res.add_argument("--file", metavar="PATTERN",
                     help="file name: a substring, or a glob with * and ? (case-insensitive)")
    res.add_argument("--limit", type=_at_least(0), default=100, metavar="N",
                     help="newest N rows; 0 = all (default: %(default)s)")
    res.add_argument("--format", choices=("table", "json", "csv"), default="table",
                     help="output format (default: %(default)s)")

    stats_cmd = sub["stats"]
    stats_cmd.add_argument("--format", choices=("text", "json"), default="text",
                           help="output format, as for results (default: %(default)s)")
    stats_cmd.add_argument("--json", action="store_const", const="json", dest="format", help="same as --format json")

    bench = sub["bench"]
    bench.add_argument("images", metavar="IMAGES", help="folder of real images, searched recursively")
    bench.add_argument("--burst", type=_at_least(1), default=500, metavar="N",
                       help="images in the end-to-end burst (default: %(default)s)")
    bench.add_argument("--large", type=_at_least(1), default=40, metavar="N",
                       help="12-megapixel photos in the large-photo burst (default: %(default)s)")
    bench.add_argument("--drops", type=_at_least(1), default=20, metavar="N",
                       help="single drops timed for latency (default: %(default)s)")
    bench.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 8, 16, 32], metavar="N,N",
                       help="model-throughput batch sizes (default: 1,4,8,16,32)")
    bench.add_argument("--threads", type=_int_list, default=None, metavar="N,N",
                       help="model-throughput thread counts (default: 1 and the number of cores)")
    bench.add_argument("--int8-model", default=None, metavar="FILE",
                       help="int8 model to compare with fp32 (default: MODEL.int8.onnx beside the model if present)")
    bench.add_argument("--idle-seconds", type=_seconds, default=10.0, metavar="S",
                       help="how long idle CPU is measured (default: %(default)s)")
    bench.add_argument("--naive", action="store_true",
                       help="also time a per-image PyTorch eager loop (needs the train extra)")
    bench.add_argument("--max-batch", type=_at_least(1), default=None, metavar="N",
                       help="the worker's batch.max_batch (default: from the config)")
    bench.add_argument("--decode-threads", type=_at_least(1), default=None, metavar="N",
                       help="the worker's batch.decode_threads (default: from the config)")
    bench.add_argument("--ceiling", action="store_true",
                       help="also run the burst with a model doing no work: what decoding and bookkeeping allow "
                            "(needs the onnx package: the train or test extra)")
    bench.add_argument("--workers", type=_at_least(1), default=1, metavar="N",
                       help="also run the burst with N worker processes sharing the inbox, as install-service "
                            "--instances N does (needs --database; default: %(default)s, none)")
    bench.add_argument("--database", default=None, metavar="URL",
                       help="PostgreSQL URL the --workers share (their rows stay in its results table)")
    bench.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")

    inst = sub["install-service"]
    inst.add_argument("--venv", default=None, help="virtual environment holding fashion-worker "
                                                   "(default: the running one)")
    inst.add_argument("--user", default="fashion-worker",
                      help="service user, created if missing (default: %(default)s)")
    inst.add_argument("--uploaders-group", default="uploaders", metavar="GROUP",
                      help="group whose members may drop files into the inbox (default: %(default)s)")
    inst.add_argument("--memory-max", default=None,
                      help="MemoryMax= of the unit (default: 4G, 8G with GPU access)")
    inst.add_argument("--network", choices=("none", "loopback", "remote"), default=None,
                      help="network access (default: from the config: remote database -> remote, "
                           "metrics port -> loopback, else none)")
    inst.add_argument("--gpu", choices=("yes", "no"), default=None,
                      help="let the service open the NVIDIA devices (default: yes when the venv's onnxruntime "
                           "offers CUDA or TensorRT, i.e. onnxruntime-gpu, and model.providers may use them)")
    inst.add_argument("--instances", type=_at_least(1), default=None, metavar="N",
                      help="workers run from the config; N > 1 needs PostgreSQL and installs the template unit "
                           "fashion-worker@.service with fashion-worker.target (default: the count installed "
                           "now, else 1)")
    inst.add_argument("--no-start", action="store_true", help="enable the service without starting it")
    inst.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")

    uninst = sub["uninstall-service"]
    uninst.add_argument("--user", default="fashion-worker", help="service user (default: %(default)s)")
    uninst.add_argument("--remove-user", action="store_true", help="also delete the service user")
    uninst.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = {flag for flags in GLOBAL_FLAGS.values() for flag in flags}
    if argv and argv[0].split("=", 1)[0] in flags:  # `fashion-worker --config x run`: say where it goes
        parser.error(f"{argv[0].split('=', 1)[0]} goes after the command: {PROG} COMMAND {argv[0]} …")
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's own parser, which points at the command's --help
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args)
    except FashionWorkerError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fashion-worker results | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
