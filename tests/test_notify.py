"""The sd_notify protocol against real Unix datagram sockets, as systemd would receive it."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from worker.notify import Notifier

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def listener(tmp_path, monkeypatch):
    """A real AF_UNIX SOCK_DGRAM socket bound in tmp_path, announced through NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_messages_arrive_as_systemd_reads_them(listener):
    notifier = Notifier.from_environment()
    assert notifier.enabled

    assert notifier.ready()
    assert listener.recv(4096) == b"READY=1\n"
    assert notifier.watchdog()
    assert listener.recv(4096) == b"WATCHDOG=1\n"
    assert notifier.status("queue 3; 12.5 images/s")
    assert listener.recv(4096) == b"STATUS=queue 3; 12.5 images/s\n"
    assert notifier.stopping()
    assert listener.recv(4096) == b"STOPPING=1\n"
    notifier.close()


def test_several_fields_go_in_one_datagram_and_values_stay_on_one_line(listener):
    notifier = Notifier.from_environment()
    notifier.ready(status="ready; model abc")
    assert listener.recv(4096) == b"READY=1\nSTATUS=ready; model abc\n"
    notifier.notify(status="two\nlines", errno=0)
    assert listener.recv(4096) == b"STATUS=two lines\nERRNO=0\n"
    notifier.extend_timeout(2.5)
    assert listener.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000\n"


def test_abstract_socket_names_with_at_sign(monkeypatch):
    name = f"fashion-worker-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier.from_environment()
        assert notifier.enabled
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1\n"
    finally:
        sock.close()


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled
    assert [notifier.ready(), notifier.watchdog(), notifier.status("x"), notifier.stopping()] == [False] * 4


def test_a_send_error_is_logged_at_debug_and_never_raised(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="worker.notify"):
        assert notifier.ready() is False
    assert any("READY failed" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_watchdog_interval_is_half_of_watchdog_usec_for_our_pid():
    own = str(os.getpid())
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": own}) == 30.0
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert Notifier.watchdog_interval({}) is None
    assert Notifier.watchdog_interval({"WATCHDOG_USEC": "garbage"}) is None
    assert Notifier(None).watchdog_interval({"WATCHDOG_USEC": "1000000"}) == 0.5


@pytest.mark.timeout(60)
def test_a_child_process_notifies_from_its_own_pid(tmp_path):
    """systemd (NotifyAccess=main) checks the sender's pid from SCM_CREDENTIALS: check it is the worker's."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(30)
        code = "from worker.notify import Notifier; n = Notifier.from_environment(); n.ready(); n.stopping()"
        env = {**os.environ, "NOTIFY_SOCKET": str(path)}
        child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
        received = []
        for _ in range(2):
            data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, _uid, _gid = struct.unpack("iII", payload[:12])
            received.append((data, pid))
        assert child.wait(30) == 0
    assert received == [(b"READY=1\n", child.pid), (b"STOPPING=1\n", child.pid)]
