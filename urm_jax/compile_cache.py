"""Compile once: JAX's persistent compilation cache, on by default, and a compile-time meter.

Every `urm-jax` command turns the cache on (`enable`) before its first compile, so a second
`urm-jax score` of the same model, a resumed training run or a restarted server loads its
programs from disk instead of compiling them again. The cache lives under the user's cache
directory (`$XDG_CACHE_HOME/urm-jax/jax-compilation-cache`, else
`~/.cache/urm-jax/jax-compilation-cache`); `URM_JAX_COMPILATION_CACHE=DIR` moves it and
`URM_JAX_COMPILATION_CACHE=off` turns it off. It is bounded (`URM_JAX_COMPILATION_CACHE_GB`,
default 8, JAX's entries and `stored_jit`'s programs together) with least-recently-used
eviction, which also makes JAX take a file lock around every read and write: several processes (hosts of a job sharing a directory, parallel scoring jobs)
can use one cache safely. The cache is optional: a directory that cannot be created, written or
read is reported in one `warning:` line naming it and `URM_JAX_COMPILATION_CACHE`, and the
command runs without a cache; an entry that cannot be read or written later only costs a
recompile (`entry_warning` turns JAX's repeated warnings into that one line).

JAX's cache still traces and lowers every program before it can look it up (its key is a hash of
the lowered module): for a training step or a scoring forward that is most of a warm start.
`stored_jit` skips both: it saves each compiled program whole (`jax.experimental.
serialize_executable`) under a key computed without tracing (the caller's description of the
function, the argument shapes/dtypes/shardings, the urm-jax sources, library versions, devices,
XLA flags and JAX's tracing configuration), in `programs/` of the cache directory, and a warm
start loads it directly. Single-process runs only (a multi-host job uses JAX's cache alone).
Loading a program runs native code from the cache directory, as JAX's own cache does: the cache
belongs to the user, and `URM_JAX_COMPILATION_CACHE=off` turns both off.

JAX's bounded cache is not crash-safe: it writes `<key>-cache`, then `<key>-atime`, and before
every write it reads the `-atime` of every entry to pick what to evict. A write cut short
(a kill, a full disk, a file-size limit) leaves a `-cache` (often truncated) without its `-atime`,
and from then on every write of every process using the cache fails with `UserWarning: Error
writing persistent compilation cache entry ... FileNotFoundError ...-atime`, so nothing new is
cached. (It is not two processes racing: JAX writes only from process 0 of a job and takes the
cache's file lock around every read and write.) `enable` therefore removes such half-written
entries first (`repair`), under the same lock.

`CompileMeter` adds up the time JAX spends tracing, lowering and compiling, and loading or saving
programs from either cache, per phase (and counts programs served from the caches) while it is
active, so logs and benchmarks report compile time apart from run time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import math
import os
import pickle
import pkgutil
import re
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import filelock
import jax
from jax._src import config as jax_config  # trace_context: the config values tracing reads
from jax.experimental import serialize_executable

from urm_jax.io_utils import atomic_file

ENV_DIR = "URM_JAX_COMPILATION_CACHE"
ENV_SIZE_GB = "URM_JAX_COMPILATION_CACHE_GB"
ENV_MIN_SECONDS = "URM_JAX_COMPILATION_CACHE_MIN_SECONDS"
OFF = ("off", "0", "false", "no", "none")
DEFAULT_SIZE_GB = 8.0
# Programs that compile faster than this are not worth a disk round trip (JAX's default is 1 s;
# the small scoring shapes of a tiny model compile in ~0.1-0.5 s and are still worth keeping).
MIN_COMPILE_SECONDS = 0.1
PROGRAMS = "programs"  # stored_jit's subdirectory of the cache directory
_FORMAT = b"urm-jax program 1\n"

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"  # XLA compile, or JAX's cache key + read
_JAX_CACHE_READ = "/jax/compilation_cache/cache_retrieval_time_sec"  # within _BACKEND, on a hit
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_JAX_CACHE_MISS = "/jax/compilation_cache/cache_misses"
STORE_LOAD = "/urm_jax/program_store/load_duration"  # a program loaded whole by stored_jit
STORE_SAVE = "/urm_jax/program_store/save_duration"  # a compiled program serialised and written
logger = logging.getLogger("urm_jax.compile_cache")
_max_bytes = int(DEFAULT_SIZE_GB * 1e9)
# JAX's own words (jax/_src/compiler.py) when one cache entry cannot be read or written: a
# UserWarning per entry, with JAX's source line; commands show the first as one line.
ENTRY_ERROR = re.compile(r"Error (reading|writing) persistent compilation cache entry for ")
TOO_LARGE = re.compile(r"Cache value for key .* exceeds the maximum cache size of ")
# JAX's LRU cache layout (jax/_src/lru_cache.py): `<key>-cache` + `<key>-atime`, and the file
# lock it takes around every read, write and eviction.
_CACHE_SUFFIX, _ATIME_SUFFIX, _LOCK_FILE = "-cache", "-atime", ".lockfile"
REPAIR_LOCK_TIMEOUT_S = 60.0


def default_dir() -> Path:
    """Where the cache goes when `URM_JAX_COMPILATION_CACHE` does not say."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "urm-jax" / "jax-compilation-cache"


def gpu_plugin_installed() -> bool:
    """Whether a JAX GPU backend (a CUDA or ROCm plugin) is installed; found without starting
    any backend (enable runs before `jax.distributed.initialize`)."""
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(m.name.startswith(("xla_cuda", "xla_rocm")) for m in pkgutil.iter_modules(jax_plugins.__path__))


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
    repair(directory)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # URM_JAX_COMPILATION_CACHE_MIN_SECONDS=0 caches every program whatever its compile time
    # (tests that count cache misses must not depend on how fast a loaded machine compiles).
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get(ENV_MIN_SECONDS, MIN_COMPILE_SECONDS)))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # A program stored_jit keeps is in JAX's own cache too (JAX writes every program it compiles;
    # it has no per-call switch), so the two stores split the bound and the directory as a whole
    # stays within URM_JAX_COMPILATION_CACHE_GB: half each, each least-recently-used first.
    jax.config.update("jax_compilation_cache_max_size", int(size_gb * 1e9 / 2))
    if not gpu_plugin_installed():
        # JAX's default points XLA's GPU autotuning cache into this directory through the compile
        # options, which are part of every entry's key: the entries' keys would name the path, and
        # a cache restored elsewhere (CI, another mount point, another user) would miss them all.
        # Without a GPU backend the option only does that.
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    global _max_bytes
    _max_bytes = int(size_gb * 1e9 / 2)
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
    if TOO_LARGE.match(message):  # JAX's LRU refuses an entry over its half of the bound
        return (f"compiled programs larger than the compilation cache's bound are not cached (JAX: "
                f"{message.split(' of size ', 1)[-1]}); raise {ENV_SIZE_GB}")
    if not ENTRY_ERROR.match(message):
        return None
    detail = message.split("': ", 1)[-1].strip().splitlines()[0]
    return (f"the compilation cache {jax.config.jax_compilation_cache_dir} cannot be used ({detail}); "
            f"programs compile without it; set {ENV_DIR} to a writable directory (or off)")
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
    """Where compile time went, in seconds: tracing Python to a jaxpr, lowering it to StableHLO,
    XLA compiling (programs no cache had), loading programs from a cache (JAX's: key + read +
    deserialise; `stored_jit`'s: read + deserialise, with no trace or lowering before it) and
    saving programs to `stored_jit`'s store. `compiles`: programs XLA compiled; `cache_hits`:
    programs loaded from either cache; `cache_misses`: lookups in JAX's cache that found nothing."""

    trace: float = 0.0
    lower: float = 0.0
    xla: float = 0.0
    load: float = 0.0
    save: float = 0.0
    compiles: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def seconds(self) -> float:
        """Everything above: the time a run spent before its programs could run."""
        return self.trace + self.lower + self.xla + self.load + self.save

    def phases(self) -> dict[str, float]:
        """Seconds per phase (JSON-ready)."""
        return {"trace": self.trace, "lower": self.lower, "xla": self.xla, "load": self.load,
                "save": self.save}

    def describe(self) -> str:
        """One phrase for logs: 'compile 12.3 s (4 programs, 2 from the cache)'."""
        hits = f", {self.cache_hits} from the cache" if self.cache_hits else ""
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.phases().items() if v >= 0.05)
        return (f"compile {self.seconds:.1f} s ({self.compiles + self.cache_hits} programs{hits}"
                f"{f'; {parts}' if parts else ''})")


class CompileMeter:
    """Adds up JAX's compile-time events and `stored_jit`'s loads and saves (all threads) per
    phase while active; use as a context manager or call `start`/`stop`. `totals` is readable
    at any time."""

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
        for meter in list(cls._active):
            t = meter.totals
            if name == _TRACE:
                t.trace += seconds
            elif name == _LOWER:
                t.lower += seconds
            elif name == _BACKEND:  # a JAX cache hit's read was reported (as load) before
                t.xla += seconds
                t.compiles += 1
            elif name == _JAX_CACHE_READ:
                t.load += seconds
                t.xla -= seconds
            elif name == STORE_LOAD:
                t.load += seconds
                t.cache_hits += 1
            elif name == STORE_SAVE:
                t.save += seconds

    @classmethod
    def _on_event(cls, name: str, **_) -> None:
        for meter in list(cls._active):
            if name == _JAX_CACHE_HIT:
                meter.totals.cache_hits += 1
                meter.totals.compiles -= 1  # the backend event that follows counts it back
            elif name == _JAX_CACHE_MISS:
                meter.totals.cache_misses += 1
    def start(self) -> "CompileMeter":
        """Count compile events from now on (JAX monitoring listeners, installed once); returns self."""
        self._install()
        with self._lock:
            if self not in self._active:  # starting an active meter again counts nothing twice
                self._active.append(self)
        return self

    def stop(self) -> CompileTotals:
        """Stop counting (idempotent); returns the totals so far."""
        with self._lock:
            if self in self._active:
                self._active.remove(self)
        return self.totals

    def __enter__(self) -> "CompileMeter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- whole programs, loaded without tracing ----------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_memo: dict[tuple, Any] = {}  # (key, static args, argument signature) -> Compiled, this process
_memo_lock = threading.Lock()
_environment: str | None = None


_jax_cache_served = threading.local()  # programs JAX's cache served in this thread
_hit_counter_installed = False


def _count_jax_cache_hit(name: str, **_) -> None:
    if name == _JAX_CACHE_HIT:
        _jax_cache_served.count = getattr(_jax_cache_served, "count", 0) + 1


def _install_hit_counter() -> None:
    global _hit_counter_installed
    with CompileMeter._lock:
        if not _hit_counter_installed:
            jax.monitoring.register_event_listener(_count_jax_cache_hit)
            _hit_counter_installed = True


def program_dir() -> Path | None:
    """Where `stored_jit` keeps programs: `programs/` of the enabled cache directory; None when
    the cache is off or the job has several processes (then JAX's cache alone serves)."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory or jax.process_count() > 1:
        return None
    return Path(directory) / PROGRAMS


def _sources_digest() -> str:
    """sha256 of every urm-jax source file: any change to the code that is traced makes every
    stored program stale."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _environment_key() -> str:
    """What every program depends on besides its own description, once per process: library
    versions, the urm-jax sources, the backend and its devices, XLA flags."""
    global _environment
    if _environment is None:
        versions = []
        for package in ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes"):
            try:
                versions.append((package, importlib.metadata.version(package)))
            except importlib.metadata.PackageNotFoundError:
                versions.append((package, None))
        backend = jax.devices()[0].client
        devices = [(d.id, d.device_kind, d.process_index) for d in jax.devices()]
        flags = [(k, os.environ.get(k)) for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")]
        _environment = repr((_FORMAT, versions, _sources_digest(), backend.platform,
                             backend.platform_version, devices, flags))
    return _environment


def stable_repr(value) -> str:
    """repr(value) for a cache key; ValueError when it holds an object address (a repr that
    differs run to run would never hit, and would not say what the object is)."""
    text = repr(value)
    if _ADDRESS.search(text):
        raise ValueError(f"not a stable key (an object address in its repr): {text[:200]}")
    return text


def _sharding_key(sharding) -> tuple:
    assignment = getattr(sharding, "_device_assignment", ())
    return repr(sharding), tuple(d.id for d in assignment)


def _leaf_signature(x) -> tuple:
    sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
    return (tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
            bool(getattr(x, "weak_type", False)), sharding)


def _evict(directory: Path, limit: int) -> None:
    """Remove the least recently used programs until the store holds at most `limit` bytes."""
    entries = []
    for path in directory.glob("*.program"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed by another process
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        path.unlink(missing_ok=True)
        total -= size


class StoredJit:
    """A jitted function whose compiled programs are stored whole (see `stored_jit`)."""

    def __init__(self, jitted, name: str, key, static_argnums: tuple[int, ...]):
        self.jitted, self.name, self.static_argnums = jitted, name, tuple(static_argnums)
        self.key = stable_repr(key)
        self.__wrapped__ = jitted
        _install_hit_counter()

    def __call__(self, *args):
        """Run the function: a stored program for these argument shapes/dtypes/shardings when one
        exists, else trace + compile (and store) it; returns what the jitted function returns."""
        static = tuple(args[i] for i in self.static_argnums)
        dynamic = tuple(a for i, a in enumerate(args) if i not in self.static_argnums)
        leaves, treedef = jax.tree.flatten(dynamic)
        context = _ADDRESS.sub("", repr(jax_config.trace_context()))
        memo_key = (self.key, static, treedef, tuple(_leaf_signature(x) for x in leaves), context)
        compiled = _memo.get(memo_key)
        if compiled is None:
            with _memo_lock:
                compiled = _memo.get(memo_key)
                if compiled is None:
                    compiled = _memo[memo_key] = self._load_or_compile(args, static, treedef, leaves,
                                                                       context)
        return compiled(*dynamic)

    def _path(self, directory: Path, static, treedef, leaves, context) -> Path:
        signature = [(s, d, w, _sharding_key(sh) if sh is not None else None) for s, d, w, sh in
                     (_leaf_signature(x) for x in leaves)]
        text = "\0".join([_environment_key(), self.name, self.key, stable_repr(static),
                          str(treedef), repr(signature), context])
        return directory / f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()}.program"

    def _load_or_compile(self, args, static, treedef, leaves, context):
        directory = program_dir()
        try:
            path = None if directory is None else self._path(directory, static, treedef, leaves, context)
        except ValueError as err:  # an unstable static argument: JAX's cache still serves
            logger.debug("%s: not stored: %s", self.name, err)
            path = None
        if path is not None and path.exists():
            started = time.perf_counter()
            try:
                data = path.read_bytes()
                if not data.startswith(_FORMAT):
                    raise ValueError("not a urm-jax program file")
                payload, in_tree, out_tree = pickle.loads(data[len(_FORMAT):])
                compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            except Exception as err:  # noqa: BLE001 - any unreadable entry only costs a compile
                warnings.warn(f"{path}: unreadable stored program ({type(err).__name__}: {err}); "
                              "compiling it again")
                path.unlink(missing_ok=True)
            else:
                os.utime(path)  # recently used: evicted last
                jax.monitoring.record_event_duration_secs(STORE_LOAD, time.perf_counter() - started)
                return compiled
        served_before = getattr(_jax_cache_served, "count", 0)
        compiled = self.jitted.lower(*args).compile()
        # An XLA:CPU executable that JAX's cache deserialised does not serialise again whole (the
        # copy fails at run time: "Function ... not found"): store only what XLA compiled here.
        if path is not None and getattr(_jax_cache_served, "count", 0) == served_before:
            self._save(compiled, path)
        return compiled

    def _save(self, compiled, path: Path) -> None:
        started = time.perf_counter()
        try:
            payload, in_tree, out_tree = serialize_executable.serialize(compiled)
            data = _FORMAT + pickle.dumps((payload, in_tree, out_tree), protocol=pickle.HIGHEST_PROTOCOL)
            with atomic_file(path, "wb") as handle:  # readers see a whole file or none
                handle.write(data)
            _evict(path.parent, _max_bytes)
        except Exception as err:  # noqa: BLE001 - a program that cannot be stored still runs
            logger.warning("%s: could not store the compiled program in %s (%s: %s)", self.name,
                           path.parent, type(err).__name__, err)
        jax.monitoring.record_event_duration_secs(STORE_SAVE, time.perf_counter() - started)


def stored_jit(jitted, *, name: str, key, static_argnums: tuple[int, ...] = ()) -> Callable:
    """`jitted` (a `jax.jit` function), with each compiled program also stored whole in the
    cache directory, so a later process with the same key loads it without tracing or lowering.

    ``key``: a value whose repr (free of object addresses, else ValueError) describes everything
    the traced function reads besides its arguments: its configuration, closed-over settings,
    the mesh and sharding rules active while it traces. The stored program is found by that,
    ``name``, the static arguments' reprs, every dynamic argument's shape, dtype, weak type and
    sharding (with device ids), JAX's tracing configuration, the urm-jax sources and the versions
    of jax, jaxlib, flax, optax, numpy, the backend, devices and XLA flags. ``static_argnums``
    must match `jitted`'s. Calls take the same arguments as `jitted`; keyword arguments are not
    supported. Without an enabled cache, or with several processes, this is `jitted` itself."""
    if program_dir() is None:
        return jitted
    try:
        return StoredJit(jitted, name, key, static_argnums)
    except ValueError as err:  # an unstable key would never hit: JAX's cache alone serves
        logger.warning("%s: compiled programs not stored: %s", name, err)
        return jitted
