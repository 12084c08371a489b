"""A training run's directory: one owner at a time, one configuration per run.

    checkpoints/<step>/   Orbax CheckpointManager steps (train state + data position)
    final/                the trained model as a full urm-jax checkpoint
    config.yaml           the accepted configuration (written once the run is accepted)
    metrics.jsonl, tensorboard/, loss.png, data_report.txt, feature_cache/
    .lock                 held (flock) by the process training into the directory

Ownership: `claim` takes an exclusive `flock` on `.lock`. The kernel drops it when its process
dies, however it dies, so a lock left by a killed run is never in the way (a stale lock cannot
exist), while a live run in the same directory is refused with its host and pid. On a multi-host
job only process 0 claims the directory and checks the resume; `agree` hands its verdict to every
process, so a refused job stops on every host instead of leaving the others waiting in a
collective.

A failed attempt takes back what it added: an attempt that fails (bad data found while loading,
a backend that cannot run, Ctrl-C, ...) before it has produced anything of value (a checkpoint
step, `final/`, metrics lines, a feature cache) removes the files and directories it created and
restores the small files it rewrote (`config.yaml`, `data_report.txt`, `.lock`'s holder line,
with their times); a directory it created
(with any parents it created) is removed, so a run that never started leaves nothing behind, and
a resumed run's directory is left as it was (`AttemptState`, `RunDirectory.take_back`).

Where the lock holds: flock is enforced by the kernel of the machine that takes it. On a local
disk it excludes every other process on that machine. On NFS Linux turns flock into an NFS
byte-range lock that other clients see; a holder whose host died keeps it until the server lets
it go (NFSv4: when the host's lease lapses, ~90 s; NFSv3: when the host reboots), and until then
a new run is refused with the dead holder's host and pid. On mounts that do not forward locks
(NFS with `nolock`, gcsfuse and most FUSE object-store mounts) the kernel locks locally: two runs
on one machine still exclude each other, but two jobs on different machines writing one bucket
path are NOT excluded; give each job its own output_dir there.

One configuration: resuming compares the new configuration with the recorded `config.yaml` and
refuses any change that alters the training trajectory (`TRAJECTORY_NEUTRAL` lists the keys
that do not: logging, checkpoint cadence, evaluation, and the layout keys that only move float
rounding), unless the key is allowed explicitly (`--allow-config-change KEY`, or `all`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from urm_jax.io_utils import atomic_file
from urm_jax.train.config import TrainConfig, TrainConfigError, config_from_dict, to_dict, yaml_error
from urm_jax.validate import expect_object

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
# Small files an attempt rewrites before training starts; restored when it fails before then.
REWRITTEN_FILES = (CONFIG_FILE, "data_report.txt")
# What makes an attempt's directory worth keeping: a step or the final model to resume or use,
# the metrics of steps run (e.g. the log of a diverged run), pooled features (a long forward pass).
VALUABLE = ("checkpoints", "final", "metrics.jsonl", "feature_cache")

# Keys whose change leaves the trained parameters as they were (or moves them only by float
# rounding: the mesh, remat, attention kernel and micro-batching of the same global batch).
TRAJECTORY_NEUTRAL = frozenset({
    "output_dir", "log_every", "eval_every", "tensorboard", "plot", "data.eval", "data.eval_split",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save", "mesh", "remat",
    "attention", "grad_accum", "stage2_cached_features",
})


class RunDirectoryError(ValueError):
    """The run directory is in use, or holds a run this configuration would not continue."""


def flatten(d: dict, prefix: str = "") -> dict:
    """{"optim.learning_rate": 2e-6, ...} from a nested config dict."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(recorded: TrainConfig, new: TrainConfig) -> dict[str, tuple]:
    """{key: (recorded value, new value)} for every key that differs."""
    old, cur = flatten(to_dict(recorded)), flatten(to_dict(new))
    return {k: (old.get(k), cur.get(k)) for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)}


@dataclasses.dataclass(frozen=True)
class AttemptState:
    """What a run directory held before an attempt (`RunDirectory.attempt_state`)."""

    created: tuple[Path, ...]  # the root and its parents that did not exist, deepest first
    entries: frozenset[str]  # names in the root
    progress: dict  # what the VALUABLE entries held (`RunDirectory._progress`)
    rewritten: dict  # {name in REWRITTEN_FILES or the lock: (bytes, os.stat_result)} of those that existed


class RunDirectory:
    """The paths of one run directory (`root`: absolute)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / "final"
        self.config = self.root / CONFIG_FILE
        self.lock = self.root / LOCK_FILE

    def recorded_config(self) -> TrainConfig | None:
        """The configuration the run was accepted with, or None before it was."""
        if not self.config.is_file():
            return None
        try:
            raw = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RunDirectoryError(f"{self.config}: unreadable, invalid YAML: {yaml_error(err)}") from None
        except (UnicodeDecodeError, OSError) as err:
            raise RunDirectoryError(f"{self.config}: unreadable ({err})") from None
        expect_object(raw, str(self.config), RunDirectoryError, what="a YAML mapping")
        try:
            return config_from_dict(raw)
        except TrainConfigError as err:
            raise RunDirectoryError(f"{self.config}: {err}") from None

    def has_checkpoints(self) -> bool:
        """Whether `checkpoints/` holds at least one step directory (a name of digits)."""
        return self.checkpoints.is_dir() and any(p.name.isdigit() for p in self.checkpoints.iterdir())

    def check_resume(self, cfg: TrainConfig, allow_changes: tuple[str, ...] = ()) -> None:
        """Refuse to continue a checkpointed run with a configuration that changes its
        trajectory (keys outside TRAJECTORY_NEUTRAL and not in `allow_changes`; 'all' allows
        every key)."""
        recorded = self.recorded_config()
        if recorded is None or not self.has_checkpoints():
            return
        allowed = set(allow_changes)
        changes = {k: v for k, v in config_changes(recorded, cfg).items()
                   if k not in TRAJECTORY_NEUTRAL and k not in allowed and "all" not in allowed}
        if changes:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            keys = " ".join(f"--allow-config-change {k}" for k in changes)
            raise RunDirectoryError(
                f"{self.root} holds checkpoints of a run with another configuration ({listed}); "
                f"resuming would mix two trainings. Use a new output_dir, or pass {keys} to "
                "continue anyway")

    def _progress(self) -> dict:
        """What the VALUABLE entries hold now: the kept steps, whether final/ exists, the
        metrics' size, the feature cache's files."""
        def listing(path: Path) -> list[str]:
            return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

        metrics = self.root / "metrics.jsonl"
        return {"checkpoints": [n for n in listing(self.checkpoints) if n.isdigit()],
                "final": self.final.exists(),
                "metrics.jsonl": metrics.stat().st_size if metrics.is_file() else 0,
                "feature_cache": listing(self.root / "feature_cache")}

    def attempt_state(self) -> AttemptState:
        """Note what the directory holds before an attempt touches it (`take_back` undoes)."""
        created, path = [], self.root
        while not os.path.lexists(path):
            created.append(path)
            path = path.parent
        exists = self.root.is_dir()
        return AttemptState(
            created=tuple(created),
            entries=frozenset(os.listdir(self.root)) if exists else frozenset(),
            progress=self._progress(),
            rewritten={name: ((self.root / name).read_bytes(), os.stat(self.root / name))
                       for name in (*REWRITTEN_FILES, LOCK_FILE) if exists and (self.root / name).is_file()})

    def take_back(self, before: AttemptState) -> bool:
        """After a failed attempt that produced nothing of value (VALUABLE unchanged since
        `before`): remove what it created, restore what it rewrote, remove the directory and
        the parents it created (only if empty: a concurrent newcomer's files stay). Call while
        holding the directory (`claim`): the `.lock` goes last. Returns whether it took back;
        never raises (the attempt's own error is what the user must see)."""
        try:
            if self._progress() != before.progress:
                return False
            for name in sorted(set(os.listdir(self.root)) - before.entries - {LOCK_FILE}):
                path = self.root / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            for name, (content, stat) in before.rewritten.items():
                path = self.root / name
                if path.read_bytes() != content or path.stat().st_mtime_ns != stat.st_mtime_ns:
                    if name == LOCK_FILE:  # in place: the flock is on this inode
                        with open(path, "r+b") as out:
                            out.truncate(0)
                            out.write(content)
                    else:
                        with atomic_file(path, "wb") as out:
                            out.write(content)
                    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            if LOCK_FILE not in before.entries:
                (self.root / LOCK_FILE).unlink(missing_ok=True)
            for path in before.created:
                os.rmdir(path)
            return True
        except OSError:
            return False

    def write_config(self, cfg: TrainConfig) -> None:
        """Record `cfg` as the run's `config.yaml`, atomically (temporary sibling, then rename)."""
        with atomic_file(self.config) as out:
            out.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    @contextlib.contextmanager
    def claim(self) -> Iterator["RunDirectory"]:
        """Hold the directory for this process (an exclusive flock on `.lock`) for the block;
        RunDirectoryError names the live holder if another process has it, or says why the
        directory cannot be created (`output_dir: ...`)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirectoryError(f"output_dir: cannot create {err.filename or self.root}: "
                                    f"{err.strerror} (errno {err.errno})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                raise RunDirectoryError(f"{self.root} is in use by a running `urm-jax train` "
                                        f"({holder}); wait for it to finish or use another "
                                        "output_dir") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the flock


_VERDICT_BYTES = 4096


def agree(message: str | None) -> str | None:
    """Process 0's `message` (None: go on) on every process of a multi-host job; unchanged in a
    single process. Every process must call it at the same point."""
    if jax.process_count() == 1:
        return message
    data = np.zeros(_VERDICT_BYTES, np.uint8)
    if jax.process_index() == 0 and message is not None:
        raw = message.encode()[:_VERDICT_BYTES - 1]
        data[0], data[1:len(raw) + 1] = 1, np.frombuffer(raw, np.uint8)
    data = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(data[1:]).rstrip(b"\0").decode("utf-8", "replace") if data[0] else None
