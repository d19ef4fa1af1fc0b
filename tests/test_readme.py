"""The README's two set-up commands, run as written, so they cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import write_image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def quick_start_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Quick start"):text.index("## Dropping files")]
    return re.findall(r"```console\n(.+?)\n```", section)


def test_the_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    run_worker, run_tests = quick_start_commands()
    assert run_worker.startswith("python3 -m venv .venv && ") and run_worker.endswith("fashion-worker run")
    assert run_tests.startswith("python3 -m venv .venv && ") and run_tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == run_tests


@pytest.mark.timeout(900)
def test_the_first_command_installs_and_starts_a_worker_that_classifies(tmp_path):
    """Runs the README's first command verbatim in a copy of the repository: a real venv, a real pip
    install (from the package index, as on a fresh machine), the real worker on the shipped model."""
    run_worker, _ = quick_start_commands()
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the tracked files")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    copy = tmp_path / "repo"
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    log = (tmp_path / "out.log").open("w")
    process = subprocess.Popen(["bash", "-c", run_worker], cwd=copy, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        database = copy / "data" / "results.db"
        deadline = time.monotonic() + 800
        while "watching inbox" not in (tmp_path / "out.log").read_text():
            assert process.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.5)
        write_image(copy / "inbox" / "red-dress.jpg", (180, 20, 30), (400, 533), noise_seed=1)
        rows = []
        while not rows:
            assert time.monotonic() < deadline, "no result row"
            time.sleep(0.2)
            with sqlite3.connect(database, timeout=5) as db:
                rows = db.execute("select file, status, category from results").fetchall()
        assert rows[0][:2] == ("red-dress.jpg", "ok")
        assert (copy / "processed" / "red-dress.jpg").is_file()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
        log.close()
    assert code == 0
