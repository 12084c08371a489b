"""Durability of the atomic outputs: everything written is flushed to disk before the rename that
makes it visible, and the rename itself is flushed after (a power cut must not leave a
complete-looking directory of empty files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from urm_jax import io_utils


@pytest.fixture
def journal(monkeypatch):
    """Record fsyncs (by the path behind the descriptor) and renames, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, Path.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self, target):
        events.append(("rename", f"{self} -> {target}"))
        return real_rename(self, target)

    def replace(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _index(events, kind, predicate):
    return [i for i, (k, what) in enumerate(events) if k == kind and predicate(what)]


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_dir_flushes_every_file_and_dir_before_the_rename(tmp_path, journal, existing):
    out = tmp_path / "export"
    if existing:
        out.mkdir()
        (out / "stale.bin").write_bytes(b"old")
    with io_utils.atomic_dir(out, overwrite=existing) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"x" * 4096)
        (tmp / "sub" / "b.json").write_text("{}")
        io_utils.create_output(tmp / "mapped.bin", 8192)
        with io_utils.mapped(tmp / "mapped.bin", 0, 8192, writable=True) as view:
            view[:] = 7
        temp_name = tmp.name

    assert sorted(p.name for p in out.rglob("*")) == ["a.bin", "b.json", "mapped.bin", "sub"]
    assert (out / "mapped.bin").read_bytes() == bytes([7]) * 8192
    publish = _index(journal, "rename", lambda w: w.startswith(str(tmp_path / temp_name)))
    assert len(publish) == 1
    tmp_root = str(tmp_path / temp_name)
    flushed = {w for i, (k, w) in enumerate(journal) if k == "fsync" and i < publish[0]}
    for rel in ("a.bin", "sub/b.json", "mapped.bin", "sub", ""):
        assert os.path.normpath(os.path.join(tmp_root, rel)) in flushed, rel
    assert _index(journal, "fsync", lambda w: w == str(tmp_path))[-1] > publish[0]


def test_atomic_file_flushes_data_then_parent(tmp_path, journal):
    target = tmp_path / "out.jsonl"
    with io_utils.atomic_file(target) as handle:
        handle.write("line\n")
    assert target.read_text() == "line\n"
    publish = _index(journal, "rename", lambda w: w.endswith(f"-> {target}"))
    assert len(publish) == 1
    assert _index(journal, "fsync", lambda w: w.startswith(str(tmp_path / ".out.jsonl.tmp-")))[0] < publish[0]
    assert _index(journal, "fsync", lambda w: w == str(tmp_path))[-1] > publish[0]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with io_utils.atomic_dir(out) as tmp:
            (tmp / "a.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_directory_fsync_unsupported_is_tolerated_file_fsync_error_is_not(tmp_path, monkeypatch):
    """A filesystem that cannot fsync directories (EINVAL, as some FUSE mounts answer) still gets
    its output; an EIO on a file's fsync fails the write, names the file and leaves nothing."""
    import errno

    real_fsync = os.fsync

    def dirs_unsupported(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", dirs_unsupported)
    with io_utils.atomic_dir(tmp_path / "ok") as tmp:
        (tmp / "a.bin").write_bytes(b"x")
    assert (tmp_path / "ok" / "a.bin").read_bytes() == b"x"

    def file_eio(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("b.bin"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", file_eio)
    with pytest.raises(OSError, match="b.bin"):
        with io_utils.atomic_dir(tmp_path / "bad") as tmp:
            (tmp / "b.bin").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_a_failed_background_fsync_fails_the_output(tmp_path, monkeypatch):
    """A big output is fsynced in the background as soon as it is written; when that fsync
    fails (EIO), Linux reports the error to no later descriptor, so the fsync before the rename
    must raise the kept error itself: the output is refused naming the file, nothing left."""
    import errno
    import time

    real_fsync, failed = os.fsync, []

    def eio_once(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("big.bin") and not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", eio_once)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="Input/output error") as caught:
        with io_utils.atomic_dir(out) as tmp:
            io_utils.create_output(tmp / "big.bin", 0, head=bytes(io_utils.EARLY_SYNC_BYTES))
            deadline = time.monotonic() + 60
            while not failed and time.monotonic() < deadline:  # the background fsync ran
                time.sleep(0.01)
            assert failed
    assert caught.value.filename.endswith("big.bin")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dangling", [False, True])
def test_overwrite_replaces_a_symlinked_output_not_its_target(tmp_path, dangling):
    """`OUT --overwrite` where OUT is a symlink: the link itself is replaced by the new output and
    the directory it pointed to is left alone (found by the stop-20 review: the rename worked,
    then removing the old link failed with 'Cannot call rmtree on a symbolic link', exit 2, and a
    hidden `.OUT.old-PID` link stayed behind)."""
    target = tmp_path / "elsewhere"
    if not dangling:
        target.mkdir()
        (target / "keep.txt").write_text("theirs")
    out = tmp_path / "out"
    out.symlink_to(target)
    with io_utils.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("ours")
    assert out.is_dir() and not out.is_symlink()
    assert (out / "new.txt").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if dangling else ["elsewhere", "out"])
    if not dangling:
        assert (target / "keep.txt").read_text() == "theirs"
