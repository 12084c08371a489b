"""Resource exhaustion ends in one `error:` line, never a crash, and loses nothing: a real full
disk (a small tmpfs, filled at a chosen point of the run) during a step checkpoint and while
writing final/, under `urm-jax score --output` and `urm-jax eval`; a real out-of-memory from XLA
(an allocation past the process's address-space limit) in training and scoring."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from faults import ROOT, Gate, cli_env, wait_for, write_tiny_base
from hf_fixtures import make_tiny_urm
from urm_jax.checkpoint import load_params
from urm_jax.cli import main as cli_main

STAGE1 = str(ROOT / "configs/train/tiny_stage1.yaml")
# Async saves (the recipe's default): a failed save surfaces a step or more later.
COMMON = ["max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=3", "plot=false"]
ADDRESS_SPACE = 12 << 30  # the OOM tests' limit: XLA's allocation fails long before RAM would


class Disk:
    """A tmpfs of `size` bytes at `path`; `fill` takes all but `leave` bytes, `free` gives them back."""

    def __init__(self, path: Path, size: int):
        self.path, self.filler = path, path / "filler"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},uid={os.getuid()}", "tmpfs",
                               str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"a full disk needs a tmpfs, and mounting one failed: {done.stderr.strip()}")

    def fill(self, leave: int = 0) -> None:
        free = shutil.disk_usage(self.path).free
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT)
        try:
            os.posix_fallocate(fd, 0, max(free - leave, 1))
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path / "disk", 256 << 20)
    yield d
    d.unmount()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("res") / "hf")


def train_args(base, out, *overrides):
    return ["train", STAGE1, f"model={base}", f"output_dir={out}", *COMMON, *overrides]


def one_error(code: int, stderr: str) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "ERROR:absl" not in stderr, stderr[-3000:]
    return lines[0]


def urm_jax(*args, address_space: int | None = None, **kwargs):
    """`urm-jax ARGS` in a subprocess, optionally with its address space limited."""
    if address_space is None:
        cmd = [sys.executable, "-m", "urm_jax.cli"]
    else:  # set in the child itself: a preexec_fn would fork this multithreaded (JAX) process
        cmd = [sys.executable, "-c", "import resource, runpy, sys; "
               f"resource.setrlimit(resource.RLIMIT_AS, ({address_space}, {address_space})); "
               "sys.argv[0] = 'urm-jax'; runpy.run_module('urm_jax.cli', run_name='__main__')"]
    return subprocess.run([*cmd, *map(str, args)], cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_full_disk_at_a_step_checkpoint_and_at_final_loses_nothing(base_model, disk, tmp_path):
    """The disk fills after checkpoint 2: the (asynchronous) save of step 4 fails -> one error
    line naming step 4, the reason and the kept step; the partial step is gone. Space freed, the
    same command resumes from step 2; the disk fills again just before final/: one error line,
    no partial final/, the checkpoints intact. Space freed, the same command writes final/, and
    the model equals an uninterrupted run's bit for bit."""
    reference = urm_jax(*train_args(base_model, tmp_path / "reference"), env=cli_env(1))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = disk.path / "run"

    gate = Gate(tmp_path / "gate1", "step:3")
    proc = gate.start(train_args(base_model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gate.wait(proc)
    wait_for((out / "checkpoints" / "2").is_dir, "checkpoint 2 to be committed", proc)
    disk.fill(leave=512 << 10)  # room for metrics lines, none for a checkpoint
    gate.open()
    _, stderr = proc.communicate(timeout=900)
    line = one_error(proc.returncode, stderr)
    assert f"{out / 'checkpoints'}: writing the checkpoint of step 4 failed: No space left on device" in line
    assert "its partial directory was removed; the kept steps [2] are intact" in line
    assert "resume from step 2" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert not (out / "final").exists()

    disk.free()
    gate = Gate(tmp_path / "gate2", "final")
    proc = gate.start(train_args(base_model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gate.wait(proc)
    disk.fill(leave=512 << 10)
    gate.open()
    _, stderr = proc.communicate(timeout=900)
    line = one_error(proc.returncode, stderr)
    assert "resumed from step 2" in stderr
    assert f"{out / 'final'}: writing the final model failed: No space left on device" in line
    assert "nothing of it was left behind and the kept steps [2, 4, 6] are intact" in line
    assert sorted(p.name for p in out.iterdir() if "final" in p.name) == []  # no final/, no temporary

    disk.free()
    done = urm_jax(*train_args(base_model, out), env=cli_env(1))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 6" in done.stderr
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(load_params(out / "final"))[0],
                                 jax.tree_util.tree_flatten_with_path(load_params(tmp_path / "reference" / "final"))[0]):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_urm(tmp_path_factory.mktemp("res_model") / "m", vocab=512, gate_dtype="float32")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_full_disk_under_score_output_names_the_file(tiny, disk, tmp_path, capsys):
    rows = [{"id": i, "input_ids": list(range(4, 40))} for i in range(200)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    out = disk.path / "scores.jsonl"
    disk.fill(leave=8 << 10)  # 200 output lines need ~100 KB
    code = cli_main(["score", "--model", str(tiny), "--input", str(source), "--output", str(out), "--no-progress"])
    line = one_error(code, capsys.readouterr().err)
    assert line == f"error: {out}: No space left on device (errno 28)", line
    assert sorted(p.name for p in disk.path.iterdir()) == ["filler"]  # no output, no temporary


def test_full_disk_under_eval_keeps_the_previous_output(tiny, disk, tmp_path, capsys):
    rows = [{"id": f"p{i}", "subset": "shp", "chosen": {"input_ids": list(range(4, 30))},
             "rejected": {"input_ids": list(range(5, 40))}} for i in range(40)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = disk.path / "eval"
    args = ["eval", "--model", str(tiny), "--pairs", str(pairs), "--output-dir", str(out), "--no-progress"]
    assert cli_main(args) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    disk.fill(leave=0)
    line = one_error(cli_main([*args, "--overwrite"]), capsys.readouterr().err)
    assert "No space left on device" in line and str(out) in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output is whole
    assert sorted(p.name for p in disk.path.iterdir()) == ["eval", "filler"]  # no temporary left


def test_out_of_memory_in_training_is_one_line_saying_what_to_change(base_model, tmp_path, monkeypatch,
                                                                    capsys):
    """32768-token rows with the L x L reference attention (~150 GB): refused before the run
    directory exists by the host-memory check, in one line saying what to change. Should XLA
    still run out of memory later (the estimate was wrong), that is one line too."""
    run = tmp_path / "run"
    done = urm_jax(*train_args(base_model, run, "data.seq_len=32768", "global_batch_size=1",
                               "attention=reference", "max_steps=1"), env=cli_env(1),
                   address_space=ADDRESS_SPACE)
    line = one_error(done.returncode, done.stderr)
    assert line.startswith("error: training needs about ") and "is available" in line, line
    assert "lower `global_batch_size`" in line and "remat: full" in line and "blockwise" in line, line
    assert not run.exists()

    from urm_jax.cli import main as cli_main
    from urm_jax.train import loop

    def exhausted(self):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 134217728000 bytes.")

    monkeypatch.setattr(loop.TrainingRun, "run", exhausted)
    code = cli_main(train_args(base_model, tmp_path / "run2", "max_steps=1", "global_batch_size=8"))
    err = capsys.readouterr().err
    line = one_error(code, err)
    assert line.startswith("error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating"), line
    assert "lower global_batch_size" in line and "remat=full" in line and "urm-jax memory" in line


def test_out_of_memory_in_scoring_is_one_line(tiny, tmp_path):
    """512 rows of 4000 tokens in one batch: ~140 GB of attention scores. `--memory-budget 1000`
    tells the batch fitting (which would otherwise shrink the batch to fit) that 1000 GB are
    there, so the allocation reaches XLA and fails under the address-space limit."""
    source = write_jsonl(tmp_path / "long.jsonl", [{"input_ids": [5] * 4000}] * 512)
    done = urm_jax("score", "--model", tiny, "--input", source, "--output", tmp_path / "out.jsonl",
                   "--batch-size", 512, "--memory-budget", 1000, "--no-progress", env=cli_env(1),
                   address_space=ADDRESS_SPACE)
    line = one_error(done.returncode, done.stderr)
    assert "memory" in line and "--batch-size" in line, line
    assert not (tmp_path / "out.jsonl").exists()
