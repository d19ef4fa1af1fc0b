"""worker.files: ignore patterns, relative names, and reading inbox entries without being tricked."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
from conftest import write_image

from worker.config import InboxConfig
from worker.exceptions import FileSkipped, ImageRejected
from worker.files import FILE_FLAGS, is_ignored, read_image_file, relative_name, sha256_hex

IGNORE = InboxConfig().ignore
MAX = 1 << 20


@pytest.mark.parametrize(("name", "ignored"), [
    ("a.jpg", False),
    ("sub/a.jpg", False),
    (".a.jpg", True),
    (".a.jpg.AbCd12", True),  # rsync temp name
    ("a.jpg.part", True),
    ("A.JPG.PART", True),  # case does not hide a temp name
    ("a.tmp", True),
    ("a.jpg.crdownload", True),
    ("a.jpg.filepart", True),
    ("~a.jpg", True),
    (".hidden/a.jpg", True),  # an ignored folder ignores what is below it
    ("sub/.sync/deep/a.jpg", True),
    ("sub/part/a.jpg", False),
    ("a.partial.jpg", False),
])
def test_is_ignored_default_patterns(name: str, ignored: bool) -> None:
    assert is_ignored(name, IGNORE) is ignored


def test_is_ignored_custom_patterns() -> None:
    assert is_ignored("x.bak", ["*.bak"])
    assert not is_ignored("x.jpg", ["*.bak"])
    assert not is_ignored("x.jpg", [])


def test_relative_name(inbox: Path) -> None:
    assert relative_name(inbox, inbox / "a.jpg") == "a.jpg"
    assert relative_name(inbox, inbox / "sub" / "b c.jpg") == "sub/b c.jpg"
    # A symlinked inbox: paths under its resolved location are accepted too.
    link = inbox.parent / "inbox-link"
    link.symlink_to(inbox)
    assert relative_name(link, inbox / "x.jpg") == "x.jpg"
    assert relative_name(link, link / "x.jpg") == "x.jpg"


@pytest.mark.parametrize("outside", ["../etc/passwd", "..", ".", "/etc/passwd", "../inbox2/a.jpg"])
def test_relative_name_outside_inbox(inbox: Path, outside: str) -> None:
    with pytest.raises(FileSkipped, match="not inside the inbox"):
        relative_name(inbox, inbox / outside)


def test_reads_a_regular_file(inbox: Path) -> None:
    path = write_image(inbox / "sub" / "a.jpg", noise_seed=1)
    data, st = read_image_file(inbox, path, MAX)
    assert data == path.read_bytes()
    assert st.st_size == len(data) and st.st_ino == path.stat().st_ino
    assert sha256_hex(data) == sha256_hex(bytearray(data)) and len(sha256_hex(data)) == 64


def test_reads_a_file_larger_than_one_chunk(inbox: Path) -> None:
    path = inbox / "big.jpg"
    payload = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(payload)
    data, _ = read_image_file(inbox, path, 8 << 20)
    assert data == payload


@pytest.mark.parametrize("name", [
    "with space.jpg", "new\nline.jpg", "ünïcødé 画像.jpg", "quote'\"; DROP TABLE x;--.jpg", "a" * 200 + ".jpg",
])
def test_odd_names_are_read(inbox: Path, name: str) -> None:
    path = write_image(inbox / name, noise_seed=2)
    data, _ = read_image_file(inbox, path, MAX)
    assert data == path.read_bytes()
    assert relative_name(inbox, path) == name


def test_symlink_to_etc_passwd_is_skipped_without_opening_it(inbox: Path) -> None:
    link = inbox / "passwd.jpg"
    link.symlink_to("/etc/passwd")
    with pytest.raises(FileSkipped, match="symlink"):
        read_image_file(inbox, link, MAX)
    # The open the reader uses refuses the symlink by itself (O_NOFOLLOW): even a race that swapped a
    # regular file for this link between the lstat and the open could not make it read /etc/passwd.
    with pytest.raises(OSError) as caught:
        os.open(link, FILE_FLAGS)
    assert caught.value.errno == errno.ELOOP


def test_symlink_loop_is_skipped(inbox: Path) -> None:
    (inbox / "loop1.jpg").symlink_to(inbox / "loop2.jpg")
    (inbox / "loop2.jpg").symlink_to(inbox / "loop1.jpg")
    with pytest.raises(FileSkipped, match="symlink"):
        read_image_file(inbox, inbox / "loop1.jpg", MAX)


def test_symlinked_folder_pointing_outside_is_not_followed(inbox: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    secret = write_image(outside / "secret.jpg", noise_seed=3)
    (inbox / "sub").symlink_to(outside)
    with pytest.raises(FileSkipped, match="'sub' is a symlink"):
        read_image_file(inbox, inbox / "sub" / "secret.jpg", MAX)
    assert secret.exists()


@pytest.mark.timeout(10)
def test_fifo_does_not_block(inbox: Path) -> None:
    fifo = inbox / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(FileSkipped, match="FIFO"):
        read_image_file(inbox, fifo, MAX)


def test_socket_is_skipped(tmp_path: Path) -> None:
    inbox = tmp_path / "i"  # short path: AF_UNIX names are limited to 108 bytes
    inbox.mkdir()
    path = inbox / "s.jpg"
    if len(os.fsencode(path)) >= 100:
        pytest.skip("temp path too long for an AF_UNIX socket name")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        with pytest.raises(FileSkipped, match="socket"):
            read_image_file(inbox, path, MAX)
    finally:
        server.close()


def test_character_device_is_skipped_without_opening(inbox: Path) -> None:
    # A device node cannot be created without privileges; /dev/null reached through the inbox path is
    # the real thing: the reader must refuse it from lstat, before any open.
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    try:
        os.mknod(inbox / "null.jpg", 0o600 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    with pytest.raises(FileSkipped, match="character device"):
        read_image_file(inbox, inbox / "null.jpg", MAX)


def test_directory_named_like_an_image_is_skipped(inbox: Path) -> None:
    (inbox / "photo.jpg").mkdir()
    with pytest.raises(FileSkipped, match="directory"):
        read_image_file(inbox, inbox / "photo.jpg", MAX)


def test_hard_link_is_rejected(inbox: Path, tmp_path: Path) -> None:
    outside = write_image(tmp_path / "elsewhere.jpg", noise_seed=4)
    os.link(outside, inbox / "linked.jpg")
    with pytest.raises(ImageRejected, match="hard-linked file refused"):
        read_image_file(inbox, inbox / "linked.jpg", MAX)


def test_too_large_is_rejected_with_size_and_limit(inbox: Path) -> None:
    path = inbox / "big.jpg"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(ImageRejected,
                       match=r"^file is 5,000 bytes, above the limit of 4,096 bytes \(files.max_file_bytes\)$"):
        read_image_file(inbox, path, 4096)


def test_zero_bytes_is_rejected(inbox: Path) -> None:
    path = inbox / "empty.jpg"
    path.touch()
    with pytest.raises(ImageRejected, match="empty file"):
        read_image_file(inbox, path, MAX)


def test_vanished_file_is_skipped(inbox: Path) -> None:
    with pytest.raises(FileSkipped, match="no longer exists"):
        read_image_file(inbox, inbox / "gone.jpg", MAX)
    with pytest.raises(FileSkipped, match="no longer exists"):
        read_image_file(inbox, inbox / "gone" / "x.jpg", MAX)


def test_path_outside_inbox_is_skipped(inbox: Path) -> None:
    with pytest.raises(FileSkipped, match="not inside the inbox"):
        read_image_file(inbox, inbox / ".." / ".." / "etc" / "passwd", MAX)


def grow_after_fstat(monkeypatch: pytest.MonkeyPatch, path: Path, extra: int) -> None:
    """Append `extra` bytes to `path` right after the reader's fstat of it, once.

    A writer racing the reader is real, but when it lands is chance; this hook (the one thing not real
    here) makes the file grow at the worst moment, after its size was checked and before it is read.
    """
    real_fstat, inode = os.fstat, path.stat().st_ino

    def fstat_then_grow(fd: int) -> os.stat_result:
        result = real_fstat(fd)
        if result.st_ino == inode and not grown:
            grown.append(extra)
            with open(path, "ab") as handle:
                handle.write(b"y" * extra)
        return result

    grown: list[int] = []
    monkeypatch.setattr(os, "fstat", fstat_then_grow)


def test_file_growing_past_the_limit_while_read_is_rejected(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = inbox / "growing.jpg"
    path.write_bytes(b"x" * 1000)
    grow_after_fstat(monkeypatch, path, 300 * 1024)
    with pytest.raises(ImageRejected, match=r"^file grew above the limit of 262,144 bytes "
                                             r"\(files.max_file_bytes\) while being read$"):
        read_image_file(inbox, path, 256 * 1024)
    assert path.stat().st_size == 1000 + 300 * 1024  # the file itself is left as it is


def test_file_growing_within_the_limit_is_read_to_its_end(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = inbox / "growing.jpg"
    path.write_bytes(b"x" * 1000)
    grow_after_fstat(monkeypatch, path, 100 * 1024)
    data, st = read_image_file(inbox, path, 256 * 1024)
    assert st.st_size == 1000  # the size when it was checked...
    assert data == b"x" * 1000 + b"y" * 100 * 1024  # ...and every byte there when it was read
