"""Multi-process training on loopback: 2 processes x 4 CPU devices behave like 1 process x 8,
a checkpoint written by 2 processes resumes in 1, a lost process ends the survivor in one error
line (and its newest checkpoint resumes), a refused run directory stops every process.

Nothing waits on the clock: the coordination service's heartbeat timeout is the default 60 s
(a healthy process starved of CPU on a loaded machine must not be declared dead), and every
wait is for an event (a checkpoint directory, a metrics line, a process exit) with a ceiling of
many minutes."""

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from faults import CEILING_S, wait_for, write_tiny_base
from urm_jax.checkpoint import load_params
from urm_jax.train.supervisor import PEER_LOST_EXIT_CODE, lost_process

ROOT = Path(__file__).resolve().parent.parent
STAGE1 = str(ROOT / "configs/train/tiny_stage1.yaml")
# The recipe's learning rate: at 1e-3, Adam turns float32 rounding differences between
# layouts into 1e-4 parameter differences on near-zero gradients (see test_train_step).
COMMON = ["global_batch_size=8", "mesh=[-1,1,1]", "checkpoint.every_steps=2", "checkpoint.async_save=false",
          "optim.learning_rate=2e-6"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("mh") / "hf")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(devices: int, **extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def command(base, out, *overrides):
    return [sys.executable, "-m", "urm_jax.cli", "train", STAGE1, f"model={base}", f"output_dir={out}",
            *COMMON, *overrides]


def start_two_processes(base, out, *overrides, stdout=subprocess.PIPE) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(command(base, out, *overrides) + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env(4), stdout=stdout, stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(proc: subprocess.Popen, what: str) -> tuple[str, str]:
    """(stdout, stderr) of a process once it exits; the ceiling is generous and named."""
    try:
        return proc.communicate(timeout=CEILING_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"awaited {what} for {CEILING_S:g} s") from None


def run_two_processes(base, out, *overrides):
    procs = start_two_processes(base, out, *overrides)
    outputs = [finish(p, f"process {i} to finish training") for i, p in enumerate(procs)]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


def run_one_process(base, out, *overrides):
    done = subprocess.run(command(base, out, *overrides), cwd=ROOT, env=env(8), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_close(a_dir, b_dir, tol):
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(load_params(a_dir))[0],
                                 jax.tree_util.tree_flatten_with_path(load_params(b_dir))[0]):
        assert np.max(np.abs(a.astype(np.float64) - b)) <= tol, jax.tree_util.keystr(path)


def test_two_processes_match_one_and_resume_in_one(base_model, tmp_path):
    two = tmp_path / "two"
    outs = run_two_processes(base_model, two, "max_steps=3")
    assert "2 process(es)" in outs[0][1]
    single = tmp_path / "single"
    run_one_process(base_model, single, "max_steps=3")
    assert_close(two / "final", single / "final", 1e-6)
    # Logs and metrics only from process 0; both processes wrote the same checkpoints.
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 3
    assert "final checkpoint" not in outs[1][1]
    # The 2-process checkpoint (step 3) resumes in a single process and continues to step 5.
    resumed = run_one_process(base_model, two, "max_steps=5", "--allow-config-change", "max_steps")
    assert "resumed from step 3" in resumed.stderr
    reference = tmp_path / "single5"
    run_one_process(base_model, reference, "max_steps=5")
    assert_close(two / "final", reference / "final", 1e-6)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-lost", "coordinator-lost"])
def test_a_lost_process_ends_the_survivor_in_one_error_line(base_model, tmp_path, victim):
    """SIGKILL one process mid-training (process 0 hosts the coordination service): the other
    ends with exit 75 and one error line naming the lost process and the newest checkpoint, no
    traceback and no runtime log on stderr (those go to failure-process<K>.log); that checkpoint
    then resumes in a single process."""
    out = tmp_path / "dead"
    procs = start_two_processes(base_model, out, "max_steps=10000", "epochs=1000", stdout=subprocess.DEVNULL)
    try:
        wait_for((out / "checkpoints" / "2").is_dir, "checkpoint 2 (both processes training)", procs)
        procs[victim].send_signal(signal.SIGKILL)  # the supervisor: its training child dies with it
        survivor = 1 - victim
        _, err = finish(procs[survivor], f"process {survivor} to notice that process {victim} was lost")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[survivor].returncode == PEER_LOST_EXIT_CODE, err[-3000:]
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert f"error: process {victim} of the 2 processes of this job was lost" in lines[0], lines[0]
    assert f"process {survivor} stopped too" in lines[0]
    assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
    assert not re.search(r"^[EF]\d{4} ", err, re.M), err[-3000:]
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert f"step {kept[-1]} in {out / 'checkpoints'} is intact" in lines[0], (lines[0], kept)
    log = out / f"failure-process{survivor}.log"
    assert f"(runtime log: {log})" in lines[0] and log.stat().st_size > 0
    resumed = run_one_process(base_model, out, f"max_steps={kept[-1] + 1}", "--allow-config-change", "max_steps",
                              "--allow-config-change", "epochs")
    assert f"resumed from step {kept[-1]}" in resumed.stderr


@pytest.mark.parametrize("text, lost", [
    ("UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks have crashed.", "1"),
    ("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 3 heartbeat timeout.", "3"),
    ("absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was "
     "preempted/died/restarted unexpectedly or this task is experiencing network issues.", "0"),
    ("jax.errors.JaxRuntimeError: UNKNOWN: Gloo all-reduce failed: Connection reset by peer", None),
])
def test_the_lost_process_from_the_coordination_services_words(text, lost):
    """The survivor names the lost process from what jaxlib's coordination service says (the
    texts above are what jaxlib 0.10 prints); a bare collective error names none."""
    assert lost_process(text) == lost


def test_a_refused_run_directory_stops_every_process(base_model, tmp_path):
    """Only process 0 takes the directory's lock; when it is refused (here: the directory is held
    by another live process), process 1 gets the same one-line refusal instead of waiting for
    process 0 in a collective."""
    out = tmp_path / "held"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(json.dumps({"host": "elsewhere", "pid": 4242}))
        lock.flush()
        procs = start_two_processes(base_model, out, "max_steps=2")
        outputs = [finish(p, f"process {i} to refuse the held directory") for i, p in enumerate(procs)]
    for p, (_, err) in zip(procs, outputs):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert p.returncode == 2 and len(lines) == 1, err[-3000:]
        assert f"{out} is in use by a running `urm-jax train`" in lines[0] and '"pid": 4242' in lines[0]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_sigterm_to_one_process_stops_all_at_one_saved_step(base_model, tmp_path):
    """Preemption of one host (SIGTERM to process 1): JAX's preemption sync point makes both
    processes checkpoint the same step and exit 143; the run then resumes from that step."""
    out = tmp_path / "preempted"
    procs = start_two_processes(base_model, out, "max_steps=10000", "epochs=1000", "checkpoint.every_steps=1000",
                                stdout=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
             "two logged steps (both processes training)", procs)
    procs[1].send_signal(signal.SIGTERM)
    errs = [finish(p, f"process {i} to stop after SIGTERM")[1] for i, p in enumerate(procs)]
    assert [p.returncode for p in procs] == [143, 143], [e[-1500:] for e in errs]
    kept = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(kept) == 1, kept
    for err in errs:
        assert f"stopped after step {kept[0]}" in err, err[-1500:]
    resumed = run_one_process(base_model, out, f"max_steps={kept[0] + 2}", "--allow-config-change",
                              "max_steps", "--allow-config-change", "epochs")
    assert f"resumed from step {kept[0]}" in resumed.stderr + resumed.stdout
