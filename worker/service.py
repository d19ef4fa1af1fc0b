"""Install and uninstall the worker as a hardened systemd service.

`install_service` turns a config file into a running service in one call: it creates the service user
and the uploaders' group, the inbox (setgid, group-writable for the uploaders), the processed and failed
folders, renders the unit with the real paths (the sandbox's writable paths come from the config), checks
it with `systemd-analyze verify`, installs it, reloads systemd and enables and starts it.

Every action is a `Step` in a `ServicePlan`: `dry_run=True` returns the plan without doing anything (the
CLI prints `plan.script()`), and `root=` performs only the file actions under another root folder (tests
render and inspect a real unit there without touching the host; user, group and systemctl commands are
listed but not run).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from worker import config as config_mod
from worker.exceptions import FashionWorkerError
from worker.lock import uses_claims
from worker.model import GPU_PROVIDERS
from worker.store import hide_password

log = logging.getLogger(__name__)

UNIT_NAME = "fashion-worker"
DEFAULT_USER = "fashion-worker"
DEFAULT_UPLOADERS = "uploaders"
DEFAULT_CONFIG = Path("/etc/fashion-worker/config.toml")
DEFAULT_DATA = Path("/srv/fashion-worker")
STATE_DIR = Path("/var/lib")  # StateDirectory= lives under it
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
HOME_PREFIXES = (Path("/home"), Path("/root"), Path("/run/user"))
NETWORKS = ("none", "loopback", "remote")
DEFAULT_MEMORY_MAX = {False: "4G", True: "8G"}  # without and with GPU access: a CUDA context and cuDNN add ~1.5 GB

# The address families and IP rules of each network mode (see docs/operations.md):
# none     - no network at all: PrivateNetwork=yes (own loopback only), Unix sockets only.
# loopback - the metrics endpoint on the host's 127.0.0.1: host network, IP limited to localhost.
# remote   - a remote database: host network; narrow IPAddressAllow= to the database's address.
_NETWORK_BLOCKS = {
    "none": (
        "# No network: the worker needs none with a local SQLite database. See docs/operations.md for\n"
        "# the drop-ins that open loopback (metrics) or a remote database.\n"
        "PrivateNetwork=yes\n"
        "IPAddressDeny=any\n"
        "RestrictAddressFamilies=AF_UNIX\n"
    ),
    "loopback": (
        "# Metrics endpoint: host network, but IP traffic limited to localhost.\n"
        "PrivateNetwork=no\n"
        "IPAddressDeny=any\n"
        "IPAddressAllow=localhost\n"
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n"
    ),
    "remote": (
        "# Remote database: host network. Narrow IPAddressAllow= to the database server's address\n"
        "# (e.g. IPAddressAllow=10.0.0.5/32) with `systemctl edit`; DNS needs the resolver's address too.\n"
        "PrivateNetwork=no\n"
        "IPAddressDeny=\n"
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n"
    ),
}


@dataclass(frozen=True)
class UnitSettings:
    """Everything that varies between installations of the unit."""

    executable: Path  # the venv's fashion-worker script
    config: Path
    user: str = DEFAULT_USER
    group: str = DEFAULT_USER
    uploaders_group: str | None = DEFAULT_UPLOADERS  # None = no SupplementaryGroups=
    read_write_paths: tuple[Path, ...] = ()
    state_directory: str = UNIT_NAME  # /var/lib/<this>, owned by the user, for the SQLite database
    network: str = "none"  # none | loopback | remote
    protect_home: str = "yes"  # "read-only" when the venv, config or data live under /home or /root
    memory_max: str = DEFAULT_MEMORY_MAX[False]
    gpu: bool = False  # open the NVIDIA devices (onnxruntime-gpu, decode_on = "gpu")
    watchdog_sec: int = 60
    timeout_start_sec: int = 300  # loading and warming up a model on a slow CPU
    timeout_stop_sec: int = 30  # the worker finishes its batch and exits within a few seconds
    extra_args: tuple[str, ...] = ()  # appended to `run --config CONFIG`, e.g. ("--inbox", "/x")
    description: str = "fashion-worker: classifies clothing photos dropped into an inbox"
    template: bool = False  # NAME@.service: workers 1..N from one config, grouped by NAME.target
    unit_name: str = UNIT_NAME


def _quote(path: Path | str) -> str:
    """A path or argument for a unit file: quoted when it has spaces; % escaped as %%."""
    text = str(path).replace("%", "%%")
    if any(c in text for c in " \t\"'\\"):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def render_unit(settings: UnitSettings) -> str:
    """The text of the systemd unit for `settings`."""
    s = settings
    if s.network not in NETWORKS:
        raise FashionWorkerError(f"network must be one of {', '.join(NETWORKS)}, got {s.network!r}")
    if s.protect_home not in ("yes", "read-only", "tmpfs"):
        raise FashionWorkerError(f"protect_home must be yes, read-only or tmpfs, got {s.protect_home!r}")
    command = " ".join(_quote(a) for a in (s.executable, "run", "--config", s.config, *s.extra_args))
    # A template's instances: worker N runs with --instance N (its worker id, metrics port) and a runtime
    # directory of its own, which systemd removes when that instance stops; the target starts and stops them.
    # The template has no [Install]: its target's Wants= names the workers, so that re-installing with
    # another count leaves no enablement link behind.
    if s.template:
        name, edit_name, description = f"{s.unit_name}@", f"{s.unit_name}@.service", f"{s.description} (worker %i)"
        runtime, part_of = f"{s.state_directory}/%i", f"PartOf={s.unit_name}.target\n"
        install = ""
        runtime_use = "this worker's own (systemd removes it when the worker stops); unused with PostgreSQL"
        command += " --instance %i"
    else:
        name, edit_name, description = s.unit_name, s.unit_name, s.description
        runtime, part_of = s.state_directory, ""
        install = "\n[Install]\nWantedBy=multi-user.target\n"
        runtime_use = "the inbox lock when the database is not a local SQLite file"
    rw = " ".join(_quote(p) for p in s.read_write_paths)
    supplementary = f"SupplementaryGroups={s.uploaders_group}\n" if s.uploaders_group else ""
    devices, syscalls, wx = _GPU_BLOCKS[s.gpu]
    after = "local-fs.target"
    if s.gpu:  # the driver's persistence daemon and the nvidia-uvm oneshot of docs/operations.md, where there
        after += " nvidia-persistenced.service nvidia-uvm-nodes.service"  # are such units: GPUs and nodes ready
    if s.network == "remote":
        after += " network-online.target\nWants=network-online.target"
    return f"""\
# Rendered by `fashion-worker install-service`; edit with `systemctl edit {edit_name}` (a drop-in)
# rather than here, so a re-install keeps your changes. See docs/operations.md.
[Unit]
Description={description}
After={after}
{part_of}StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
ExecStart={command}
WatchdogSec={s.watchdog_sec}
Restart=on-failure
RestartSec=5
# Exit 2 = a configuration or usage mistake: restarting cannot fix it.
RestartPreventExitStatus=2
TimeoutStartSec={s.timeout_start_sec}
TimeoutStopSec={s.timeout_stop_sec}
KillMode=mixed
StandardOutput=journal
StandardError=journal
SyslogIdentifier={name}{"%i" if s.template else ""}

# Identity: a dedicated system user; the uploaders' group gives access to the inbox.
User={s.user}
Group={s.group}
{supplementary}UMask=0027

# Files: the whole system read-only, the inbox/processed/failed folders writable, the database
# in /var/lib/{s.state_directory} (StateDirectory=, owned by the user).
ProtectSystem=strict
ProtectHome={s.protect_home}
ReadWritePaths={rw}
StateDirectory={s.state_directory}
StateDirectoryMode=0750
# /run/{runtime}: {runtime_use}.
RuntimeDirectory={runtime}
RuntimeDirectoryMode=0750
Environment=XDG_RUNTIME_DIR=%t/{runtime}
PrivateTmp=yes
{devices}PrivateMounts=yes
PrivateIPC=yes
RemoveIPC=yes

# Network.
{_NETWORK_BLOCKS[s.network]}
# Privileges and kernel.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
{wx}MemoryDenyWriteExecute=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
# Not ProcSubset=pid: onnxruntime reads /proc/cpuinfo, and without it logs four warnings at every start
# ("failed to parse processor information"); its speed is the same either way.
ProcSubset=all
DevicePolicy=closed
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
{syscalls}SystemCallErrorNumber=EPERM

# Resources.
MemoryMax={s.memory_max}
TasksMax=256
{install}"""


def render_target(instances: int, unit_name: str = UNIT_NAME) -> str:
    """The target that starts workers 1..instances of the template unit, and stops every instance."""
    wants = " ".join(f"{unit_name}@{n}.service" for n in range(1, instances + 1))
    return f"""\
# Rendered by `fashion-worker install-service --instances {instances}`: re-run it to change the count.
# `systemctl start {unit_name}.target` starts workers 1 to {instances}; stop and restart act on every
# worker that runs (their unit has PartOf= this).
[Unit]
Description=fashion-worker: {instances} workers sharing one inbox through PostgreSQL
Wants={wants}
# (targets get this by default; said here so that `systemctl start` waits for every worker's READY=1 always)
After={wants}

[Install]
WantedBy=multi-user.target
"""


# (devices, system call filter, the comment on MemoryDenyWriteExecute=) without and with GPU access;
# systemd/gpu.conf makes the same changes to the reference unit as a drop-in.
_GPU_BLOCKS = {
    False: (
        "PrivateDevices=yes\n",
        "SystemCallFilter=~@privileged @resources\n"
        "# ...but onnxruntime's threads and the thread calling it are each pinned to a core (worker/affinity.py).\n"
        "SystemCallFilter=sched_setaffinity\n",
        "# onnxruntime's CPU provider, numpy and CPython do not JIT: checked by tests/test_service.py.\n",
    ),
    True: (
        "# GPU: /dev is the host's, but of its devices only the NVIDIA ones may be opened (the groups\n"
        "# nvidia, nvidiactl, nvidia-uvm, nvidia-caps... of /proc/devices); DevicePolicy=closed keeps\n"
        "# every other device shut. The groups are looked up when the unit starts: load the driver and\n"
        "# nvidia-uvm before (docs/operations.md). 195 is the driver's fixed major (/dev/nvidia0...,\n"
        "# /dev/nvidiactl), which systemd takes as a number, whatever the driver names it.\n"
        "PrivateDevices=no\n"
        "DeviceAllow=char-195 rw\n"
        "DeviceAllow=char-nvidia* rw\n",
        "# The CUDA driver, cuDNN and torch (nvJPEG) are not ours to audit: @resources (NUMA placement,\n"
        "# priorities, limits) stays allowed, as in NixOS' ollama service.\n"
        "SystemCallFilter=~@privileged\n",
        "# The CPU side does not JIT (tests/test_service.py); CUDA, cuDNN and TensorRT compile GPU code, not\n"
        "# host code, and NixOS' ollama service runs CUDA under this too. Not yet tried here on a GPU: if CUDA starts\n"
        "# by hand but not in the unit, try MemoryDenyWriteExecute=no in a drop-in.\n",
    ),
}


# Plan -----------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One action: a command (argv) run on the host, or a file action done by `apply` under a root."""

    description: str
    argv: list[str] | None = None
    apply: Callable[[Path], None] | None = None
    host_only: bool = False  # acts on the host's users or systemd: not done when root != "/"
    content: str | None = None  # the text a file action writes, shown by --dry-run
    may_fail: bool = False  # stopping or disabling what may not be installed: a failure is only logged

    def shell(self) -> str:
        return shlex.join(self.argv) if self.argv else f"# {self.description}"


@dataclass
class ServicePlan:
    """What install_service / uninstall_service does (or did), in order."""

    unit_name: str
    unit_path: Path
    unit_text: str | None = None
    target_path: Path | None = None  # several workers: the target grouping the template's instances
    target_text: str | None = None
    config_path: Path | None = None
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth saying, nothing wrong

    def script(self) -> str:
        """The plan as a commented shell-like script (what `--dry-run` prints)."""
        lines = [f"# WARNING: {w}" for w in self.warnings] + [f"# NOTE: {n}" for n in self.notes]
        for step in self.steps:
            lines.append(f"# {step.description}")
            if step.argv:
                lines.append(shlex.join(step.argv))
            if step.content is not None:
                lines.extend(f"#   {line}".rstrip() for line in step.content.splitlines())
        return "\n".join(lines) + "\n"


def _under(path: Path, prefix: Path) -> bool:
    try:
        path.relative_to(prefix)
    except ValueError:
        return False
    return True


def _rooted(root: Path, path: Path) -> Path:
    return root / path.relative_to("/") if path.is_absolute() else root / path


def _lookup_ids(user: str, group: str, root: Path) -> tuple[int, int] | None:
    """(uid, gid) when acting on the host and both exist; None under a test root (no chown)."""
    if root != Path("/"):
        return None
    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def _make_dir(path: Path, mode: int, user: str, group: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        target = _rooted(root, path)
        target.mkdir(parents=True, exist_ok=True)
        ids = _lookup_ids(user, group, root)
        if ids is not None:
            os.chown(target, *ids)
        os.chmod(target, mode)  # after chown, which clears setgid

    return apply


def _write_file(path: Path, text: str, mode: int = 0o644) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        target = _rooted(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)

    return apply


def _remove_file(path: Path) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        _rooted(root, path).unlink(missing_ok=True)

    return apply


def default_config_text(data_dir: Path = DEFAULT_DATA, state_dir: Path = STATE_DIR / UNIT_NAME) -> str:
    """A minimal config for a system install; every other setting keeps its default (see config.toml)."""
    return f"""\
# fashion-worker settings for the systemd service (written by `fashion-worker install-service`).
# Every setting and its default is documented in the repository's config.toml.

[inbox]
path = "{data_dir / 'inbox'}"

[files]
processed_dir = "{data_dir / 'processed'}"
failed_dir = "{data_dir / 'failed'}"

[database]
url = "sqlite:///{state_dir / 'results.db'}"

[service]
metrics_port = 0  # e.g. 9464 to serve /metrics and /healthz on 127.0.0.1 (the unit then allows loopback)
"""


def default_unit_settings() -> UnitSettings:
    """The settings of the reference unit committed as systemd/fashion-worker.service."""
    return UnitSettings(
        executable=Path("/opt/fashion-worker/.venv/bin/fashion-worker"),
        config=DEFAULT_CONFIG,
        read_write_paths=tuple(DEFAULT_DATA / name for name in ("inbox", "processed", "failed")),
    )


def venv_gpu_providers(python: Path) -> list[str] | str:
    """The GPU execution providers the onnxruntime of the interpreter `python` offers (onnxruntime-gpu
    lists them with or without a GPU), or why the interpreter could not say."""
    try:
        done = subprocess.run([str(python), "-c", "import onnxruntime; print(*onnxruntime.get_available_providers())"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python}: {getattr(exc, 'strerror', None) or exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return f"{python}: {last}"
    return [p for p in GPU_PROVIDERS if p in done.stdout.split()]


def _venv_executable(venv: Path | None) -> Path:
    if venv is None:
        venv = Path(sys.prefix)
    return Path(os.path.abspath(venv)) / "bin" / "fashion-worker"


#: What useradd/groupadd accept by default (Debian's NAME_REGEX), and what systemd's MemoryMax= takes.
NAME_PATTERN = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
MEMORY_PATTERN = re.compile(r"(\d+(\.\d+)?[KMGTP]?|\d+(\.\d+)?%|infinity)")


#: A system account as useradd --system makes one (Debian's SYS_UID_MAX): the only kind uninstall deletes.
SYSTEM_UID_MAX = 999


def _check_names(*, user: str, uploaders_group: str, memory_max: str) -> None:
    """One clear line for a value systemd or useradd would refuse later, half-way through an install, or
    that would hand the service (or the uploaders) root's powers."""
    for flag, name in (("--user", user), ("--uploaders-group", uploaders_group)):
        if not NAME_PATTERN.fullmatch(name):
            raise FashionWorkerError(f"{flag} {name!r} is not a valid user or group name (lower-case letters, "
                                     "digits, _ and -, starting with a letter or _, at most 32)")
    if _account_id(pwd.getpwnam, user) == 0 or _account_id(grp.getgrnam, user) == 0:
        raise FashionWorkerError(f"--user {user!r} is root's: the service runs as an unprivileged system user "
                                 f"(default {DEFAULT_USER})")
    if _account_id(grp.getgrnam, uploaders_group) == 0:
        raise FashionWorkerError(f"--uploaders-group {uploaders_group!r} is root's group: the service user "
                                 f"would join it (default {DEFAULT_UPLOADERS})")
    if not MEMORY_PATTERN.fullmatch(memory_max) or not re.search(r"[1-9]", memory_max):
        raise FashionWorkerError(f"--memory-max {memory_max!r} is not a size systemd takes, above zero (e.g. "
                                 "4G, 512M, 50%, infinity)")


def _check_removable_user(user: str, installed: str | None) -> None:
    """`uninstall-service --remove-user` deletes only the unprivileged system user the unit runs as."""
    if not NAME_PATTERN.fullmatch(user):
        raise FashionWorkerError(f"--user {user!r} is not a valid user name")
    if installed is not None and installed != user:
        raise FashionWorkerError(f"--remove-user: the installed unit runs as {installed!r}, not {user!r}; "
                                 "nothing deleted")
    uid = _account_id(pwd.getpwnam, user)
    if uid is not None and not 0 < uid <= SYSTEM_UID_MAX:
        raise FashionWorkerError(f"--remove-user: {user!r} (uid {uid}) is not a system account the installer "
                                 f"makes (uid 1 to {SYSTEM_UID_MAX}); nothing deleted")


def install_service(
    config: Path | str | None = None,
    *,
    venv: Path | str | None = None,
    user: str = DEFAULT_USER,
    uploaders_group: str = DEFAULT_UPLOADERS,
    inbox: Path | str | None = None,
    memory_max: str | None = None,
    network: str | None = None,
    gpu: bool | None = None,
    instances: int | None = None,
    unit_name: str = UNIT_NAME,
    root: Path | str = "/",
    start: bool = True,
    dry_run: bool = False,
    runner: Callable[[Sequence[str]], None] | None = None,
) -> ServicePlan:
    """Install, enable and start the worker as a systemd service; returns the plan it carried out.

    config: the config file the service runs with (default /etc/fashion-worker/config.toml, written with
        system paths if it does not exist). Its inbox, processed, failed, database and model-cache paths
        become the sandbox's writable paths.
    venv: the virtual environment holding fashion-worker (default: the running one, sys.prefix).
    inbox: overrides the config's inbox (passed to the service as `--inbox`).
    memory_max: MemoryMax= of the unit (default 4G, 8G with GPU access).
    network: "none" | "loopback" | "remote"; default from the config (metrics_port set -> loopback,
        non-SQLite database -> remote, else none).
    gpu: let the service open the NVIDIA devices; default: when the venv's onnxruntime offers CUDA or
        TensorRT (onnxruntime-gpu) and the config's model.providers may use them.
    instances: how many workers run from the config: 1 = one unit, fashion-worker.service; N > 1 (PostgreSQL
        only) = the template fashion-worker@.service, started as workers 1..N (`run --instance N`) by
        fashion-worker.target. Either replaces the other if it was installed before, and takes over its
        drop-ins. Default: the count installed now (a re-install keeps it), else 1.
    root: "/" acts on this host (needs root and a running systemd); another folder only writes the unit,
        the config and the folders under it (host commands are listed, not run): for tests.
    start: enable, then start or restart (True), or only enable.
    dry_run: do nothing; the returned plan's `script()` lists every action.
    runner: runs a host command (default: subprocess, raising FashionWorkerError on failure).
    """
    root = Path(root)
    on_host = root == Path("/")
    config_path = Path(os.path.abspath(config if config is not None else DEFAULT_CONFIG))
    executable = _venv_executable(Path(venv) if venv is not None else None)
    _check_names(user=user, uploaders_group=uploaders_group, memory_max=memory_max or DEFAULT_MEMORY_MAX[False])
    if on_host and not executable.is_file():
        raise FashionWorkerError(f"--venv {venv or sys.prefix}: no fashion-worker at {executable}")
    single_path, template_path, target_path = _unit_paths(unit_name)
    installed = _installed_instances(_rooted(root, target_path), unit_name)  # 0: no template installed
    asked = instances is not None
    if instances is None:
        instances = installed or 1
    if instances < 1:
        raise FashionWorkerError(f"--instances must be at least 1, got {instances}")
    template = instances > 1
    if template:
        plan = ServicePlan(f"{unit_name}@{{1..{instances}}}.service", template_path, config_path=config_path,
                           target_path=target_path)
    else:
        plan = ServicePlan(unit_name, single_path, config_path=config_path)

    # The config is an input, read where it is; only a missing one is written (under root).
    write_config = not config_path.exists()
    if write_config:
        cfg = config_mod.Config(base_dir=config_path.parent)
        text = default_config_text()
        config_mod.apply(cfg, tomllib.loads(text), source=str(config_path))
        config_mod.validate(cfg)
    else:
        cfg = config_mod.load(config_path)
    if inbox is not None and not str(inbox).strip():
        raise FashionWorkerError("--inbox must not be empty (it would make the current folder the inbox)")
    inbox_path = Path(os.path.abspath(inbox)) if inbox is not None else cfg.inbox_path
    if (inbox_there := _rooted(root, inbox_path)).exists() and not inbox_there.is_dir():
        raise FashionWorkerError(f"inbox {inbox_path} exists and is not a folder")
    processed, failed = cfg.processed_path, cfg.failed_path
    group = user

    writable = [inbox_path, processed, failed]
    state_dir = STATE_DIR / UNIT_NAME
    db_url = cfg.database_url
    db_dir: Path | None = None
    if db_url.startswith("sqlite:///") and ":memory:" not in db_url:
        db_dir = Path(db_url[len("sqlite:///"):]).parent
        if not _under(db_dir, state_dir):
            writable.append(db_dir)
    writable = list(dict.fromkeys(Path(os.path.normpath(p)) for p in writable))
    if template and not uses_claims(db_url):
        who = f"--instances {instances}" if asked else f"the {instances} installed workers ({target_path.name})"
        raise FashionWorkerError(
            f"{who} need{'s' if asked else ''} a PostgreSQL database.url, through whose claims several workers "
            "share one inbox; "
            f"{config_path if not write_config else 'the default config'} has {hide_password(db_url)}"
            + ("" if asked else "; --instances 1 goes back to one worker"))
    last_port = config_mod.instance_metrics_port(cfg.service.metrics_port, instances)
    if template and cfg.service.metrics_port and last_port > 65535:
        raise FashionWorkerError(f"--instances {instances}: worker {instances} would serve metrics on port "
                                 f"{last_port} (service.metrics_port {cfg.service.metrics_port} + "
                                 f"{instances - 1}), past 65535")

    if network is None:
        if not db_url.startswith("sqlite"):
            network = "remote"
        elif cfg.service.metrics_port:
            network = "loopback"
        else:
            network = "none"

    readable = [executable, config_path, *([cfg.model_path] if cfg.model_path else [])]
    if on_host and executable.exists():
        readable.append((executable.parent / "python").resolve())  # the venv's interpreter
    home_paths = [p for p in readable + writable if any(_under(p, h) for h in HOME_PREFIXES)]
    protect_home = "yes"
    if home_paths:
        protect_home = "read-only"
        plan.warnings.append(
            "under /home, /root or /run/user: " + ", ".join(map(str, home_paths))
            + "; the unit uses ProtectHome=read-only, and the service user must be able to traverse "
            "those folders (install under /opt and /srv instead)")

    gpu_providers = venv_gpu_providers(executable.parent / "python")
    wants_gpu = cfg.model.providers in ([], ["auto"]) or any(p in GPU_PROVIDERS for p in cfg.model.providers)
    if isinstance(gpu_providers, str):  # the venv's interpreter could not say
        plan.warnings.append(f"cannot tell whether the venv's onnxruntime offers a GPU ({gpu_providers})"
                             + ("" if gpu else ": the unit keeps the devices closed (--gpu yes opens them)"))
        gpu = bool(gpu)
    elif gpu is None:
        gpu = wants_gpu and bool(gpu_providers)
        if gpu:
            plan.notes.append(f"GPU: onnxruntime offers {' and '.join(gpu_providers)}: the unit may open the NVIDIA "
                              "devices (--gpu no to keep them closed)")
    elif gpu and not gpu_providers:
        plan.warnings.append(f"--gpu yes, but the onnxruntime of {executable.parent.parent} offers no GPU provider "
                             "(install onnxruntime-gpu): the worker will run on the CPU")
    elif gpu and not wants_gpu:
        plan.warnings.append(f"--gpu yes, but model.providers = {cfg.model.providers} uses no GPU provider")
    if memory_max is None:
        memory_max = DEFAULT_MEMORY_MAX[gpu]

    extra_args = ("--inbox", str(inbox_path)) if inbox is not None else ()
    settings = UnitSettings(
        executable=executable, config=config_path, user=user, group=group,
        uploaders_group=uploaders_group, read_write_paths=tuple(writable), network=network,
        protect_home=protect_home, memory_max=memory_max, gpu=gpu, extra_args=extra_args, template=template,
        unit_name=unit_name)
    plan.unit_text = render_unit(settings)
    if template:
        plan.target_text = render_target(instances, unit_name)
        ids = cfg.service.worker_id or "HOST"
        plan.notes.append(f"{instances} workers: {unit_name}@1.service to {unit_name}@{instances}.service, started "
                          f"and stopped together by {unit_name}.target; worker ids {ids}@1 to {ids}@{instances}")
        if not gpu:
            plan.warnings.append(
                f"{instances} workers without GPU access: each one's onnxruntime uses every core of this host, "
                "so on the CPU they only compete; several workers pay where the model runs on a GPU")

    # Users and groups.
    nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    if _account_id(grp.getgrnam, uploaders_group) is None or not on_host:
        plan.steps.append(Step(f"create the uploaders' group {uploaders_group}",
                               ["groupadd", "--system", uploaders_group], host_only=True))
    if _account_id(pwd.getpwnam, user) is None or not on_host:
        plan.steps.append(Step(
            f"create the system user {user}",
            ["useradd", "--system", "--user-group", "--home-dir", str(state_dir), "--no-create-home",
             "--shell", nologin, "--comment", "fashion-worker service", user], host_only=True))
    plan.steps.append(Step(f"let {user} read what uploaders drop (group {uploaders_group})",
                           ["usermod", "--append", "--groups", uploaders_group, user], host_only=True))

    # Files and folders.
    if write_config:
        plan.steps.append(Step(f"write the default config {config_path}",
                               apply=_write_file(config_path, default_config_text()),
                               content=default_config_text()))
    plan.steps.append(Step(f"inbox {inbox_path}: owner {user}, group {uploaders_group}, mode 2775 "
                           "(setgid, group-writable)",
                           apply=_make_dir(inbox_path, 0o2775, user, uploaders_group)))
    for folder in (processed, failed):
        if folder != inbox_path:
            plan.steps.append(Step(f"{folder}: owner {user}, group {uploaders_group}, mode 2750",
                                   apply=_make_dir(folder, 0o2750, user, uploaders_group)))
    for folder in writable:
        if folder not in (inbox_path, processed, failed):
            plan.steps.append(Step(f"{folder}: owner {user}, mode 0750",
                                   apply=_make_dir(folder, 0o750, user, group)))
    # The units: the new ones are checked, then written, then the other kind, if installed, is removed (a
    # refused unit changes nothing); its drop-ins move to the new kind's folder.
    if shutil.which("systemd-analyze"):
        staged = {plan.unit_path.name: plan.unit_text, **({target_path.name: plan.target_text} if template else {})}
        checked = [f"{unit_name}@1.service", target_path.name] if template else [plan.unit_path.name]
        plan.steps.append(Step(f"check the unit{'s' if template else ''} (systemd-analyze verify, in a scratch "
                               "folder)", apply=_verify_staged(staged, checked)))
    plan.steps.append(Step(f"write the unit {plan.unit_path}",
                           apply=_write_file(plan.unit_path, plan.unit_text), content=plan.unit_text))
    if template:
        assert plan.target_text is not None
        plan.steps.append(Step(f"write the target {target_path}",
                               apply=_write_file(target_path, plan.target_text), content=plan.target_text))
        old_dropins, new_dropins = _dropin_dir(single_path), _dropin_dir(template_path)
        switching = _rooted(root, single_path).exists()
        if switching:
            plan.steps += _remove_single(unit_name, single_path, "replaced by the workers of the template")
    else:
        old_dropins, new_dropins = _dropin_dir(template_path), _dropin_dir(single_path)
        switching = _template_installed(root, template_path, target_path)
        if switching:
            plan.steps += _remove_template(unit_name, template_path, target_path, "replaced by one worker")
    moved = sorted(_rooted(root, old_dropins).glob("*.conf")) if switching else []
    if moved:
        names = ", ".join(p.name for p in moved)
        plan.notes.append(f"drop-ins {names} moved from {old_dropins} to {new_dropins}")
        for path in moved:
            if re.search(r"^\s*ExecStart\s*=|%i", path.read_text(errors="replace"), re.MULTILINE):
                plan.warnings.append(f"the drop-in {path.name} sets ExecStart= or uses %i, written for "
                                     f"{old_dropins.name.removesuffix('.d')}: check it in {new_dropins}")
        plan.steps.append(Step(f"move the drop-ins {names} to {new_dropins}",
                               apply=_move_dropins(old_dropins, new_dropins)))
    plan.steps.append(Step("reload systemd", ["systemctl", "daemon-reload"], host_only=True))
    enabled = f"{unit_name}.target" if template else f"{unit_name}.service"
    plan.steps.append(Step("enable the service at boot", ["systemctl", "enable", enabled], host_only=True))
    if start:  # a service failing over and over (why one re-installs) has hit StartLimitBurst, and systemd
        # refuses to start it again, however it was fixed; since systemd 255 a daemon-reload keeps that count
        plan.steps.append(Step("forget earlier failed starts (the start limit)",
                               ["systemctl", "reset-failed", f"{unit_name}@*.service" if template
                                else f"{unit_name}.service"], host_only=True, may_fail=True))
    if start and template:  # one worker at a time, so that the others go on; then those past the count stop
        for n in range(1, instances + 1):
            plan.steps.append(Step(f"start (or restart) worker {n}",
                                   ["systemctl", "restart", f"{unit_name}@{n}.service"], host_only=True))
        if installed > instances:
            plan.steps.append(Step(f"stop workers {instances + 1} to {installed}",
                                   ["systemctl", "stop", *(f"{unit_name}@{n}.service"
                                                           for n in range(instances + 1, installed + 1))],
                                   host_only=True))
        plan.steps.append(Step(f"start {enabled}", ["systemctl", "start", enabled], host_only=True))
    elif start:  # restart = start, or apply a changed unit/config when re-installing over a running one
        plan.steps.append(Step("start (or restart) the service",
                               ["systemctl", "restart", enabled], host_only=True))

    if not dry_run:
        if on_host:
            _require_host()
        _carry_out(plan, root, runner)
    return plan


def uninstall_service(
    *,
    user: str = DEFAULT_USER,
    remove_user: bool = False,
    unit_name: str = UNIT_NAME,
    root: Path | str = "/",
    dry_run: bool = False,
    runner: Callable[[Sequence[str]], None] | None = None,
) -> ServicePlan:
    """Stop, disable and remove the unit. Data (inbox, processed, failed, database, config) is kept;
    remove_user=True also deletes the service user (its files stay, owned by its old uid)."""
    root = Path(root)
    on_host = root == Path("/")
    single_path, template_path, target_path = _unit_paths(unit_name)
    template = _template_installed(root, template_path, target_path)
    if template and not _rooted(root, single_path).exists():
        plan = ServicePlan(f"{unit_name}@.service", template_path, target_path=target_path)
    else:
        plan = ServicePlan(unit_name, single_path)
    plan.steps += _remove_single(unit_name, single_path)
    if template:
        plan.steps += _remove_template(unit_name, template_path, target_path)
    plan.steps.append(Step("reload systemd", ["systemctl", "daemon-reload"], host_only=True))
    if remove_user:
        unit = _rooted(root, template_path if template and not _rooted(root, single_path).exists() else single_path)
        users = re.findall(r"^User=(.+)$", unit.read_text(), re.MULTILINE) if unit.is_file() else []
        _check_removable_user(user, users[-1].strip() if users else None)
        plan.steps.append(Step(f"delete the user {user}", ["userdel", user], host_only=True))
    plan.notes.append("the inbox, processed and failed folders, the database and the config are kept")
    if not dry_run:
        if on_host:
            _require_host()
        _carry_out(plan, root, runner)
    return plan


def _unit_paths(unit_name: str) -> tuple[Path, Path, Path]:
    """The one-worker unit, the several-workers template and its target."""
    return (SYSTEM_UNIT_DIR / f"{unit_name}.service", SYSTEM_UNIT_DIR / f"{unit_name}@.service",
            SYSTEM_UNIT_DIR / f"{unit_name}.target")


def _template_installed(root: Path, template_path: Path, target_path: Path) -> bool:
    return _rooted(root, template_path).exists() or _rooted(root, target_path).exists()


def _installed_instances(target: Path, unit_name: str) -> int:
    """The count of workers an installed target starts: the highest N of its Wants=NAME@N.service (0 when
    there is no target; 1 when it names no worker, so that a re-install keeps the template)."""
    try:
        text = target.read_text()
    except OSError:
        return 0
    wants = " ".join(re.findall(r"^\s*Wants\s*=(.*)$", text, re.MULTILINE))
    numbers = [int(n) for n in re.findall(rf"(?<![\w@.-]){re.escape(unit_name)}@([1-9][0-9]*)\.service\b", wants)]
    return max(numbers, default=1)


def _verify_staged(texts: dict[str, str], checked: list[str]) -> Callable[[Path], None]:
    """systemd-analyze verify on the units written to a scratch folder under their real names (a template
    through its first instance), before they replace anything."""
    def apply(root: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="fashion-worker-units-") as scratch:
            for name, text in texts.items():
                (Path(scratch) / name).write_text(text)
            run_command(["systemd-analyze", "verify", *(str(Path(scratch) / name) for name in checked)])

    return apply


def _dropin_dir(unit_path: Path) -> Path:
    return unit_path.with_name(unit_path.name + ".d")


def _move_dropins(source: Path, destination: Path) -> Callable[[Path], None]:
    """Move the *.conf drop-ins of one unit kind to the other's folder. One there of the same name stays; the
    moved one goes beside it as NAME.from-OLD.conf, which sorts after it and so wins where both set a
    value."""
    def apply(root: Path) -> None:
        src, dst = _rooted(root, source), _rooted(root, destination)
        dst.mkdir(parents=True, exist_ok=True)
        for path in sorted(src.glob("*.conf")):
            target, n = dst / path.name, 1
            while target.exists():  # never over a file there: NAME.from-OLD.conf, then .from-OLD-2.conf ...
                suffix = source.name.removesuffix(".d") + (f"-{n}" if n > 1 else "")
                target, n = dst / f"{path.stem}.from-{suffix}.conf", n + 1
            os.rename(path, target)
        with contextlib.suppress(OSError):
            src.rmdir()  # only when nothing else is left in it

    return apply


def _remove_single(unit_name: str, path: Path, why: str = "") -> list[Step]:
    return [Step("stop and disable the service" + (f" ({why})" if why else ""),
                 ["systemctl", "disable", "--now", f"{unit_name}.service"], host_only=True, may_fail=True),
            Step(f"remove the unit {path}", apply=_remove_file(path))]


def _remove_template(unit_name: str, template_path: Path, target_path: Path, why: str = "") -> list[Step]:
    """Stop every instance (those started by hand too), disable the target, remove both files."""
    return [Step("stop and disable the workers' target" + (f" ({why})" if why else ""),
                 ["systemctl", "disable", "--now", f"{unit_name}.target"], host_only=True, may_fail=True),
            Step("stop every worker of the template", ["systemctl", "stop", f"{unit_name}@*.service"],
                 host_only=True, may_fail=True),
            Step(f"remove the unit {template_path}", apply=_remove_file(template_path)),
            Step(f"remove the target {target_path}", apply=_remove_file(target_path))]


# Helpers --------------------------------------------------------------------------------------------

def _account_id(lookup: Callable[[str], object], name: str) -> int | None:
    """The uid (pwd.getpwnam) or gid (grp.getgrnam) of `name` on this host; None when there is none."""
    try:
        entry = lookup(name)
    except KeyError:
        return None
    return entry[2]  # type: ignore[index]  # pw_uid / gr_gid


def _require_host() -> None:
    if os.geteuid() != 0:
        raise FashionWorkerError("installing a system service needs root: run it with sudo")
    if not Path("/run/systemd/system").is_dir():
        raise FashionWorkerError(
            "systemd is not running on this machine (no /run/systemd/system); run `fashion-worker run` "
            "under your own supervisor instead, or use --dry-run to see the steps")


def run_command(argv: Sequence[str]) -> None:
    """Run a host command; a failure becomes one clear FashionWorkerError line."""
    log.info("running %s", shlex.join(argv))
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FashionWorkerError(f"`{argv[0]}` not found; is this a systemd-based Linux?") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise FashionWorkerError(
            f"`{shlex.join(argv)}` failed (exit {done.returncode})" + (f": {detail[-1]}" if detail else ""))


def _carry_out(plan: ServicePlan, root: Path, runner: Callable[[Sequence[str]], None] | None) -> None:
    runner = runner or run_command
    on_host = root == Path("/")
    for warning in plan.warnings:
        log.warning("%s", warning)
    for note in plan.notes:
        log.info("%s", note)
    for step in plan.steps:
        if step.host_only and not on_host:
            log.debug("not on the host root, skipping: %s", step.description)
            continue
        log.info("%s", step.description)
        if step.apply is not None:
            step.apply(root)
        if step.argv is not None:
            try:
                runner(step.argv)
            except FashionWorkerError:
                if not step.may_fail:
                    raise
                log.info("ignored: %s failed (probably not installed)", shlex.join(step.argv))


if __name__ == "__main__":  # python -m worker.service > systemd/fashion-worker.service
    sys.stdout.write(render_unit(default_unit_settings()))
