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



# A run that fails after its checks passed but before it produced anything of value (a bad data
# file found while loading, Ctrl-C during setup) takes back what it created. In this process
# (8 simulated CPU devices, see conftest): every case fails before anything compiles.
GOOD_LINE = {"prompt": "q", "response": "a", "helpfulness": 3, "correctness": 3, "coherence": 3,
             "complexity": 1, "verbosity": 1}


def failing_data(tmp_path: Path, kind: str) -> Path:
    data = tmp_path / f"{kind}.jsonl"
    if kind == "empty":
        data.write_text("")
    elif kind == "broken":
        data.write_text(json.dumps(GOOD_LINE) + "\n{oops\n")
    elif kind == "missing-column":
        data.write_text(json.dumps({k: v for k, v in GOOD_LINE.items() if k != "verbosity"}) + "\n")
    elif kind == "fake-parquet":
        data = tmp_path / "fake.parquet"
        data.write_text("not parquet\n")
    return data  # kind "missing": never written


def in_process(capsys, argv, code=2) -> str:
    from urm_jax import cli

    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == code and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("kind", ["empty", "broken", "missing-column", "missing", "fake-parquet"])
def test_a_failed_new_run_leaves_nothing_behind(kind, base_model, tmp_path, capsys):
    """output_dir (and a parent) did not exist: after the data error, neither does it (no
    config.yaml, .lock, data_report.txt, checkpoints/)."""
    data = failing_data(tmp_path, kind)
    out = tmp_path / "new" / "run"
    line = in_process(capsys, train_args(base_model, out, f"data.train={data}", "global_batch_size=8"))
    assert str(data) in line, line
    assert not (tmp_path / "new").exists(), sorted((tmp_path / "new").rglob("*"))


def test_a_failed_run_into_an_empty_directory_leaves_it_empty(base_model, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    in_process(capsys, train_args(base_model, out, f"data.train={failing_data(tmp_path, 'empty')}",
                                  "global_batch_size=8"))
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_failed_resume_leaves_the_directory_as_it_was(base_model, tmp_path, capsys):
    """A run with a checkpoint, resumed with a trajectory-neutral change (log_every) and an
    allowed new data file that fails while loading: config.yaml (which the attempt rewrote),
    the lock, the checkpoint, the metrics and every other file are as they were."""
    from urm_jax.train.config import load_train_config, to_dict

    out = tmp_path / "run"
    (out / "checkpoints" / "2").mkdir(parents=True)
    (out / "checkpoints" / "2" / "state").write_bytes(b"step 2")
    cfg = load_train_config(STAGE1, [f"model={base_model}", f"output_dir={out}", *COMMON, "global_batch_size=8"])
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (out / "data_report.txt").write_text("earlier report\n")
    (out / ".lock").write_text('{"host": "earlier", "pid": 1}')
    before, lock = snapshot(out), (out / ".lock").read_bytes()
    data = failing_data(tmp_path, "broken")
    line = in_process(capsys, [*train_args(base_model, out, f"data.train={data}", "log_every=2",
                                           "global_batch_size=8"), "--allow-config-change", "data.train"])
    assert f"{data}:2" in line, line
    assert snapshot(out) == before and (out / ".lock").read_bytes() == lock
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "config.yaml", "data_report.txt",
                                                     "metrics.jsonl"]


def test_ctrl_c_during_setup_leaves_nothing_behind(base_model, tmp_path, capsys, monkeypatch):
    from urm_jax.train import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "load_params_any", interrupted)
    out = tmp_path / "run"
    line = in_process(capsys, train_args(base_model, out, "global_batch_size=8"), code=130)
    assert "interrupted (Ctrl-C)" in line
    assert not out.exists()


def test_output_dir_that_cannot_be_a_directory_is_named(base_model, tmp_path, capsys):
    """output_dir an existing file, or under one: one line naming the key and the path (no bare
    `[Errno N]`); the file untouched, nothing created."""
    existing = tmp_path / "inputs.jsonl"
    existing.write_text("mine\n")
    line = in_process(capsys, train_args(base_model, existing, "global_batch_size=8"))
    assert line == f"error: output_dir: {existing} is a file, not a directory", line
    line = in_process(capsys, train_args(base_model, existing / "run", "global_batch_size=8"))
    assert line == (f"error: output_dir: cannot create {existing / 'run'}: {existing} is not a directory "
                    "(errno 20)"), line
    assert existing.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["inputs.jsonl"]


def test_output_dir_the_system_refuses_is_named(base_model, tmp_path, capsys, monkeypatch):
    """A refusal no check can foresee (an immutable directory, `chattr +i`, refuses even root):
    one line naming the key, the path and the OS reason; nothing left behind."""
    out = tmp_path / "ro" / "run2"
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == out:
            raise PermissionError(1, "Operation not permitted", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    line = in_process(capsys, train_args(base_model, out, "global_batch_size=8"))
    assert line == f"error: output_dir: cannot create {out}: Operation not permitted (errno 1)", line
    assert list(tmp_path.iterdir()) == []
