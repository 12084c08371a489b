"""Bad inputs and faults at the file edges of every command, each ending in one `error:` line
that names the file (and line, field or tensor), exit 2, nothing half-written left behind and
nothing that was there before destroyed.

    1. outputs never destroy inputs          (score, eval, parity, export, convert, train, demo)
    2. metadata is validated with types      (config.json, urm_jax.json, _METADATA, index, run files)
    5. non-finite numbers never pass          (checkpoint reads, down-casts, score output lines)
    8. every error names where                (dataset lines, Orbax metadata, index paths, symlinks)

Models are tiny random URMs written straight from the mapping table (no torch).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from convert.__main__ import main as convert_main
from urm_jax.checkpoint import CheckpointError, check_orbax_step, load_params, save_checkpoint
from urm_jax.cli import main as cli_main
from urm_jax.config import ModelConfig
from urm_jax.data.datasets import DatasetSchemaError, load_helpsteer2, load_preference_pairs, load_rows
from urm_jax.finite import NonFiniteError, check_cast, check_finite, check_tree_finite, checked_astype
from urm_jax.hf import safetensors_io
from urm_jax.hf.safetensors_io import HFWeights
from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf
from urm_jax.io_utils import OutputConflictError, OutputExistsError, check_outputs
from urm_jax.jsonl import InputError
from urm_jax.train.features import load_or_compute
from urm_jax.train.run_dir import RunDirectory, RunDirectoryError
from urm_jax.validate import Fields, MetadataError, read_json
from refusals import refused

HF_CONFIG = tiny_hf_config()
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"
STAGE1, STAGE2 = str(CONFIGS / "tiny_stage1.yaml"), str(CONFIGS / "tiny_stage2.yaml")
ROWS = [{"input_ids": [4, 5, 6], "id": "a"}, {"input_ids": [7, 8, 9, 10], "id": 2}]

# ---------------------------------------------------------------------------------------------
# helpers


def ok(main, *argv) -> None:
    """Run a command expecting success (exit 0)."""
    assert main([str(a) for a in argv]) == 0, f"{' '.join(map(str, argv))} failed"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def strict_lines(path: Path) -> list:
    """Every line parsed by a strict JSON parser (NaN/Infinity rejected)."""
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name} in {path}")
    return [json.loads(line, parse_constant=reject) for line in Path(path).read_text().splitlines()]


def edit_config(directory: Path, change=None, *, text: str | None = None) -> None:
    file = directory / "config.json"
    if text is None:
        cfg = json.loads(file.read_text())
        cfg.update(change)
        text = json.dumps(cfg)
    file.write_text(text)


def poke_tensor(directory: Path, key: str, index, value, dtype=None) -> None:
    """Set one value of an HF tensor in a single-file checkpoint (optionally recast it)."""
    file = directory / "model.safetensors"
    tensors = load_file(file)
    tensor = tensors[key].astype(dtype) if dtype else tensors[key].copy()
    tensor[index] = value
    tensors[key] = tensor
    save_file(tensors, file, metadata={"format": "pt"})


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_random_hf(tmp_path_factory.mktemp("hard") / "hf", HF_CONFIG, dtype="float32",
                           gate_dtype="float32", progress=False)


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hard_ckpt") / "ckpt"
    ok(convert_main, "from_hf", str(hf_dir), str(out))
    return out


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hard_in") / "in.jsonl", ROWS)


# ---------------------------------------------------------------------------------------------
# 1. outputs never destroy inputs: the one rule, then every command


def test_check_outputs_resolves_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    (tmp_path / "link.jsonl").symlink_to(inp)
    os.link(inp, tmp_path / "hard.jsonl")
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    ins = [("--input", "in.jsonl"), ("--model", model)]
    for out, how in [("in.jsonl", "is the input --input"), ("./in.jsonl", "is the input"),
                     (str(inp), "is the input"), ("sub/../in.jsonl", "is the input"),
                     ("link.jsonl", "is the input"), ("hard.jsonl", "is the input"),
                     (model / "scores.jsonl", "is inside the input --model"),
                     (model / "sub", "is inside the input --model"),
                     (tmp_path, "contains the input")]:
        for overwrite in (False, True):  # --overwrite never lets an output replace an input
            with pytest.raises(OutputConflictError, match=how):
                check_outputs(ins, [("--output", out)], overwrite=overwrite)
    with pytest.raises(OutputConflictError, match="--bad-lines o.jsonl is --output ./o.jsonl"):
        check_outputs(ins, [("--output", "./o.jsonl"), ("--bad-lines", "o.jsonl")], overwrite=True)
    check_outputs(ins, [("--output", "new.jsonl"), ("--bad-lines", None)], overwrite=False)
    (tmp_path / "old.jsonl").write_text("x\n")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for existing in ("old.jsonl", "dangling"):
        with pytest.raises(OutputExistsError, match=f"--output {existing} already exists"):
            check_outputs(ins, [("--output", existing)], overwrite=False)
        check_outputs(ins, [("--output", existing)], overwrite=True)


def score_argv(model, inp, out, *extra):
    return ["score", "--model", model, "--input", inp, "--output", out, "--no-progress", *extra]


def test_score_outputs_never_replace_inputs(capsys, hf_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    (tmp_path / "alias.jsonl").symlink_to("in.jsonl")
    for out in (inp, "./in.jsonl", "alias.jsonl"):
        for extra in ((), ("--overwrite",)):
            refused(capsys, cli_main, score_argv(hf_dir, "in.jsonl", out, *extra), "is the input",
                    "--input", keep=[inp, hf_dir])
    refused(capsys, cli_main, score_argv(hf_dir, inp, hf_dir / "config.json", "--overwrite"),
            "inside the input --model", keep=[hf_dir])
    refused(capsys, cli_main, score_argv(hf_dir, inp, tmp_path / "o.jsonl", "--on-bad-line", "skip",
                                         "--bad-lines", "./o.jsonl"),
            "--bad-lines ./o.jsonl is --output", absent=[tmp_path / "o.jsonl"])
    refused(capsys, cli_main, score_argv(hf_dir, inp, tmp_path / "x.jsonl", "--on-bad-line", "skip",
                                         "--bad-lines", inp, "--overwrite"),
            "--bad-lines", "is the input", keep=[inp], absent=[tmp_path / "x.jsonl"])
    # An existing output is kept unless --overwrite; with it, it is replaced by the scores.
    old = tmp_path / "old.jsonl"
    old.write_text("previous\n")
    refused(capsys, cli_main, score_argv(hf_dir, inp, old), "already exists", "--overwrite", keep=[old])
    ok(cli_main, *score_argv(hf_dir, inp, old, "--overwrite"))
    assert [r["id"] for r in strict_lines(old)] == ["a", 2]


def test_eval_parity_export_outputs(capsys, hf_dir, ckpt, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": {"input_ids": [4, 5]},
                                                    "rejected": {"input_ids": [6, 7]}}])
    refused(capsys, cli_main, ["eval", "--model", hf_dir, "--pairs", pairs, "--output-dir", tmp_path,
                               "--overwrite"], "contains the input", keep=[pairs])
    refused(capsys, cli_main, ["eval", "--model", hf_dir, "--pairs", pairs, "--output-dir",
                               hf_dir / "eval", "--no-progress"], "inside the input --model",
            absent=[hf_dir / "eval"])
    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.json").write_text("{}")
    refused(capsys, cli_main, ["eval", "--model", hf_dir, "--pairs", pairs, "--output-dir", done],
            "already exists", keep=[done])

    inp = write_jsonl(tmp_path / "p.jsonl", ROWS)
    refused(capsys, cli_main, ["parity", "--hf", hf_dir, "--model", ckpt, "--input", inp, "--json",
                               inp, "--overwrite"], "--json", "is the input --input", keep=[inp])
    refused(capsys, cli_main, ["parity", "--hf", hf_dir, "--model", ckpt, "--json",
                               ckpt / "urm_jax.json", "--overwrite"], "inside the input --model",
            keep=[ckpt])
    report = tmp_path / "report.json"
    report.write_text("{}")
    refused(capsys, cli_main, ["parity", "--hf", hf_dir, "--model", ckpt, "--json", report],
            "already exists", keep=[report])

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(ckpt), "output_dir": str(run),
                                                     "data": {"train": "x.jsonl"}}))
    for out, needle in [(run, "is the input RUN_DIR"), (run / "exported", "inside the input RUN_DIR"),
                        (ckpt, f"is the input model (from RUN_DIR's config.yaml) {ckpt}"),
                        (tmp_path, "contains the input")]:
        refused(capsys, cli_main, ["export", run, out, "--overwrite"], needle, keep=[run, ckpt])


def test_convert_outputs_never_replace_inputs(capsys, hf_dir, ckpt, tmp_path):
    (tmp_path / "hf_link").symlink_to(hf_dir)
    for cmd, src in (("from_hf", hf_dir), ("init", hf_dir), ("to_hf", ckpt)):
        for out, needle in [(src, "is the input"), (tmp_path / "hf_link" if cmd != "to_hf" else ckpt,
                                                    "is the input"),
                            (src / "out", "is inside the input"), (src.parent, "contains the input")]:
            refused(capsys, convert_main, [cmd, src, out, "--overwrite"], needle, "OUT_DIR",
                    keep=[src])
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    for cmd, src in (("from_hf", hf_dir), ("init", hf_dir), ("to_hf", ckpt)):
        refused(capsys, convert_main, [cmd, src, existing], "already exists", keep=[existing])


def test_outputs_never_replace_the_current_directory(capsys, hf_dir, ckpt, tmp_path, monkeypatch):
    """`OUT_DIR .` (or `..`, or the cwd by its absolute name) with --overwrite would replace the
    directory the user works in: refused by every command that replaces a directory output."""
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": {"input_ids": [4, 5]},
                                                    "rejected": {"input_ids": [6, 7]}}])
    for out, how in ((".", "is"), ("./", "is"), (work, "is"), ("..", "contains")):
        for cmd, src in (("from_hf", hf_dir), ("init", hf_dir), ("to_hf", ckpt)):
            refused(capsys, convert_main, [cmd, src, out, "--overwrite"], "OUT_DIR",
                    f"{how} the current directory", keep=[work, src])
        refused(capsys, cli_main, ["eval", "--model", hf_dir, "--pairs", pairs, "--output-dir", out,
                                   "--overwrite", "--no-progress"], "--output-dir",
                f"{how} the current directory", keep=[work, pairs])


def test_train_never_replaces_its_inputs(capsys, ckpt, tmp_path):
    """Stage 2 pointed at stage 1's run directory would replace stage 1's final/ (its model);
    a data file named like a run output would be appended to."""
    stage1 = tmp_path / "stage1"
    model = copy(ckpt, stage1 / "final")
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": [], "rejected": []}])
    refused(capsys, cli_main, ["train", STAGE2, f"model={model}", f"output_dir={stage1}",
                               f"data.train={data}"], "output_dir's final", "is the input model",
            keep=[stage1])
    inside = copy(ckpt, tmp_path / "run2" / "checkpoints" / "m")  # Orbax prunes what is in there
    refused(capsys, cli_main, ["train", STAGE2, f"model={inside}", f"output_dir={tmp_path / 'run2'}",
                               f"data.train={data}"], "output_dir's checkpoints", "contains the input model",
            keep=[inside])
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [{"chosen": [], "rejected": []}])
    refused(capsys, cli_main, ["train", STAGE2, f"model={ckpt}", f"output_dir={tmp_path}",
                               f"data.train={metrics}"], "is the input data.train", keep=[metrics])


def test_demo_never_empties_a_foreign_directory(capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(capsys, cli_main, ["demo", "--workdir", mine], "--workdir", "already exists", keep=[mine])


# ---------------------------------------------------------------------------------------------
# 2. metadata is validated with types: every field names file and field


BAD_CONFIGS = [
    ("[]", "expected a JSON object, got a list"),
    ({"num_hidden_layers": None}, "field num_hidden_layers: expected a positive integer, got null"),
    ({"rope_parameters": "llama3"}, 'field rope_parameters: expected an object, got "llama3"'),
    ({"eos_token_id": {"id": 2}}, "field eos_token_id: expected an integer or a list of integers"),
    ({"eos_token_id": [2, "3"]}, "field eos_token_id"),
    ({"hidden_size": "abc"}, 'field hidden_size: expected a positive integer, got "abc"'),
    ({"num_attention_heads": True}, "field num_attention_heads: expected a positive integer, got true"),
    ({"intermediate_size": -128}, "field intermediate_size: expected a positive integer, got -128"),
    ({"vocab_size": 0}, "field vocab_size"),
    ({"num_key_value_heads": 2.5}, "field num_key_value_heads"),
    ({"rope_parameters": {**HF_CONFIG["rope_parameters"], "rope_theta": 0}},
     "field rope_parameters.rope_theta: expected a positive number, got 0"),
    ({"rope_parameters": {**HF_CONFIG["rope_parameters"], "factor": "8"}}, "field rope_parameters.factor"),
    ({"rope_parameters": {**HF_CONFIG["rope_parameters"], "original_max_position_embeddings": None}},
     "field rope_parameters.original_max_position_embeddings"),
    ({"max_position_embeddings": 0}, "field max_position_embeddings: expected a positive integer, got 0"),
    ({"rms_norm_eps": 0}, "field rms_norm_eps: expected a positive number, got 0"),
    ({"rms_norm_eps": -1e-5}, "field rms_norm_eps"),
    ({"pad_token_id": "511"}, 'field pad_token_id: expected a non-negative integer, got "511"'),
    ({"pad_token_id": 1.5}, "field pad_token_id"),
    ({"bos_token_id": [1]}, "field bos_token_id"),
    ({"tie_word_embeddings": "no"}, "field tie_word_embeddings: expected true or false"),
    ({"id2label": ["a", "b"]}, "field id2label: expected an object"),
    ({"num_labels": "10"}, "field num_labels"),
    ({"dtype": 32}, "field dtype: expected a string"),
    ({"gate_dtype": "float8"}, "field gate_dtype 'float8' is not one of"),
    ('{"hidden_size": NaN}', "not valid JSON"),
    ("\xff\xfe", "not UTF-8"),
]


@pytest.mark.parametrize("change, needle", BAD_CONFIGS, ids=[n.split(":")[0][:40] for _, n in BAD_CONFIGS])
def test_bad_config_json_names_file_and_field(capsys, hf_dir, tmp_path, change, needle):
    src = copy(hf_dir, tmp_path / "src")
    if isinstance(change, str):
        (src / "config.json").write_bytes(change.encode("latin-1"))
    else:
        edit_config(src, change)
    config = src / "config.json"
    refused(capsys, convert_main, ["from_hf", src, tmp_path / "out"], config, needle, keep=[src],
            absent=[tmp_path / "out"])


@pytest.mark.parametrize("change, needle", [
    ({"num_hidden_layers": None}, "field num_hidden_layers"),
    ({"rope_parameters": "llama3"}, "field rope_parameters"),
    ({"hidden_size": "abc"}, "field hidden_size"),
], ids=["layers-null", "rope-string", "hidden-abc"])
def test_bad_config_json_when_scoring_an_hf_dir(capsys, hf_dir, ids_file, tmp_path, change, needle):
    src = copy(hf_dir, tmp_path / "src")
    edit_config(src, change)
    refused(capsys, cli_main, score_argv(src, ids_file, tmp_path / "o.jsonl"), src / "config.json",
            needle, absent=[tmp_path / "o.jsonl"])


def test_init_std_from_config_is_validated(capsys, hf_dir, tmp_path):
    src = copy(hf_dir, tmp_path / "base")
    edit_config(src, {"initializer_range": "abc"})
    refused(capsys, convert_main, ["init", src, tmp_path / "out"], src / "config.json",
            "field initializer_range", absent=[tmp_path / "out"])


@pytest.mark.parametrize("text, needle", [
    ("[]", "expected a JSON object, got a list"),
    ("", "not valid JSON"),
    ('{"layout_version": 1}', "field format: missing"),
    ('{"format": "urm-jax"}', "field layout_version: missing"),
    ('{"format": "urm-jax", "layout_version": "1"}', 'field layout_version: expected a positive integer, got "1"'),
    ('{"format": "urm-jax", "layout_version": 1, "dtypes": ["float32"]}', "field dtypes"),
    ('{"format": "other", "layout_version": 1}', "format 'other'"),
], ids=["list", "empty", "no-format", "no-version", "version-string", "dtypes-list", "other-format"])
def test_bad_checkpoint_marker(capsys, ckpt, ids_file, tmp_path, text, needle):
    bad = copy(ckpt, tmp_path / "ckpt")
    (bad / "urm_jax.json").write_text(text)
    for argv in (["to_hf", bad, tmp_path / "hf"], ["verify", ckpt.parent.parent / "none", bad]):
        refused(capsys, convert_main, argv, bad / "urm_jax.json", needle, keep=[bad],
                absent=[tmp_path / "hf"])
    refused(capsys, cli_main, score_argv(bad, ids_file, tmp_path / "o.jsonl"), bad / "urm_jax.json",
            needle, absent=[tmp_path / "o.jsonl"])


@pytest.mark.parametrize("name, text, needle", [
    ("params/_METADATA", "", "not valid JSON"),
    ("params/_METADATA", "[]", "expected a JSON object"),
    ("params/_METADATA", '{"use_ocdbt": false}', "field tree_metadata: missing"),
    ("params/_METADATA", '{"tree_metadata": [], "use_ocdbt": false}', "field tree_metadata"),
    ("params/_METADATA", '{"tree_metadata": {}, "use_ocdbt": "no"}', "field use_ocdbt"),
    ("params/_CHECKPOINT_METADATA", "[]", "expected a JSON object"),
    ("params/_CHECKPOINT_METADATA", "{", "not valid JSON"),
    ("params/gate.fc0.bias/.zarray", "[]", "expected a JSON object"),
    ("params/gate.fc0.bias/.zarray", '{"shape": "5", "chunks": [5]}', "field shape"),
], ids=["metadata-empty", "metadata-list", "no-tree", "tree-list", "ocdbt-string",
        "checkpoint-metadata-list", "checkpoint-metadata-broken", "zarray-list", "zarray-shape"])
def test_bad_orbax_metadata_names_the_file(capsys, ckpt, ids_file, tmp_path, name, text, needle):
    bad = copy(ckpt, tmp_path / "ckpt")
    (bad / name).write_text(text)
    refused(capsys, convert_main, ["to_hf", bad, tmp_path / "hf"], bad / name, needle,
            keep=[bad], absent=[tmp_path / "hf"])
    if name.endswith("_METADATA"):  # Orbax's restore path (scoring) parses them first
        refused(capsys, cli_main, score_argv(bad, ids_file, tmp_path / "o.jsonl"), bad / name,
                needle, absent=[tmp_path / "o.jsonl"])


@pytest.mark.parametrize("index, needle", [
    ("[]", "expected a JSON object"),
    ('{"weight_map": ["model.safetensors"]}', "field weight_map: expected an object of strings"),
    ('{"weight_map": {"model.norm.weight": 3}}', "field weight_map.model.norm.weight: expected a string"),
    ('{"metadata": {}}', "field weight_map: missing"),
    ("{", "not valid JSON"),
], ids=["list", "map-list", "map-int", "no-map", "broken"])
def test_bad_safetensors_index(capsys, hf_dir, tmp_path, index, needle):
    src = copy(hf_dir, tmp_path / "src")
    (src / "model.safetensors.index.json").write_text(index)
    refused(capsys, convert_main, ["from_hf", src, tmp_path / "out"], "model.safetensors.index.json",
            needle, absent=[tmp_path / "out"])


def test_run_metadata_is_validated(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.root.mkdir()
    (run.checkpoints / "3").mkdir(parents=True)
    for text, needle in [("- a\n- b\n", "expected a YAML mapping, got a list"),
                         ("just text\n", "expected a YAML mapping, got a string"),
                         ("optim: [1\n", "unreadable")]:
        run.config.write_text(text)
        with pytest.raises(RunDirectoryError, match=needle) as err:
            run.recorded_config()
        assert str(run.config) in str(err.value)


def test_feature_cache_key_is_validated_not_trusted(tmp_path, capsys):
    """A corrupt or mismatched stage-2 cache is recomputed (said on stderr), never loaded."""
    key = json.dumps({"model": "/m", "seq_len": 64, "compute": "float32", "examples": 3,
                      "tokens": "abc"}, sort_keys=True)
    calls = []

    def compute():
        calls.append(1)
        return np.full((3, 2, 4), float(len(calls)), np.float32)

    cache = tmp_path / "cache"
    assert load_or_compute(cache, key, compute)[0, 0, 0] == 1 and len(calls) == 1
    assert load_or_compute(cache, key, compute)[0, 0, 0] == 1 and len(calls) == 1  # reused
    for name, text, needle in [("features.json", "[]", "expected a JSON object"),
                               ("features.json", key.replace('"examples": 3', '"examples": "3"'),
                                "field examples"),
                               ("features.json", "\xff", "not UTF-8"),
                               ("features.npy", "garbage", "features.npy: unreadable")]:
        capsys.readouterr()
        (cache / name).write_bytes(text.encode("latin-1"))
        before = len(calls)
        assert load_or_compute(cache, key, compute)[0, 0, 0] == before + 1
        assert needle in capsys.readouterr().err
    np.save(cache / "features.npy", np.zeros((2, 2, 4), np.float32))  # whole, but 2 pairs, not 3
    assert load_or_compute(cache, key, compute).shape == (3, 2, 4)
    assert "shape [2, 2, 4]" in capsys.readouterr().err


def test_validate_field_readers():
    fields = Fields({"a": 3, "b": True, "c": 8192.0, "d": None, "e": float("nan"), "f": [1, "x"]}, "f.json")
    assert fields.int("a", minimum=1) == 3 and fields.int("c", minimum=1) == 8192
    assert fields.int("d", 7, null_ok=True) == 7 and fields.int("zz", 5) == 5
    for call, needle in [(lambda: fields.int("b"), "field b: expected an integer, got true"),
                         (lambda: fields.int("a", maximum=2), "field a: expected an integer <= 2, got 3"),
                         (lambda: fields.float("e"), "field e: expected a finite number, got NaN"),
                         (lambda: fields.str("a"), "field a: expected a string, got 3"),
                         (lambda: fields.int_list("f"), 'field f: expected a list of integers, got [1, "x"]'),
                         (lambda: fields.int("d"), "field d: expected an integer, got null"),
                         (lambda: fields.object("zz"), "field zz: missing (expected an object)"),
                         (lambda: Fields({"o": {"x": "y"}}, "g.json").object("o").int("x"),
                          'g.json: field o.x: expected an integer, got "y"')]:
        with pytest.raises(MetadataError, match=re.escape(needle)):
            call()


# ---------------------------------------------------------------------------------------------
# 5. non-finite numbers never pass silently


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan], ids=["inf", "-inf", "nan"])
def test_nonfinite_checkpoint_is_never_scored_or_exported(capsys, hf_dir, ids_file, tmp_path, value):
    src = copy(hf_dir, tmp_path / "src")
    poke_tensor(src, "score.weight", (3, 7), value)
    refused(capsys, cli_main, score_argv(src, ids_file, tmp_path / "o.jsonl"), "score.weight",
            "NaN or Inf", absent=[tmp_path / "o.jsonl"])  # an HF dir read directly
    bad = tmp_path / "ckpt"
    ok(convert_main, "from_hf", src, bad, "--allow-nonfinite")
    refused(capsys, cli_main, score_argv(bad, ids_file, tmp_path / "o.jsonl"),
            "parameter value_head.kernel", "NaN or Inf", absent=[tmp_path / "o.jsonl"])
    refused(capsys, convert_main, ["to_hf", bad, tmp_path / "hf"], "value_head.kernel", "[7, 3]",
            "--allow-nonfinite", absent=[tmp_path / "hf"])
    refused(capsys, convert_main, ["verify", src, bad], "value_head.kernel", "NaN or Inf")
    ok(convert_main, "to_hf", bad, tmp_path / "hf", "--allow-nonfinite")
    ok(convert_main, "verify", src, bad, "--allow-nonfinite")  # same bits both sides


def test_load_params_checks_sharded_arrays_too(ckpt, tmp_path):
    params = load_params(ckpt)
    params["gate"]["fc2"]["kernel"] = np.array(params["gate"]["fc2"]["kernel"])
    params["gate"]["fc2"]["kernel"][1, 2] = np.inf
    bad = tmp_path / "bad"
    save_checkpoint(bad, params, ModelConfig.from_hf_dir(ckpt))
    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                             params)
    for kwargs in ({}, {"shardings": shardings}):
        with pytest.raises(NonFiniteError, match="parameter gate.fc2.kernel holds NaN or Inf"):
            load_params(bad, **kwargs)
    assert np.isinf(load_params(bad, allow_nonfinite=True)["gate"]["fc2"]["kernel"][1, 2])
    with pytest.raises(NonFiniteError, match=r"where: parameter b holds NaN or Inf"):
        check_tree_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan])}, "where")


@pytest.mark.parametrize("cmd, dtype_flag, key, value", [
    ("to_hf", ("--dtype", "float16"), "model.layers.1.mlp.down_proj.weight", 1e5),
    ("to_hf", ("--dtype", "bfloat16"), "model.embed_tokens.weight", 3.4e38),
    ("to_hf", ("--gate-dtype", "float16"), "weights.fc.2.weight", -7e4),
    ("to_hf", ("--gate-dtype", "bfloat16"), "weights.fc.4.bias", 3.4e38),
    ("from_hf", ("--dtype", "bfloat16"), "model.norm.weight", 3.4e38),
    ("from_hf", ("--gate-dtype", "float16"), "weights.fc.0.weight", 1e6),
    ("from_hf", ("--gate-dtype", "float16"), "weights.fc.0.bias", 65520.0),
    ("init", ("--dtype", "bfloat16"), "model.layers.0.self_attn.q_proj.weight", -3.4e38),
], ids=["to_hf-fp16", "to_hf-bf16", "to_hf-gate-fp16", "to_hf-gate-bf16", "from_hf-bf16",
        "from_hf-gate-fp16", "from_hf-gate-fp16-rounding", "init-bf16"])
def test_downcast_overflow_names_the_tensor(capsys, hf_dir, tmp_path, cmd, dtype_flag, key, value):
    src = copy(hf_dir, tmp_path / "src")
    poke_tensor(src, key, (0,) * len(load_file(src / "model.safetensors")[key].shape), value)
    source = src
    if cmd == "to_hf":
        source = tmp_path / "ckpt"
        ok(convert_main, "from_hf", src, source)  # float32: fits
    out = tmp_path / "out"
    # the advice names the flag that chose this tensor's dtype (the gate has its own)
    advice = "(e.g. --gate-dtype float32)" if dtype_flag[0] == "--gate-dtype" else "(e.g. --dtype keep"
    refused(capsys, convert_main, [cmd, source, out, *dtype_flag], "beyond", "range",
            key if cmd != "to_hf" else "-> tensor " + key, advice, keep=[source], absent=[out])
    ok(convert_main, cmd, source, out)  # the default (keep) fits


def test_fresh_heads_and_scoring_casts_are_range_checked(capsys, hf_dir, ids_file, tmp_path):
    # `--init-std` is capped at 10 on the command line (no float16 overflow is reachable there);
    # the library's own check still guards any caller.
    from urm_jax.hf.base import init_from_base
    with pytest.raises(ValueError, match=r"fresh head weights\.fc.*beyond float16.*--gate-dtype float32"):
        init_from_base(hf_dir, tmp_path / "out", init_std=1e6, progress=False)
    assert not (tmp_path / "out").exists()
    src = copy(hf_dir, tmp_path / "src")
    poke_tensor(src, "weights.fc.4.weight", (1, 1), 1e6)
    refused(capsys, cli_main, score_argv(src, ids_file, tmp_path / "o.jsonl", "--gate-dtype", "float16"),
            "gate.fc4.kernel", "float16", "beyond", absent=[tmp_path / "o.jsonl"])


def test_chunk_checksums_detect_silent_corruption(capsys, hf_dir, ckpt, ids_file, tmp_path):
    """Every writer records each chunk's digest in urm_jax.json; every reader checks it: a flipped
    bit in a chunk is an error naming the chunk file, not a slightly wrong model. A checkpoint
    written before checksums existed (no `checksums` in its marker) still loads."""
    marker = json.loads((ckpt / "urm_jax.json").read_text())
    chunks = marker["checksums"]["chunks"]
    assert marker["checksums"]["algorithm"] == "xxh3_64" and len(chunks["backbone.layers.q_proj"]) == 2
    bad = copy(ckpt, tmp_path / "bad")
    chunk = bad / "params" / "backbone.layers.down_proj" / "1.0.0"
    data = bytearray(chunk.read_bytes())
    data[1000] ^= 0x10  # a finite value stays finite: only the checksum can tell
    chunk.write_bytes(bytes(data))
    refused(capsys, convert_main, ["to_hf", bad, tmp_path / "hf"], chunk, "corrupt", "checksum",
            absent=[tmp_path / "hf"])
    refused(capsys, convert_main, ["verify", hf_dir, bad], chunk, "corrupt")
    refused(capsys, cli_main, score_argv(bad, ids_file, tmp_path / "o.jsonl"), chunk, "corrupt",
            absent=[tmp_path / "o.jsonl"])
    old = copy(ckpt, tmp_path / "old")
    del marker["checksums"]
    (old / "urm_jax.json").write_text(json.dumps(marker))
    ok(convert_main, "to_hf", old, tmp_path / "hf")
    assert load_params(old)["gate"]["fc0"]["bias"].shape == (HF_CONFIG["hidden_size"],)
    for checksums, needle in [({"algorithm": "md5", "chunks": {}}, "field checksums.algorithm"),
                              ({"algorithm": "xxh3_64", "chunks": {"a": 3}}, "field checksums.chunks.a"),
                              ([], "field checksums: expected an object")]:
        (old / "urm_jax.json").write_text(json.dumps({**marker, "checksums": checksums}))
        refused(capsys, convert_main, ["to_hf", old, tmp_path / "hf2"], old / "urm_jax.json", needle,
                absent=[tmp_path / "hf2"])


def test_finite_helpers():
    check_finite(np.array([1.0, -2.0], np.float32), "x")
    with pytest.raises(NonFiniteError, match=r"t holds NaN or Inf \(first at \[3, 1\]"):
        check_finite(np.array([[0, 0], [0, 0], [0, np.nan]], np.float32), "t", first_row=1)
    bf16 = np.array([1.0, 2.0], jnp.bfloat16)
    with pytest.raises(NonFiniteError, match="b holds NaN or Inf"):
        check_finite(np.array([0, np.inf], jnp.bfloat16), "b")
    check_finite(np.array([1, 2], np.int32), "ints")  # not floats: nothing to check
    big = np.array([[1.0, 7e4]], np.float32)
    with np.errstate(over="ignore"), pytest.raises(NonFiniteError,
                                                   match=r"w: a value beyond float16's range .* 70000"):
        check_cast(big, big.T.astype(np.float16), "w", wider="--dtype keep")  # any layout: a transposed cast too
    with pytest.raises(NonFiniteError, match=r"beyond float16's range.*\(e\.g\. --gate-dtype float32\)"):
        checked_astype(np.array([np.inf, 7e4], np.float32), np.float16, "w",
                       wider="--gate-dtype float32")  # one new Inf; the advice names the caller's flag
    assert checked_astype(np.array([np.inf, 6e4], np.float32), np.float16, "w",
                          wider="-")[1] == 60000  # kept Inf
    assert checked_astype(bf16, np.float32, "w", wider="-").dtype == np.float32  # widening: no check needed


def test_score_output_lines_are_strict_json(capsys, hf_dir, tmp_path):
    """Overflowing variance is written as null (never Infinity); an input `"id": NaN` is a bad
    line (reported, never echoed as NaN)."""
    src = copy(hf_dir, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["score.weight"] = tensors["score.weight"].copy()
    tensors["score.weight"][1::2] *= 1e4  # log-std rows: exp(2 log_std) overflows float32
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    inp = write_jsonl(tmp_path / "in.jsonl", ['{"input_ids": [4, 5], "id": NaN}', *ROWS,
                                              '{"input_ids": [9], "id": Infinity}'])
    out, bad = tmp_path / "o.jsonl", tmp_path / "bad.jsonl"
    refused(capsys, cli_main, score_argv(src, inp, out), f"{inp}:1:", "NaN", absent=[out])
    ok(cli_main, *score_argv(src, inp, out, "--on-bad-line", "skip", "--bad-lines", bad))
    records = strict_lines(out)
    assert [r["id"] for r in records] == ["a", 2]
    assert any(r["uncertainty"] is None for r in records)
    assert [b["line"] for b in strict_lines(bad)] == [1, 4]
    assert all("id" not in b for b in strict_lines(bad))


# ---------------------------------------------------------------------------------------------
# 8. every error names where


def hs_row(**change):
    row = {"prompt": "What is 2+2?", "response": "4.", "helpfulness": 3, "correctness": 4,
           "coherence": 4, "complexity": 1, "verbosity": 1}
    row.update(change)
    return row


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

    with pytest.MonkeyPatch.context() as mp:  # a private cache: never the home directory
        mp.setenv("URM_JAX_CACHE", str(tmp_path_factory.mktemp("urm_cache")))
        return cached_llama3_tokenizer_dir()


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize("lines, needle", [
    ([hs_row(), "{not json", hs_row()], ":2: invalid JSON"),
    ([hs_row(), hs_row(), "[1, 2]"], ":3: expected a JSON object"),
    ([hs_row(), '{"prompt": "a", "response": "b", "helpfulness": NaN}'], ":2: non-standard JSON constant NaN"),
    ([hs_row(), hs_row(), "", b"\xff\xfe"], ":4: not UTF-8"),
    ([], ": no examples"),
], ids=["broken", "not-object", "nan", "not-utf8", "empty-file"])
def test_malformed_training_jsonl_names_file_and_line(tok, tmp_path, lines, needle):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode())
                              + b"\n" for x in lines))
    for load in (load_helpsteer2, load_preference_pairs):
        with pytest.raises(InputError, match=re.escape(f"{path}{needle}")):
            load(str(path), tok, max_length=64)


def test_dataset_rows_of_mixed_types_are_dropped_and_counted(tok, tmp_path):
    """A column whose type changes from row to row (which `datasets` cannot load at all) costs
    only the rows that are wrong, each counted with its reason."""
    path = write_jsonl(tmp_path / "train.jsonl", [hs_row(), hs_row(helpfulness="three"),
                                                  hs_row(response=["not", "text"]), hs_row(verbosity=None)])
    examples, report = load_helpsteer2(str(path), tok, max_length=64)
    assert len(examples) == 1 and report.dropped == {"bad_label": 1, "not_text": 1, "missing_label": 1}


@pytest.mark.parametrize("rows, needle", [
    ([hs_row(response="  "), hs_row(response="")], "0 used"),
    ([hs_row(helpfulness=9)], "label_out_of_range"),
], ids=["all-empty", "all-out-of-range"])
def test_empty_dataset_is_a_clear_error(tok, tmp_path, rows, needle):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DatasetSchemaError, match="no usable examples") as err:
        load_helpsteer2(str(path), tok, max_length=64)
    assert str(path) in str(err.value) and needle in str(err.value)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": [{"role": "user", "content": "a"}],
                                                    "rejected": [{"role": "user", "content": "a"}]}])
    with pytest.raises(DatasetSchemaError, match="identical_pair"):
        load_preference_pairs(str(pairs), tok, max_length=64)


def test_training_on_a_malformed_file_is_one_error_line(capsys, tok_dir, tmp_path):
    model = write_random_hf(tmp_path / "m", tiny_hf_config(
        vocab_size=128257, pad_token_id=128256, bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009)), tokenizer_dir=tok_dir, progress=False)
    data = write_jsonl(tmp_path / "train.jsonl", [hs_row(), hs_row(), '{"prompt": "x", '])
    run = tmp_path / "run"
    refused(capsys, cli_main, ["train", STAGE1, f"model={model}", "global_batch_size=8",  # 8 test devices
                               f"output_dir={run}", f"data.train={data}"], f"{data}:3:", "invalid JSON",
            absent=[run])  # the failed run takes back the directory it created


def test_index_outside_the_model_dir_is_refused_before_opening(capsys, hf_dir, tmp_path, monkeypatch):
    outside = tmp_path / "outside.safetensors"
    shutil.copy2(hf_dir / "model.safetensors", outside)
    opened = []
    real = safetensors_io.read_header
    monkeypatch.setattr(safetensors_io, "read_header", lambda f: opened.append(Path(f)) or real(f))
    keys = list(load_file(hf_dir / "model.safetensors"))
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        src = tmp_path / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        shutil.copy2(hf_dir / "config.json", src / "config.json")
        (src / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: name for k in keys}}))
        refused(capsys, convert_main, ["from_hf", src, tmp_path / "out"], "is not a file inside",
                repr(name), "field weight_map.", absent=[tmp_path / "out"])
        refused(capsys, cli_main, score_argv(src, write_jsonl(tmp_path / "i.jsonl", ROWS),
                                             tmp_path / "o.jsonl"), "is not a file inside",
                absent=[tmp_path / "o.jsonl"])
    assert opened == [], f"opened {opened}"


def test_dangling_symlinks_are_named(capsys, hf_dir, ckpt, tmp_path):
    src = copy(hf_dir, tmp_path / "src")
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    refused(capsys, convert_main, ["from_hf", src, tmp_path / "out"], src / "model.safetensors",
            "dangling symlink", "gone.safetensors", absent=[tmp_path / "out"])
    sharded = tmp_path / "sharded"
    shutil.copytree(hf_dir, sharded)
    keys = list(load_file(hf_dir / "model.safetensors"))
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}))
    with HFWeights(sharded) as weights:  # a well-formed index reads
        assert sorted(weights.keys()) == sorted(keys)
    (sharded / "model-00001-of-00001.safetensors").unlink()
    (sharded / "model-00001-of-00001.safetensors").symlink_to("../blobs/abc")
    refused(capsys, convert_main, ["from_hf", sharded, tmp_path / "out"],
            sharded / "model-00001-of-00001.safetensors", "dangling symlink", absent=[tmp_path / "out"])
    cfg_src = copy(hf_dir, tmp_path / "cfg")
    (cfg_src / "config.json").unlink()
    (cfg_src / "config.json").symlink_to(tmp_path / "nowhere.json")
    refused(capsys, convert_main, ["from_hf", cfg_src, tmp_path / "out"], cfg_src / "config.json",
            "dangling symlink", absent=[tmp_path / "out"])
    marker = copy(ckpt, tmp_path / "ckpt")
    (marker / "urm_jax.json").unlink()
    (marker / "urm_jax.json").symlink_to(tmp_path / "nowhere.json")
    refused(capsys, convert_main, ["to_hf", marker, tmp_path / "hf"], marker / "urm_jax.json",
            "dangling symlink", absent=[tmp_path / "hf"])
    data = tmp_path / "train.jsonl"
    data.symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match="dangling symlink"):
        load_rows(str(data))


def test_hub_cache_symlinks_into_blobs_still_load(hf_dir, tmp_path):
    """HF's hub cache holds every file as a symlink to ../../blobs/<hash>: a shard outside the
    directory by its target, inside by its name, is fine."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in hf_dir.iterdir():
        shutil.copy2(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    with HFWeights(snap) as weights:
        assert sorted(weights.keys()) == sorted(load_file(hf_dir / "model.safetensors"))


def test_corrupt_training_step_metadata_names_the_file(tmp_path):
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True, enable_async_checkpointing=False))
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones((4, 4))}),
                                            data=ocp.args.JsonSave({"epoch": 0})))
    manager.wait_until_finished()
    step = tmp_path / "checkpoints" / "1"
    check_orbax_step(step)  # a good step passes
    for name, text, needle in [("state/_METADATA", "", "not valid JSON"),
                               ("state/_METADATA", "[]", "expected a JSON object"),
                               ("_CHECKPOINT_METADATA", "{", "not valid JSON"),
                               ("state/_sharding", "null", "expected a JSON object"),
                               ("data/metadata", "[1]", "expected a JSON object")]:
        original = (step / name).read_bytes()
        (step / name).write_text(text)
        with pytest.raises(CheckpointError, match=needle) as err:
            check_orbax_step(step)
        assert str(step / name) in str(err.value)
        (step / name).write_bytes(original)
    with pytest.raises(CheckpointError, match="checkpoint step missing"):
        check_orbax_step(tmp_path / "checkpoints" / "7")


def test_read_json_names_every_fault(tmp_path):
    f = tmp_path / "m.json"
    for content, needle in [(None, "not found"), (b"\xff", "not UTF-8"), (b"{", "not valid JSON"),
                            (b"[]", "expected a JSON object"), (b'{"a": Infinity}', "not valid JSON")]:
        if content is not None:
            f.write_bytes(content)
        with pytest.raises(MetadataError, match=needle) as err:
            read_json(f)
        assert str(f) in str(err.value)
