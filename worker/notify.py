"""systemd readiness, watchdog and status notifications (the sd_notify datagram protocol).

The protocol is one AF_UNIX SOCK_DGRAM datagram of newline-separated `KEY=value` lines sent to the
socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`). It is small
enough that the standard library does it; no dependency. Outside systemd (no `$NOTIFY_SOCKET`) every
call is a cheap no-op, so the worker calls these unconditionally.

A failed send is never an error for the worker: it is logged at debug level and the worker goes on.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to `address`; disabled (every call a no-op) when `address` is None."""

    def __init__(self, address: str | None = None) -> None:
        self._address: str | bytes | None = None
        self._socket: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):
            # Abstract namespace socket: a leading NUL byte instead of '@'.
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        else:
            # systemd also knows vsock:CID:PORT (VMs); not needed on a host, so we stay disabled.
            log.debug("NOTIFY_SOCKET %r is not a Unix socket address; notifications disabled", address)
            return
        try:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            log.debug("cannot create the notify socket: %s; notifications disabled", exc)
            self._address = None

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> Notifier:
        """A Notifier for `$NOTIFY_SOCKET` (from `environ`, default os.environ); disabled when unset."""
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._socket is not None

    # Messages ---------------------------------------------------------------------------------------
    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` lines in one datagram (keys are upper-cased); True if it was sent."""
        if self._socket is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value)
            if "\n" in text:  # a value is one line in this protocol
                text = " ".join(text.splitlines())
            lines.append(f"{key.upper()}={text}")
        payload = ("\n".join(lines) + "\n").encode("utf-8", "replace")
        try:
            self._socket.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify %s failed: %s", ",".join(fields), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is done (the model is loaded and warmed up); optionally with a STATUS."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the main loop is alive. Send at least every `watchdog_interval()` seconds."""
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun (the current batch is being finished)."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, text: str) -> bool:
        """STATUS=text: one line shown by `systemctl status`, e.g. queue depth and throughput."""
        return self.notify(STATUS=text)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for `seconds` more before the start/stop timeout fires."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, int(seconds * 1_000_000)))

    # Watchdog ---------------------------------------------------------------------------------------
    @staticmethod
    def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of `$WATCHDOG_USEC`, or None when no watchdog is set.

        None also when `$WATCHDOG_PID` names another process (the watchdog is not ours).
        """
        env = os.environ if environ is None else environ
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            value = int(usec)
        except ValueError:
            return None
        if value <= 0:
            return None
        return value / 2 / 1_000_000

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __repr__(self) -> str:
        return f"Notifier(enabled={self.enabled})"
