"""Atomic outputs: everything is written under a temporary sibling and renamed into place only
when complete, so an error or a kill never leaves a half-written file or directory that looks
finished. Temporary siblings are named `.NAME.tmp-HOST-PID`; one left by a killed run on this host
is removed by the next run writing the same output.

Also the one place big outputs are written from numpy (`open_output` + `write_arrays`), so a disk
error always names its file and tests can simulate a full disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np


class OutputExistsError(FileExistsError):
    pass


def _temp_sibling(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove temporary siblings of `path` left by dead processes on this host (a SIGKILL or a
    power cut cannot clean up after itself). Other hosts' temporaries are left alone: their PIDs
    mean nothing here."""
    prefix = f".{path.name}.tmp-{socket.gethostname()}-"
    removed = []
    for temp in path.parent.glob(f"{glob_escape(prefix)}*"):
        pid = temp.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(temp, ignore_errors=True) if temp.is_dir() else temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling for writing; rename over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_output(path: Path):
    """Open a new binary output file, unbuffered (big writes go straight to the kernel, and an
    error surfaces at the write, not at close). The seam tests use to simulate a full disk."""
    return open(path, "wb", buffering=0)


def write_arrays(handle, path: Path, arrays: Iterable[np.ndarray]) -> int:
    """Append arrays' bytes (C order) to an open file; returns the bytes written. An OSError
    (ENOSPC, EIO, EFBIG) is re-raised naming the file, so the one-line error says where."""
    written = 0
    try:
        for array in arrays:
            view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            written += len(view)
            while view:  # a raw write may be short (Linux caps one write at ~2 GiB)
                view = view[handle.write(view):]
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    return written
