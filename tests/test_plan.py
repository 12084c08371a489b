"""`urm-jax plan`: a recipe's programs compiled for a TPU topology on this CPU host.

Without libtpu: the topology key's validation, the clear failures (no topology, unknown topology,
no TPU compiler), the attention compile target, and the batch layout the plan compiles against
the batches the data pipeline really builds. With libtpu (the `tpu` tests, in a subprocess that
alone sees it: `make test` installs it into build/libtpu, see tests/conftest.py): a small model's
stage-1 and stage-2 programs compiled for a 4-chip v5p topology, the compiler's memory next to
the estimate, and exit 1 for a recipe that does not fit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from urm_jax.config import ModelConfig
from urm_jax.data.batching import pair_batch, regression_batch
from urm_jax.data.datasets import PairExample, RegressionExample
from urm_jax.memory import GB
from urm_jax.model.attention import check_available, compile_target, resolve
from urm_jax.train.config import TrainConfigError, load_train_config, parse_topology
from urm_jax.train.features import FeatureIterator
from urm_jax.train.loop import with_accum_axis
from urm_jax.train.step import batch_shapes

ROOT = Path(__file__).resolve().parent.parent
HARDWARE = sorted((ROOT / "configs/hardware").glob("*.yaml"))
LIBTPU = os.environ.get("URM_JAX_LIBTPU_PATH")  # a directory holding the libtpu package


def cli(*args, env_extra=None, timeout=900):
    """`python -m urm_jax.cli ARGS` in a fresh process (the plan must pick its backend first)."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "urm_jax.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_topology_names_are_validated_with_the_config():
    assert parse_topology("v5p:2x2x1") == ("v5p", (2, 2, 1))
    assert parse_topology("v6e:8x8") == ("v6e", (8, 8))
    cfg = load_train_config(ROOT / "configs/hardware/v5p-8.yaml", runnable=False)
    assert cfg.plan.topology == "v5p:2x2x1" and cfg.plan.chips == 4
    with pytest.raises(TrainConfigError, match=r"`plan.topology`: topology 'v5p-8': expected CHIP:AxB"):
        load_train_config(None, ["plan.topology=v5p-8"], runnable=False)
    with pytest.raises(TrainConfigError, match=r"unknown chip 'v9'; known: v5e \(e.g. v5e:2x4\), v5p"):
        load_train_config(None, ["plan.topology=v9:2x2"], runnable=False)
    with pytest.raises(TrainConfigError, match=r"`mesh`: \[1, 8, 1\] does not fit `plan.topology` v5p:2x2x1 \(4 chips\)"):
        load_train_config(ROOT / "configs/hardware/v5p-8.yaml", ["mesh=[1, 8, 1]"], runnable=False)
    with pytest.raises(TrainConfigError, match="does not fit"):
        load_train_config(None, ["plan.topology=v6e:2x4", "mesh=[-1, 3, 1]"], runnable=False)
    assert load_train_config(None, ["plan.topology=v6e:2x4", "mesh=[-1, 4, 1]"], runnable=False).plan.chips == 8


@pytest.mark.parametrize("path", HARDWARE, ids=lambda p: p.stem)
def test_every_hardware_recipe_names_its_topology(path):
    cfg = load_train_config(path, runnable=False)
    chip, _ = parse_topology(cfg.plan.topology)
    assert path.stem.startswith(chip)
    assert cfg.plan.chips == np.prod(cfg.mesh)


def test_plan_fails_clearly_without_a_topology_or_a_tpu_compiler():
    bare = cli("plan", "configs/train/stage1_helpsteer2.yaml")
    assert bare.returncode == 2
    assert bare.stderr.strip().splitlines()[-1] == (
        "error: configs/train/stage1_helpsteer2.yaml: no `plan.topology` in the config; pass "
        "--topology (e.g. v5e:2x4, v5p:2x2x1, v6e:2x4, h100:1x8)")
    unknown = cli("plan", "configs/hardware/v5p-8.yaml", "--topology", "v4:2x2x1")
    assert unknown.returncode == 2 and "unknown chip 'v4'; known: v5e (e.g. v5e:2x4)" in unknown.stderr
    if LIBTPU is None:  # this suite's own environment has no libtpu: the install hint
        missing = cli("plan", "configs/hardware/v5p-8.yaml")
        assert missing.returncode == 3, missing.stderr
        assert "no TPU compiler on this machine" in missing.stderr
        assert "pip install 'jax[tpu]==0.10.2'" in missing.stderr and "~700 MB" in missing.stderr
        assert missing.stdout == ""
    gpu = cli("plan", "configs/hardware/h100x8.yaml")  # the suite never has the CUDA plugin
    assert gpu.returncode == 3, gpu.stderr
    assert "no CUDA compiler on this machine" in gpu.stderr and "pip install 'jax[cuda12]==" in gpu.stderr


def test_compile_target_lets_splash_build_on_a_cpu_host():
    assert jax.default_backend() == "cpu"
    with pytest.raises(ValueError, match="attention 'splash' needs a TPU"):
        check_available("splash")
    assert resolve("auto") == "reference"
    with compile_target("tpu"):
        assert check_available("splash") == "splash"
        assert resolve("auto") == "splash"
        with pytest.raises(ValueError, match="attention 'cudnn' needs a GPU"):
            check_available("cudnn")
    assert resolve("auto") == "reference"  # restored
    with pytest.raises(ValueError, match="compile target"):
        with compile_target("quantum"):
            pass


def test_batch_shapes_are_the_batches_the_pipeline_builds():
    """The plan compiles against `batch_shapes`: they must be exactly what the loop feeds the
    step (after `with_accum_axis`), per stage and path."""
    cfg = ModelConfig.from_hf_dict(json.loads((ROOT / "configs/model/urm-tiny.json").read_text()))
    one = load_train_config(None, ["global_batch_size=8", "grad_accum=2", "data.seq_len=64",
                                   "data.max_segments=3"], runnable=False)
    examples = [RegressionExample(np.arange(1, 9, dtype=np.int32), np.ones(cfg.num_attributes, np.float32))] * 3
    host = regression_batch([[0, 1], [2]] + [[]] * 6, examples, seq_len=64, max_segments=3)
    assert_same_layout(with_accum_axis(host, 2), batch_shapes(cfg, one))

    pairs = [PairExample(np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32))] * 4
    tokens = load_train_config(None, ["stage=2", "loss.kind=bt", "global_batch_size=4", "grad_accum=2",
                                      "data.seq_len=32", "stage2_cached_features=false"], runnable=False)
    assert_same_layout(with_accum_axis(pair_batch([[0], [1], [2], []], pairs, seq_len=32), 2),
                       batch_shapes(cfg, tokens))

    cached = load_train_config(None, ["stage=2", "loss.kind=bt", "global_batch_size=4", "grad_accum=2",
                                      "precision.compute=bfloat16"], runnable=False)
    features = np.zeros((4, 2, cfg.hidden_size), jax.numpy.bfloat16)  # what the feature pass pools
    host = next(iter(FeatureIterator(features, 4, seed=0)))
    assert_same_layout(with_accum_axis(host, 2), batch_shapes(cfg, cached))


def assert_same_layout(host: dict, shapes: dict) -> None:
    assert set(host) == set(shapes)
    for key, value in host.items():
        assert (value.shape, np.dtype(value.dtype)) == (shapes[key].shape, np.dtype(shapes[key].dtype)), key


# --- with libtpu: the TPU compiler ------------------------------------------------------------

needs_libtpu = pytest.mark.skipif(
    LIBTPU is None, reason="libtpu not installed: `make test` puts it in build/libtpu and sets "
    "URM_JAX_LIBTPU_PATH (it refuses to skip these there)")

# A model small enough to compile in seconds whose per-token tensors still dominate its small
# vocabulary: the estimate's activation terms are what is compared. Every sharded dimension is a
# multiple of 128 (the TPU's lane tiling pads the rest, which only a toy model would notice).
SMALL = {"hidden_size": 512, "intermediate_size": 1792, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 128, "num_hidden_layers": 2, "vocab_size": 1024, "pad_token_id": 1023}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    hf = json.loads((ROOT / "configs/model/urm-llama-3.1-8b.json").read_text())
    hf.update(SMALL)
    path = tmp_path_factory.mktemp("plan") / "config.json"
    path.write_text(json.dumps(hf))
    return path


def tpu_plan(tmp_path, *args):
    """`urm-jax plan ARGS --json` with libtpu visible to that process only; (result, JSON)."""
    out = tmp_path / "plan.json"
    done = cli("plan", *args, "--json", str(out),
               env_extra={"PYTHONPATH": os.pathsep.join(filter(None, [LIBTPU, os.environ.get("PYTHONPATH")]))})
    return done, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.tpu
@needs_libtpu
def test_stage1_step_compiles_for_a_tpu_topology(tmp_path, small_model):
    done, plan = tpu_plan(tmp_path, "configs/hardware/v5p-8.yaml", "data.seq_len=1024", "grad_accum=2",
                          "--model-config", str(small_model))
    assert done.returncode == 0, done.stderr
    assert plan["topology"] == "v5p:2x2x1" and plan["chips"] == 4 and plan["mesh"] == [1, 4, 1]
    assert plan["attention"] == "splash" and plan["fits"]  # attention: auto on a TPU target
    [step] = plan["programs"]
    assert step["name"] == "train step" and step["compile_seconds"] > 0
    est = plan["estimate"]
    # Arguments: the parameters, AdamW moments and the batch, exactly as the estimate shards them.
    batch = 2 * 4 * (1024 * 4 * 2 + 8 * 4 * 2 + 8 * 5 * 4)  # [accum, micro] rows: ids, segments; pools; labels
    static = est["params"] + est["frozen_params"] + est["optimizer"]
    assert abs(step["arguments"] - static - batch / 4) < 0.03 * static  # 0.1% at 8B: bench/tpu_plan_results.jsonl
    # The donated state comes back in place: only the step's metrics (scalars) are new outputs.
    assert 0 < step["outputs"] - step["aliases"] < 64 * 1024
    # The whole peak: the calibrated estimate is within 10% of the compiler.
    assert abs(est["total"] - step["total"]) <= 0.10 * step["total"], (est["total"] / GB, step["total"] / GB)
    assert "vs the compiler" in done.stdout and done.stdout.splitlines()[-1].endswith(": fits")


@pytest.mark.tpu
@needs_libtpu
def test_stage2_feature_pass_and_gate_step_compile(tmp_path, small_model):
    done, plan = tpu_plan(tmp_path, "configs/train/stage2_skywork80k.yaml", "global_batch_size=16",
                          "data.seq_len=1024", "--topology", "v5p:2x2x1", "--model-config", str(small_model))
    assert done.returncode == 0, done.stderr
    names = [p["name"] for p in plan["programs"]]
    assert names == ["feature pass", "train step"] and plan["peak"] == "feature pass"
    feature, step = plan["programs"]
    # The frozen bf16 backbone (replicated over data=4) dominates the feature pass's arguments;
    # the gate-only step holds the gate, its moments and a batch of pooled features.
    assert abs(feature["arguments"] - plan["estimate"]["frozen_params"]) < 0.05 * feature["arguments"]
    assert step["total"] < 0.25 * feature["total"]
    est = plan["estimate"]["total"]
    assert abs(est - feature["total"]) <= 0.10 * feature["total"], (est / GB, feature["total"] / GB)


@pytest.mark.tpu
@needs_libtpu
def test_a_mesh_that_splits_the_slices_axes_compiles(tmp_path, small_model):
    """fsdp=8 x tensor=2 on a 4x4 slice: neither mesh axis is a whole physical axis (as fsdp=16
    x tensor=4 on a v6e-64's 8x8), which jax.make_mesh refuses; urm_jax.sharding.make_mesh
    splits a physical axis instead, so the recipe runs (and plans) at all."""
    done, plan = tpu_plan(tmp_path, "configs/hardware/v6e-8.yaml", "mesh=[1, 8, 2]", "plan.topology=v6e:4x4",
                          "data.seq_len=1024", "--model-config", str(small_model))
    assert done.returncode == 0, done.stderr
    assert plan["mesh"] == [1, 8, 2] and plan["chips"] == 16 and plan["fits"]


@pytest.mark.tpu
@needs_libtpu
def test_a_recipe_that_does_not_fit_exits_1(tmp_path, small_model):
    """Unfused attention's [B, H, L, L] scores at L=8192 cannot fit a 16 GB v5e chip: the TPU
    compiler refuses the program, and the plan says so in its words, exit 1."""
    done, plan = tpu_plan(tmp_path, "configs/hardware/v5p-8.yaml", "attention=reference", "remat=none",
                          "data.seq_len=8192", "global_batch_size=16", "grad_accum=1", "plan.topology=v5e:2x2",
                          "--model-config", str(small_model))
    assert done.returncode == 1, done.stderr
    [step] = plan["programs"]
    assert not plan["fits"] and plan["free"] is None and "exceeds available HBM" in step["refused"]
    assert "DOES NOT FIT" in done.stdout and "refused by the compiler" in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith("error: train step does not fit a v5e chip: Ran out of memory")
    assert plan["estimate"]["total"] > 16e9  # the estimate agrees


@pytest.mark.tpu
@needs_libtpu
def test_plan_json_replaces_an_existing_file_only_with_overwrite(tmp_path, small_model):
    out = tmp_path / "plan.json"
    out.write_text("keep me")
    args = ["plan", "configs/hardware/v5p-8.yaml", "data.seq_len=512", "--model-config", str(small_model),
            "--json", str(out)]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [LIBTPU, os.environ.get("PYTHONPATH")]))}
    kept = cli(*args, env_extra=env)
    assert kept.returncode == 2 and out.read_text() == "keep me"
    assert "compiling" not in kept.stderr and "pass --overwrite" in kept.stderr
    replaced = cli(*args, "--overwrite", env_extra=env)
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(out.read_text())["topology"] == "v5p:2x2x1"
