"""Compile once: JAX's persistent compilation cache, on by default, and a compile-time meter.

Every `urm-jax` command turns the cache on (`enable`) before its first compile, so a second
`urm-jax score` of the same model, a resumed training run or a restarted server loads its
programs from disk instead of compiling them again. The cache lives under the user's cache
directory (`$XDG_CACHE_HOME/urm-jax/jax-compilation-cache`, else
`~/.cache/urm-jax/jax-compilation-cache`); `URM_JAX_COMPILATION_CACHE=DIR` moves it and
`URM_JAX_COMPILATION_CACHE=off` turns it off. It is bounded (`URM_JAX_COMPILATION_CACHE_GB`,
default 8) with least-recently-used eviction, which also makes JAX take a file lock around every
read and write: several processes (hosts of a job sharing a directory, parallel scoring jobs)
can use one cache safely. The cache is optional: a directory that cannot be created, written or
read is reported in one `warning:` line naming it and `URM_JAX_COMPILATION_CACHE`, and the
command runs without a cache; an entry that cannot be read or written later only costs a
recompile (`entry_warning` turns JAX's repeated warnings into that one line).

`CompileMeter` adds up the time JAX spends tracing, lowering and compiling (and counts programs
served from the cache) while it is active, so logs and benchmarks report compile time apart from
run time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

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
# JAX's own words (jax/_src/compiler.py) when one cache entry cannot be read or written: a
# UserWarning per entry, with JAX's source line; commands show the first as one line.
ENTRY_ERROR = re.compile(r"Error (reading|writing) persistent compilation cache entry for ")


def default_dir() -> Path:
    """Where the cache goes when `URM_JAX_COMPILATION_CACHE` does not say."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "urm-jax" / "jax-compilation-cache"


def enable(path: str | Path | None = None, *, source: str = ENV_DIR) -> Path | None:
    """Turn JAX's persistent compilation cache on at `path` (default: `URM_JAX_COMPILATION_CACHE`,
    else `default_dir()`); returns the directory, or None when turned off ('off') or when the
    directory cannot be created, written or read: then one `warning:` line on stderr names it and
    `source` (the setting that chose it) and nothing is cached. Must run before the programs to
    cache are compiled. ValueError for a size that is not a positive number."""
    setting = str(path) if path is not None else os.environ.get(ENV_DIR, "")
    if setting.strip().lower() in OFF and setting.strip():
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    size_text = os.environ.get(ENV_SIZE_GB, str(DEFAULT_SIZE_GB))
    try:
        size_gb = float(size_text)
    except ValueError:
        size_gb = -1.0
    if not (size_gb > 0 and math.isfinite(size_gb)):
        raise ValueError(f"{ENV_SIZE_GB}={size_text!r}: expected a positive number of GB")
    try:
        directory = Path(setting) if setting.strip() else default_dir()
    except RuntimeError as err:  # Path.home(): no HOME and no passwd entry
        directory, problem = None, str(err)
    else:
        problem = unusable(directory)
    if problem is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        print(f"warning: compilation cache off: {problem}; set {source} to a writable directory "
              "(or off)", file=sys.stderr, flush=True)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", int(size_gb * 1e9))
    return directory


def unusable(directory: Path) -> str | None:
    """Why the cache cannot live in `directory` (created if missing): it cannot be created, a
    file cannot be created in it, or it cannot be listed; None when it can. Checked up front so
    an unusable directory is one line, not a failed command or a warning per program."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
        os.listdir(directory)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return f"cannot use {directory} ({reason}{f': {err.filename}' if err.filename else ''})"
    return None


def entry_warning(message: str) -> str | None:
    """The one line to show for JAX's warning `message` about a cache entry it could not read or
    write (None for any other message): the directory and what to change."""
    if not ENTRY_ERROR.match(message):
        return None
    detail = message.split("': ", 1)[-1].strip().splitlines()[0]
    return (f"the compilation cache {jax.config.jax_compilation_cache_dir} cannot be used ({detail}); "
            f"programs compile without it; set {ENV_DIR} to a writable directory (or off)")


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
