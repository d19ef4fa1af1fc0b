"""Safe intake of one inbox entry: names, ignore patterns, and reading a file without being tricked.

Anyone can drop anything into the inbox, so reading is defensive: every path component below the inbox is
opened with O_NOFOLLOW relative to its parent's descriptor (a symlink anywhere below the inbox is never
followed, and a folder swapped for a symlink between checks cannot redirect the read), the entry is
lstat-ed first so FIFOs, sockets and devices are never even opened, and the descriptor is fstat-ed again
before reading (O_NONBLOCK: a FIFO swapped in at the last moment cannot block the worker).
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import hashlib
import os
import stat
from pathlib import Path, PurePosixPath

from worker.exceptions import FileSkipped, FileUnreadable, ImageRejected

FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_CHUNK = 1 << 20


def is_ignored(name: str, patterns: list[str]) -> bool:
    """True when any component of `name` (a relative path) matches one of the fnmatch `patterns`.

    Matching ignores case (`X.PART` is as temporary as `x.part`). A matching folder ignores everything below
    it, so `.sync/a.jpg` is ignored by the pattern `.*`.
    """
    parts = [part for part in PurePosixPath(name.replace(os.sep, "/")).parts if part not in ("", "/")]
    lowered = [pattern.lower() for pattern in patterns]
    return any(fnmatch.fnmatchcase(part.lower(), pattern) for part in parts for pattern in lowered)


def relative_name(inbox: Path, path: Path) -> str:
    """`path` relative to `inbox` as a posix string ("sub/a.jpg"); FileSkipped if it is not below the inbox.

    The path is normalised without following symlinks ("inbox/../etc/passwd" is outside). When the inbox
    itself was configured through a symlink, a path under its resolved location is accepted too.
    """
    target = os.path.abspath(path)
    for base in inbox_bases(os.path.abspath(inbox)):
        if target.startswith(base) and len(target) > len(base):
            return target[len(base):]
    raise FileSkipped(f"{path!s} is not inside the inbox {inbox!s}")


@functools.lru_cache(maxsize=64)
def inbox_bases(inbox: str) -> tuple[str, str]:
    """The absolute path `inbox` and its resolved form, each with a trailing "/" (cached: this runs per
    file, and resolving symlinks is a system call per path component; the worker fixes its inbox at
    start-up)."""
    return tuple(base if base.endswith("/") else base + "/"  # type: ignore[return-value]
                 for base in (inbox, os.path.realpath(inbox)))


def real_inbox(inbox: Path | str) -> str:
    """The inbox's resolved path (cached, see inbox_bases)."""
    return inbox_bases(os.path.abspath(inbox))[1].rstrip("/") or "/"


def describe_entry(mode: int) -> str:
    """What a non-regular inbox entry is, for skip messages: "a FIFO", "a symlink (not followed)", …"""
    if stat.S_ISLNK(mode):
        return "a symlink (not followed)"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def read_image_file(inbox: Path, path: Path, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """Read one inbox file completely and safely; return its bytes and its fstat.

    Raises FileSkipped (no result row; log and leave it) for anything that is not a regular file below the
    inbox reached without symlinks: a symlink, a symlinked or vanished folder, a FIFO, socket, device or
    directory, a file that disappeared; FileUnreadable (a FileSkipped, tried again later) for a file the
    worker's user may not open. Raises ImageRejected (a `failed` row) for a regular file that must not be
    classified: hard-linked, empty, larger than `max_bytes`, unreadable for another reason (an I/O error).
    """
    dir_fd, name = open_parent(inbox, path)
    try:
        return _read_at(dir_fd, name, max_bytes)
    finally:
        os.close(dir_fd)


def open_parent(inbox: Path, path: Path) -> tuple[int, str]:
    """A descriptor of the folder holding inbox file `path`, and the file's name in it.

    Each folder below the inbox is opened relative to its parent without following symlinks, so a folder
    swapped for a symlink cannot redirect what is done through the descriptor. Raises FileSkipped when
    `path` is not below the inbox or a folder on the way is gone, a symlink or not a folder. The caller
    closes the descriptor.
    """
    parts = relative_name(inbox, path).split("/")
    try:
        dir_fd = os.open(real_inbox(inbox), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise FileSkipped(f"cannot open the inbox {inbox!s}: {exc.strerror}") from None
    for index, part in enumerate(parts[:-1]):
        try:
            next_fd = os.open(part, DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            os.close(dir_fd)
            folder = "/".join(parts[: index + 1])
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise FileSkipped(f"folder {folder!r} is a symlink or not a folder; not followed") from None
            if exc.errno == errno.ENOENT:
                raise FileSkipped(f"folder {folder!r} no longer exists") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise FileUnreadable(f"cannot open folder {folder!r}: {exc.strerror} (the worker's user may not "
                                     "read it); left in the inbox and tried again") from None
            raise FileSkipped(f"cannot open folder {folder!r}: {exc.strerror}") from None
        os.close(dir_fd)
        dir_fd = next_fd
    return dir_fd, parts[-1]


def lstat_or_none(path: Path | str) -> os.stat_result | None:
    """The file's lstat, None when it cannot be looked at (gone, or a folder on its way not searchable)."""
    try:
        return os.lstat(path)
    except OSError:
        return None


def file_signature(st: os.stat_result) -> tuple[int, int, int]:
    """What tells a file changed since it was last seen: inode, size, mtime (ns); compared by the watcher
    (settling, reports) and the worker (files left in place)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one inbox file from its replacement or a rewrite: device, inode, size, mtime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_at(dir_fd: int, name: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise FileSkipped("file no longer exists") from None
    except OSError as exc:
        raise FileSkipped(f"cannot stat: {exc.strerror}") from None
    if not stat.S_ISREG(before.st_mode):
        # Never open what is not a regular file: opening a device can have side effects.
        raise FileSkipped(f"{describe_entry(before.st_mode)}, not a regular file; left alone")
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileSkipped("a symlink (not followed); left alone") from None
        if exc.errno == errno.ENXIO:
            raise FileSkipped("a socket, not a regular file; left alone") from None
        if exc.errno == errno.ENOENT:
            raise FileSkipped("file no longer exists") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise FileUnreadable(f"cannot open the file: {exc.strerror} (the worker's user may not read it); "
                                 "left in the inbox and tried again") from None
        raise ImageRejected(f"cannot open the file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileSkipped(f"{describe_entry(st.st_mode)}, not a regular file; left alone")
        if st.st_nlink > 1:
            raise ImageRejected(f"hard-linked file refused ({st.st_nlink} links)")
        if st.st_size > max_bytes:
            raise ImageRejected(f"file is {st.st_size:,} bytes, above the limit of {max_bytes:,} bytes "
                                "(files.max_file_bytes)")
        if st.st_size == 0:
            raise ImageRejected("empty file (0 bytes)")
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                chunk = os.read(fd, max(READ_CHUNK, st.st_size + 1 - total))
            except OSError as exc:
                raise ImageRejected(f"cannot read the file: {exc.strerror}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise ImageRejected(f"file grew above the limit of {max_bytes:,} bytes (files.max_file_bytes) "
                                    "while being read")
        if total == 0:
            raise ImageRejected("empty file (0 bytes)")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of the file content (the key for "same bytes dropped again")."""
    return hashlib.sha256(data).hexdigest()
