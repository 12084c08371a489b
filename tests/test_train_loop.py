"""`urm-jax train` end to end on the bundled samples: both stages, the hand-off between them,
export, kill-and-resume bit-identity, and config errors before any compilation. Runs that are
interrupted are first held at a known step (tests/faults.py), so no test races the run."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from faults import Gate
from urm_jax.hf.synthetic import llama3_hf_config, write_random_hf
from urm_jax.checkpoint import load_params
from urm_jax.train.config import TrainConfigError, load_train_config

ROOT = Path(__file__).resolve().parent.parent
STAGE1 = str(ROOT / "configs/train/tiny_stage1.yaml")
STAGE2 = str(ROOT / "configs/train/tiny_stage2.yaml")
TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

    os.environ.setdefault("URM_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = llama3_hf_config(**TINY, rope_theta=500000.0)
    return write_random_hf(tmp_path_factory.mktemp("base") / "hf", cfg, dtype="float32",
                           gate_dtype="float16", tokenizer_dir=cached_llama3_tokenizer_dir(),
                           progress=False)


def train_cmd(config, *overrides):
    return [sys.executable, "-m", "urm_jax.cli", "train", config, *overrides]


def run_train(config, *overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run(train_cmd(config, *overrides), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["final_checkpoint"]


def leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


@pytest.fixture(scope="module")
def stage1(base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("s1") / "run"
    final = run_train(STAGE1, f"model={base_model}", f"output_dir={out}", "checkpoint.async_save=false",
                      f"data.eval={ROOT / 'data/samples/helpsteer2_sample.jsonl'}", "data.eval_split=train",
                      "eval_every=4")
    return out, Path(final)


def test_stage1_trains_and_writes_everything(stage1, base_model):
    out, final = stage1
    assert final == out / "final"
    for name in ("metrics.jsonl", "loss.png", "config.yaml", "data_report.txt", "tensorboard"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    assert {"loss", "mse_per_attribute/helpfulness", "sigma_mean", "grad_norm", "learning_rate"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]  # it learns on the sample
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[0]["eval/count"] == 96
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    before, after = load_params(base_model_ckpt(base_model, out)), load_params(final)
    changed = [p for (p, a), (_, b) in zip(leaves(after["backbone"]), leaves(before["backbone"]))
               if not np.array_equal(a, b)]
    assert changed, "stage 1 must train the backbone"
    for (path, a), (_, b) in zip(leaves(after["gate"]), leaves(before["gate"])):
        assert np.array_equal(a, b), f"stage 1 must leave the gate alone: {jax.tree_util.keystr(path)}"


def base_model_ckpt(base_model, out):
    """The base model as a urm-jax checkpoint, to compare parameters with."""
    from urm_jax.hf.load import from_hf

    path = out.parent / "base_ckpt"
    if not path.exists():
        from_hf(base_model, path, progress=False)
    return path


def test_stage2_trains_only_the_gate_and_exports(stage1, tmp_path):
    _, s1_final = stage1
    final = Path(run_train(STAGE2, f"model={s1_final}", f"output_dir={tmp_path / 's2'}"))
    before, after = load_params(s1_final), load_params(final)
    for group in ("backbone", "value_head"):
        for (path, a), (_, b) in zip(leaves(after[group]), leaves(before[group])):
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{group}{jax.tree_util.keystr(path)}"
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(leaves(after["gate"]), leaves(before["gate"])))
    assert after["gate"]["fc0"]["kernel"].dtype == np.float16  # saved back in the source's gate dtype
    records = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin", "loss"} <= set(records[-1])

    from urm_jax.hf.export import to_hf

    export = to_hf(final, tmp_path / "hf", progress=False)
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True,
                                                               dtype=torch.float32)
    assert model.weights.fc[0].weight.dtype == torch.float16

    # How it was trained travels with the weights: one record per stage, in final/ and the
    # export, and the model card says it (recipe settings, steps, data, last metrics, evals).
    trained = json.loads((final / "config.json").read_text())["urm_jax_training"]
    assert [r["stage"] for r in trained] == [1, 2]
    assert trained[0]["data"].endswith("helpsteer2_sample.jsonl") and trained[0]["eval"]["count"] == 96
    assert trained[1]["steps"] == len(records) and trained[1]["final_metrics"]["accuracy"] == records[-1]["accuracy"]
    assert json.loads((export / "config.json").read_text())["urm_jax_training"] == trained
    card = (export / "README.md").read_text()
    assert "- Stage 1: `urm-jax train` on" in card and "- Stage 2: `urm-jax train` on" in card
    assert f"{trained[1]['steps']} steps" in card and "Eval (step 8)" in card


def test_uncached_stage2_names_a_segment_cap_that_limits_packing(stage1, tmp_path):
    """Full-model BT on packed pairs (`stage2_cached_features=false`): with 8 sides a row (4
    pairs of the bundled ~51-token sides in 2 x 640 slots) about half of each row is padding and
    the log says what 16 would give; the stage-2 default (16) packs >= 90% real tokens."""
    _, s1_final = stage1
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    logs = {}
    for cap in ("8", "null"):
        done = subprocess.run(train_cmd(STAGE2, f"model={s1_final}", f"output_dir={tmp_path / cap}",
                                        "stage2_cached_features=false", "data.pack=true", f"data.max_segments={cap}",
                                        "global_batch_size=2", "max_steps=1", "checkpoint.async_save=false"),
                              cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        logs[cap] = done.stderr
    hint = [line for line in logs["8"].splitlines() if line.startswith("hint: data.max_segments=8")]
    assert len(hint) == 1 and "limits packing: 16 would make 9" in hint[0], logs["8"][-3000:]
    assert "hint:" not in logs["null"]
    real = re.search(r"; ([0-9.]+)% of the first epoch's token slots are real tokens", logs["null"])
    assert real and float(real.group(1)) >= 90, logs["null"][-3000:]


def test_stage1_from_convert_init_of_a_base(tmp_path):
    """The recipe's real start: a one-label base (Skywork-Reward's shape) -> `convert init` ->
    stage 1 trains the fresh value head and the backbone, and leaves the fresh gate alone."""
    from urm_jax.hf.base import init_from_base
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

    base = write_random_hf(tmp_path / "base", llama3_hf_config(**TINY), dtype="float32", heads="base",
                           tokenizer_dir=cached_llama3_tokenizer_dir(), progress=False)
    start = init_from_base(base, tmp_path / "init", progress=False)
    final = Path(run_train(STAGE1, f"model={start}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                           "checkpoint.async_save=false"))
    before, after = load_params(start), load_params(final)
    assert not np.array_equal(before["value_head"]["kernel"], after["value_head"]["kernel"])
    assert not np.array_equal(before["backbone"]["layers"]["up_proj"], after["backbone"]["layers"]["up_proj"])
    for (path, a), (_, b) in zip(leaves(after["gate"]), leaves(before["gate"])):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "urm_jax.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)


def test_export_of_kept_steps(stage1, tmp_path):
    """`urm-jax export`: the newest kept step is the run's final model bit for bit; an earlier
    step is an earlier model (same frozen gate); a step not kept is refused, naming the kept ones."""
    run, final = stage1
    kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert len(kept) == 2, kept
    done = run_cli("export", run, tmp_path / "newest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["checkpoint"] == str(tmp_path / "newest")
    for (path, a), (_, b) in zip(leaves(load_params(tmp_path / "newest")), leaves(load_params(final))):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)

    assert run_cli("export", run, tmp_path / "earlier", "--step", kept[0]).returncode == 0
    earlier, last = load_params(tmp_path / "earlier"), load_params(final)
    assert not np.array_equal(earlier["backbone"]["layers"]["q_proj"], last["backbone"]["layers"]["q_proj"])
    assert np.array_equal(earlier["gate"]["fc0"]["kernel"], last["gate"]["fc0"]["kernel"])

    missing = run_cli("export", run, tmp_path / "missing", "--step", 3)
    assert missing.returncode == 2 and f"no step 3; kept steps: {kept}" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "missing").exists()
    # Exactly the error line: no Orbax notice ('Given directory is read only=...') before it,
    # and none on success either.
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "read only" not in done.stderr, done.stderr
    exists = run_cli("export", run, tmp_path / "newest")
    assert exists.returncode == 2 and "already exists" in exists.stderr


def test_export_ctrl_c_leaves_no_output(stage1, tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) while the exported model is being written: one `error:` line,
    exit 130, no traceback, no OUT_DIR and no temporary sibling of it."""
    from refusals import refused
    from urm_jax.cli import main
    from urm_jax.train import loop

    real, calls = loop.checked_astype, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:  # two parameters written to the temporary already
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "checked_astype", interrupted)
    out = tmp_path / "exported"
    refused(capsys, main, ["export", stage1[0], out], "error: interrupted (Ctrl-C): urm-jax export stopped",
            code=130, absent=[out])
    assert len(calls) == 3


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_preemption_watch_signals(signum, exit_code):
    """The first SIGTERM or Ctrl-C asks for a checkpoint-and-stop at the step boundary (143 /
    130); a second Ctrl-C stops at once (KeyboardInterrupt); `close` puts the handlers back."""
    from urm_jax.train.preemption import PreemptionWatch

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    watch = PreemptionWatch()
    try:
        assert not watch.reached(1)
        os.kill(os.getpid(), signum)  # os.kill runs this process's pending handlers before returning
        assert watch.reached(2) and watch.exit_code == exit_code
        assert watch.signal_name == ("SIGINT (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM")
        if signum == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        watch.close()
    assert {s: signal.getsignal(s) for s in before} == before


def test_divergence_stops_before_checkpointing_broken_weights(base_model, tmp_path):
    """A learning rate of 1e30 breaks the weights at the first real update: the run stops with
    one error naming the step and what went non-finite, logs that step, and no checkpoint or
    final/ holds the broken weights."""
    out = tmp_path / "diverged"
    done = run_cli("train", STAGE1, f"model={base_model}", f"output_dir={out}", "optim.learning_rate=1e30",
                   "optim.warmup_ratio=0", "checkpoint.every_steps=1", "checkpoint.async_save=false")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step 1: param_norm inf" in errors[0] and "diverged" in errors[0], errors
    assert "nothing after step 0 was checkpointed" in errors[0]
    assert "Traceback" not in done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and np.isfinite(records[0]["loss"])
    assert not (out / "final").exists()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.isdigit()]


def signalled_at(gate_dir: Path, step: int, signum: int, args: list) -> tuple[int, str]:
    """Run `urm-jax ARGS`, send `signum` while it is held before `step`, let it go on; returns
    (exit status, stderr)."""
    gate = Gate(gate_dir, f"step:{step}")
    proc = gate.start(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    gate.wait(proc)
    proc.send_signal(signum)
    gate.open()
    _, stderr = proc.communicate()
    return proc.returncode, stderr


def test_sigterm_checkpoints_the_current_step_and_resumes_bit_identical(base_model, tmp_path):
    """SIGTERM (preemption, tpu_scripts/stop.sh) mid-run: the run finishes its step, checkpoints
    it although no periodic checkpoint is due, exits 143; the same command resumes from that step
    and ends bit-identical to an uninterrupted run."""
    overrides = ["max_steps=30", "epochs=20", "checkpoint.every_steps=1000", "checkpoint.async_save=false"]
    reference = Path(run_train(STAGE1, f"model={base_model}", f"output_dir={tmp_path / 'ref'}", *overrides))
    out = tmp_path / "preempted"
    # held before step 4: the signal arrives mid-run
    returncode, stderr = signalled_at(tmp_path / "gate", 4, signal.SIGTERM,
                                      ["train", STAGE1, f"model={base_model}", f"output_dir={out}", *overrides])
    assert returncode == 143, stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    kept = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert kept == [4] and steps == [1, 2, 3, 4], (kept, steps)  # step 4 finished, then saved
    assert "stopped after step 4 of 30" in stderr and "Traceback" not in stderr
    assert not (out / "final").exists()
    resumed = Path(run_train(STAGE1, f"model={base_model}", f"output_dir={out}", *overrides))
    for (path, a), (_, b) in zip(leaves(load_params(resumed)), leaves(load_params(reference))):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)


def test_ctrl_c_checkpoints_the_current_step_like_sigterm(base_model, tmp_path):
    """Ctrl-C (SIGINT) mid-run with asynchronous periodic saves: handled as SIGTERM is (the step
    it is on finishes and is checkpointed), exit 130, one `stopped:` line, no traceback and no
    partial `*.orbax-checkpoint-tmp` step left behind."""
    out = tmp_path / "interrupted"
    # held before step 5: step 4's asynchronous save may still be in flight
    returncode, stderr = signalled_at(tmp_path / "gate", 5, signal.SIGINT,
                                      ["train", STAGE1, f"model={base_model}", f"output_dir={out}", "max_steps=30",
                                       "epochs=20", "checkpoint.every_steps=2", "checkpoint.async_save=true"])
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith(("stopped:", "error:"))]
    assert stopped == [f"stopped: SIGINT (Ctrl-C): stopped after step 5 of 30, checkpoint 5 saved in "
                       f"{out / 'checkpoints'}; run the same command to resume from it"], stderr[-3000:]
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [4, 5], kept
    assert not list((out / "checkpoints").glob("*tmp*")), list((out / "checkpoints").iterdir())


def test_kill_and_resume_is_bit_identical(base_model, tmp_path, stage1):
    _, uninterrupted = stage1
    out = tmp_path / "killed"
    gate = Gate(tmp_path / "gate", "step:4")  # checkpoint 2 is committed (synchronous saves)
    proc = gate.start(["train", STAGE1, f"model={base_model}", f"output_dir={out}", "checkpoint.async_save=false"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gate.wait(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    resumed = Path(run_train(STAGE1, f"model={base_model}", f"output_dir={out}", "checkpoint.async_save=false"))
    records = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records == sorted(set(records)), "the resumed log must not repeat steps"
    for (path, a), (_, b) in zip(leaves(load_params(resumed)), leaves(load_params(uninterrupted))):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)


@pytest.mark.parametrize("override, message", [
    ("optim.learnig_rate=1e-5", "unknown config key `optim.learnig_rate`; did you mean optim.learning_rate"),
    ("global_batch_size=four", "`global_batch_size`: expected int"),
    ("precision.compute=float64", "`precision.compute`: 'float64' is not one of"),
    ("mesh=[2,2]", "`mesh`: expected a list of 3 values"),
    ("loss.kind=bt", "stage 1 needs loss.kind"),
    ("grad_accum=3", "not divisible by grad_accum"),
    ("epochs=true", "`epochs`: expected int"),
])
def test_config_errors_fail_before_compiling(override, message):
    with pytest.raises(TrainConfigError) as err:
        load_train_config(STAGE1, ["model=m", "output_dir=o", override])
    assert message in str(err.value)


def test_yaml_scientific_notation_without_a_dot_is_a_float():
    cfg = load_train_config(STAGE1, ["model=m", "output_dir=o", "optim.learning_rate=1e-5", "optim.eps=2E-8"])
    assert cfg.optim.learning_rate == 1e-5 and cfg.optim.eps == 2e-8
    with pytest.raises(TrainConfigError, match="optim.learning_rate"):
        load_train_config(STAGE1, ["model=m", "output_dir=o", "optim.learning_rate=fast"])


def test_config_error_through_the_cli_is_one_line(tmp_path):
    done = subprocess.run(train_cmd(STAGE1, "model=m", f"output_dir={tmp_path}", "optim.lr=1"), cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: unknown config key `optim.lr`")
    assert "Traceback" not in done.stderr
