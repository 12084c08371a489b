"""Training runs that tests can stop at a chosen point, and the waits that go with them.

Run as a script, it is `urm-jax` with one test-only pause point: with URM_JAX_TEST_PAUSE set to
`step:N` (before optimiser step N) or `final` (before final/ is written) and URM_JAX_TEST_GATE
to a directory, the run creates GATE/reached at that point and waits until GATE/go exists. A
test can then act (send a signal, fill the disk, start a second run) while the run is provably
at that point, instead of racing a process that may have run on or finished: nothing here
depends on how fast the machine is.

    python tests/faults.py train CONFIG key=value ...   (same arguments as `urm-jax`)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()
CEILING_S = 900.0  # the most any wait here lasts: generous for a loaded 2-core machine
TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def write_tiny_base(out_dir: Path) -> Path:
    """A tiny random URM (HF format, Llama-3.1's tokenizer and context) to train from."""
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir
    from urm_jax.hf.synthetic import llama3_hf_config, write_random_hf

    cfg = llama3_hf_config(**TINY, rope_theta=500000.0)
    return write_random_hf(out_dir, cfg, dtype="float32", gate_dtype="float16",
                           tokenizer_dir=cached_llama3_tokenizer_dir(), progress=False)


def cli_env(devices: int = 1, **extra: str) -> dict:
    """The environment of a `urm-jax` subprocess: CPU, `devices` simulated devices, this
    checkout first on the path."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)


def wait_for(condition, what: str, procs=(), ceiling_s: float = CEILING_S) -> None:
    """Poll `condition` until true; fail naming `what` after the ceiling, or at once if one of
    `procs` (a Popen or several: the processes that should make it true) has ended."""
    procs = [procs] if isinstance(procs, subprocess.Popen) else list(procs)
    deadline = time.monotonic() + ceiling_s
    while not condition():
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            raise AssertionError(f"awaited {what}, but a process ended first (exit {ended[0].returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"awaited {what} for {ceiling_s:g} s")
        time.sleep(0.05)


class Gate:
    """The test's side of a pause point: `start` a paused run, `wait` until it is there, `open`."""

    def __init__(self, directory: Path, where: str):
        self.dir, self.where = Path(directory), where
        self.dir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict:
        return {"URM_JAX_TEST_PAUSE": self.where, "URM_JAX_TEST_GATE": str(self.dir)}

    def start(self, args: list[str], devices: int = 1, **popen) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT,
                                env=cli_env(devices, **self.env()), **popen)

    def wait(self, proc: subprocess.Popen) -> None:
        wait_for((self.dir / "reached").exists, f"the run to pause at {self.where}", proc)

    def open(self) -> None:
        (self.dir / "go").touch()


def _hold(where: str) -> None:
    gate = Path(os.environ["URM_JAX_TEST_GATE"])
    (gate / "reached").write_text(where)
    deadline = time.monotonic() + CEILING_S
    while not (gate / "go").exists():
        if time.monotonic() > deadline:
            sys.exit(f"faults.py: nobody opened the gate at {where} within {CEILING_S:g} s")
        time.sleep(0.05)


def _install_pause() -> None:
    where = os.environ.get("URM_JAX_TEST_PAUSE")
    if not where:
        return
    from urm_jax.train import loop

    if where.startswith("step:"):
        target = int(where.split(":", 1)[1])
        train_step = loop.TrainingRun._train_step

        def paused_step(self, done, watch):
            if done == target:
                _hold(where)
            return train_step(self, done, watch)

        loop.TrainingRun._train_step = paused_step
    elif where == "final":
        save_model = loop.save_model

        def paused_save(out_dir, *args, **kwargs):
            if Path(out_dir).name == "final":
                _hold(where)
            return save_model(out_dir, *args, **kwargs)

        loop.save_model = paused_save
    else:
        raise SystemExit(f"faults.py: unknown URM_JAX_TEST_PAUSE {where!r}")


if __name__ == "__main__":
    _install_pause()
    from urm_jax.cli import main

    sys.exit(main())


@contextlib.contextmanager
def unwritable(directory: Path):
    """`directory` (existing) made unwritable for this process while inside: mode 0555, and as
    root (whom modes do not stop) the immutable attribute. Fails if neither works here."""
    directory = Path(directory)
    directory.chmod(0o555)
    immutable = os.access(directory, os.W_OK) and subprocess.run(
        ["chattr", "+i", str(directory)], capture_output=True).returncode == 0
    try:
        assert not os.access(directory, os.W_OK), f"could not make {directory} unwritable (root without chattr?)"
        yield directory
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)
