"""Plumbing of the streamed converters: units of work on a few threads with bounded memory,
readahead into the page cache, recycled big buffers, and a byte-counting progress bar.

Copies and transposes drop the GIL, so a few threads keep the disk streaming; memory stays a
small multiple of the largest unit whatever the model's size."""

from __future__ import annotations

import collections
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

# Threads converting units at once; each holds a unit's source and destination mapped and maybe a
# buffer or two, so memory grows with it. URM_CONVERT_THREADS overrides (e.g. 1 on a busy host).
WORKERS = int(os.environ.get("URM_CONVERT_THREADS") or min(4, os.cpu_count() or 1))


def ordered_map(fn: Callable, items: Iterable, workers: int = WORKERS) -> Iterator:
    """`map(fn, items)` on `workers` threads, results in order, at most workers + 1 items started
    and not yet consumed (so memory stays bounded). An error cancels what has not started and is
    raised once the running items finish (they may write into a temporary directory)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def readahead(units: list, prefetch: Callable, ahead: int = 2) -> Iterator:
    """Yield `units`, calling `prefetch` on the unit `ahead` places further as each is handed
    out: the kernel reads the next inputs into the page cache while threads work on this one,
    so the disk streams the way it does for `cp`."""
    for unit in units[:ahead]:
        prefetch(unit)
    for i, unit in enumerate(units):
        if i + ahead < len(units):
            prefetch(units[i + ahead])
        yield unit


class BufferPool:
    """Recycled big buffers. A fresh 100 MB numpy array costs more to fault in (the kernel zeroes
    every page) than to fill from disk: profiling from_hf showed 40% of its CPU there. Units take
    their read and transpose buffers here and give them back when the data is written; the pool
    holds at most what was in flight at once."""

    def __init__(self):
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape, dtype) -> np.ndarray:
        """An uninitialised array of `shape` and `dtype`: a view of the smallest free pooled block of at
        least its byte size, else of a fresh uint8 block. Hand it back with `give`."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        with self._lock:  # the smallest free block that fits (by identity: no array ==)
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            best = min(fits, key=lambda i: self._free[i].nbytes, default=None)
            block = None if best is None else self._free.pop(best)
        if block is None:
            block = np.empty(max(nbytes, 1), np.uint8)
        return block[:nbytes].view(dtype).reshape(shape)

    def give(self, *arrays: np.ndarray) -> None:
        """Return buffers from `take` (arrays not from the pool are ignored)."""
        with self._lock:
            for array in arrays:
                block = array.base
                if (isinstance(block, np.ndarray) and block.dtype == np.uint8 and block.ndim == 1
                        and block.flags.owndata and all(b is not block for b in self._free)):
                    self._free.append(block)


class Progress:
    """A tqdm bar in bytes (so it shows MB/s) with a tensors counter."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool):
        self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=not enabled, file=sys.stderr, dynamic_ncols=True)
        self.tensors, self.total, self.enabled = 0.0, total_tensors, enabled

    def update(self, nbytes: int, tensors: float) -> None:
        """Advance by `nbytes` bytes and `tensors` HF tensors (a fraction for part of an unstacked one)."""
        self.tensors += tensors
        self.bar.set_postfix_str(f"{round(self.tensors)}/{self.total} tensors", refresh=False)
        self.bar.update(nbytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Closed and released here, so tqdm's finalizer runs now (before the caller renames its
        # output into place), not at some later garbage collection; a Ctrl-C landing inside
        # that finalizer is swallowed by Python and raised again by `signals.SigtermRaiser`.
        bar, self.bar = self.bar, None
        try:
            bar.close()
        except BaseException:  # Ctrl-C mid-close: end the bar's line, so the error line is whole
            if self.enabled:
                sys.stderr.write("\n")
            raise
        del bar



def pooled(pool: BufferPool, fn: Callable) -> Callable:
    """fn(unit, alloc) with buffers taken from `pool` for the call and given back after it."""
    def run(unit):
        taken: list[np.ndarray] = []

        def alloc(shape, dtype):
            taken.append(pool.take(shape, dtype))
            return taken[-1]
        try:
            return fn(unit, alloc)
        finally:
            pool.give(*taken)
    return run
