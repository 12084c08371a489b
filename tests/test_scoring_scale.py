"""Scoring at scale: streaming, order across length buckets, bounded shapes, data parallelism
over 8 simulated CPU devices, batch-composition invariance, URME statistics, bad lines, and the
Python API.

Batch invariance is measured, not assumed exact: XLA's CPU kernels (dot tiling, reduction
order) depend on the batch shape, so a row's fp32 outputs can move by float rounding when its
batch changes. The metric is parity's: max|a - b| / max|b| per output. Measured on this suite's
tiny fp32 models (hidden 64, 2 layers, XLA CPU), against one device at batch 1: reward <= 6.9e-7,
means <= 4.3e-7, log_stds <= 4.6e-7, gate <= 4.7e-7, uncertainty <= 8.0e-7 across batch sizes
3/8/16, a token budget, 1 vs 8 devices and input order (8 devices x 1 row equals one device at
batch 1 exactly: the per-device program is the same). Asserted: the issue's 1e-6 (uncertainty:
that bound carried through exp(2 log_std)).
"""

from __future__ import annotations

import json
import random

import jax
import numpy as np
import pytest

from hf_fixtures import make_tiny_urm
from urm_jax.cli import main as cli_main
from urm_jax.attributes import HELPSTEER2 as ATTRIBUTES
from urm_jax.scoring import Ensemble, Scorer, bucket_lengths, ensemble_statistics, score_jsonl

VOCAB, PAD = 512, 511
TOL = 1e-6
OUTPUTS = ("reward", "means", "log_stds", "gate", "uncertainty")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def assert_same(got, want, tol=TOL) -> dict:
    """Every output within `tol` (relative to its scale). uncertainty = sum exp(2 log_std) turns
    an absolute log-std error d into a relative one of about 2 d, so it gets the log-std bound
    carried through that derivative, as in test_cli."""
    diffs = {k: rel_diff(getattr(got, k), getattr(want, k)) for k in OUTPUTS}
    bounds = dict.fromkeys(OUTPUTS, tol)
    bounds["uncertainty"] = tol + 2 * tol * max(1.0, float(np.abs(want.log_stds).max()))
    assert all(diffs[k] <= bounds[k] for k in OUTPUTS), (diffs, bounds)
    np.testing.assert_array_equal(got.num_tokens, want.num_tokens)
    return diffs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return [make_tiny_urm(root / f"m{seed}", vocab=VOCAB, gate_dtype="float32", seed=seed)
            for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def rows():
    """48 sequences of 2..130 tokens in random order, spanning 6 length buckets (few shapes: each
    configuration compiles each of them once)."""
    rng = random.Random(0)
    lengths = [rng.choice([2, 5, 15, 16, 17, 23, 40, 64, 65, 130]) for _ in range(48)]
    return [{"id": f"r{i}", "input_ids": [rng.randrange(0, PAD) for _ in range(n)]}
            for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def seqs(rows):
    return [r["input_ids"] for r in rows]


@pytest.fixture(scope="module")
def single(models):
    """Member 0 on one device, batch 1: the reference every other configuration must match."""
    return Scorer(models[0], batch_size=1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def reference(single, seqs):
    return single.score_arrays(seqs)


# --- buckets ------------------------------------------------------------------------------------


def test_bucket_lengths_small_fixed_set():
    assert bucket_lengths(4096) == (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024,
                                    1536, 2048, 3072, 4096)
    assert bucket_lengths(100) == (16, 24, 32, 48, 64, 96, 100)
    assert bucket_lengths(10) == (10,)
    for max_len in (17, 4000, 131072):
        b = bucket_lengths(max_len)
        assert list(b) == sorted(set(b)) and b[-1] == max_len
        assert len(b) <= 2 * np.log2(max_len / 16) + 2  # bounded: two per octave
        # Padding waste: a sequence of n tokens sits in a bucket < 1.5 n (+ the 16 floor).
        for n in range(1, max_len + 1, 7):
            bucket = next(x for x in b if x >= n)
            assert bucket <= max(16, 1.5 * n + 1), (n, bucket)


def test_plan_groups_by_bucket_and_rounds_rows_to_devices(models):
    scorer = Scorer(models[0], batch_size=5)  # 8 devices: 5 rows round up to 8
    assert scorer.num_devices == len(jax.devices()) == 8
    assert scorer.batch_size == 8
    lengths = [3, 300, 16, 17, 300, 24, 2]
    plan = scorer.plan(lengths)
    assert sorted(i for _, idx in plan for i in idx) == list(range(len(lengths)))
    for bucket, idx in plan:
        assert bucket in scorer.buckets and len(idx) <= 8
        assert all(lengths[i] <= bucket for i in idx)
        assert all(bucket == scorer.buckets[0] or lengths[i] > max(x for x in scorer.buckets if x < bucket)
                   for i in idx)
    budget = Scorer(models[0], batch_size=64, batch_tokens=1024)
    assert budget.rows_for(16) == 64 and budget.rows_for(128) == 8 and budget.rows_for(4096) == 8


# --- invariance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    dict(batch_size=3, devices="one"), dict(batch_size=8, devices="all"),
    dict(batch_size=16, devices="all"), dict(batch_size=64, batch_tokens=512, devices="all"),
], ids=["1dev-bs3", "8dev-bs8", "8dev-bs16", "8dev-tokens512"])
def test_batch_composition_never_changes_a_score(models, seqs, reference, config):
    config = dict(config)
    devices = jax.devices()[:1] if config.pop("devices") == "one" else None
    scorer = Scorer(models[0], devices=devices, **config)
    assert scorer.num_devices == (1 if devices else 8)
    got = scorer.score_arrays(seqs)
    diffs = assert_same(got, reference)
    print(f"max relative difference vs 1 device batch 1 ({config}): {diffs}")
    # ... and in another input order, each row still gets its own score.
    perm = np.random.default_rng(1).permutation(len(seqs))
    shuffled = scorer.score_arrays([seqs[i] for i in perm])
    assert_same(shuffled, reference.take(perm))


def test_data_parallel_outputs_are_sharded_over_all_devices(models, seqs):
    scorer = Scorer(models[0], batch_size=16)
    pending = scorer.submit(seqs[:20])
    _, out = pending.batches[0]
    assert len(out.reward.sharding.device_set) == 8  # each device holds its rows
    assert out.reward.sharding.spec[0] == "data"
    state_leaf = jax.tree.leaves(scorer._state)[0]
    assert state_leaf.sharding.is_fully_replicated and len(state_leaf.sharding.device_set) == 8


def test_compiled_shapes_are_bounded(models, seqs):
    scorer = Scorer(models[0], batch_size=8)
    scorer.score_arrays(seqs)
    scorer.score_arrays(list(reversed(seqs)))
    used = {next(b for b in scorer.buckets if b >= len(s)) for s in seqs}
    assert scorer.compiled_shapes == {(8, b) for b in used}
    assert len(used) <= 8


# --- streaming ----------------------------------------------------------------------------------


def test_stream_keeps_order_across_buckets_and_chunks(models, rows, reference, tmp_path, monkeypatch):
    # 480 lines (the 48 rows x 10, shuffled), chunks of 37: chunks cut across buckets and batches.
    rng = random.Random(3)
    many = [dict(r, id=f"{r['id']}-{k}") for k in range(10) for r in rows]
    rng.shuffle(many)
    inp = write_jsonl(tmp_path / "in.jsonl", many)
    scorer = Scorer(models[0], batch_size=8)
    sizes = []
    submit = scorer.submit
    monkeypatch.setattr(scorer, "submit", lambda s, t=None: sizes.append(len(s)) or submit(s, t))
    run = score_jsonl(scorer, inp, tmp_path / "out.jsonl", chunk_size=37, progress=False)
    assert run.written == len(many) == 480 and len(run.skipped) == 0
    assert max(sizes) == 37 and sum(sizes) == 480  # memory bounded by the chunk, whatever the file
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in many]
    want = {r["id"]: float(reference.reward[i]) for i, r in enumerate(rows)}
    got = np.array([r["reward"] for r in out])
    expect = np.array([want[r["id"].rsplit("-", 1)[0]] for r in out])
    assert rel_diff(got, expect) <= TOL
    assert run.tokens == sum(len(r["input_ids"]) for r in many)


def test_cli_skip_bad_lines_and_report(models, tmp_path, capsys):
    good = [{"id": i, "input_ids": [4 + i, 5, 6]} for i in range(4)]
    lines = [good[0], "{not json", good[1], {"input_ids": [4, VOCAB]}, good[2],
             {"text": "?"}, good[3]]
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    with open(inp, "ab") as f:
        f.write(b'{"input_ids": [4, 5], "id": "\xff"}\n')  # not UTF-8: line 8
    out, report = tmp_path / "out.jsonl", tmp_path / "bad.jsonl"
    rc = cli_main(["score", "--model", str(models[0]), "--input", str(inp), "--output", str(out),
                   "--on-bad-line", "skip", "--bad-lines", str(report), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 2, 3]
    bad = read_jsonl(report)
    assert [b["line"] for b in bad] == [2, 4, 6, 8]
    assert "invalid JSON" in bad[0]["error"] and "outside the vocabulary" in bad[1]["error"]
    assert "unknown example schema" in bad[2]["error"] and "not UTF-8" in bad[3]["error"]
    assert "skipped 4 bad line(s)" in captured.err and "4 bad lines skipped" in captured.out


@pytest.mark.parametrize("case", ["utf8", "all-bad-skipped", "bad-lines-without-skip", "ensemble-vocab"])
def test_cli_score_refusals(models, tmp_path, capsys, case):
    inp = tmp_path / "in.jsonl"
    extra, needles, model_args = [], [], ["--model", str(models[0])]
    if case == "utf8":
        inp.write_bytes(b'{"input_ids": [4, 5]}\n{"input_ids": [4], "id": "\xc3"}\n')
        needles = [f"{inp}:2:", "not UTF-8"]
    elif case == "all-bad-skipped":
        write_jsonl(inp, ["nope", {"input_ids": []}])
        extra, needles = ["--on-bad-line", "skip"], [str(inp), "no usable examples", "line 1"]
    elif case == "bad-lines-without-skip":
        write_jsonl(inp, [{"input_ids": [4, 5]}])
        extra, needles = ["--bad-lines", str(tmp_path / "b.jsonl")], ["--bad-lines needs --on-bad-line skip"]
    else:
        other = make_tiny_urm(tmp_path / "v1024", vocab=1024, gate_dtype="float32")
        write_jsonl(inp, [{"input_ids": [4, 5]}])
        model_args += ["--model", str(other)]
        needles = ["vocabulary", "512", "1024"]
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    rc = cli_main(["score", *model_args, "--input", str(inp), "--output", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    for needle in needles:
        assert needle in line, (needle, line)
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))


def test_truncation_left_marks_rows_and_matches_the_tail(models, tmp_path):
    rows = [{"id": "short", "input_ids": list(range(4, 20))}, {"id": "long", "input_ids": list(range(4, 104))}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert cli_main(["score", "--model", str(models[0]), "--input", str(inp), "--output", str(out),
                     "--max-length", "32", "--truncation", "left", "--no-progress"]) == 0
    short, long = read_jsonl(out)
    assert (short["truncated"], long["truncated"]) == (False, True)
    assert long["num_tokens"] == 32
    tail = Scorer(models[0], max_length=32).score_arrays([list(range(72, 104))])
    assert rel_diff([long["reward"]], tail.reward) <= TOL


# --- URME ---------------------------------------------------------------------------------------


def test_ensemble_statistics_numpy():
    rng = np.random.default_rng(0)
    rewards, log_stds = rng.normal(size=(4, 6)), rng.normal(size=(4, 6, 5))
    stats = ensemble_statistics(rewards, log_stds)
    for n in range(6):
        r = rewards[:, n]
        gap = max(abs(a - b) for a in r for b in r)  # every pair, by definition
        frob = max(np.linalg.norm(np.diag(np.exp(2 * log_stds[m, n])), "fro") for m in range(4))
        aleatoric = np.mean([np.exp(2 * log_stds[m, n]).sum() for m in range(4)])
        np.testing.assert_allclose(stats["reward_mean"][n], r.mean(), rtol=1e-12)
        np.testing.assert_allclose(stats["reward_gap"][n], gap, rtol=1e-12)
        np.testing.assert_allclose(stats["cov_frobenius"][n], frob, rtol=1e-12)
        np.testing.assert_allclose(stats["aleatoric"][n], aleatoric, rtol=1e-12)


def test_cli_ensemble_against_members(models, rows, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", rows[:20])
    singles = []
    for k, m in enumerate(models):
        out = tmp_path / f"m{k}.jsonl"
        assert cli_main(["score", "--model", str(m), "--input", str(inp), "--output", str(out), "--no-progress"]) == 0
        singles.append(read_jsonl(out))
    out = tmp_path / "ens.jsonl"
    args = ["score", "--input", str(inp), "--output", str(out), "--no-progress"]
    for m in models:
        args += ["--model", str(m)]
    assert cli_main(args) == 0
    ens = read_jsonl(out)
    assert [r["id"] for r in ens] == [r["id"] for r in rows[:20]]
    for n, rec in enumerate(ens):
        members = [s[n] for s in singles]
        assert len(rec["members"]) == 3
        for got, want in zip(rec["members"], members):  # each member equals its own single run
            assert rel_diff([got["reward"]], [want["reward"]]) <= TOL
            assert got["log_std"].keys() == want["log_std"].keys() == set(ATTRIBUTES)
        r = np.array([m["reward"] for m in members])
        s = np.array([[m["log_std"][a] for a in ATTRIBUTES] for m in members])
        np.testing.assert_allclose(rec["reward"], r.mean(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rec["reward_mean"], r.mean(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rec["max_reward_gap"], r.max() - r.min(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec["max_cov_frobenius"], np.sqrt(np.exp(4 * s).sum(-1)).max(), rtol=1e-5)
        np.testing.assert_allclose(rec["uncertainty"], np.exp(2 * s).sum(-1).mean(), rtol=1e-5)
        assert rec["num_tokens"] == members[0]["num_tokens"]


def test_ensemble_members_share_compiled_programs(models, seqs):
    from urm_jax.scoring import engine

    Scorer(models[0], batch_size=8).score_arrays(seqs)  # compiles every shape once
    before = engine.forward_batch._cache_size()
    ens = Ensemble.load(models[1:], batch_size=8)
    ens.score_arrays(seqs)
    assert engine.forward_batch._cache_size() == before  # same architecture: nothing recompiled


# --- Python API ---------------------------------------------------------------------------------


def test_api_score_best_of_n_and_filter(models, rows, reference):
    from urm_jax.api import RewardModel, confident

    rm = RewardModel(models[0])
    scores = rm.score([r["input_ids"] for r in rows] + [np.array(rows[0]["input_ids"])])
    assert len(scores) == len(rows) + 1
    assert rel_diff(scores.reward[:-1], reference.reward) <= TOL
    assert scores.reward[-1] == scores.reward[0]
    assert scores.record(0)["mean"].keys() == set(ATTRIBUTES)

    keep = confident(scores, keep_fraction=0.25)
    assert keep.sum() == int(np.ceil(0.25 * len(scores)))
    assert scores.uncertainty[keep].max() <= scores.uncertainty[~keep].min()
    threshold = float(np.median(scores.uncertainty))
    np.testing.assert_array_equal(confident(scores, max_uncertainty=threshold), scores.uncertainty <= threshold)

    ens = RewardModel(models[:2], batch_size=16)
    es = ens.score([r["input_ids"] for r in rows[:10]])
    assert ens.is_ensemble and len(es.members) == 2
    np.testing.assert_allclose(es.reward, (es.members[0].reward.astype(np.float64) + es.members[1].reward) / 2)
    assert confident(es, keep_fraction=0.5, measure="reward_gap").sum() == 5

    with pytest.raises(ValueError, match="conversation 1"):
        rm.score([[4, 5], [4, VOCAB]])
    with pytest.raises(ValueError, match="conversation 0: .*no tokenizer"):
        rm.score([("prompt", "response")])
    with pytest.raises(ValueError, match="reward_gap.*ensemble"):
        confident(scores, keep_fraction=0.5, measure="reward_gap")
