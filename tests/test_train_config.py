"""`urm-jax train` refuses a configuration it cannot run as written before anything compiles and
before the output directory is touched: one `error:` line naming the key (or the file), exit 2.

Most cases call the command's handler in this process (8 simulated CPU devices, see conftest),
with the trainer replaced by a tripwire, so a case that slipped through would fail loudly instead
of training; two cases run the real command in a subprocess."""

import dataclasses
import subprocess
import sys
import warnings as warnings_module
from pathlib import Path

import pytest

from faults import ROOT, cli_env, write_tiny_base
from urm_jax import cli
from urm_jax.train import loop
from urm_jax.train.config import LossConfig, TrainConfig, load_train_config

STAGE1 = str(ROOT / "configs/train/tiny_stage1.yaml")
STAGE2 = str(ROOT / "configs/train/tiny_stage2.yaml")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("cfg") / "hf")  # Llama-3.1's context, 131072


@pytest.fixture
def no_training(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("the run got past its checks: training started")

    monkeypatch.setattr(loop, "TrainingRun", tripwire)
    monkeypatch.setattr(loop, "build_trainer", tripwire)


def refused(capsys, tmp_path, config, *args, model="m"):
    """Run `urm-jax train` in-process; return its single error line (asserting exit 2, one
    `error:` line, no traceback, and nothing created at output_dir)."""
    out = tmp_path / "run"
    code = cli.main(["train", str(config), f"model={model}", f"output_dir={out}", *map(str, args)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert err.strip().splitlines() == lines, f"more on stderr than the error line:\n{err}"
    assert "Traceback" not in err, err
    assert not out.exists(), f"{out} was created by a refused run"
    return lines[0]


# The examples and the other bounds of the same kind: (override, words of the error).
OUT_OF_RANGE = [
    ("checkpoint.every_steps=0", "`checkpoint.every_steps`: must be >= 1, got 0"),
    ("checkpoint.keep=0", "`checkpoint.keep`: must be >= 1, got 0"),
    ("max_steps=-3", "`max_steps`: must be >= 1, got -3"),
    ("max_steps=0", "`max_steps`: must be >= 1, got 0"),
    ("optim.learning_rate=-1e-5", "`optim.learning_rate`: must be >= 0"),
    ("optim.learning_rate=.nan", "`optim.learning_rate`: must be a finite number"),
    ("optim.b1=1.5", "`optim.b1`: must be in [0, 1), got 1.5"),
    ("optim.b2=1", "`optim.b2`: must be in [0, 1), got 1"),
    ("optim.warmup_ratio=1.5", "`optim.warmup_ratio`: must be in [0, 1], got 1.5"),
    ("optim.min_lr_ratio=-0.5", "`optim.min_lr_ratio`: must be in [0, 1]"),
    ("optim.clip_norm=-1", "`optim.clip_norm`: must be > 0 (or null for no clipping)"),
    ("optim.weight_decay=-0.1", "`optim.weight_decay`: must be >= 0"),
    ("optim.eps=0", "`optim.eps`: must be > 0"),
    ("optim.eps=.inf", "`optim.eps`: must be a finite number"),
    ("loss.label_scale=0", "`loss.label_scale`: must not be 0"),
    ("loss.label_shift=.inf", "`loss.label_shift`: must be a finite number"),
    ("data.seq_len=4", "`data.seq_len`: must be >= 8"),
    ("data.max_segments=0", "`data.max_segments`: must be >= 1"),
    ("data.max_segments=1000000000", "`data.max_segments`: 1000000000 segments cannot fit in a row of at most"),
    ("data.shuffle_seed=-1", "`data.shuffle_seed`: must be in [0, 4294967295], got -1"),
    ("seed=-5", "`seed`: must be in [0, 4294967295], got -5"),
    ("seed=4294967296", "`seed`: must be in [0, 4294967295]"),
    ("global_batch_size=0", "`global_batch_size`: must be >= 1"),
    ("grad_accum=0", "`grad_accum`: must be >= 1"),
    ("epochs=0", "`epochs`: must be >= 1"),
    ("log_every=0", "`log_every`: must be >= 1"),
    ("eval_every=0", "`eval_every`: must be >= 1"),
    ("mesh=[0,1,1]", "`mesh`: [0, 1, 1] needs 3 positive sizes"),
    ("mesh=[-1,-1,1]", "`mesh`: [-1, -1, 1] needs 3 positive sizes"),
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_refused(override, message, capsys, tmp_path, no_training):
    assert message in refused(capsys, tmp_path, STAGE1, override)


# Checks that need the devices and the model: refused after reading config.json and the
# tokenizer, still before the output directory exists and before anything compiles.
AGAINST_DEVICES_AND_MODEL = [
    (["mesh=[1,3,1]"], "`mesh`: mesh (1, 3, 1) needs 3 devices, 8 available"),
    (["mesh=[-1,3,1]"], "`mesh`: mesh (-1, 3, 1) does not divide 8 devices"),
    (["global_batch_size=4"], "`global_batch_size`: 4 / grad_accum 1 = 4 rows per micro-batch cannot be "
                              "split over the 8 data-parallel devices of mesh [8, 1, 1]"),
    (["global_batch_size=16", "grad_accum=4"], "make the rows per micro-batch a multiple of 8"),
    (["global_batch_size=8", "mesh=[2,2,2]"], None),  # 8 rows over data x fsdp = 4: accepted
    (["global_batch_size=8", "attention=splash"], "`attention`: attention 'splash' needs a TPU; this run's "
                                                  "JAX backend is 'cpu'"),
    (["data.seq_len=131073", "global_batch_size=8"], "`data.seq_len`: 131073 is longer than the model's "
                                                    "context (max_position_embeddings 131072"),
]


@pytest.mark.parametrize("overrides, message", AGAINST_DEVICES_AND_MODEL,
                         ids=[" ".join(o) for o, _ in AGAINST_DEVICES_AND_MODEL])
def test_checks_against_devices_and_model(overrides, message, base_model, capsys, tmp_path, no_training):
    if message is None:  # the control: these pass every check and reach the (tripwired) trainer
        with pytest.raises(AssertionError, match="training started"):
            cli.main(["train", STAGE1, f"model={base_model}", f"output_dir={tmp_path / 'run'}", *overrides])
        return
    assert message in refused(capsys, tmp_path, STAGE1, *overrides, model=base_model)


def test_stage2_pairs_count_two_rows(base_model, capsys, tmp_path, no_training):
    """Stage 2 batches are pairs, two rows each: 4 pairs fill 8 devices; 3 do not."""
    line = refused(capsys, tmp_path, STAGE2, "global_batch_size=3", model=base_model)
    assert "3 pairs (6 rows) per micro-batch" in line
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["train", STAGE2, f"model={base_model}", f"output_dir={tmp_path / 'ok'}", "global_batch_size=4"])


def test_model_that_is_a_run_directory_or_missing(base_model, capsys, tmp_path, no_training):
    run = tmp_path / "stage1_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("stage: 1\n")
    line = refused(capsys, tmp_path, STAGE1, "global_batch_size=8", model=run)
    assert f"`model`: {run} is a training run directory; start from its final/" in line
    missing = tmp_path / "nowhere"
    assert str(missing) in refused(capsys, tmp_path, STAGE1, "global_batch_size=8", model=missing)


def test_yaml_files(capsys, tmp_path, no_training):
    """`base:` pointing at itself or round a cycle, non-UTF-8 text, a missing base, invalid YAML,
    a list at the top: each names the file."""
    (tmp_path / "self.yaml").write_text("base: self.yaml\nseed: 1\n")
    line = refused(capsys, tmp_path, tmp_path / "self.yaml")
    assert "self.yaml: `base` chain comes back to a file already in it" in line

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    line = refused(capsys, tmp_path, tmp_path / "a.yaml")
    assert f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}" in line

    (tmp_path / "latin1.yaml").write_bytes("seed: 1  # café\n".encode("latin-1"))
    line = refused(capsys, tmp_path, tmp_path / "latin1.yaml")
    assert f"{tmp_path / 'latin1.yaml'}: not UTF-8 text" in line and "at byte 14" in line

    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    assert f"{tmp_path / 'missing.yaml'}: not found" in refused(capsys, tmp_path, tmp_path / "orphan.yaml")

    (tmp_path / "broken.yaml").write_text("optim: {learning_rate: 1e-5\n")
    assert f"{tmp_path / 'broken.yaml'}: invalid YAML" in refused(capsys, tmp_path, tmp_path / "broken.yaml")

    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "list.yaml: the top level must be a mapping" in refused(capsys, tmp_path, tmp_path / "list.yaml")


# A YAML syntax error: one line naming the file (or the override), the 1-based line and column
# and the parser's short reason; never PyYAML's several lines about `<unicode string>`.
YAML_SYNTAX = [  # (recipe text after its `base:` line, what the error says)
    ("optim: [1,\n", "line 3, column 1: expected the node content, but found '<stream end>'"),
    ("seed: 1\noptim: {learning_rate: 1e-5\n", "line 4, column 1: expected ',' or '}'"),
    ("seed: 1\n  bad: 2\n", "line 3, column 6: mapping values are not allowed here"),
    ("data:\n\ttrain: x\n", "line 3, column 1: found character '\\t' that cannot start any token"),
]


@pytest.mark.parametrize("text, message", YAML_SYNTAX, ids=[m.split(":")[0] for _, m in YAML_SYNTAX])
def test_yaml_syntax_error_is_one_line(text, message, capsys, tmp_path, no_training):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"base: {STAGE1}\n{text}")
    line = refused(capsys, tmp_path, recipe)
    assert line.startswith(f"error: {recipe}: invalid YAML: {message}"), line
    assert "<unicode string>" not in line


def test_yaml_syntax_error_in_an_override_names_it(capsys, tmp_path, no_training):
    line = refused(capsys, tmp_path, STAGE1, "optim={learning_rate: [1,")
    assert ("override 'optim={learning_rate: [1,': invalid YAML value: line 1, column 26: expected the node "
            "content, but found '<stream end>'") in line, line


def test_a_mapping_override_merges_into_its_section():
    """`optim={}` changes nothing (it used to reset the recipe's optim section to the base
    defaults); `optim={learning_rate: 1e-5}` changes that key alone; the same rule as `base:`."""
    recipe = load_train_config(STAGE1, runnable=False)
    assert load_train_config(STAGE1, runnable=False, overrides=["optim={}"]) == recipe
    assert load_train_config(STAGE1, runnable=False, overrides=["data={}", "precision={}"]) == recipe
    changed = load_train_config(STAGE1, runnable=False, overrides=["optim={learning_rate: 1e-5}"])
    assert changed.optim == dataclasses.replace(recipe.optim, learning_rate=1e-5)
    assert changed == dataclasses.replace(recipe, optim=changed.optim)
    nested = load_train_config(STAGE1, runnable=False, overrides=["checkpoint={keep: 5}", "data={seq_len: 128}"])
    assert nested.checkpoint == dataclasses.replace(recipe.checkpoint, keep=5)
    assert nested.data == dataclasses.replace(recipe.data, seq_len=128)
    assert recipe.optim.warmup_ratio == 0.1  # the recipe's value, not the base's 0.03


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint.every_steps=0"], "error: `checkpoint.every_steps`: must be >= 1, got 0"),
    (["mesh=[1,2,1]"], "error: `mesh`: mesh (1, 2, 1) needs 2 devices, 1 available"),
])
def test_the_real_command(overrides, message, base_model, tmp_path):
    """The installed command end to end: exit 2, stderr is the one error line, nothing written."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "urm_jax.cli", "train", STAGE1, f"model={base_model}",
                           f"output_dir={out}", *overrides], cwd=ROOT, env=cli_env(1),
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [message], done.stderr[-2000:]
    assert not Path(out).exists()


@pytest.mark.parametrize("overrides, ignored", [
    (["data.pack=true", "data.max_segments=8"], "data.pack=true, data.max_segments=8 change nothing"),
    (["data.pack=false", "data.max_segments=8"], "data.max_segments=8 changes nothing"),
    (["remat=full"], "remat=full changes nothing"),
    ([], None),  # the recipe's own data.pack: false asks for nothing the cached path does otherwise
    (["stage2_cached_features=false", "data.pack=true", "data.max_segments=8", "remat=full"], None),
    # held-out pairs are batched as packed token rows: the data keys apply to them
    ([f"data.eval={ROOT / 'data/samples/preference_sample.jsonl'}", "data.max_segments=8",
      "remat=dots"], "remat=dots changes nothing"),
], ids=["pack+max_segments", "max_segments", "remat", "recipe", "uncached", "with-eval"])
def test_settings_cached_stage2_ignores_are_named_once(overrides, ignored, base_model, capsys, tmp_path,
                                                        no_training):
    """Stage 2 on cached features (the default) trains the gate on pooled features: token-row
    settings the user gave (packing, its segment cap, remat) would change nothing. The run says
    so in one `warning:` line at its start, naming them and stage2_cached_features=false; not for
    keys left at their defaults, nor when the run trains on token rows."""
    capsys.readouterr()
    with pytest.raises(AssertionError, match="training started"):
        cli.main(["train", STAGE2, f"model={base_model}", f"output_dir={tmp_path / 'run'}",
                  "global_batch_size=8", *overrides])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    if ignored is None:
        assert warnings == []
        return
    assert len(warnings) == 1 and ignored in warnings[0], warnings
    assert ("data.max_segments" in warnings[0]) == ("data.max_segments" in ignored), warnings
    assert "cached features" in warnings[0] and "stage2_cached_features=false" in warnings[0]
    # without `notices` (a run's saved config.yaml read back holds every key): no warning
    with warnings_module.catch_warnings(record=True) as seen:
        warnings_module.simplefilter("always")
        load_train_config(STAGE2, ["model=m", "output_dir=o", *overrides])
    assert seen == []


@pytest.mark.parametrize("trainable, cached", [
    (None, True), (("gate", "value_head"), True), (("gate",), True),
    (("gate", "backbone/layers/q_proj"), False), (("*q_proj*",), False), (("gate", "backbone"), False),
    (("backbone/final_norm",), False)])
def test_stage2_trainable_patterns_that_reach_the_backbone_leave_the_cached_path(trainable, cached):
    """Features pooled once cannot follow a trained backbone: a stage-2 run whose `trainable`
    patterns select any backbone parameter goes through the backbone (found by the stop-20
    review: `trainable=[gate,backbone/layers/q_proj]` trained the gate only and recorded q_proj
    as trained)."""
    train = TrainConfig(stage=2, loss=LossConfig(kind="bt"), trainable=trainable)
    assert train.use_features is cached
    assert TrainConfig(stage=2, loss=LossConfig(kind="bt"), trainable=trainable,
                       stage2_cached_features=False).use_features is False
