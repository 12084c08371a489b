"""Multi-process training on loopback: 2 processes x 4 CPU devices behave like 1 process x 8,
a checkpoint written by 2 processes resumes in 1, and a dead peer fails the survivor quickly."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from urm_jax.checkpoint import load_params

ROOT = Path(__file__).resolve().parent.parent
STAGE1 = str(ROOT / "configs/train/tiny_stage1.yaml")
# The recipe's learning rate: at 1e-3, Adam turns float32 rounding differences between
# layouts into 1e-4 parameter differences on near-zero gradients (see test_train_step).
COMMON = ["global_batch_size=8", "mesh=[-1,1,1]", "checkpoint.every_steps=2", "checkpoint.async_save=false",
          "optim.learning_rate=2e-6"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from urm_jax.hf.synthetic import llama3_hf_config, write_random_hf
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

    cfg = llama3_hf_config(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return write_random_hf(tmp_path_factory.mktemp("mh") / "hf", cfg, dtype="float32", gate_dtype="float16",
                           tokenizer_dir=cached_llama3_tokenizer_dir(), progress=False)


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


def run_two_processes(base, out, *overrides, extra_env=None, timeout=600):
    port = free_port()
    procs = [subprocess.Popen(command(base, out, *overrides) + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env(4, **(extra_env or {})), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs


def run_one_process(base, out, *overrides):
    done = subprocess.run(command(base, out, *overrides), cwd=ROOT, env=env(8), capture_output=True,
                          text=True, timeout=600)
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


def test_dead_peer_fails_the_survivor_within_the_timeout(base_model, tmp_path):
    out = tmp_path / "dead"
    port = free_port()
    procs = [subprocess.Popen(command(base_model, out, "max_steps=10000", "epochs=1000") + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env(4, URM_JAX_HEARTBEAT_TIMEOUT="10"), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 900  # generous: a loaded CI machine compiles slowly
    while not (out / "checkpoints" / "2").is_dir():  # both are training
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=180)
    waited = time.time() - killed_at
    assert procs[0].returncode != 0
    assert waited < 120, f"survivor took {waited:.0f} s to fail"
    text = err.lower()
    assert any(word in text for word in ("heartbeat", "unavailable", "connection", "task", "peer",
                                          "coordination", "gloo")), err[-2000:]


def test_sigterm_to_one_process_stops_all_at_one_saved_step(base_model, tmp_path):
    """Preemption of one host (SIGTERM to process 1): JAX's preemption sync point makes both
    processes checkpoint the same step and exit 143; the run then resumes from that step."""
    out = tmp_path / "preempted"
    port = free_port()
    procs = [subprocess.Popen(command(base_model, out, "max_steps=10000", "epochs=1000",
                                      "checkpoint.every_steps=1000") + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    metrics, deadline = out / "metrics.jsonl", time.time() + 900
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):  # both training
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], [e[-1500:] for e in errs]
    kept = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(kept) == 1, kept
    for err in errs:
        assert f"stopped after step {kept[0]}" in err, err[-1500:]
    resumed = run_one_process(base_model, out, f"max_steps={kept[0] + 2}", "--allow-config-change",
                              "max_steps", "--allow-config-change", "epochs")
    assert f"resumed from step {kept[0]}" in resumed.stderr + resumed.stdout
