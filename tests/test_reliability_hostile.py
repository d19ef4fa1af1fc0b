"""Reliability 5: hostile inputs. A corpus of bad files and odd filesystem entries is dropped into the inbox
(half before the worker starts, half while it runs): each bad file must end as a `failed` row (moved to
failed/ with its reason) or a logged skip (left where it is, no row); hostile NAMES carrying real images
must be classified and land inside processed/ under their own name. The worker must neither crash nor
hang (a sentinel image dropped after the corpus is classified, SIGTERM exits 0, a restart over the
leftovers is quiet), and nothing outside the inbox, processed/ and failed/ may be read, moved or written:
an outside canary folder (the target of symlinks and of a hard link) is watched with inotify (watchdog's
observer reports opens, reads and closes too) and its atimes/mtimes/ctimes are compared, and /etc/passwd
(a symlink target) is checked unchanged.
"""

from __future__ import annotations

import errno
import io
import os
import random
import socket
import stat
import struct
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver
from workerproc import Site, color_of, image_bytes, report, sha256_bytes, wait_until, workers

from worker.store import safe_text

__all__ = ["workers"]

DAY_NS = 86_400 * 10**9


@dataclass
class Entry:
    name: str  # relative to the inbox (may hold surrogate-escaped bytes)
    expect: str  # "failed" | "skip" | "ok"
    what: str


UNSUPPORTED = "not a supported image (expected one of JPEG, PNG, WEBP)"
TOO_LARGE = "image too large: {0}x{0} = {1:,} pixels exceeds the limit of 64,000,000"
HARD_LINKED = "hard-linked file refused (2 links)"
#: The start of each failed row's error: the reason the file was refused, not just any reason.
ERRORS = {
    "zero.jpg": "empty file (0 bytes)", "truncated.jpg": "corrupt or truncated JPEG: image file is truncated",
    "truncated.png": "corrupt or truncated PNG: image file is truncated",
    "truncated.webp": "unreadable image header: ", "only-soi.jpg": UNSUPPORTED,
    "corrupt-header.jpg": "unreadable image header: ", "bad-crc.png": UNSUPPORTED,
    "garbage.webp": "unreadable image header: ",
    "bomb-20000x20000.png": TOO_LARGE.format(20_000, 20_000 ** 2),
    "huge-50000x50000.png": TOO_LARGE.format(50_000, 50_000 ** 2),
    "huge-50000x50000.jpg": TOO_LARGE.format(50_000, 50_000 ** 2),
    "huge-16384x16384.webp": "unreadable image header: ",  # a canvas header and no image: Pillow refuses it
    "ztxt-bomb.png": "unreadable image header: Decompressed data too large",
    "text.jpg": UNSUPPORTED, "page.jpg": UNSUPPORTED, "program.jpg": UNSUPPORTED, "xxe.jpg": UNSUPPORTED,
    "gifar.jpg": UNSUPPORTED, "archive.jpg": UNSUPPORTED, "png-then-html.png": UNSUPPORTED,
    "document.jpg": UNSUPPORTED, "animated.webp": "animated WEBP with 2 frames is not supported",
    "bitmap.jpg": UNSUPPORTED, "scan.jpg": UNSUPPORTED,
    "sparse-100GB.jpg": "file is 107,374,182,400 bytes, above the limit of 67,108,864 bytes (files.max_file_bytes)",
    "hard-1.jpg": HARD_LINKED, "hard-2.jpg": HARD_LINKED, "hard-outside.jpg": HARD_LINKED,
}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny IDAT (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + png_chunk(b"IEND", b""))


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(image_bytes("red", 1, (16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_canvas(width: int, height: int) -> bytes:
    """A WebP with an extended (VP8X) header claiming a width x height canvas."""
    vp8x = struct.pack("<B3x", 0) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def encoded(fmt: str, size: tuple[int, int] = (64, 48), **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def build_corpus(corpus: Path, outside: Path) -> list[Entry]:
    """Bad files, odd entries and hostile names in `corpus` (moved into the inbox later)."""
    entries: list[Entry] = []

    def bad(name: str, data: bytes, what: str) -> None:
        (corpus / name).write_bytes(data)
        entries.append(Entry(name, "failed", what))

    jpeg, png = image_bytes("red", 7, (120, 90)), image_bytes("red", 8, (120, 90), fmt="PNG")
    webp = encoded("WEBP")
    bad("zero.jpg", b"", "zero bytes")
    bad("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated JPEG")
    bad("truncated.png", png[: len(png) // 2], "truncated PNG")
    bad("truncated.webp", webp[: len(webp) // 2], "truncated WebP")
    bad("only-soi.jpg", b"\xff\xd8", "JPEG start marker only")
    # Seeded: about 1 in 300 draws of os.urandom made Pillow refuse the file as not a JPEG at all, another
    # reason than the one ERRORS expects, and the test failed now and then.
    bad("corrupt-header.jpg", b"\xff\xd8\xff\xe0" + random.Random(118).randbytes(400),
        "JPEG marker then random bytes")
    broken_crc = bytearray(png)
    broken_crc[16] ^= 0xFF  # inside IHDR: its CRC no longer matches
    bad("bad-crc.png", bytes(broken_crc), "PNG with a broken IHDR checksum")
    bad("garbage.webp", b"RIFF\x20\x00\x00\x00WEBPVP8 " + os.urandom(40), "WebP header then random bytes")
    bad("bomb-20000x20000.png", png_with_size(20_000, 20_000), "decompression bomb (400 Mpx, tiny IDAT)")
    bad("huge-50000x50000.png", png_with_size(50_000, 50_000), "PNG header claiming 50,000x50,000")
    bad("huge-50000x50000.jpg", jpeg_with_size(50_000, 50_000), "JPEG header claiming 50,000x50,000")
    bad("huge-16384x16384.webp", webp_canvas(16_384, 16_384), "WebP canvas of 16,384x16,384")
    ztxt = png_chunk(b"zTXt", b"bomb\0\0" + zlib.compress(b"A" * 50_000_000, 9))
    bad("ztxt-bomb.png", png[:33] + ztxt + png[33:], "PNG with a 50 MB zTXt chunk (text bomb)")
    bad("text.jpg", b"just some text, not an image\n", "text named .jpg")
    bad("page.jpg", b"<html><body><script>alert(document.cookie)</script></body></html>", "HTML named .jpg")
    bad("program.jpg", Path("/bin/true").read_bytes(), "ELF executable named .jpg")
    bad("xxe.jpg", b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                   b'<svg xmlns="http://www.w3.org/2000/svg">&e;</svg>', "SVG with an external entity")
    bad("gifar.jpg", b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00*/=1;alert(1);//" + b"\x00;", "GIF/JavaScript polyglot")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("../../evil.sh", "rm -rf /")
    bad("archive.jpg", zipped.getvalue(), "ZIP with a path-traversal member named .jpg")
    bad("png-then-html.png", b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script>", "PNG signature then HTML")
    bad("document.jpg", b"%PDF-1.7\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "PDF named .jpg")
    frames = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(frames, format="WEBP", save_all=True,
                                                 append_images=[Image.new("RGB", (32, 32), (0, 0, 255))])
    bad("animated.webp", frames.getvalue(), "animated WebP")
    bad("bitmap.jpg", encoded("BMP"), "BMP named .jpg (unsupported format)")
    bad("scan.jpg", encoded("TIFF"), "TIFF named .jpg (unsupported format)")
    with (corpus / "sparse-100GB.jpg").open("wb") as handle:
        handle.write(jpeg)
        handle.truncate(100 * 2**30)
    entries.append(Entry("sparse-100GB.jpg", "failed", "100 GB sparse file (above max_file_bytes)"))
    # Hard links: two names for one image inside the inbox, and a link to a file outside it.
    (corpus / "hard-1.jpg").write_bytes(image_bytes("green", 9))
    os.link(corpus / "hard-1.jpg", corpus / "hard-2.jpg")
    entries += [Entry("hard-1.jpg", "failed", "hard link (two names)"),
                Entry("hard-2.jpg", "failed", "hard link (two names)")]
    os.link(outside / "hard-source.jpg", corpus / "hard-outside.jpg")
    entries.append(Entry("hard-outside.jpg", "failed", "hard link to a file outside the inbox"))

    # Entries that are not regular files: skipped and left alone.
    def skip(name: str, what: str) -> None:
        entries.append(Entry(name, "skip", what))

    os.symlink("/etc/passwd", corpus / "passwd.jpg")
    skip("passwd.jpg", "symlink to /etc/passwd")
    os.symlink(outside / "canary.jpg", corpus / "canary-link.jpg")
    skip("canary-link.jpg", "symlink to an image outside the inbox")
    os.symlink(outside, corpus / "outside-folder.jpg")
    skip("outside-folder.jpg", "symlink to a folder outside the inbox")
    os.symlink("loop-b.jpg", corpus / "loop-a.jpg")
    os.symlink("loop-a.jpg", corpus / "loop-b.jpg")
    skip("loop-a.jpg", "symlink loop")
    skip("loop-b.jpg", "symlink loop")
    os.symlink("self.jpg", corpus / "self.jpg")
    skip("self.jpg", "symlink to itself")
    os.symlink("/nonexistent/photo.jpg", corpus / "dangling.jpg")
    skip("dangling.jpg", "dangling symlink")
    os.mkfifo(corpus / "pipe.jpg")
    skip("pipe.jpg", "FIFO (opening it for reading would block)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(corpus / "sock.jpg"))
        skip("sock.jpg", "Unix socket")
    except OSError:  # the path is longer than a socket address allows here
        pass
    finally:
        sock.close()
    if os.geteuid() == 0:
        os.mknod(corpus / "zero-device.jpg", stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero
        skip("zero-device.jpg", "character device (/dev/zero: endless if read)")
    os.symlink(outside, corpus / "linked-dir")
    skip("linked-dir", "symlinked folder (never walked into)")

    # Hostile names carrying real images: classified, kept under their own name inside processed/.
    names = ["photo..-red.jpg", "red..\\..\\etc\\passwd-red.jpg", "%2e%2e%2fetc%2fpasswd-red.jpg", "new\nline-red.jpg",
             "tab\there-red.jpg", "ｄｒｅｓｓ 👗-red.jpg", "\u202egpj.exe-red.jpg", "e\u0301te\u0301-red.jpg",
             os.fsdecode(b"\xff\xfe-not-utf8-red.jpg"), "x" * 247 + "-red.jpg", "'; DROP TABLE results;--red.jpg",
             'Robert"); DELETE FROM results; --red.jpg', "-rf --no-preserve-root-red.jpg", " leading-red.jpg",
             "$(reboot)-red.jpg", "`id`-red.jpg", "*-red.jpg", "%s%n%x-red.jpg", "{0}{__class__}-red.jpg",
             "dots...  /inside-dots-red.jpg", "photo.jpg/inside-a-folder-named-like-an-image-red.jpg"]
    for i, name in enumerate(names):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_bytes(image_bytes("red", 1000 + i))
        entries.append(Entry(name, "ok", "hostile name"))
    # Hidden names ("..jpg" is as hidden as ".x.jpg") are temp names by the inbox.ignore patterns: left for
    # their writer to rename, never read, no row and no log line.
    for name in ["..jpg", "...jpg", "..\\..\\etc\\passwd-red.jpg", ".../inside-red.jpg"]:
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_bytes(image_bytes("red", 2000 + len(entries)))
        entries.append(Entry(name, "ignored", "hidden name (an ignore pattern)"))
    # A path longer than PATH_MAX (4096 bytes) below the inbox cannot be listed by path: a logged skip.
    deep = Path(*["d" * 200] * 21) / "deep-red.jpg"
    _write_deep(corpus, deep, image_bytes("red", 999))
    entries.append(Entry(deep.as_posix(), "skip", "path longer than PATH_MAX (4096)"))
    (corpus / "empty-folder.jpg").mkdir()  # a folder named like an image: nothing to do, no row
    return entries


def _write_deep(root: Path, rel: Path, data: bytes) -> None:
    """Create root/rel even when it is longer than PATH_MAX (one component at a time, by descriptor)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in rel.parts[:-1]:
            os.mkdir(part, dir_fd=fd)
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        out = os.open(rel.parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)


def listing(folder: Path) -> list[Path]:
    """`folder` and every entry below it (this lists folders: do it before taking atimes)."""
    out = [folder]
    for current, dirs, files in os.walk(folder):
        out.extend(Path(current) / name for name in [*dirs, *files])
    return out


def contents(paths: list[Path]) -> dict[str, str]:
    """sha256 of the regular files (this reads them: do it before taking atimes)."""
    return {str(p): sha256_bytes(p.read_bytes()) for p in paths if stat.S_ISREG(os.lstat(p).st_mode)}


def stamps(paths: list[Path]) -> dict[str, tuple[int, int, int, int]]:
    """(atime, mtime, ctime, size) of each path, by lstat only: nothing is read or listed."""
    out = {}
    for path in paths:
        st = os.lstat(path)
        out[str(path)] = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
    return out


class Events(FileSystemEventHandler):
    def __init__(self) -> None:
        self.seen: list[FileSystemEvent] = []
        self._lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        with self._lock:
            self.seen.append(event)


@pytest.mark.timeout(150)
def test_hostile_inputs_fail_or_are_skipped_and_nothing_outside_is_touched(tmp_path: Path, workers, capsys) -> None:
    site = Site(tmp_path / "site", settle_s=0.3)
    outside, corpus = tmp_path / "outside", tmp_path / "corpus"
    (outside / "sub").mkdir(parents=True)
    (outside / "canary.jpg").write_bytes(image_bytes("blue", 1))
    (outside / "hard-source.jpg").write_bytes(image_bytes("blue", 2))
    (outside / "secret.txt").write_text("outside the inbox\n")
    (outside / "sub" / "nested.jpg").write_bytes(image_bytes("blue", 3))
    corpus.mkdir()
    entries = build_corpus(corpus, outside)
    # Old atimes (and mtimes): with relatime, any read from now on moves a file's atime, and any listing a
    # folder's. The hard link's ctime moves when its inbox name is moved to failed/: excluded below.
    # The inotify observer first: scheduling it lists the folders; the events of the set-up are cleared.
    watcher, events = InotifyObserver(), Events()
    watcher.schedule(events, str(outside), recursive=True)
    watcher.start()
    paths = listing(outside)
    content_before = contents(paths)
    old = time.time_ns() - 2 * DAY_NS
    for path in paths:
        os.utime(path, ns=(old, old), follow_symlinks=False)
    before = stamps(paths)
    passwd_before = (os.stat("/etc/passwd").st_mtime_ns, os.stat("/etc/passwd").st_ctime_ns,
                     sha256_bytes(Path("/etc/passwd").read_bytes()))
    time.sleep(0.3)
    events.seen.clear()
    try:
        tops = sorted({e.name.split("/")[0] for e in entries} | {"empty-folder.jpg"})
        for top in tops[::2]:  # half before the worker starts: found by its start-up scan
            os.rename(corpus / top, site.inbox / top)
        worker = workers(site).wait_ready()
        started = time.monotonic()
        for top in tops[1::2]:  # the other half while it runs: found by the watcher
            os.rename(corpus / top, site.inbox / top)
        failed = [e for e in entries if e.expect == "failed"]
        ok = [e for e in entries if e.expect == "ok"]
        skipped = [e for e in entries if e.expect == "skip"]
        waited = []
        try:
            wait_until(lambda: site.count() >= len(failed) + len(ok), 30, f"{len(failed) + len(ok)} rows")
        except AssertionError as exc:  # go on: the per-entry outcome below says which ones are missing
            waited.append(str(exc))
        (site.inbox / "sentinel-blue.jpg").write_bytes(image_bytes("blue", 77))
        wait_until(lambda: site.count("file = 'sentinel-blue.jpg'") == 1, 30, "the sentinel after the corpus")
        seconds = time.monotonic() - started
        time.sleep(1.0)  # late rows or skips would show up now
        sent = time.monotonic()
        assert worker.stop(timeout=15) == 0, worker.log
        stop_s = time.monotonic() - sent
        # A restart over the leftovers (skipped entries stay in the inbox) is quiet and still works.
        again = workers(site).wait_ready()
        (site.inbox / "sentinel-2-green.jpg").write_bytes(image_bytes("green", 78))
        wait_until(lambda: site.count("file = 'sentinel-2-green.jpg'") == 1, 30, "the sentinel after a restart")
        assert again.stop(timeout=15) == 0, again.log
        time.sleep(0.2)
    finally:
        watcher.stop()
        watcher.join()
    after = stamps(paths)
    hard = str(outside / "hard-source.jpg")
    after[hard] = after[hard][:2] + before[hard][2:3] + after[hard][3:]  # its ctime moves with the link
    changed = {p: (before[p], after[p]) for p in before if before[p] != after[p]}
    if listing(outside) != paths or contents(paths) != content_before:
        changed["(entries or contents)"] = (sorted(map(str, paths)), sorted(map(str, listing(outside))))
    passwd_after = (os.stat("/etc/passwd").st_mtime_ns, os.stat("/etc/passwd").st_ctime_ns,
                    sha256_bytes(Path("/etc/passwd").read_bytes()))

    rows = {r[0]: r[1:] for r in site.query("SELECT file, status, error, location, sha256, category FROM results")}
    log = worker.log + again.log
    outcome: dict[str, str] = {}
    for entry in entries:
        row = rows.get(safe_text(entry.name))
        in_inbox = _lexists(site.inbox / entry.name)
        if row is None:
            marker = "File name too long" if "PATH_MAX" in entry.what else repr(entry.name)[1:-1]
            logged = any(("skipping" in line or "cannot list" in line) and marker in line for line in log.splitlines())
            if entry.expect == "ignored" and not logged and in_inbox:
                outcome[entry.name] = "ignored"
            else:
                outcome[entry.name] = "skip" if logged and in_inbox else f"no row, logged={logged}, in_inbox={in_inbox}"
        else:
            status, error, location, _, category = row
            target = (site.failed if status == "failed" else site.processed) / entry.name
            good = location == safe_text(str(target)) and _lexists(target) and not in_inbox
            if status == "failed":
                good = good and "\n" not in error and error.startswith(ERRORS[entry.name])
            else:
                good = good and category == color_of(entry.name)
            outcome[entry.name] = status if good else f"{status} row but {location!r}, in_inbox={in_inbox}, {error!r}"
    assert sorted(ERRORS) == sorted(e.name for e in entries if e.expect == "failed")
    mismatched = {e.name: (e.what, e.expect, outcome[e.name]) for e in entries if outcome[e.name] != e.expect}
    escaped = [r for r in rows.values() if not os.path.realpath(r[2]).startswith(
        (str(site.processed) + os.sep, str(site.failed) + os.sep))]
    ignored = [e for e in entries if e.expect == "ignored"]
    line = report(capsys, "hostile inputs", bad_files=len(failed),
                  failed_rows=sum(o == "failed" for o in outcome.values()),
                  odd_entries=len(skipped), logged_skips=sum(o == "skip" for o in outcome.values()),
                  hostile_names=len(ok), classified_ok=sum(o == "ok" for o in outcome.values()),
                  hidden_names_left_alone=sum(outcome[e.name] == "ignored" for e in ignored),
                  mismatched=len(mismatched), rows_outside_processed_failed=len(escaped),
                  corpus_and_sentinel_s=round(seconds, 1), sigterm_exit_s=round(stop_s, 2),
                  outside_entries_changed=len(changed), outside_inotify_events=len(events.seen),
                  etc_passwd_unchanged=passwd_before == passwd_after, tracebacks=log.count("Traceback"))
    assert len(failed) + len(skipped) >= 30, line
    details = "\n".join(f"{k[:300]!r}: {v}" for k, v in mismatched.items())
    assert not mismatched and not waited, f"{line}\n{waited}\n{details}\n{log[-3000:]}"
    assert not escaped, f"{line}\n{escaped}"
    assert not changed and not events.seen, f"{line}\n{changed}\n{events.seen[:10]}"
    assert passwd_before == passwd_after, line
    assert "Traceback" not in log, log


def _lexists(path: Path) -> bool:
    """os.path.lexists, also for paths longer than PATH_MAX (walked one component at a time)."""
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            return False
    parts = Path(path).parts
    fd = os.open(parts[0], os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[1:-1]:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
