"""A run directory has one owner and one configuration (urm_jax/train/run_dir.py), for real:
`urm-jax train` processes started against the same output_dir. Runs are paused at a chosen step
(tests/faults.py) so each scenario happens at a known point, whatever the machine's speed."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from faults import ROOT, Gate, cli_env, write_tiny_base
from urm_jax.checkpoint import load_params

STAGE1 = str(ROOT / "configs/train/tiny_stage1.yaml")
COMMON = ["max_steps=4", "checkpoint.every_steps=2", "checkpoint.async_save=false", "plot=false"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("rundir") / "hf")


def train_args(base, out, *overrides):
    return ["train", STAGE1, f"model={base}", f"output_dir={out}", *COMMON, *overrides]


def urm_jax(*args):
    return subprocess.run([sys.executable, "-m", "urm_jax.cli", *map(str, args)], cwd=ROOT, env=cli_env(1),
                          capture_output=True, text=True)


def error_line(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every file under root (but the lock) -> (size, mtime, sha256): 'nothing changed' means equal."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_second_run_into_a_live_directory_is_refused_at_once(base_model, tmp_path):
    """While run A is training (held at step 2), run B into the same directory fails with one
    error line naming A's host and pid, and writes nothing; A then finishes untouched: its own
    configuration, one line per step in metrics.jsonl."""
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", "step:2")
    first = gate.start(train_args(base_model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gate.wait(first)
    before = snapshot(out)
    second = urm_jax(*train_args(base_model, out, "optim.learning_rate=5e-4", "seed=3"))
    line = error_line(second)
    assert f"{out} is in use by a running `urm-jax train`" in line and f'"pid": {first.pid}' in line, line
    assert snapshot(out) == before, "the refused run changed the directory"
    gate.open()
    stdout, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stderr[-3000:]
    assert steps_logged(out) == [1, 2, 3, 4]
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["optim"]["learning_rate"] == 1e-3 and recorded["seed"] == 0


def test_the_lock_of_a_killed_run_does_not_block_the_next(base_model, tmp_path):
    """SIGKILL leaves `.lock` on disk (naming the dead process), but the kernel dropped the
    flock with the process: the next run takes the directory without any manual clean-up."""
    out = tmp_path / "run"
    gate = Gate(tmp_path / "gate", "step:1")
    killed = gate.start(train_args(base_model, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gate.wait(killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == killed.pid  # left behind
    done = urm_jax(*train_args(base_model, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps_logged(out) == [1, 2, 3, 4] and (out / "final").is_dir()


@pytest.fixture(scope="module")
def preempted(base_model, tmp_path_factory):
    """A run stopped by SIGTERM after step 3 of 4 (checkpoints 2 and 3 kept), and the same run
    uninterrupted, to compare with."""
    root = tmp_path_factory.mktemp("preempted")
    gate = Gate(root / "gate", "step:3")
    proc = gate.start(train_args(base_model, root / "run"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      text=True)
    gate.wait(proc)
    proc.send_signal(signal.SIGTERM)  # noted now, acted on when step 3 is done
    gate.open()
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 143, stderr[-3000:]
    done = urm_jax(*train_args(base_model, root / "reference"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", root / "reference" / "final"


@pytest.fixture
def run_copy(preempted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(preempted[0], out, symlinks=True)
    return out


@pytest.mark.parametrize("override, key", [
    ("optim.learning_rate=5e-4", "optim.learning_rate: 0.001 -> 0.0005"),
    ("seed=7", "seed: 0 -> 7"),
    ("data.shuffle_seed=3", "data.shuffle_seed: 0 -> 3"),
    ("max_steps=6", "max_steps: 4 -> 6"),
])
def test_resuming_with_a_trajectory_change_is_refused(override, key, base_model, run_copy):
    """A changed learning rate, seed, data order or schedule length would continue a mixed run:
    refused with one line naming the key, both values and the flag that allows it; config.yaml
    and every other file stay as they were."""
    before = snapshot(run_copy)
    line = error_line(urm_jax(*train_args(base_model, run_copy, override)))
    name = key.split(":")[0]
    assert key in line and f"--allow-config-change {name}" in line and "resuming would mix two trainings" in line
    assert snapshot(run_copy) == before


def test_allow_config_change_lets_the_resume_through(base_model, run_copy):
    done = urm_jax(*train_args(base_model, run_copy, "optim.learning_rate=5e-4"),
                   "--allow-config-change", "optim.learning_rate")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 3" in done.stderr
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["optim"]["learning_rate"] == 5e-4
    assert steps_logged(run_copy) == [1, 2, 3, 4]


def test_changing_only_logging_and_checkpoint_cadence_resumes_on_the_same_trajectory(base_model, run_copy,
                                                                                         preempted):
    """log_every, checkpoint cadence and keep do not move the weights: the resume needs no flag
    and ends bit-identical to the uninterrupted run."""
    done = urm_jax(*train_args(base_model, run_copy, "log_every=2", "checkpoint.every_steps=1",
                               "checkpoint.keep=5"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 3" in done.stderr
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(load_params(run_copy / "final"))[0],
                                 jax.tree_util.tree_flatten_with_path(load_params(preempted[1]))[0]):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["log_every"] == 2

