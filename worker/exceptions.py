"""The errors fashion-worker raises on purpose. The CLI turns each into one line without a traceback."""

from __future__ import annotations


class FashionWorkerError(Exception):
    """Base class: a problem the user can fix, reported as one line (exit status `exit_code`)."""

    exit_code = 2  # a usage or configuration mistake: systemd's unit does not restart on it


class ConfigError(FashionWorkerError):
    """The configuration file or a flag has a bad value."""


class ModelError(FashionWorkerError):
    """The model file is missing, unreadable or does not honour the ONNX contract."""


class ImageRejected(FashionWorkerError):
    """One input file cannot be classified; it becomes a `failed` row, the worker carries on."""


class StoreError(FashionWorkerError):
    """The database cannot be opened, migrated or written."""


class InboxLocked(FashionWorkerError):
    """Another worker already processes this inbox into this database."""


class WorkerIdStillHeld(InboxLocked):
    """The worker id is still held by the database session of a gone process of this host: passes once the
    server ends that session, so the exit status (75, EX_TEMPFAIL) is one systemd restarts on."""

    exit_code = 75


class DataError(FashionWorkerError):
    """Training data is missing, empty, inconsistent or corrupt."""


class FileSkipped(FashionWorkerError):
    """An inbox entry that is not a regular image file (FIFO, socket, device, symlink, folder…).

    It is logged once and left where it is; no result row is written for it.
    """


class FileUnreadable(FileSkipped):
    """An inbox file the worker's user may not read (its permissions): an operations fault, not a bad image.

    No row either: it stays in the inbox and is tried again with back-off, so it is classified once its
    permissions are fixed.
    """


class MissingExtra(FashionWorkerError):
    """A command needs packages of an install extra that is not installed (torch for training…)."""

    def __init__(self, extra: str, missing: str) -> None:
        super().__init__(f"needs the {extra} extra (no module named {missing!r}); install it with: "
                         f".venv/bin/pip install -e '.[{extra}]'")
