"""worker.disposition: move / leave / delete after commit, never overwriting, across filesystems too."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import unwritable, write_image

from worker import disposition
from worker.config import Config, load
from worker.disposition import DispositionError, FileChanged, dispose, prune_empty_dirs, unique_destination
from worker.files import identity


def make_config(tmp_path: Path, **overrides: object) -> Config:
    values = {"inbox.path": str(tmp_path / "inbox"), "files.processed_dir": str(tmp_path / "processed"),
              "files.failed_dir": str(tmp_path / "failed")}
    values.update({key: value for key, value in overrides.items()})
    return load(None, {key.replace("__", "."): value for key, value in values.items()})


def age(path: Path, seconds: float = 60) -> None:
    """Make a folder look untouched for `seconds` (uploaders' folders are left alone while fresh)."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_ok_is_moved_keeping_the_subfolder(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    path = write_image(inbox / "sub" / "deep" / "a.jpg", noise_seed=1)
    content = path.read_bytes()
    age(inbox / "sub" / "deep")
    age(inbox / "sub")
    moved = dispose(path, inbox, "ok", config)
    assert moved == tmp_path / "processed" / "sub" / "deep" / "a.jpg"
    assert moved.read_bytes() == content
    assert not path.exists()
    # The now-empty subfolders left behind are removed; the inbox itself stays.
    assert not (inbox / "sub").exists()
    assert inbox.is_dir()


def test_fresh_or_non_empty_subfolders_are_kept(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    a = write_image(inbox / "busy" / "a.jpg", noise_seed=1)
    write_image(inbox / "busy" / "b.jpg", noise_seed=2)
    age(inbox / "busy")
    dispose(a, inbox, "ok", config)
    assert (inbox / "busy" / "b.jpg").exists()  # not empty: kept
    fresh = write_image(inbox / "fresh" / "c.jpg", noise_seed=3)  # just written: an uploader may add more
    dispose(fresh, inbox, "ok", config)
    assert (inbox / "fresh").is_dir()


def test_failed_always_moves_to_failed(inbox: Path, tmp_path: Path) -> None:
    for on_success in ("move", "leave", "delete"):
        config = make_config(tmp_path, files__on_success=on_success)
        path = inbox / f"bad-{on_success}.jpg"
        path.write_bytes(b"not an image")
        moved = dispose(path, inbox, "failed", config)
        assert moved == tmp_path / "failed" / path.name
        assert moved.read_bytes() == b"not an image" and not path.exists()


def test_leave_keeps_the_file(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, files__on_success="leave")
    path = write_image(inbox / "a.jpg")
    assert dispose(path, inbox, "ok", config) == path
    assert path.exists()
    assert not (tmp_path / "processed").exists()


def test_delete_unlinks(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, files__on_success="delete")
    path = write_image(inbox / "sub" / "a.jpg")
    age(inbox / "sub")
    assert dispose(path, inbox, "ok", config) is None
    assert not path.exists() and not (inbox / "sub").exists()


def test_bad_outcome_is_refused(inbox: Path, tmp_path: Path) -> None:
    path = write_image(inbox / "a.jpg")
    with pytest.raises(ValueError, match="outcome must be one of ok, failed"):
        dispose(path, inbox, "maybe", make_config(tmp_path))
    assert path.exists()


def test_clashes_never_overwrite(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    processed = tmp_path / "processed"
    contents = []
    for seed in range(4):
        path = write_image(inbox / "a.jpg", noise_seed=seed)
        contents.append(path.read_bytes())
        dispose(path, inbox, "ok", config)
    names = ["a.jpg", "a (1).jpg", "a (2).jpg", "a (3).jpg"]
    assert sorted(p.name for p in processed.iterdir()) == sorted(names)
    assert [(processed / name).read_bytes() for name in names] == contents


def test_unique_destination(tmp_path: Path) -> None:
    target = tmp_path / "processed"
    assert unique_destination(target, "sub/a.jpg") == target / "sub" / "a.jpg"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "a.jpg").touch()
    (target / "sub" / "a (1).jpg").touch()
    assert unique_destination(target, "sub/a.jpg") == target / "sub" / "a (2).jpg"
    (target / "noext").touch()
    assert unique_destination(target, "noext") == target / "noext (1)"
    (target / "broken-link.jpg").symlink_to(tmp_path / "nowhere")  # a dangling link is taken too
    assert unique_destination(target, "broken-link.jpg") == target / "broken-link (1).jpg"
    with pytest.raises(ValueError, match="bad relative name"):
        unique_destination(target, "../escape.jpg")


def test_clash_on_a_255_byte_name_stays_within_name_max(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    name = "é" * 125 + ".jpg"  # 254 bytes in UTF-8
    for seed in range(2):
        dispose(write_image(inbox / name, fmt="JPEG", noise_seed=seed), inbox, "ok", config)
    names = sorted(p.name for p in (tmp_path / "processed").iterdir())
    assert len(names) == 2 and all(len(n.encode()) <= 255 for n in names)
    assert any(n.endswith(" (1).jpg") for n in names)


@pytest.mark.parametrize("name", ["with space.jpg", "new\nline.jpg", "ünïcødé.jpg", "it's \"quoted\".jpg"])
def test_odd_names_move(inbox: Path, tmp_path: Path, name: str) -> None:
    path = write_image(inbox / name, fmt="PNG")
    assert dispose(path, inbox, "ok", make_config(tmp_path)) == tmp_path / "processed" / name


def test_processed_inside_the_inbox(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path, files__processed_dir=str(inbox / "processed"))
    path = write_image(inbox / "a.jpg")
    assert dispose(path, inbox, "ok", config) == inbox / "processed" / "a.jpg"


def _other_filesystem(tmp_path: Path) -> Path | None:
    """A writable folder on a different filesystem than tmp_path (tmpfs /dev/shm on most Linux hosts)."""
    for candidate in ("/dev/shm", f"/run/user/{os.getuid()}", tempfile.gettempdir()):
        try:
            if os.stat(candidate).st_dev != os.stat(tmp_path).st_dev and os.access(candidate, os.W_OK):
                return Path(tempfile.mkdtemp(prefix="fw-exdev-", dir=candidate))
        except OSError:
            continue
    return None


def test_move_to_another_filesystem_for_real(inbox: Path, tmp_path: Path) -> None:
    other = _other_filesystem(tmp_path)
    if other is None:
        pytest.skip("no second writable filesystem here; test_exdev_fallback_simulated covers the path")
    try:
        config = make_config(tmp_path, files__processed_dir=str(other / "processed"))
        contents = []
        for seed in range(2):
            path = write_image(inbox / "sub" / "a.jpg", noise_seed=seed)
            os.utime(path, (1_000_000_000, 1_000_000_000))
            contents.append(path.read_bytes())
            moved = dispose(path, inbox, "ok", config)
            assert not path.exists()
            assert moved.stat().st_mtime == 1_000_000_000
        target = other / "processed" / "sub"
        assert [(target / n).read_bytes() for n in ("a.jpg", "a (1).jpg")] == contents
        assert sorted(p.name for p in target.iterdir()) == ["a (1).jpg", "a.jpg"]  # no temp file left
    finally:
        shutil.rmtree(other)


def test_exdev_fallback_simulated(inbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated because a second filesystem is not guaranteed on every CI host (the test above uses a real
    # one when present): the first no-clobber rename, from the inbox, fails with EXDEV as it would across
    # filesystems; the copy path's own rename (temp -> final, same folder) stays real.
    moves_cross_devices(monkeypatch)
    config = make_config(tmp_path)
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed" / "a.jpg").write_bytes(b"already here")
    path = write_image(inbox / "a.jpg", noise_seed=5)
    content = path.read_bytes()
    moved = dispose(path, inbox, "ok", config)
    assert moved == tmp_path / "processed" / "a (1).jpg"
    assert moved.read_bytes() == content and not path.exists()
    assert (tmp_path / "processed" / "a.jpg").read_bytes() == b"already here"
    assert sorted(p.name for p in (tmp_path / "processed").iterdir()) == ["a (1).jpg", "a.jpg"]


def test_link_unlink_fallback_when_renameat2_is_missing(inbox: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: renameat2 exists on this kernel; filesystems and libcs without it take link + unlink.
    monkeypatch.setattr(disposition, "_renameat2", None)
    config = make_config(tmp_path)
    for seed in range(2):
        dispose(write_image(inbox / "a.jpg", noise_seed=seed), inbox, "ok", config)
    assert sorted(p.name for p in (tmp_path / "processed").iterdir()) == ["a (1).jpg", "a.jpg"]
    assert not (inbox / "a.jpg").exists()


def test_unwritable_destination_keeps_the_source(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    (tmp_path / "processed").mkdir()
    with unwritable(tmp_path / "processed"):
        path = write_image(inbox / "sub" / "a.jpg")
        with pytest.raises(DispositionError) as caught:
            dispose(path, inbox, "ok", config)
        assert caught.value.errno in (errno.EACCES, errno.EPERM)
        assert "sub" in str(caught.value) and "processed" in str(caught.value)
        assert path.exists() and isinstance(caught.value, OSError)
    # Once the fault clears, the same call succeeds.
    assert dispose(path, inbox, "ok", config) == tmp_path / "processed" / "sub" / "a.jpg"


def test_destination_blocked_by_a_file_keeps_the_source(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    (tmp_path / "processed").write_bytes(b"a file where the folder should be")
    path = write_image(inbox / "a.jpg")
    with pytest.raises(DispositionError, match="cannot create folder"):
        dispose(path, inbox, "ok", config)
    assert path.exists()


def test_a_destination_folder_removed_meanwhile_is_made_again(inbox: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder is made when a move finds it missing, not before every move: the first file into a
    folder, and the first after someone removed processed/ while the worker runs. (The real _make_folder
    runs; the wrapper only counts its calls.)"""
    made: list[Path] = []
    real = disposition._make_folder
    monkeypatch.setattr(disposition, "_make_folder", lambda folder, rel: (made.append(folder), real(folder, rel)))
    config = make_config(tmp_path)
    first = dispose(write_image(inbox / "a.jpg", noise_seed=1), inbox, "ok", config)
    assert first == tmp_path / "processed" / "a.jpg" and made == [tmp_path / "processed"]
    dispose(write_image(inbox / "c.jpg", noise_seed=4), inbox, "ok", config)
    assert len(made) == 1  # the folder is there: no mkdir
    shutil.rmtree(tmp_path / "processed")
    path = write_image(inbox / "sub" / "b.jpg", noise_seed=2)
    content = path.read_bytes()
    assert dispose(path, inbox, "ok", config) == tmp_path / "processed" / "sub" / "b.jpg"
    assert (tmp_path / "processed" / "sub" / "b.jpg").read_bytes() == content and not path.exists()
    assert made[1:] == [tmp_path / "processed" / "sub"]
    again = dispose(write_image(inbox / "sub" / "b.jpg", noise_seed=3), inbox, "ok", config)
    assert again == tmp_path / "processed" / "sub" / "b (1).jpg"  # the folder there: no clobbering either
    assert len(made) == 2


def test_vanished_source_raises(inbox: Path, tmp_path: Path) -> None:
    with pytest.raises(DispositionError) as caught:
        dispose(inbox / "gone.jpg", inbox, "ok", make_config(tmp_path))
    assert caught.value.errno == errno.ENOENT


def test_prune_empty_dirs(inbox: Path, tmp_path: Path) -> None:
    (inbox / "old" / "older").mkdir(parents=True)
    (inbox / "new").mkdir()
    (inbox / "kept").mkdir()
    write_image(inbox / "kept" / "a.jpg")
    (inbox / "processed" / "x").mkdir(parents=True)
    for folder in (inbox / "old" / "older", inbox / "old", inbox / "kept", inbox / "processed" / "x"):
        age(folder, 600)
    removed = prune_empty_dirs(inbox, [inbox / "processed"], min_age_s=60)
    assert removed == 1  # old/older; old's mtime just changed, it goes on the next pass
    assert not (inbox / "old" / "older").exists()
    assert (inbox / "new").is_dir() and (inbox / "kept" / "a.jpg").exists()
    assert (inbox / "processed" / "x").is_dir()
    age(inbox / "old", 600)
    assert prune_empty_dirs(inbox, [inbox / "processed"], min_age_s=60) == 1
    assert not (inbox / "old").exists() and inbox.is_dir()


# The file must still be the one that was read ------------------------------------------------------------
def read_identity(path: Path) -> tuple[int, int, int, int]:
    return identity(os.lstat(path))


def _photo_as_read(inbox: Path) -> tuple[Path, bytes, tuple[int, int, int, int]]:
    """An inbox photo as the worker read it: its path, its bytes, and its identity at the read."""
    path = write_image(inbox / "photo.jpg", noise_seed=1)
    return path, path.read_bytes(), read_identity(path)


def _touch(path: Path) -> None:
    """What `touch` does to a file: a later mtime, nothing else."""
    mtime = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(mtime, mtime))


@pytest.mark.parametrize("action", ["move", "delete"])
def test_a_file_replaced_since_it_was_read_is_left_alone(inbox: Path, tmp_path: Path, action: str) -> None:
    config = make_config(tmp_path, files__on_success=action)
    path = write_image(inbox / "photo.jpg", (200, 0, 0), noise_seed=1)
    read_as = read_identity(path)
    newer = write_image(tmp_path / "upload.jpg", (0, 0, 200), noise_seed=2)
    os.rename(newer, path)  # the same name uploaded again, after the first was read
    content = path.read_bytes()
    with pytest.raises(FileChanged, match=r"'photo\.jpg' was replaced or rewritten since it was read") as caught:
        dispose(path, inbox, "ok", config, expect=read_as)
    assert caught.value.replaced and caught.value.errno == errno.ESTALE
    assert path.read_bytes() == content and not (tmp_path / "processed").exists()


def test_a_file_rewritten_in_place_since_it_was_read_is_left_alone(inbox: Path, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    path = write_image(inbox / "photo.jpg", noise_seed=1)
    read_as = read_identity(path)
    with open(path, "ab") as handle:  # "close, then reopen to append": the rest arrives after the read
        handle.write(b"more")
    with pytest.raises(FileChanged) as caught:
        dispose(path, inbox, "ok", config, expect=read_as)
    assert caught.value.replaced and path.exists()


@pytest.mark.parametrize("action", ["move", "delete", "leave"])
def test_a_file_only_touched_since_it_was_read_is_still_the_one_read(inbox: Path, tmp_path: Path,
                                                                      action: str) -> None:
    """`touch` (or a sync tool setting times) changes the mtime alone: the bytes hash as read, so the file
    is disposed of under its row, not taken for a rewrite that needs a row of its own."""
    config = make_config(tmp_path, files__on_success=action)
    path, content, read_as = _photo_as_read(inbox)
    _touch(path)
    where = dispose(path, inbox, "ok", config, expect=read_as, sha256=hashlib.sha256(content).hexdigest())
    if action == "move":
        assert where == tmp_path / "processed" / "photo.jpg" and where.read_bytes() == content
    elif action == "delete":
        assert where is None
    else:
        assert where == path
    assert path.exists() is (action == "leave")
    # Without the hash of what was read, a changed mtime is a rewrite, as before.
    if action == "leave":
        with pytest.raises(FileChanged):
            dispose(path, inbox, "ok", config, expect=read_as)


@pytest.mark.parametrize("action", ["move", "leave"])
def test_a_file_rewritten_with_other_bytes_of_the_same_size_is_left_alone(inbox: Path, tmp_path: Path,
                                                                          action: str) -> None:
    config = make_config(tmp_path, files__on_success=action)
    path, content, read_as = _photo_as_read(inbox)
    with open(path, "r+b") as handle:  # same inode, same size, other bytes
        handle.seek(len(content) // 2)
        handle.write(bytes(b ^ 0xFF for b in content[len(content) // 2:][:16]))
    os.utime(path, ns=(read_as[3], read_as[3] + 1_000_000_000))
    assert read_identity(path)[:3] == read_as[:3]
    rewritten = path.read_bytes()
    with pytest.raises(FileChanged) as caught:
        dispose(path, inbox, "ok", config, expect=read_as, sha256=hashlib.sha256(content).hexdigest())
    assert caught.value.replaced and path.read_bytes() == rewritten
    assert not (tmp_path / "processed").exists()


@pytest.mark.parametrize("action", ["move", "delete"])
def test_a_folder_swapped_for_a_symlink_cannot_send_a_move_or_delete_outside(
        inbox: Path, tmp_path: Path, action: str) -> None:
    config = make_config(tmp_path, files__on_success=action)
    path = write_image(inbox / "sub" / "victim.jpg", noise_seed=3)
    read_as = read_identity(path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.jpg").write_text("not yours")
    os.rename(inbox / "sub", inbox / "sub2")  # after the read, the folder is swapped for a symlink
    os.symlink(outside, inbox / "sub")
    for expect in (read_as, None):  # with or without the identity: the symlink is never followed
        with pytest.raises(FileChanged, match=r"'sub/victim\.jpg' is no longer there since it was read") as caught:
            dispose(path, inbox, "ok", config, expect=expect)
        assert not caught.value.replaced and caught.value.errno == errno.ENOENT
    assert (outside / "victim.jpg").read_text() == "not yours"
    assert (inbox / "sub2" / "victim.jpg").exists() and not (tmp_path / "processed").exists()


def test_a_file_swapped_in_during_the_move_is_put_back(inbox: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The swap is real; only its moment is arranged (a hook on the rename, the one thing not real here),
    # since landing it between the identity check and the rename by chance would take millions of tries.
    config = make_config(tmp_path)
    path = write_image(inbox / "photo.jpg", (200, 0, 0), noise_seed=1)
    read_as = read_identity(path)
    newer = write_image(tmp_path / "upload.jpg", (0, 0, 200), noise_seed=2)
    content = newer.read_bytes()
    real = disposition._rename_noreplace

    def swap_then_rename(src: Path | str, dst: Path | str, src_dir_fd: int | None = None,
                         dst_dir_fd: int | None = None) -> None:
        if src_dir_fd is not None and newer.exists():
            os.rename(newer, path)
        real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(disposition, "_rename_noreplace", swap_then_rename)
    with pytest.raises(FileChanged) as caught:
        dispose(path, inbox, "ok", config, expect=read_as)
    assert caught.value.replaced
    assert path.read_bytes() == content  # the new upload is back under its name, for its own row
    assert list((tmp_path / "processed").iterdir()) == []


def test_across_filesystems_a_replaced_file_is_not_copied(inbox: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path)
    path = write_image(inbox / "photo.jpg", noise_seed=1)
    read_as = read_identity(path)
    newer = write_image(tmp_path / "upload.jpg", noise_seed=2)
    real = disposition._rename_noreplace

    def swap_then_cross_device(src: Path | str, dst: Path, src_dir_fd: int | None = None) -> None:
        if src_dir_fd is not None:  # simulated EXDEV, as in test_exdev_fallback_simulated, after a real swap
            os.rename(newer, path)
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real(src, dst)

    monkeypatch.setattr(disposition, "_rename_noreplace", swap_then_cross_device)
    with pytest.raises(FileChanged):
        dispose(path, inbox, "ok", config, expect=read_as)
    assert read_identity(path) != read_as  # the new upload is still in the inbox...
    assert list((tmp_path / "processed").iterdir()) == []  # ...and nothing was copied, no temp file left


def moves_cross_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The move out of the inbox fails with EXDEV, as in test_exdev_fallback_simulated; the copy path's own
    rename (temp -> final, same folder, plain paths) stays real."""
    real_rename = disposition._rename_noreplace

    def cross_device(src: Path | str, dst: Path, src_dir_fd: int | None = None) -> None:
        if src_dir_fd is not None:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_rename(src, dst)

    monkeypatch.setattr(disposition, "_rename_noreplace", cross_device)


def test_across_filesystems_a_file_replaced_after_its_copy_keeps_the_copy(
        inbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The copy of the file read has landed; then the inbox name gets a new upload (a real swap, timed by a
    # hook on the folder sync that follows the copy). The copy is the only one left of the file read: kept.
    config = make_config(tmp_path)
    path = write_image(inbox / "photo.jpg", (200, 0, 0), noise_seed=1)
    original = path.read_bytes()
    read_as = read_identity(path)
    newer = write_image(tmp_path / "upload.jpg", (0, 0, 200), noise_seed=2)
    upload = newer.read_bytes()
    real_sync = disposition._fsync_dir
    moves_cross_devices(monkeypatch)

    def swap_then_sync(directory: Path) -> None:
        os.rename(newer, path)
        real_sync(directory)

    monkeypatch.setattr(disposition, "_fsync_dir", swap_then_sync)
    with pytest.raises(FileChanged) as caught:
        dispose(path, inbox, "ok", config, expect=read_as)
    assert caught.value.replaced and caught.value.copied_to == tmp_path / "processed" / "photo.jpg"
    assert caught.value.copied_to.read_bytes() == original and path.read_bytes() == upload
    assert [p.name for p in (tmp_path / "processed").iterdir()] == ["photo.jpg"]  # no temp file left


def test_a_file_touched_between_the_check_and_the_rename_is_moved(inbox: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The touch is real; only its moment is arranged (a hook on the rename), as in the swap test above.
    config = make_config(tmp_path)
    path, content, read_as = _photo_as_read(inbox)
    real = disposition._rename_noreplace

    def touch_then_rename(src: Path | str, dst: Path | str, src_dir_fd: int | None = None,
                          dst_dir_fd: int | None = None) -> None:
        if src_dir_fd is not None:
            _touch(path)
        real(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(disposition, "_rename_noreplace", touch_then_rename)
    moved = dispose(path, inbox, "ok", config, expect=read_as, sha256=hashlib.sha256(content).hexdigest())
    assert moved == tmp_path / "processed" / "photo.jpg" and moved.read_bytes() == content
    assert not path.exists()


def test_across_filesystems_a_file_touched_during_its_copy_is_moved(inbox: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Touched after the copy landed (timed by a hook on the folder sync, as in the test above): the inbox
    # name still holds the bytes read, so the move completes instead of leaving it for a second row.
    config = make_config(tmp_path)
    path, content, read_as = _photo_as_read(inbox)
    real_sync = disposition._fsync_dir
    moves_cross_devices(monkeypatch)

    def touch_then_sync(directory: Path) -> None:
        if path.exists():
            _touch(path)
        real_sync(directory)

    monkeypatch.setattr(disposition, "_fsync_dir", touch_then_sync)
    moved = dispose(path, inbox, "ok", config, expect=read_as, sha256=hashlib.sha256(content).hexdigest())
    assert moved == tmp_path / "processed" / "photo.jpg" and moved.read_bytes() == content
    assert not path.exists() and [p.name for p in (tmp_path / "processed").iterdir()] == ["photo.jpg"]


@pytest.mark.parametrize("raw", [b"caf\xe9.jpg", b"\xff" * 250 + b".jpg"])
def test_a_name_that_is_not_utf8_gets_a_numbered_name_on_a_clash(inbox: Path, tmp_path: Path, raw: bytes) -> None:
    # A Latin-1 upload's name arrives as surrogate escapes; counting or cutting it with str.encode raised
    # UnicodeEncodeError on any clash (and on every move across filesystems), which took its whole batch's
    # disposal down with a traceback.
    config = make_config(tmp_path)
    name = os.fsdecode(raw)
    contents = []
    for seed in range(2):
        path = write_image(inbox / name, fmt="JPEG", noise_seed=seed)
        contents.append(path.read_bytes())
        dispose(path, inbox, "ok", config)
    moved = sorted(os.listdir(os.fsencode(tmp_path / "processed")))
    stem = raw[:-4] if len(raw) < 200 else raw[: 255 - len(b" (1).jpg")]
    assert moved == sorted([raw, stem + b" (1).jpg"])
    assert [(tmp_path / "processed" / os.fsdecode(n)).read_bytes() for n in (raw, stem + b" (1).jpg")] == contents
