"""File-handling edges found by review 10a: the demo's workdir never swallows what it reads,
corrupt training steps, checkpoint provenance fields, ensembles of mismatched attribute sets,
non-finite ids, outputs of the wrong kind, stale temporaries, and one-line usage errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from urm_jax import demo as demo_module
from convert.__main__ import main as convert_main
from urm_jax.cli import main as cli_main
from faults import write_tiny_base
from refusals import refused, snapshot


# ---------------------------------------------------------------------------------------------
# the demo's workdir


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    """A checkout-shaped tree the demo is made to believe it reads (package, configs/, data/),
    with the current directory and $HOME inside it: a refusal that failed would empty only
    this copy."""
    root = tmp_path / "co"
    for sub in ("urm_jax", "configs/train", "data/samples"):
        (root / sub).mkdir(parents=True)
        (root / sub / "keep.txt").write_text(sub)
    monkeypatch.setattr(demo_module, "PACKAGE", root / "urm_jax")
    monkeypatch.setattr(demo_module, "CONFIGS", root / "configs" / "train")
    monkeypatch.setattr(demo_module, "SAMPLES", root / "data" / "samples")
    home = tmp_path / "home"
    (home / "cwd").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "cwd")
    return root


@pytest.mark.parametrize("workdir, needle", [
    ("co", "contains the input the urm_jax package"), ("", "contains the input"),
    ("co/data", "is the input the data directory"), ("co/data/samples", "is inside the input the data"),
    ("co/configs", "is the input the configs"), ("co/urm_jax/sub", "is inside the input the urm_jax"),
    ("home/cwd", "is the current directory"), ("home", "contains the current directory"),
])
def test_demo_workdir_never_holds_what_it_reads(capsys, fake_checkout, workdir, needle):
    tmp = fake_checkout.parent
    refused(capsys, cli_main, ["demo", "--workdir", tmp / workdir, "--overwrite"], "--workdir", needle,
            keep=[fake_checkout, tmp / "home"])


def test_demo_workdir_dot_and_root(capsys, fake_checkout):
    refused(capsys, cli_main, ["demo", "--workdir", ".", "--overwrite"], "is the current directory")
    refused(capsys, cli_main, ["demo", "--workdir", "/", "--overwrite"], "--workdir /")


def test_demo_mark_counts_only_where_it_was_made(fake_checkout, tmp_path):
    made = tmp_path / "made"
    demo_module.fresh_workdir(made, overwrite=False)
    mark = json.loads((made / demo_module.DEMO_MARK).read_text())
    assert mark["workdir"] == os.path.realpath(made)
    (made / "result.txt").write_text("x")
    demo_module.fresh_workdir(made, overwrite=False)  # its own mark: emptied without --overwrite
    assert not (made / "result.txt").exists()
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "thesis.tex").write_text("years of work")
    (forged / demo_module.DEMO_MARK).write_bytes((made / demo_module.DEMO_MARK).read_bytes())
    with pytest.raises(FileExistsError, match="already exists"):
        demo_module.fresh_workdir(forged, overwrite=False)
    assert (forged / "thesis.tex").read_text() == "years of work"


# ---------------------------------------------------------------------------------------------
# a training step whose data file is truncated or missing


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-step stage-1 run of a tiny random URM, a checkpoint per step (in-process)."""
    root = tmp_path_factory.mktemp("tiny_run")
    base = write_tiny_base(root / "base")
    run = root / "run"
    assert cli_main(["train", str(STAGE1), f"model={base}", f"output_dir={run}", "max_steps=2",
                     "checkpoint.async_save=false", "checkpoint.every_steps=1", "global_batch_size=8"]) == 0
    return run


STAGE1 = Path(__file__).resolve().parent.parent / "configs" / "train" / "tiny_stage1.yaml"


def step_data_files(run: Path, step: int) -> list[Path]:
    return sorted((run / "checkpoints" / str(step) / "state").glob("ocdbt.process_*/d/*"),
                  key=lambda f: f.stat().st_size)


def test_unreadable_training_step_is_one_error_line(capsys, tiny_run, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_run, truncated)
    largest = step_data_files(truncated, 2)[-1]
    largest.write_bytes(largest.read_bytes()[:1000])
    refused(capsys, cli_main, ["export", truncated, tmp_path / "out", "--step", "2"],
            "training step 2 cannot be read", str(largest), absent=[tmp_path / "out"])
    missing = tmp_path / "missing"
    shutil.copytree(tiny_run, missing)
    for f in step_data_files(missing, 2):
        f.unlink()
    refused(capsys, cli_main, ["export", missing, tmp_path / "out", "--step", "2"],
            "training step 2 cannot be read", str(missing / "checkpoints" / "2" / "state"),
            absent=[tmp_path / "out"])
    assert cli_main(["export", str(missing), str(tmp_path / "out"), "--step", "1"]) == 0  # other steps intact


# ---------------------------------------------------------------------------------------------
# checkpoint provenance fields in config.json


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf

    return write_random_hf(tmp_path_factory.mktemp("edges") / "hf", tiny_hf_config(), dtype="float32",
                           gate_dtype="float32", progress=False)


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("edges_ckpt") / "ckpt"
    assert convert_main(["from_hf", str(hf_dir), str(out)]) == 0
    return out


GOOD_STAGE = {"stage": 1, "run_dir": "/r", "data": "d.jsonl", "split": "train", "steps": 4, "epochs": 1,
              "global_batch_size": 8, "seq_len": 64, "learning_rate": 1e-3, "head_lr_scale": 1.0,
              "loss": "gaussian_nll", "trainable": ["backbone"], "compute_dtype": "float32",
              "final_metrics": {"loss": 1.5}, "eval": {}, "eval_step": None}


@pytest.mark.parametrize("change, needle", [
    ({"urm_jax_training": "oops"}, "field urm_jax_training: expected a list of training records"),
    ({"urm_jax_training": [1]}, "field urm_jax_training[0]: expected an object"),
    ({"urm_jax_training": [{**GOOD_STAGE, "learning_rate": "fast"}]},
     "field urm_jax_training[0].learning_rate: expected a finite number >= 0"),
    ({"urm_jax_training": [{**GOOD_STAGE, "trainable": "backbone"}]}, "field urm_jax_training[0].trainable"),
    ({"urm_jax_training": [{**GOOD_STAGE, "final_metrics": {"loss": "low"}}]},
     "field urm_jax_training[0].final_metrics.loss"),
    ({"urm_jax_init": [1]}, "field urm_jax_init: expected an object"),
    ({"urm_jax_init": {"base_model": 5}}, "field urm_jax_init.base_model: expected a string"),
    ({"urm_jax_init": {"init_std": -1}}, "field urm_jax_init.init_std"),
    ({"urm_label_range": [4, 0]}, "field urm_label_range: needs finite low < high"),
    ({"urm_label_range": "1-5"}, "field urm_label_range: expected [low, high]"),
])
def test_checkpoint_provenance_is_validated(capsys, ckpt, tmp_path, change, needle):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    refused(capsys, convert_main, ["to_hf", bad, tmp_path / "hf"], str(bad / "config.json"), needle,
            absent=[tmp_path / "hf"])


def test_valid_provenance_reaches_the_card(ckpt, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(ckpt, good)
    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({
        **config, "urm_jax_training": [GOOD_STAGE], "urm_label_range": [1, 5],
        "urm_jax_init": {"base": "/b", "base_model": "org/base", "license": None, "init_std": 0.02,
                         "seed": 0, "base_architectures": ["LlamaForCausalLM"]}}))
    assert convert_main(["to_hf", str(good), str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert 'base_model: "org/base"' in card and "labels in [1, 5]" in card and "lr 0.001" in card


# ---------------------------------------------------------------------------------------------
# ensembles of models with different attribute sets


def with_attributes(ckpt: Path, out: Path, attributes: list[str]) -> Path:
    shutil.copytree(ckpt, out)
    config = json.loads((out / "config.json").read_text())
    config["urm_attributes"] = attributes
    config["id2label"] = {str(2 * k + j): f"{a}{s}" for k, a in enumerate(attributes)
                          for j, s in enumerate(("_mean", "_log_std"))}
    config.pop("label2id", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_ensemble_members_must_share_attributes(capsys, ckpt, tmp_path):
    from urm_jax.config import ModelConfig

    names = list(ModelConfig.from_hf_dir(ckpt).attributes)
    other = with_attributes(ckpt, tmp_path / "abcde", ["a", "b", "c", "d", "e"][:len(names)])
    shuffled = with_attributes(ckpt, tmp_path / "shuffled", names[::-1])
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"input_ids": [4, 5, 6], "id": 1}) + "\n")
    for member in (other, shuffled):
        refused(capsys, cli_main, ["score", "--model", ckpt, "--model", member, "--input", inp,
                                   "--output", tmp_path / "o.jsonl"],
                "different attributes", f"{ckpt} has [{', '.join(names)}]", f"{member} has [",
                absent=[tmp_path / "o.jsonl"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"chosen": [4, 5], "rejected": [6, 7]}) + "\n")
    refused(capsys, cli_main, ["eval", "--model", ckpt, "--model", other, "--pairs", pairs,
                               "--output-dir", tmp_path / "ev"], "different attributes", str(other),
            absent=[tmp_path / "ev"])


# ---------------------------------------------------------------------------------------------
# numbers that overflow to infinity are bad lines, like NaN


@pytest.mark.parametrize("spelling", ["1e999", "-1E+999", "123456789e400", "1.5e309"])
def test_overflowing_numbers_are_bad_lines(capsys, ckpt, tmp_path, spelling):
    from urm_jax.validate import MetadataError, read_json

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"input_ids": [4, 5], "id": "ok"}\n' f'{{"input_ids": [4, 5], "id": {spelling}}}\n')
    refused(capsys, cli_main, ["score", "--model", ckpt, "--input", inp, "--output", tmp_path / "o.jsonl"],
            f"{inp}:2", "out of range", absent=[tmp_path / "o.jsonl"])
    assert cli_main(["score", "--model", str(ckpt), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                     "--on-bad-line", "skip", "--bad-lines", str(tmp_path / "bad.jsonl")]) == 0
    assert [json.loads(line)["id"] for line in (tmp_path / "o.jsonl").read_text().splitlines()] == ["ok"]
    assert "out of range" in (tmp_path / "bad.jsonl").read_text()
    meta = tmp_path / "m.json"
    meta.write_text(f'{{"rope_theta": {spelling}}}')
    with pytest.raises(MetadataError, match="out of range"):
        read_json(meta)


# ---------------------------------------------------------------------------------------------
# an output of the wrong kind (a directory where a file is written, and vice versa)


def test_outputs_of_the_wrong_kind_are_refused_up_front(capsys, hf_dir, ckpt, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"input_ids": [4, 5, 6], "id": 1}) + "\n")
    adir = tmp_path / "adir"
    (adir / "sub").mkdir(parents=True)
    (adir / "sub" / "x.txt").write_text("keep")
    afile = tmp_path / "afile"
    afile.write_text("keep")
    score = ["score", "--model", ckpt, "--input", inp, "--overwrite"]
    refused(capsys, cli_main, [*score, "--output", adir], "--output", "is a directory, where a file",
            keep=[adir])
    refused(capsys, cli_main, [*score, "--output", tmp_path / "o.jsonl", "--on-bad-line", "skip",
                               "--bad-lines", adir], "--bad-lines", "is a directory", keep=[adir])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"chosen": [4, 5], "rejected": [6, 7]}) + "\n")
    refused(capsys, cli_main, ["eval", "--model", ckpt, "--pairs", pairs, "--output-dir", afile,
                               "--overwrite"], "--output-dir", "is not a directory", keep=[afile])
    refused(capsys, convert_main, ["from_hf", hf_dir, afile, "--overwrite"], "OUT_DIR", "is not a directory",
            keep=[afile])
    refused(capsys, convert_main, ["to_hf", ckpt, afile, "--overwrite"], "OUT_DIR", "is not a directory",
            keep=[afile])
    refused(capsys, cli_main, ["parity", "--hf", hf_dir, "--model", ckpt, "--json", adir, "--overwrite"],
            "--json", "is a directory", keep=[adir])


# ---------------------------------------------------------------------------------------------
# a dead run's hidden temporary is swept by the next write of the same file


def test_atomic_file_sweeps_temporaries_of_dead_processes(ckpt, tmp_path):
    import socket
    import subprocess
    import sys

    from urm_jax.io_utils import atomic_file

    dead_pid = 999999999  # above any pid_max: no such process (a reaped child's pid could be reused)
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        out = tmp_path / "o.jsonl"
        host = socket.gethostname()
        stale = tmp_path / f".o.jsonl.tmp-{host}-{dead_pid}"
        live = tmp_path / f".o.jsonl.tmp-{host}-{alive.pid}"
        other_host = tmp_path / f".o.jsonl.tmp-{host}x-{dead_pid}"
        for temp in (stale, live, other_host):
            temp.write_text("half a file")
        inp = tmp_path / "in.jsonl"
        inp.write_text(json.dumps({"input_ids": [4, 5, 6], "id": 1}) + "\n")
        assert cli_main(["score", "--model", str(ckpt), "--input", str(inp), "--output", str(out)]) == 0
        assert not stale.exists(), "a dead process's temporary must be removed"
        assert live.exists() and other_host.exists(), "a live process's (or another host's) temporary is kept"
        stale.write_text("again")
        with atomic_file(tmp_path / "o.jsonl") as handle:
            handle.write("x")
        assert not stale.exists()
    finally:
        alive.stdin.close()
        alive.wait()


# ---------------------------------------------------------------------------------------------
# messages that name the flag, in our words


@pytest.mark.parametrize("size, needle", [("0", "expected a positive size"), ("0.1", "expected a positive size"),
                                          ("abc", "cannot parse size"), ("1e3", "cannot parse size"),
                                          ("-1", "cannot parse size")])
def test_max_shard_size_is_checked_up_front(capsys, ckpt, tmp_path, size, needle):
    refused(capsys, convert_main, ["to_hf", ckpt, tmp_path / "hf", f"--max-shard-size={size}"],
            "--max-shard-size", needle, absent=[tmp_path / "hf"])


def test_init_seed_and_parity_hf_messages(capsys, hf_dir, ckpt, tmp_path):
    with pytest.raises(SystemExit) as exc:  # a usage error: OneLineParser's one line, exit 2
        convert_main(["init", str(hf_dir), str(tmp_path / "i"), "--seed", "-1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip() == ("error: argument --seed: must be at least 0, got -1 "
                                                   "(see --help)"), err
    assert not (tmp_path / "i").exists()
    refused(capsys, cli_main, ["parity", "--hf", ckpt, "--model", ckpt], str(ckpt), "no HF weights",
            "it is a urm-jax checkpoint")
    empty = tmp_path / "cfg_only"
    empty.mkdir()
    shutil.copy(hf_dir / "config.json", empty / "config.json")
    refused(capsys, cli_main, ["parity", "--hf", empty, "--model", ckpt], "no HF weights",
            "--hf must be an HF model directory")


# ---------------------------------------------------------------------------------------------
# argparse errors: one line, exit 2, for every command line


@pytest.mark.parametrize("main, argv, needle", [
    (cli_main, ["score", "--input", "x.jsonl", "--output", "o.jsonl"], "--model"),
    (cli_main, ["score", "--model", "m", "--input", "x", "--output", "o", "--batch-size", "two"], "--batch-size"),
    (cli_main, ["export"], "required"),
    (cli_main, ["nosuchcommand"], "invalid choice"),
    (cli_main, ["demo", "--no-such-flag"], "unrecognized arguments"),
    (convert_main, ["to_hf"], "required"),
    (convert_main, ["init", "b", "o", "--seed", "x"], "--seed"),
    (convert_main, ["from_hf", "a", "b", "--dtype", "int3"], "--dtype"),
])
def test_usage_errors_are_one_line(capsys, main, argv, needle):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and err.rstrip().endswith("(see --help)"), err
    assert needle in err and "usage:" not in err


def test_python_m_convert_usage_error_is_one_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "convert", "to_hf", "--dtype"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: ") and "(see --help)" in done.stderr


# ---------------------------------------------------------------------------------------------
# export of a run whose start model moved


def test_export_when_the_start_model_moved(capsys, tiny_run, hf_dir, tmp_path):
    import yaml

    record = tiny_run / "start_model"
    assert (record / "config.json").is_file() and (record / "tokenizer.json").is_file()
    moved = tmp_path / "run"
    shutil.copytree(tiny_run, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    start = Path(config["model"])
    copy_of_start = shutil.copytree(start, tmp_path / "start_copy")
    config["model"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    refused(capsys, cli_main, ["export", moved, out, "--step", "1"], "config.yaml `model:",
            str(tmp_path / "gone"), "--model PATH", absent=[out])
    refused(capsys, cli_main, ["export", moved, out, "--step", "1", "--model", hf_dir],
            f"{hf_dir} is not the model", absent=[out])
    assert cli_main(["export", str(moved), str(out), "--step", "1", "--model", str(copy_of_start)]) == 0
    assert cli_main(["export", str(tiny_run), str(tmp_path / "ref"), "--step", "1"]) == 0
    ours, ref = snapshot(out / "params"), snapshot(tmp_path / "ref" / "params")
    for timestamps in (ours, ref):
        timestamps.pop("_CHECKPOINT_METADATA")
    assert ours == ref, "the export from the moved start model must equal the original's"
