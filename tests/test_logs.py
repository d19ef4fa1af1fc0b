"""setup_logging in real subprocesses: journald format when stderr is the JOURNAL_STREAM, plain otherwise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import logging
from worker.logs import setup_logging
setup_logging("DEBUG")
log = logging.getLogger("worker.loop")
log.debug("debug %s", 1)
log.info("info %s", 2)
log.warning("warn %s", 3)
log.error("error %s", 4)
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
"""


def run_logging(journal: str | None, stderr_is_journal: bool, script: str = SCRIPT) -> str:
    """Run SCRIPT with stderr on a pipe; JOURNAL_STREAM names that pipe, another inode, or is unset."""
    read_fd, write_fd = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal is not None:
        st = os.fstat(write_fd)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if stderr_is_journal else journal
    try:
        child = subprocess.Popen([sys.executable, "-c", script], stderr=write_fd, env=env, cwd=REPO)
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        output = reader.read().decode()
    assert child.wait(30) == 0
    return output


@pytest.mark.timeout(60)
def test_under_journald_lines_carry_syslog_priorities_and_no_timestamp():
    lines = run_logging("set", stderr_is_journal=True).splitlines()
    assert lines[:4] == [
        "<7>worker.loop: debug 1",
        "<6>worker.loop: info 2",
        "<4>worker.loop: warn 3",
        "<3>worker.loop: error 4",
    ]
    assert lines[4] == "<3>worker.loop: boom"
    # Every traceback line keeps the error priority, since journald splits on newlines.
    assert len(lines) > 6
    assert all(line.startswith("<3>") for line in lines[4:])
    assert lines[-1] == "<3>ZeroDivisionError: division by zero"


@pytest.mark.timeout(60)
def test_on_a_terminal_lines_have_a_timestamp_and_level_name():
    lines = run_logging(None, stderr_is_journal=False).splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + r" DEBUG worker\.loop: debug 1", lines[0])
    assert re.fullmatch(stamp + r" INFO worker\.loop: info 2", lines[1])
    assert re.fullmatch(stamp + r" WARNING worker\.loop: warn 3", lines[2])
    assert re.fullmatch(stamp + r" ERROR worker\.loop: error 4", lines[3])
    assert not any(line.startswith("<") for line in lines)


@pytest.mark.timeout(60)
def test_a_journal_stream_that_is_not_our_stderr_gives_the_plain_format():
    """E.g. `fashion-worker run 2>file` started from a unit's shell: JOURNAL_STREAM is inherited."""
    lines = run_logging("1:1", stderr_is_journal=False).splitlines()
    assert " INFO worker.loop: info 2" in lines[1]
    assert not lines[1].startswith("<")


def test_setup_logging_replaces_its_own_handler_and_rejects_bad_levels():
    import logging

    from worker.logs import setup_logging

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        first = setup_logging("INFO")
        second = setup_logging("WARNING")
        assert first not in root.handlers and second in root.handlers
        assert root.level == logging.WARNING
        with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
            setup_logging("LOUD")
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)


FORGED = """
import logging, os
from worker.logs import setup_logging
setup_logging("INFO")
name = "evil.jpg\\n2026-11-24 12:00:00,000 INFO worker.pipeline: all good\\r\\x1b[2K" + os.fsdecode(b"\\xff")
logging.getLogger("worker.pipeline").error("cannot dispose of %s: Permission denied", name)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("journal", [False, True])
def test_a_file_name_cannot_forge_log_lines(journal: bool) -> None:
    """A dropped file's name may hold any byte but "/" and NUL: line breaks and control characters in a
    message are shown escaped, so one message stays one line (a traceback after it keeps its lines)."""
    output = run_logging("set" if journal else None, stderr_is_journal=journal, script=FORGED)
    (line,) = output.splitlines()
    assert line.endswith("worker.pipeline: cannot dispose of evil.jpg\\n2026-11-24 12:00:00,000 INFO "
                         "worker.pipeline: all good\\r\\x1b[2K\\udcff: Permission denied"), line
