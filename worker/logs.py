"""Logging set-up: plain timestamped lines on a terminal, syslog-prefixed lines under systemd.

Under systemd, stderr is connected to journald, which adds its own timestamp and reads the message's
priority from a `<N>` prefix (sd-daemon(3)). systemd announces this by setting `$JOURNAL_STREAM` to the
`device:inode` of that stream; as systemd.exec(5) recommends, we also check that stderr still is that
stream, so `fashion-worker run 2>file` from a unit's shell falls back to the plain format.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"  # prefixed with <N> per line by JournalFormatter

# Python level -> syslog priority (sd-daemon.h: SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7).
SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a Python level (levels in between round to the more severe one)."""
    for level, priority in sorted(SYSLOG_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7


#: Control characters and line breaks a message may carry in from outside (a file name may hold any byte
#: but "/" and NUL), shown escaped so that one message stays one line: a dropped file named
#: "a.jpg\\n… INFO …" could otherwise write a forged line into the log. Tab stays as it is.
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, 0x85] if code != 0x09} | {
    0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def one_line(text: str) -> str:
    """`text` with line breaks and control characters escaped (see _ESCAPES)."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """Formats each message as one line (`one_line`); a traceback after it keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


class JournalFormatter(OneLineFormatter):
    """`<N>name: message`, with the `<N>` repeated on every line of multi-line output (tracebacks).

    journald splits a stream on newlines and treats each line as a record, so each continuation line
    needs its own prefix to keep its priority.
    """

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def under_journal(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> bool:
    """True when `$JOURNAL_STREAM` is set and `stream` (default stderr) is that journal stream."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        device, inode = (int(part) for part in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


_HANDLER_MARK = "_fashion_worker_handler"


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger once (calling again replaces our handler): level name, e.g. "INFO".

    Under systemd (see `under_journal`) lines are `<N>name: message` without a timestamp; otherwise
    `asctime LEVEL name: message` on stderr. Returns the installed handler.
    """
    stream = sys.stderr if stream is None else stream
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; valid: DEBUG, INFO, WARNING, ERROR")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if under_journal(stream) else OneLineFormatter(PLAIN_FORMAT))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # Third-party chatter (per-row SQL, image plugin probing) stays quiet even at DEBUG.
    for noisy in ("sqlalchemy.engine", "PIL"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    return handler
