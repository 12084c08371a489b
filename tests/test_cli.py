"""`urm-jax score` and `urm-jax parity` end to end on tiny random checkpoints.

The CLI runs in-process through `urm_jax.cli.main` (and `convert.__main__.main` to build JAX
checkpoints); one subprocess run proves the installed `urm-jax` console script. Checkpoints are
tiny random URMs (hidden 64, 2 layers, vocab 512, fp32 backbone and fp32 gate) built here; the
chat tests use a vocab-128257 model carrying the real Llama-3 tokenizer built offline.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from convert.__main__ import main as convert_main
from hf_fixtures import load_reference, make_tiny_chat_urm, make_tiny_urm, reference_outputs
from refusals import refused
from urm_jax.checkpoint import load_config, load_params, save_checkpoint
from urm_jax.cli import main as cli_main
from urm_jax.attributes import HELPSTEER2 as ATTRIBUTES
from urm_jax.data.tokenization import render_ids

VOCAB, PAD = 512, 511
LENGTHS = [3, 17, 150, 40, 5, 64, 100, 9, 33, 128, 2, 77, 17, 64]
NAMES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

# ---------------------------------------------------------------------------------------------
# helpers


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def score(model, inp, out, *extra) -> int:
    return cli_main(["score", "--model", str(model), "--input", str(inp), "--output", str(out),
                     *map(str, extra)])


def score_ok(model, inp, out, *extra) -> list[dict]:
    assert score(model, inp, out, *extra) == 0
    return read_jsonl(out)


def temp_siblings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}*"))


def score_err(capsys, model, inp, out: Path, *needles: str, extra=()) -> str:
    """Expect a refusal: exit 2, one `error:` line holding `needles`, no traceback, and neither the
    output file nor a temporary sibling of it left behind."""
    return refused(capsys, cli_main, ["score", "--model", model, "--input", inp, "--output", out,
                                      *extra], *needles, absent=[out])


def by_id(records: list[dict]) -> dict:
    return {r["id"]: r for r in records}


def field(records: list[dict], key: str) -> np.ndarray:
    if key in ("reward", "uncertainty", "num_tokens"):
        return np.array([r[key] for r in records], np.float64)
    return np.array([[r[key][n] for n in NAMES] for r in records], np.float64)


def assert_same_scores(got: list[dict], want: list[dict], tol: float) -> None:
    """Same ids in the same order, and every output within `tol` relative to that output's scale
    (max|got - want| / max(1, max|want|), parity's metric: values near zero do not blow it up).
    `uncertainty` = sum exp(2 log_std) moves by 2 * exp(2 log_std) * d(log_std), so it gets the
    log-std bound carried through that derivative (plus its own rounding)."""
    assert [r.get("id") for r in got] == [r.get("id") for r in want]
    assert field(got, "num_tokens").tolist() == field(want, "num_tokens").tolist()
    for key in ("reward", "mean", "log_std", "gate"):
        g, w = field(got, key), field(want, key)
        err = np.abs(g - w).max() / max(1.0, np.abs(w).max())
        assert err <= tol, f"{key}: max relative difference {err:.2e} > {tol:.0e}"
    log_std_scale = max(1.0, np.abs(field(want, "log_std")).max())
    unc_tol = (2 * tol * log_std_scale + tol) * field(want, "uncertainty")
    unc_err = np.abs(field(got, "uncertainty") - field(want, "uncertainty"))
    assert np.all(unc_err <= unc_tol), (unc_err, unc_tol)


def numbers(record: dict) -> dict:
    """Every score field of an output record, without its id."""
    return {k: v for k, v in record.items() if k != "id"}


def parity(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main(["parity", *map(str, argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return rc, captured.out


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_urm(tmp_path_factory.mktemp("cli") / "hf", vocab=VOCAB, gate_dtype="float32")


@pytest.fixture(scope="module")
def jax_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_jax") / "ckpt"
    assert convert_main(["from_hf", str(hf_dir), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tampered_dir(hf_dir, tmp_path_factory):
    """A conversion re-saved with one value head entry moved by 1e-2."""
    out = tmp_path_factory.mktemp("cli_tampered") / "ckpt"
    assert convert_main(["from_hf", str(hf_dir), str(out)]) == 0
    params = load_params(out)
    kernel = np.array(params["value_head"]["kernel"])
    kernel[0, 0] += 1e-2  # column 0: the helpfulness mean
    params["value_head"]["kernel"] = kernel
    save_checkpoint(out, params, load_config(out), overwrite=True)
    assert np.array(load_params(out)["value_head"]["kernel"])[0, 0] == kernel[0, 0]
    return out


@pytest.fixture(scope="module")
def id_rows():
    rng = random.Random(0)
    # Token ids 0 .. VOCAB-2: never the pad id, which the HF reference would treat as padding.
    # Line ids are strings or ints; both must come back as given.
    return [{"input_ids": [rng.randrange(0, PAD) for _ in range(n)],
             "id": i if i % 3 == 0 else f"row{i}"} for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def id_input(id_rows, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("cli_in") / "ids.jsonl", id_rows)


@pytest.fixture(scope="module")
def scored_hf(hf_dir, id_input, tmp_path_factory):
    """The id lines scored from the HF directory with --batch-size 8 (the default)."""
    return score_ok(hf_dir, id_input, tmp_path_factory.mktemp("cli_out") / "hf.jsonl", "--batch-size", 8)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return make_tiny_chat_urm(tmp_path_factory.mktemp("cli_chat") / "hf",
                              tmp_path_factory.mktemp("urm_cache"))


# ---------------------------------------------------------------------------------------------
# 1. score: schema of the output and parity with the HF reference


def test_score_output_schema_and_order(scored_hf, id_rows):
    assert len(scored_hf) == len(id_rows)
    assert [r["id"] for r in scored_hf] == [r["id"] for r in id_rows]
    assert tuple(ATTRIBUTES) == NAMES
    for row, rec in zip(id_rows, scored_hf):
        assert rec["num_tokens"] == len(row["input_ids"])
        assert isinstance(rec["reward"], float) and math.isfinite(rec["reward"])
        for key in ("mean", "log_std", "gate"):
            assert list(rec[key]) == list(NAMES), key
            assert all(math.isfinite(v) for v in rec[key].values()), key
        log_std = np.array([rec["log_std"][n] for n in NAMES], np.float64)
        np.testing.assert_allclose(rec["uncertainty"], np.exp(2 * log_std).sum(), rtol=1e-5)
        # The reward is the gate-weighted sum of the attribute means.
        np.testing.assert_allclose(rec["reward"], sum(rec["mean"][n] * rec["gate"][n] for n in NAMES),
                                   rtol=1e-5, atol=1e-6)


def test_score_matches_hf_reference(scored_hf, id_rows, hf_dir):
    reference = load_reference(hf_dir)  # fp32 backbone, fp32 gate
    assert reference.model.embed_tokens.weight.dtype == reference.weights.fc[0].weight.dtype
    ref = [reference_outputs(reference, np.array([row["input_ids"]])) for row in id_rows]
    for key, field in (("reward", "reward"), ("means", "mean"), ("log_stds", "log_std"), ("gate", "gate")):
        want = np.array([np.ravel(r[key]) for r in ref])
        got = np.array([[rec[field]] if field == "reward" else [rec[field][n] for n in NAMES]
                        for rec in scored_hf])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)


def test_score_jax_checkpoint_equals_hf_dir(scored_hf, jax_dir, id_input, tmp_path):
    from_jax = score_ok(jax_dir, id_input, tmp_path / "jax.jsonl")
    assert from_jax == scored_hf


def test_score_fused_attention_matches_reference(scored_hf, hf_dir, id_input, tmp_path):
    """--attention xla (jax.nn.dot_product_attention) scores like the reference path (fp32)."""
    fused = score_ok(hf_dir, id_input, tmp_path / "xla.jsonl", "--attention", "xla")
    assert_same_scores(fused, scored_hf, 1e-5)


@pytest.mark.parametrize("impl, platform", [("cudnn", "GPU"), ("splash", "TPU")])
def test_score_attention_needs_its_platform(capsys, hf_dir, id_input, tmp_path, impl, platform):
    if jax.default_backend() == platform.lower():
        pytest.skip(f"this run has a {platform}")
    score_err(capsys, hf_dir, id_input, tmp_path / "out.jsonl", f"attention {impl!r} needs a {platform}",
              extra=("--attention", impl))


# ---------------------------------------------------------------------------------------------
# 2. batch composition never changes a score


def test_score_independent_of_batching_and_order(scored_hf, hf_dir, id_rows, tmp_path):
    reference = by_id(scored_hf)  # --batch-size 8
    shuffled = list(id_rows)
    random.Random(1).shuffle(shuffled)
    shuffled_in = write_jsonl(tmp_path / "shuffled.jsonl", shuffled)
    ordered_in = write_jsonl(tmp_path / "ordered.jsonl", id_rows)
    runs = {
        "bs1": score_ok(hf_dir, ordered_in, tmp_path / "bs1.jsonl", "--batch-size", 1),
        "bs3": score_ok(hf_dir, ordered_in, tmp_path / "bs3.jsonl", "--batch-size", 3),
        "shuffled": score_ok(hf_dir, shuffled_in, tmp_path / "sh.jsonl", "--batch-size", 3),
    }
    assert [r["id"] for r in runs["shuffled"]] == [r["id"] for r in shuffled]
    for name, records in runs.items():
        assert len(records) == len(id_rows), name
        got = by_id(records)
        assert len(got) == len(records) and got.keys() == reference.keys(), name
        # fp32 on XLA CPU: another batch shape may reorder a sum, ~1e-7 relative per op.
        assert_same_scores([got[k] for k in reference], list(reference.values()), tol=1e-6)


def test_score_shards_concatenate_to_the_whole_file(scored_hf, hf_dir, id_rows, id_input, tmp_path):
    """--shard K/N: contiguous, balanced slices; their outputs in shard order are the whole run's
    (blank lines do not shift the slices); more shards than lines leaves empty shards."""
    with_blanks = tmp_path / "blanks.jsonl"
    with_blanks.write_text("\n" + "\n\n".join(json.dumps(r) for r in id_rows) + "\n\n")
    parts = [score_ok(hf_dir, with_blanks, tmp_path / f"s{k}.jsonl", "--shard", f"{k}/3") for k in range(3)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(id_rows) and max(sizes) - min(sizes) <= 1, sizes
    assert_same_scores([r for p in parts for r in p], scored_hf, tol=1e-6)

    n, many = len(id_rows), len(id_rows) + 2
    expected = [len(range(n * k // many, n * (k + 1) // many)) for k in range(many)]
    assert expected[0] == 0 and expected[-1] == 1
    first = score_ok(hf_dir, id_input, tmp_path / "m0.jsonl", "--shard", f"0/{many}")
    last = score_ok(hf_dir, id_input, tmp_path / "mlast.jsonl", "--shard", f"{many - 1}/{many}")
    assert first == [] and (tmp_path / "m0.jsonl").read_text() == ""
    assert_same_scores(last, scored_hf[-1:], tol=1e-6)


@pytest.mark.parametrize("bad", ["3/3", "1/0", "a/b", "1", "-1/2"])
def test_score_bad_shard(capsys, hf_dir, id_input, tmp_path, bad):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["score", "--model", str(hf_dir), "--input", str(id_input), "--output",
                  str(tmp_path / "o.jsonl"), "--shard", bad])
    assert exit_info.value.code == 2 and "--shard" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# 3. chat inputs through the real Llama-3 tokenizer


CHAT = [
    {"id": "multi", "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."}]},
    {"id": "pr", "prompt": "Name a prime number.", "response": "Seven is prime."},
    {"id": "msg", "messages": [{"role": "user", "content": "Name a prime number."},
                               {"role": "assistant", "content": "Seven is prime."}]},
    {"id": "unicode", "prompt": "Écris « bonjour » 🙂", "response": "bonjour — 你好"},
]


def test_score_chat_lines(chat_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    records = score_ok(chat_dir, write_jsonl(tmp_path / "chat.jsonl", CHAT), tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == [c["id"] for c in CHAT]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    reference = load_reference(chat_dir)
    for example, rec in zip(CHAT, records):
        ids = render_ids(tok, example, max_length=None)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert ids[-1] == eot
        assert rec["num_tokens"] == len(ids)
        ref = reference_outputs(reference, np.array([ids]))
        np.testing.assert_allclose(rec["reward"], ref["reward"][0], rtol=1e-5, atol=1e-6)
    out = by_id(records)
    assert numbers(out["pr"]) == numbers(out["msg"])
    assert out["multi"]["reward"] != out["msg"]["reward"]


def test_score_chat_unknown_schema(capsys, chat_dir, tmp_path):
    rows = [CHAT[1], {"id": "x", "text": "no schema"}]
    score_err(capsys, chat_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o.jsonl",
              ":2:", "unknown example schema")


def test_score_chat_last_turn_must_be_assistant(capsys, chat_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    score_err(capsys, chat_dir, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o.jsonl",
              ":1:", "assistant")


# ---------------------------------------------------------------------------------------------
# 4. bad input: one clear error line, exit 2, no output


def test_score_invalid_json(capsys, hf_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl",
                      [{"input_ids": [4, 5]}, {"input_ids": [6, 7]}, '{"input_ids": [1,'])
    score_err(capsys, hf_dir, inp, tmp_path / "out.jsonl", f"{inp}:3:", "invalid JSON")


def test_score_bad_line_keeps_existing_output(capsys, hf_dir, tmp_path):
    """An existing output is refused without --overwrite; with it, a run that fails on a bad
    line still leaves the previous output as it was (it is replaced only on success)."""
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    inp = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [4, 5]}, "not json"])
    capsys.readouterr()
    assert score(hf_dir, inp, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "previous\n"
    assert score(hf_dir, inp, out, "--overwrite") == 2
    assert ":2:" in capsys.readouterr().err
    assert out.read_text() == "previous\n"
    assert temp_siblings(out) == []


@pytest.mark.parametrize("row, needles", [
    ({"id": 1, "text": "hello"}, ()),  # unknown schema (this model has no tokenizer either)
    ({"input_ids": [4, VOCAB]}, ("outside the vocabulary",)),
    ({"input_ids": [4, -1]}, ("outside the vocabulary",)),
    ({"input_ids": []}, ("input_ids",)),
    ({"input_ids": [4, 5.5]}, ("input_ids[1]",)),
    ({"input_ids": [4], "prompt": "a", "response": "b"}, ("mixes schemas",)),
    ({"prompt": "hi", "response": "hello"}, ("no tokenizer",)),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     ("no tokenizer",)),
    ([1, 2, 3], ("JSON object",)),
], ids=["unknown-schema", "id-past-vocab", "negative-id", "empty-ids", "float-id", "mixed",
        "prompt-no-tokenizer", "messages-no-tokenizer", "not-an-object"])
def test_score_bad_line(capsys, hf_dir, tmp_path, row, needles):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [4, 5, 6]}, row])
    score_err(capsys, hf_dir, inp, tmp_path / "out.jsonl", f"{inp}:2:", *needles)


def test_score_over_long_line(capsys, hf_dir, tmp_path):
    rows = [{"id": "short", "input_ids": list(range(4, 14))},
            {"id": "long", "input_ids": list(range(4, 54))}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    score_err(capsys, hf_dir, inp, tmp_path / "out.jsonl", f"{inp}:2:", "max_length=16",
              extra=("--max-length", 16))
    score_err(capsys, hf_dir, inp, tmp_path / "out.jsonl", f"{inp}:2:",
              extra=("--max-length", 16, "--truncation", "error"))

    records = score_ok(hf_dir, inp, tmp_path / "out.jsonl", "--max-length", 16, "--truncation", "left")
    assert [r["id"] for r in records] == ["short", "long"]
    assert [r["num_tokens"] for r in records] == [10, 16]
    # Left truncation keeps the tail: the same score as scoring the last 16 ids directly.
    tail = write_jsonl(tmp_path / "tail.jsonl", [{"id": "long", "input_ids": list(range(38, 54))}])
    direct = score_ok(hf_dir, tail, tmp_path / "tail_out.jsonl")
    assert_same_scores(records[1:], direct, tol=1e-6)


def test_score_ctrl_c_mid_output_leaves_the_old_output(capsys, hf_dir, id_input, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) while the output is being written: one `error:` line, exit 130,
    no traceback; the existing --output (replaced with --overwrite only on success) is as it
    was and no temporary sibling is left."""
    from urm_jax.scoring import files

    out = tmp_path / "out.jsonl"
    out.write_text('{"previous": "scores"}\n')
    real, calls = files.dumps, []

    def interrupted_dumps(record):
        calls.append(record)
        if len(calls) == 3:  # two lines written to the temporary already
            raise KeyboardInterrupt
        return real(record)

    monkeypatch.setattr(files, "dumps", interrupted_dumps)
    line = refused(capsys, cli_main, ["score", "--model", hf_dir, "--input", id_input, "--output", out,
                                      "--overwrite", "--no-progress"],
                   "error: interrupted (Ctrl-C): urm-jax score stopped", code=130, keep=[out])
    assert len(calls) == 3, line


def test_score_output_that_cannot_be_created_names_the_option(capsys, hf_dir, id_input, tmp_path):
    """--output under a file: one line naming the option and both paths, in the style of every
    other error line (no bare `[Errno 20]`), before the model loads."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = score_err(capsys, hf_dir, id_input, blocker / "out.jsonl")
    assert line == (f"error: --output: cannot create {blocker / 'out.jsonl'}: {blocker} is not a directory "
                    "(errno 20)"), line


def test_score_missing_model(capsys, id_input, tmp_path):
    line = score_err(capsys, tmp_path / "no_such_model", id_input, tmp_path / "out.jsonl", "no_such_model")
    assert len(line) < 300


def test_score_missing_input(capsys, hf_dir, tmp_path):
    score_err(capsys, hf_dir, tmp_path / "missing.jsonl", tmp_path / "out.jsonl", "missing.jsonl")


@pytest.mark.parametrize("text", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_score_empty_input(capsys, hf_dir, tmp_path, text):
    inp = tmp_path / "in.jsonl"
    inp.write_text(text)
    score_err(capsys, hf_dir, inp, tmp_path / "out.jsonl", "no examples")


@pytest.mark.parametrize("flag, bad", [("--batch-size", "0"), ("--batch-size", "-2"),
                                       ("--max-length", "0"), ("--batch-size", "two")])
def test_score_bad_numeric_option(capsys, hf_dir, id_input, tmp_path, flag, bad):
    # Was: batch size 0 -> "error: range() arg 3 must not be zero"; -2 -> AttributeError traceback
    # after scoring nothing; max length 0 -> silently the model's default.
    with pytest.raises(SystemExit) as exc:
        score(hf_dir, id_input, tmp_path / "out.jsonl", flag, bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_scorer_rejects_bad_sizes(hf_dir):
    from urm_jax.scoring import Scorer

    with pytest.raises(ValueError, match="batch_size"):
        Scorer(hf_dir, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        Scorer(hf_dir, max_length=0)


def test_score_without_required_flag(capsys, id_input, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli_main(["score", "--input", str(id_input), "--output", str(tmp_path / "o.jsonl")])
    assert exc.value.code == 2
    assert "--model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 5. parity


def test_parity_pass_with_json_and_golden(capsys, hf_dir, jax_dir, tmp_path):
    # The JAX reward of one example, to use as its golden value.
    golden_row = {"id": "g1", "input_ids": [4, 9, 33, 200, 7, 7, 310]}
    (rec,) = score_ok(jax_dir, write_jsonl(tmp_path / "g.jsonl", [golden_row]), tmp_path / "g_out.jsonl")
    golden = write_jsonl(tmp_path / "golden.jsonl", [{**golden_row, "expected_reward": rec["reward"]}])

    report_path = tmp_path / "report.json"
    rc, out = parity(capsys, "--hf", hf_dir, "--model", jax_dir, "--json", report_path,
                     "--golden", golden)
    assert rc == 0, out
    assert out.strip().splitlines()[-1] == "PASS"
    assert "FAIL" not in out
    assert "golden g1" in out
    # Printed table: every output's max_abs and max_rel at fp32 level.
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines()
             if line.split() and line.split()[0] in ("reward", "means", "log_stds", "gate")}
    assert set(table) == {"reward", "means", "log_stds", "gate"}
    for name, (max_abs, max_rel, ok) in table.items():
        assert float(max_rel) <= 1e-5 and ok == "yes", (name, max_abs, max_rel)

    report = json.loads(report_path.read_text())
    assert report["compute_dtype"] == "float32" and report["gate_dtype"] == "float32"
    assert report["tolerance"] == pytest.approx(1e-5)
    assert report["rows"] >= 4 and report["lengths"][1] > 4 * 32  # past 4x the original context
    for name in ("reward", "means", "log_stds", "gate"):
        assert 0 <= report["max_rel"][name] <= 1e-5, name
        assert 0 <= report["max_abs"][name] <= 1e-4, name
    assert [g["id"] for g in report["golden"]] == ["g1"] and report["golden"][0]["ok"]


def test_parity_golden_scored_in_the_dtypes_it_names(capsys, hf_dir, jax_dir, tmp_path):
    """A golden line names the loading its reward came from (the model card's: float32 backbone,
    float16 gate); parity scores it so, whatever the checkpoint's own gate dtype (float32 here)."""
    row = {"id": "g16", "input_ids": [4, 9, 33, 200, 7, 7, 310]}
    (rec16,) = score_ok(jax_dir, write_jsonl(tmp_path / "g.jsonl", [row]), tmp_path / "g16.jsonl",
                        "--gate-dtype", "float16")
    (rec32,) = score_ok(jax_dir, tmp_path / "g.jsonl", tmp_path / "g32.jsonl")
    assert rec16["reward"] != rec32["reward"]  # the gate dtype shows in the reward
    golden = write_jsonl(tmp_path / "golden.jsonl", [{**row, "expected_reward": rec16["reward"],
                                                      "compute_dtype": "float32", "gate_dtype": "float16"}])
    report_path = tmp_path / "report.json"
    rc, out = parity(capsys, "--hf", hf_dir, "--model", jax_dir, "--golden", golden,
                     "--golden-tolerance", "1e-6", "--json", report_path, "--long-length", "40")
    assert rc == 0, out
    (g,) = json.loads(report_path.read_text())["golden"]
    assert g["jax"] == rec16["reward"] and (g["compute_dtype"], g["gate_dtype"]) == ("float32", "float16")
    assert "golden g16" in out and "gate float16" in out


def test_parity_hf_dir_both_sides(capsys, hf_dir, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"input_ids": [4, 5, 6]}, {"input_ids": list(range(4, 90))}])
    rc, out = parity(capsys, "--hf", hf_dir, "--model", hf_dir, "--input", inp)
    assert rc == 0 and out.strip().endswith("PASS"), out
    assert "2 sequences, 3..86 tokens" in out


def test_parity_tampered_checkpoint_fails(capsys, hf_dir, tampered_dir, tmp_path):
    report_path = tmp_path / "report.json"
    rc, out = parity(capsys, "--hf", hf_dir, "--model", tampered_dir, "--json", report_path)
    assert rc == 1, out
    assert out.strip().splitlines()[-1] == "FAIL"
    report = json.loads(report_path.read_text())
    assert report["max_rel"]["means"] > 1e-4 and report["max_rel"]["reward"] > 1e-4
    assert report["max_rel"]["log_stds"] <= 1e-5 and report["max_rel"]["gate"] <= 1e-5


def test_parity_wrong_golden_fails(capsys, hf_dir, jax_dir, tmp_path):
    golden_row = {"id": "g1", "input_ids": [4, 9, 33, 200, 7, 7, 310]}
    (rec,) = score_ok(jax_dir, write_jsonl(tmp_path / "g.jsonl", [golden_row]), tmp_path / "g_out.jsonl")
    golden = write_jsonl(tmp_path / "golden.jsonl", [{**golden_row, "expected_reward": rec["reward"] + 0.5}])
    rc, out = parity(capsys, "--hf", hf_dir, "--model", jax_dir, "--golden", golden)
    assert rc == 1, out
    assert out.strip().splitlines()[-1] == "FAIL"
    assert "golden g1" in out and " NO" in out


def test_parity_golden_without_expected_reward(capsys, hf_dir, jax_dir, tmp_path):
    golden = write_jsonl(tmp_path / "golden.jsonl", [{"id": "g", "input_ids": [4, 5]}])
    capsys.readouterr()
    rc = cli_main(["parity", "--hf", str(hf_dir), "--model", str(jax_dir), "--golden", str(golden),
                   "--long-length", "40"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "expected_reward" in err


def test_parity_bfloat16(capsys, hf_dir, jax_dir):
    rc, out = parity(capsys, "--hf", hf_dir, "--model", jax_dir, "--dtype", "bfloat16")
    assert rc == 0, out
    assert "compute bfloat16, gate float32" in out
    assert out.strip().splitlines()[-1] == "PASS"


def test_parity_with_fused_attention(capsys, hf_dir, jax_dir):
    rc, out = parity(capsys, "--hf", hf_dir, "--model", jax_dir, "--attention", "xla")
    assert rc == 0, out
    assert "compute float32, gate float32, attention xla;" in out
    assert out.strip().splitlines()[-1] == "PASS"


@pytest.mark.parametrize("which", ["missing", "jax-checkpoint"])
def test_parity_bad_hf_dir(capsys, jax_dir, tmp_path, which):
    # Was: an OSError traceback from transformers for both.
    hf = tmp_path / "nope" if which == "missing" else jax_dir
    capsys.readouterr()
    rc = cli_main(["parity", "--hf", str(hf), "--model", str(jax_dir), "--long-length", "40"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert str(hf) in lines[0]


# ---------------------------------------------------------------------------------------------
# the installed console script, end to end


def test_console_script_end_to_end(hf_dir, id_input, scored_hf, tmp_path):
    script = Path(sys.executable).parent / "urm-jax"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "urm_jax.cli"]
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([*cmd, "score", "--model", str(hf_dir), "--input", str(id_input),
                           "--output", str(out), "--batch-size", "8"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert f"scored {len(LENGTHS)} examples" in proc.stdout
    assert read_jsonl(out) == scored_hf
