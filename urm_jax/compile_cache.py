"""Compile once: JAX's persistent compilation cache, on by default, and a compile-time meter.

Every `urm-jax` command turns the cache on (`enable`) before its first compile, so a second
`urm-jax score` of the same model, a resumed training run or a restarted server loads its
programs from disk instead of compiling them again. The cache lives under the user's cache
directory (`$XDG_CACHE_HOME/urm-jax/jax-compilation-cache`, else
`~/.cache/urm-jax/jax-compilation-cache`); `URM_JAX_COMPILATION_CACHE=DIR` moves it and
`URM_JAX_COMPILATION_CACHE=off` turns it off. It is bounded (`URM_JAX_COMPILATION_CACHE_GB`,
default 8) with least-recently-used eviction, which also makes JAX take a file lock around every
read and write: several processes (hosts of a job sharing a directory, parallel scoring jobs)
can use one cache safely. A cache entry that cannot be read only costs a recompile (JAX warns).

JAX's bounded cache is not crash-safe: it writes `<key>-cache`, then `<key>-atime`, and before
every write it reads the `-atime` of every entry to pick what to evict. A write cut short
(a kill, a full disk, a file-size limit) leaves a `-cache` (often truncated) without its `-atime`,
and from then on every write of every process using the cache fails with `UserWarning: Error
writing persistent compilation cache entry ... FileNotFoundError ...-atime`, so nothing new is
cached. (It is not two processes racing: JAX writes only from process 0 of a job and takes the
cache's file lock around every read and write.) `enable` therefore removes such half-written
entries first (`repair`), under the same lock.

`CompileMeter` adds up the time JAX spends tracing, lowering and compiling (and counts programs
served from the cache) while it is active, so logs and benchmarks report compile time apart from
run time.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

import filelock
import jax

ENV_DIR = "URM_JAX_COMPILATION_CACHE"
ENV_SIZE_GB = "URM_JAX_COMPILATION_CACHE_GB"
OFF = ("off", "0", "false", "no", "none")
DEFAULT_SIZE_GB = 8.0
# Programs that compile faster than this are not worth a disk round trip (JAX's default is 1 s;
# the small scoring shapes of a tiny model compile in ~0.1-0.5 s and are still worth keeping).
MIN_COMPILE_SECONDS = 0.1

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# JAX's LRU cache layout (jax/_src/lru_cache.py): `<key>-cache` + `<key>-atime`, and the file
# lock it takes around every read, write and eviction.
_CACHE_SUFFIX, _ATIME_SUFFIX, _LOCK_FILE = "-cache", "-atime", ".lockfile"
REPAIR_LOCK_TIMEOUT_S = 60.0


def default_dir() -> Path:
    """Where the cache goes when `URM_JAX_COMPILATION_CACHE` does not say."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "urm-jax" / "jax-compilation-cache"


def enable(path: str | Path | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on at `path` (default: `URM_JAX_COMPILATION_CACHE`,
    else `default_dir()`); returns the directory, or None when turned off ('off'). Must run before
    the programs to cache are compiled. ValueError for a size that is not a positive number."""
    setting = str(path) if path is not None else os.environ.get(ENV_DIR, "")
    if setting.strip().lower() in OFF and setting.strip():
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    directory = Path(setting) if setting.strip() else default_dir()
    size_text = os.environ.get(ENV_SIZE_GB, str(DEFAULT_SIZE_GB))
    try:
        size_gb = float(size_text)
    except ValueError:
        size_gb = -1.0
    if not size_gb > 0:
        raise ValueError(f"{ENV_SIZE_GB}={size_text!r}: expected a positive number of GB")
    directory.mkdir(parents=True, exist_ok=True)
    repair(directory)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", int(size_gb * 1e9))
    return directory


def repair(directory: Path) -> list[str]:
    """Remove the half-written entries of the cache at `directory` (a `<key>-cache` without its
    `<key>-atime`, or the reverse), which would make every later write fail (see the module
    docstring). Holds JAX's lock on the cache, so an entry another process is writing right now
    is never taken for half-written; if the lock is not free within REPAIR_LOCK_TIMEOUT_S, the
    repair is left to the next command. Returns the names of the removed files."""
    try:
        with filelock.FileLock(directory / _LOCK_FILE, timeout=REPAIR_LOCK_TIMEOUT_S):
            names = {p.name for p in directory.iterdir()}
            keys = {n[:-len(s)] for n in names for s in (_CACHE_SUFFIX, _ATIME_SUFFIX) if n.endswith(s)}
            halves = sorted(key + suffix for key in keys for suffix, other in
                            ((_CACHE_SUFFIX, _ATIME_SUFFIX), (_ATIME_SUFFIX, _CACHE_SUFFIX))
                            if key + suffix in names and key + other not in names)
            for name in halves:
                (directory / name).unlink(missing_ok=True)
            return halves
    except (filelock.Timeout, OSError):  # busy, or not ours to clean: the cache only costs time
        return []


@dataclasses.dataclass
class CompileTotals:
    """Seconds spent tracing + lowering + compiling, programs compiled, programs loaded from
    the persistent cache."""

    seconds: float = 0.0
    compiles: int = 0
    cache_hits: int = 0

    def describe(self) -> str:
        hits = f", {self.cache_hits} from the cache" if self.cache_hits else ""
        return f"compile {self.seconds:.1f} s ({self.compiles} programs{hits})"


class CompileMeter:
    """Adds up JAX's compile-time events (all threads) while active; use as a context manager
    or call `start`/`stop`. `totals` is readable at any time."""

    _lock = threading.Lock()
    _active: list["CompileMeter"] = []
    _installed = False

    def __init__(self):
        self.totals = CompileTotals()

    @classmethod
    def _install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            jax.monitoring.register_event_duration_secs_listener(cls._on_duration)
            jax.monitoring.register_event_listener(cls._on_event)
            cls._installed = True

    @classmethod
    def _on_duration(cls, name: str, seconds: float, **_) -> None:
        if name in _COMPILE_EVENTS:
            for meter in list(cls._active):
                meter.totals.seconds += seconds
                meter.totals.compiles += name == _COMPILE_EVENTS[-1]

    @classmethod
    def _on_event(cls, name: str, **_) -> None:
        if name == _CACHE_HIT_EVENT:
            for meter in list(cls._active):
                meter.totals.cache_hits += 1

    def start(self) -> "CompileMeter":
        self._install()
        with self._lock:
            self._active.append(self)
        return self

    def stop(self) -> CompileTotals:
        with self._lock:
            if self in self._active:
                self._active.remove(self)
        return self.totals

    def __enter__(self) -> "CompileMeter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
