"""worker/config.py and the documented config.toml at the repo root."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from worker import config as config_mod
from worker.config import Config
from worker.exceptions import ConfigError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


def test_repo_config_lists_every_setting_with_its_default() -> None:
    documented = tomllib.loads(REPO_CONFIG.read_text())
    defaults = Config()
    expected = {
        section: dataclasses.asdict(getattr(defaults, section)) for section in config_mod.SECTIONS
    }
    assert documented == expected


def test_repo_config_comments_every_setting() -> None:
    lines = REPO_CONFIG.read_text().splitlines()
    for index, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            key = line.split("=", 1)[0].strip()
            if key == "metrics_host":  # documented together with metrics_port on the line above
                continue
            assert lines[index - 1].startswith("#"), f"{key} has no comment above it"


def test_load_repo_config_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    copy = tmp_path / "conf" / "config.toml"
    copy.parent.mkdir()
    copy.write_text(REPO_CONFIG.read_text())
    cfg = config_mod.load(copy)
    assert cfg.inbox_path == copy.parent / "inbox"
    assert cfg.processed_path == copy.parent / "processed"
    assert cfg.database_url == f"sqlite:///{copy.parent}/data/results.db"
    assert cfg.model_path is None


def test_overrides_apply_after_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[batch]\nmax_batch = 8\n[inbox]\nsettle_s = 1\n')
    cfg = config_mod.load(path, {"batch.max_batch": 4, "service.log_level": "debug"})
    assert (cfg.batch.max_batch, cfg.inbox.settle_s, cfg.service.log_level) == (4, 1.0, "DEBUG")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[inbox]\nfolder = 'x'\n", "config.toml: unknown key inbox.folder; valid: path, recursive"),
        ("[nope]\nx = 1\n", "config.toml: unknown section [nope]; valid: inbox, files"),
        ("foo = 1\n", "config.toml: unknown key foo outside any section; settings go in the sections [inbox], "),
        ("[batch]\nmax_batch = 'big'\n", 'config.toml: batch.max_batch must be an integer, got "big"'),
        ("[batch]\nmax_batch = true\n", "config.toml: batch.max_batch must be an integer, got true"),
        ("[inbox]\nignore = 'x'\n", 'config.toml: inbox.ignore must be an array of strings, got "x"'),
        ("[inbox]\nrecursive = 1\n", "config.toml: inbox.recursive must be true or false, got 1"),
        ("[files]\non_success = 'keep'\n",
         "config.toml: files.on_success must be one of move, leave, delete, got 'keep'"),
        ("[batch]\nmax_queue = 2\n", "config.toml: batch.max_queue (2) must be >= batch.max_batch (16)"),
        ("[database]\nbusy_timeout_ms = -1\n", "config.toml: database.busy_timeout_ms must be 0..86400000, got -1"),
        # Values that hung the worker (a CLI review): 100,000 onnxruntime threads, a batch window past
        # time_t, a settle time of inf; and an array of mixed types, which ended in a traceback.
        ("[model]\nintra_op_threads = 100000\n", "config.toml: model.intra_op_threads must be 0..1024, got 100000"),
        ("[model]\ninter_op_threads = -3\n", "config.toml: model.inter_op_threads must be 0..1024, got -3"),
        ("[batch]\nmax_wait_ms = 9999999999999\n",
         "config.toml: batch.max_wait_ms must be 0..60000, got 9999999999999"),
        ("[inbox]\nsettle_s = inf\n", "config.toml: inbox.settle_s must be 0..86400, got inf"),
        ("[inbox]\nrescan_interval_s = nan\n", "config.toml: inbox.rescan_interval_s must be 0..86400, got nan"),
        ("[model]\nproviders = ['cuda', 3]\n", "config.toml: model.providers must be an array of strings, got "
                                              '["cuda", 3]'),
        ("[database]\nurl = 'sqlite://data/results.db'\n",
         "config.toml: database.url 'sqlite://data/results.db' has two slashes: a SQLite URL has three before a "
         "relative path (sqlite:///data/results.db) and four before an absolute one"),
        ("[database]\nurl = 'sqlite:///:memory:'\n",  # run kept nothing; doctor said OK (a CLI review)
         "config.toml: database.url 'sqlite:///:memory:' is a database in memory, gone when the worker stops (and "
         "one per connection): name a file (sqlite:///data/results.db)"),
        ("[files]\nprocessed_dir = ''\n",  # classified photos landed beside config.toml (a CLI review)
         "config.toml: files.processed_dir must not be empty (it would be the config file's own folder)"),
        ("x = [", "config file {path} is not valid TOML"),
        (b"\xff\xfe[batch]\n", "config file {path} is not UTF-8 text (byte 0)"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "config.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert str(info.value).startswith(message.replace("config.toml:", f"{path}:").format(path=path))


def test_a_bad_value_from_the_command_line_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.load(None, {"batch.max_batch": 0})
    assert str(info.value) == "command line: batch.max_batch must be at least 1, got 0"


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config_mod.load(tmp_path / "nope.toml")


def test_an_instance_gets_its_own_worker_id_and_metrics_port() -> None:
    lone = config_mod.load(None)
    config_mod.for_instance(lone, 3, "gpu7")
    assert (lone.service.worker_id, lone.service.metrics_port) == ("gpu7@3", 0)  # no metrics: none for it
    named = config_mod.load(None, {"service.worker_id": "shop-a", "service.metrics_port": 9464})
    config_mod.for_instance(named, 2, "gpu7")
    assert (named.service.worker_id, named.service.metrics_port) == ("shop-a@2", 9465)


@pytest.mark.parametrize(("port", "instance", "message"), [
    (0, 0, "--instance must be at least 1, got 0"),
    (65535, 2, "--instance 2: its metrics port, service.metrics_port 65535 + 1, is past 65535"),
])
def test_an_impossible_instance_is_one_line(port: int, instance: int, message: str) -> None:
    cfg = config_mod.load(None, {"service.metrics_port": port})
    with pytest.raises(ConfigError) as info:
        config_mod.for_instance(cfg, instance, "gpu7")
    assert str(info.value) == message
