"""Where a file goes once its result row is committed: processed/, failed/, left in place, or deleted.

Call `dispose` only after the row is committed. Moves never overwrite: a clash gets "name (1).jpg",
"name (2).jpg", … The move itself is one atomic no-clobber step:

- renameat2(RENAME_NOREPLACE) where the kernel and filesystem have it (the file never has two names, so a
  crash mid-move cannot leave a hard-linked copy in the inbox that the next run would refuse);
- otherwise link(src, dst) (fails if dst exists) then unlink(src);
- across filesystems (EXDEV): copy into an O_EXCL hidden temp file in the destination folder, fsync, give
  it its final name without clobbering, fsync the folder, then unlink the source.

The file is reached through folder descriptors opened without following symlinks (`files.open_parent`),
and, given the identity of what was read (`files.identity`), it must still be that file: one replaced,
rewritten or moved away since is not touched (FileChanged), so a swapped-in file can never be moved or
deleted under another file's row, and a subfolder swapped for a symlink cannot send a move or a delete
outside the inbox. What is left is the instant between that check and the rename; a file swapped in
right then is noticed after the rename and put back.

Failures raise DispositionError (an OSError with the errno kept) and leave the source in the inbox.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from worker.config import Config
from worker.exceptions import FileSkipped
from worker.files import identity, lstat_or_none, open_parent, real_inbox, relative_name

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "failed")
NAME_MAX = 255
# A folder whose entries changed this recently may be being filled by an uploader: it is not removed.
EMPTY_DIR_MIN_AGE_S = 2.0
RENAME_NOREPLACE = 1
_NO_NOREPLACE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_NO_HARDLINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


class DispositionError(OSError):
    """A file could not be moved or deleted; it is still where it was (in the inbox)."""


class FileChanged(DispositionError):
    """The file at the path is not the one whose row was committed; nothing was moved or deleted.

    `replaced`: another file is there now (a new upload under the same name, or the same file rewritten),
    which needs a row of its own; otherwise the file was moved away or its folder was.
    """

    def __init__(self, rel: str, path: Path, *, replaced: bool, copied_to: Path | None = None) -> None:
        what = "was replaced or rewritten" if replaced else "is no longer there"
        super().__init__(errno.ESTALE if replaced else errno.ENOENT, f"{rel!r} {what} since it was read",
                         str(path))
        self.replaced = replaced
        self.copied_to = copied_to  # across filesystems: the file read was copied there before it was replaced


def _load_renameat2():  # type: ignore[no-untyped-def]
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()
AT_FDCWD = -100


def _rename_noreplace(src: Path | str, dst: Path | str, src_dir_fd: int | None = None,
                      dst_dir_fd: int | None = None) -> None:
    """Give `src` the name `dst` atomically (each relative to its folder descriptor when given);
    FileExistsError if `dst` exists (never overwrites).

    Raises OSError(EXDEV) when they are on different filesystems.
    """
    global _renameat2
    if _renameat2 is not None:
        result = _renameat2(AT_FDCWD if src_dir_fd is None else src_dir_fd, os.fsencode(src),
                            AT_FDCWD if dst_dir_fd is None else dst_dir_fd, os.fsencode(dst), RENAME_NOREPLACE)
        if result == 0:
            return
        err = ctypes.get_errno()
        if err not in _NO_NOREPLACE:
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
        if err == errno.ENOSYS:
            _renameat2 = None
    try:
        os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_HARDLINKS:
            raise
        # No hard links here (some FUSE/SMB mounts): check-then-rename, the best this filesystem allows.
        try:
            os.stat(dst, dir_fd=dst_dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            return
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
    os.unlink(src, dir_fd=src_dir_fd)


def _split_name(name: str) -> tuple[str, str]:
    stem, suffix = os.path.splitext(name)
    if len(os.fsencode(suffix)) > 16:  # not a real extension: number the whole name
        return name, ""
    return stem, suffix


def _fit(stem: str, tail: str) -> str:
    """`stem + tail`, with the stem shortened to fit NAME_MAX bytes (on a character boundary, unless the
    name is not UTF-8 there). Names are counted and cut as the bytes they are on disk (os.fsencode): a
    name that is not UTF-8 (a Latin-1 upload) comes as surrogate escapes, which str.encode refuses."""
    budget = NAME_MAX - len(os.fsencode(tail))
    encoded = os.fsencode(stem)
    if len(encoded) > budget:
        cut = encoded[: max(budget, 1)]
        for drop in range(4):  # a UTF-8 character cut in two is dropped whole
            try:
                return cut[: len(cut) - drop].decode() + tail
            except UnicodeDecodeError:
                continue
        stem = os.fsdecode(cut)
    return stem + tail


def _candidates(directory: Path, relative: str) -> Iterator[Path]:
    rel = PurePosixPath(relative)
    if rel.is_absolute() or not rel.parts or any(part in ("..", ".") for part in rel.parts):
        raise ValueError(f"bad relative name {relative!r}")
    parent = directory.joinpath(*rel.parts[:-1])
    yield parent / rel.name
    stem, suffix = _split_name(rel.name)
    number = 1
    while True:
        yield parent / _fit(stem, f" ({number}){suffix}")
        number += 1


def unique_destination(directory: Path, relative: str) -> Path:
    """The first free name for `relative` ("sub/a.jpg") under `directory`: a.jpg, a (1).jpg, a (2).jpg, …

    Only a hint (another process may take the name next); `dispose` claims names atomically.
    """
    for candidate in _candidates(directory, relative):
        if not os.path.lexists(candidate):
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def dispose(path: Path, inbox: Path, outcome: str, config: Config,
            expect: tuple[int, int, int, int] | None = None, sha256: str | None = None) -> Path | None:
    """Move, leave or delete `path` after its result row is committed; return where it is now (None: deleted).

    outcome "ok" follows config.files.on_success; "failed" always moves to config.files.failed_dir. The
    subfolder below the inbox is kept. `expect`: the `files.identity` of the file as it was read; FileChanged
    when the file there now is another (nothing is touched). `sha256`: the hash of the bytes read; a file
    whose mtime alone changed since (a `touch`, a sync tool setting times) is still the one read when its
    bytes hash the same. Raises DispositionError (file left in place) when the move or delete fails.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    action = config.files.on_success if outcome == "ok" else "move"
    path = Path(path)
    rel = relative_name(inbox, path)
    if action == "leave":  # nothing to touch; but a file rewritten or replaced since is not the one read
        left_in_place(path, inbox, expect, sha256)
        return path
    ancestors = _ancestor_mtimes(inbox, rel)
    try:
        dir_fd, name = open_parent(inbox, path)
    except FileSkipped:  # a folder on the way is gone, or now a symlink: the file is not where it was read
        raise FileChanged(rel, path, replaced=False) from None
    try:
        expect = _check_same(dir_fd, name, rel, path, expect, sha256)
        if action == "delete":
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError as exc:
                raise DispositionError(exc.errno, f"cannot delete {rel!r}: {exc.strerror}", str(path)) from None
            destination = None
        else:
            target = config.processed_path if outcome == "ok" else config.failed_path
            destination = _move(dir_fd, name, path, target, rel, expect, sha256)
    finally:
        os.close(dir_fd)
    _remove_empty_parents(ancestors)
    return destination


def left_in_place(path: Path, inbox: Path, expect: tuple[int, int, int, int] | None,
                  sha256: str | None = None) -> tuple[int, int, int, int] | None:
    """What `dispose` checks for a file it leaves in place (files.on_success = "leave"): FileChanged when
    another file is there now; else its identity now (the mtime may have moved, see `dispose`), or None
    when it is gone or `expect` is None."""
    now = _identity_of(path)
    if expect is None or now is None or now == expect:
        return now if expect is not None else None
    rel = relative_name(inbox, path)
    try:
        dir_fd, name = open_parent(inbox, path)
    except FileSkipped:
        raise FileChanged(rel, path, replaced=True) from None
    try:
        return _check_same(dir_fd, name, rel, path, expect, sha256)
    except FileChanged as changed:
        if changed.replaced:
            raise
        return None  # gone meanwhile
    finally:
        os.close(dir_fd)


def _check_same(dir_fd: int, name: str, rel: str, path: Path, expect: tuple[int, int, int, int] | None,
                sha256: str | None = None) -> tuple[int, int, int, int] | None:
    """FileChanged unless the file is still the one read; its identity now (the mtime may have moved)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise FileChanged(rel, path, replaced=False) from None
    except OSError as exc:
        raise DispositionError(exc.errno, f"cannot stat {rel!r}: {exc.strerror}", str(path)) from None
    if expect is None or identity(st) == expect:
        return expect
    now = _same_bytes(dir_fd, name, expect, sha256)
    if now is None:
        raise FileChanged(rel, path, replaced=True)
    log.debug("%r was touched since it was read (mtime changed, same bytes)", rel)
    return now


def _same_bytes(dir_fd: int | None, name: str, expect: tuple[int, int, int, int],
                sha256: str | None) -> tuple[int, int, int, int] | None:
    """The file's identity now if only its mtime changed since it was read and its bytes still hash to
    `sha256` (read with the identity unchanged from start to end); None otherwise."""
    if sha256 is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or identity(before)[:3] != expect[:3]:
            return None  # another file, or a different size: rewritten, not touched
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        after = os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if identity(after) != identity(before) or digest.hexdigest() != sha256:
        return None
    return identity(after)


def _move(dir_fd: int, name: str, src: Path, directory: Path, rel: str,
          expect: tuple[int, int, int, int] | None, sha256: str | None = None) -> Path:
    folder = next(_candidates(directory, rel)).parent
    try:
        try:
            return _rename_to_free_name(dir_fd, name, src, directory, rel, expect, sha256)
        except (FileNotFoundError, NotADirectoryError):
            # The folder is missing (the first file to go there, or someone removed it) or a file is in its
            # way: made, and tried once more. Making it before every move took two system calls and an
            # exception a file, in the thread that also commits.
            _make_folder(folder, rel)
            return _rename_to_free_name(dir_fd, name, src, directory, rel, expect, sha256)
    except OSError as exc:
        if isinstance(exc, DispositionError):
            raise
        if exc.errno == errno.EXDEV:
            return _copy_across(dir_fd, name, src, directory, rel, expect, sha256)
        raise DispositionError(
            exc.errno, f"cannot move {rel!r} into {folder!s}: {exc.strerror}", str(src)
        ) from None


def _rename_to_free_name(dir_fd: int, name: str, src: Path, directory: Path, rel: str,
                         expect: tuple[int, int, int, int] | None, sha256: str | None) -> Path:
    """Rename the file to the first free name for `rel` under `directory` (OSError as the rename raises)."""
    for candidate in _candidates(directory, rel):
        try:
            _rename_noreplace(name, candidate, src_dir_fd=dir_fd)
        except FileExistsError:
            continue
        if (expect is not None and _identity_of(candidate) != expect
                and _same_bytes(None, str(candidate), expect, sha256) is None):
            _put_back(candidate, dir_fd, name, rel, src)  # swapped in between the check and the rename
        log.debug("moved %r to %s", rel, candidate)
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def _make_folder(folder: Path, rel: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DispositionError(
            exc.errno, f"cannot create folder {folder!s} to move {rel!r} into: {exc.strerror}", str(folder),
        ) from None


def _identity_of(path: Path) -> tuple[int, int, int, int] | None:
    st = lstat_or_none(path)
    return None if st is None else identity(st)


def _put_back(moved: Path, dir_fd: int, name: str, rel: str, src: Path) -> None:
    """A file other than the one read was just moved: give it its inbox name back; raise FileChanged."""
    try:
        _rename_noreplace(moved, name, dst_dir_fd=dir_fd)
    except OSError as exc:
        log.error("%s was replaced while it was being moved, and the new file could not be put back (%s): it "
                  "is %s", rel, exc.strerror or exc, moved)
    raise FileChanged(rel, src, replaced=True)


def _copy_across(dir_fd: int, name: str, src: Path, directory: Path, rel: str,
                 expect: tuple[int, int, int, int] | None, sha256: str | None = None) -> Path:
    """Move to another filesystem: copy to a hidden O_EXCL temp, fsync, no-clobber rename, unlink src."""
    parent = next(_candidates(directory, rel)).parent
    _make_folder(parent, rel)
    temp = parent / _fit(f".{PurePosixPath(rel).name}", f".{secrets.token_hex(4)}.fw-partial")
    placed: Path | None = None
    try:
        in_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(in_fd)
            if expect is not None and identity(st) != expect:
                raise FileChanged(rel, src, replaced=True)
            out_fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             st.st_mode & 0o777)
            try:
                while True:
                    chunk = os.read(in_fd, 1 << 20)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out_fd, view):]
                os.fsync(out_fd)
            finally:
                os.close(out_fd)
        finally:
            os.close(in_fd)
        os.utime(temp, ns=(st.st_atime_ns, st.st_mtime_ns))
        for candidate in _candidates(directory, rel):
            try:
                _rename_noreplace(temp, candidate)
            except FileExistsError:
                continue
            placed = candidate
            break
        _fsync_dir(parent)
        try:
            _check_same(dir_fd, name, rel, src, identity(st), sha256)  # still the file copied?
        except FileChanged as changed:  # the copy is the file read: kept; the new file stays in the inbox
            raise FileChanged(rel, src, replaced=changed.replaced, copied_to=placed) from None
        os.unlink(name, dir_fd=dir_fd)
    except FileChanged:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if placed is not None:  # the copy landed but the source could not go: undo, keep the source
            with contextlib.suppress(OSError):
                os.unlink(placed)
        if isinstance(exc, DispositionError):
            raise
        raise DispositionError(
            exc.errno, f"cannot copy {rel!r} to {parent!s} (other filesystem): {exc.strerror}", str(src)
        ) from None
    log.debug("copied %r to %s across filesystems", rel, placed)
    assert placed is not None
    return placed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ancestor_mtimes(inbox: Path, rel: str) -> list[tuple[Path, float]]:
    """The folders between the file `rel` and the inbox (innermost first), with their mtimes before the move."""
    result = []
    parts = rel.split("/")[:-1]
    root = Path(real_inbox(inbox))
    while parts:
        folder = root.joinpath(*parts)
        try:
            result.append((folder, os.lstat(folder).st_mtime))
        except OSError:
            break
        parts.pop()
    return result


def _remove_empty_parents(ancestors: list[tuple[Path, float]]) -> None:
    """Remove inbox subfolders left empty by a move (never the inbox; never a folder with entries).

    A folder whose entries changed in the last EMPTY_DIR_MIN_AGE_S before the move is kept: an uploader
    may be about to put the next file there. `prune_empty_dirs` removes such leftovers later.
    """
    now = time.time()
    for folder, mtime in ancestors:
        if now - mtime < EMPTY_DIR_MIN_AGE_S:
            return
        try:
            os.rmdir(folder)
        except OSError:
            return
        log.debug("removed empty folder %s", folder)


def prune_empty_dirs(inbox: Path, exclude: list[Path], min_age_s: float) -> int:
    """Remove empty subfolders of the inbox unchanged for `min_age_s` (bottom-up, never the inbox itself,
    never inside `exclude`); returns how many were removed. Symlinks are not followed."""
    root = os.path.abspath(inbox)
    excluded = [os.path.abspath(p) for p in exclude]
    removed = 0
    now = time.time()
    for current, dirs, files, dir_fd in os.fwalk(root, topdown=False, follow_symlinks=False):
        if current == root or any(current == ex or current.startswith(ex + os.sep) for ex in excluded):
            continue
        if files or dirs:
            # `dirs` lists children as they were before they were (maybe) removed: re-check.
            try:
                if os.listdir(dir_fd):
                    continue
            except OSError:
                continue
        try:
            if now - os.fstat(dir_fd).st_mtime < min_age_s:
                continue
            os.rmdir(current)
        except OSError:
            continue
        removed += 1
        log.debug("removed empty folder %s", current)
    return removed
