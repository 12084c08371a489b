"""Restores are not pinned to the training mesh: a run trained with mesh [1,2,1] on 2 devices
is exported, scored and continued (stage 2) on 1 and on 8 devices, and the exports equal its
final/ bit for bit. Each command runs in a subprocess with its own simulated device count."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from faults import ROOT, cli_env, write_tiny_base
from urm_jax.checkpoint import load_params

STAGE1 = str(ROOT / "configs/train/tiny_stage1.yaml")
STAGE2 = str(ROOT / "configs/train/tiny_stage2.yaml")


def urm_jax(devices: int, *args):
    return subprocess.run([sys.executable, "-m", "urm_jax.cli", *map(str, args)], cwd=ROOT,
                          env=cli_env(devices), capture_output=True, text=True)


def assert_same_params(a_dir, b_dir):
    a, b = (jax.tree_util.tree_flatten_with_path(load_params(d))[0] for d in (a_dir, b_dir))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Stage 1 trained on 2 devices with mesh [1,2,1] (parameters split over fsdp=2)."""
    root = tmp_path_factory.mktemp("mesh121")
    base = write_tiny_base(root / "hf")
    done = urm_jax(2, "train", STAGE1, f"model={base}", f"output_dir={root / 'run'}", "mesh=[1,2,1]",
                   "max_steps=4", "checkpoint.every_steps=2", "checkpoint.async_save=false", "plot=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'fsdp': 2" in done.stderr
    return root / "run"


@pytest.mark.parametrize("devices, mesh", [(1, None), (8, None), (8, "2,4,1"), (4, "1,-1,1")])
def test_export_on_other_device_counts_equals_final(fsdp_run, tmp_path, devices, mesh):
    out = tmp_path / "export"
    done = urm_jax(devices, "export", fsdp_run, out, *(["--mesh", mesh] if mesh else []))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["checkpoint"] == str(out)
    assert_same_params(out, fsdp_run / "final")


def test_export_of_an_earlier_step_and_a_mesh_that_does_not_fit(fsdp_run, tmp_path):
    earlier = tmp_path / "step2"
    assert urm_jax(8, "export", fsdp_run, earlier, "--step", 2).returncode == 0
    a, b = load_params(earlier), load_params(fsdp_run / "final")
    assert not np.array_equal(a["backbone"]["layers"]["q_proj"], b["backbone"]["layers"]["q_proj"])

    refused = urm_jax(1, "export", fsdp_run, tmp_path / "no", "--mesh", "1,2,1")
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "mesh (1, 2, 1) needs 2 devices, 1 available" in lines[0]
    assert not (tmp_path / "no").exists()


def test_scoring_any_checkpoint_on_any_device_count(fsdp_run, tmp_path):
    """final/ and an exported step score on 1 and on 8 devices, to float32 rounding alike."""
    rows = [{"id": i, "prompt": f"question {i}?", "response": "an answer " * (i + 1)} for i in range(6)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert urm_jax(1, "export", fsdp_run, tmp_path / "step2", "--step", 2).returncode == 0
    for model in (fsdp_run / "final", tmp_path / "step2"):
        scores = {}
        for devices in (1, 8):
            out = tmp_path / f"{model.name}-{devices}.jsonl"
            done = urm_jax(devices, "score", "--model", model, "--input", source, "--output", out,
                           "--batch-size", 8, "--no-progress")
            assert done.returncode == 0, done.stderr[-3000:]
            scores[devices] = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
        np.testing.assert_allclose(scores[1], scores[8], rtol=1e-5, atol=1e-6)


def test_stage2_starts_from_the_run_on_other_devices(fsdp_run, tmp_path):
    done = urm_jax(8, "train", STAGE2, f"model={fsdp_run / 'final'}", f"output_dir={tmp_path / 's2'}",
                   "max_steps=2", "plot=false", "tensorboard=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'data': 8" in done.stderr
    before, after = load_params(fsdp_run / "final"), load_params(tmp_path / "s2" / "final")
    assert np.array_equal(before["backbone"]["embed_tokens"], after["backbone"]["embed_tokens"])
