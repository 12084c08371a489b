"""`urm-jax eval`: RewardBench section weighting against a hand-computed example, uncertainty
filtering and reliability tables, pair parsing, end-to-end runs (token-id pairs on a tiny model,
the bundled pair file on a model with the real Llama-3 tokenizer), every bad-input path, and the
Python API's best-of-n on chat conversations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hf_fixtures import make_tiny_chat_urm, make_tiny_urm
from urm_jax.cli import main as cli_main
from urm_jax.eval import (EXAMPLE_COUNTS, SECTIONS, bundled_pairs_path, compute_metrics, parse_pair,
                          reliability, uncertainty_filter)

VOCAB, PAD = 512, 511
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- metrics by hand ----------------------------------------------------------------------------

# (subset, reward chosen, reward rejected): 13 pairs, one tie (llmbar-natural), one unknown subset.
HAND = [
    ("alpacaeval-easy", 2.0, 1.0), ("alpacaeval-easy", 0.0, 1.0),      # 1/2
    ("mt-bench-med", 3.0, -1.0),                                       # 1/1
    ("llmbar-natural", 1.0, 0.5), ("llmbar-natural", 0.7, 0.7),        # 1/2: the tie is wrong
    ("xstest-should-respond", -1.0, 1.0),                              # 0/1
    ("donotanswer", 5.0, 4.0),                                         # 1/1
    ("math-prm", 1.5, 1.0),                                            # 1/1
    ("hep-python", 1.0, 0.0), ("hep-go", 0.0, 0.1),                    # 1/1, 0/1
    ("anthropic_helpful", 1.0, 0.0), ("anthropic_helpful", 0.0, 1.0),  # Other: 1/2
    ("my-subset", 1.0, 2.0),                                           # Other: 0/1
]


def test_rewardbench_weighting_hand_computed():
    subsets = [h[0] for h in HAND]
    m = compute_metrics(subsets, [h[1] for h in HAND], [h[2] for h in HAND], np.arange(len(HAND)))
    assert m["pairs"] == 13 and m["ties"] == 1
    assert m["accuracy"] == pytest.approx(7 / 13)
    sub = m["subsets"]
    assert sub["alpacaeval-easy"] == {"section": "Chat", "pairs": 2, "correct": 1, "accuracy": 0.5, "weight": 100}
    assert sub["llmbar-natural"]["accuracy"] == 0.5 and sub["anthropic_helpful"]["section"] == "Other"

    chat = (0.5 * 100 + 1.0 * 40) / (100 + 40)  # EXAMPLE_COUNTS weights, not the pairs present
    chat_hard = 0.5
    safety = (0.0 * 250 + 1.0 * 136) / (250 + 136)
    reasoning = (1.0 * 984 + 1.0 * 164 + 0.0 * 164) / (984 + 164 + 164)  # math-prm counts as 984
    rb = m["rewardbench"]
    got = {name: s["score"] for name, s in rb["sections"].items()}
    assert got == pytest.approx({"Chat": chat, "Chat Hard": chat_hard, "Safety": safety, "Reasoning": reasoning})
    assert rb["score"] == pytest.approx((chat + chat_hard + safety + reasoning) / 4)
    assert rb["complete"] and rb["missing_sections"] == []
    assert rb["sections"]["Chat"]["subsets"] == ["alpacaeval-easy", "mt-bench-med"]
    assert rb["other"] == {"subsets": ["anthropic_helpful", "my-subset"], "pairs": 3, "accuracy": pytest.approx(1 / 3)}


def test_reasoning_weights_math_like_all_code():
    # With every subset present, math-prm weighs exactly as much as the six hep-* subsets together.
    code = [s for s in SECTIONS["Reasoning"] if s.startswith("hep-")]
    assert len(code) == 6 and EXAMPLE_COUNTS["math-prm"] == sum(EXAMPLE_COUNTS[s] for s in code)
    subsets = ["math-prm"] + code
    rc = [1.0] + [0.0] * 6  # math right, all code wrong
    m = compute_metrics(subsets, rc, [0.5] * 7, np.zeros(7))
    assert m["rewardbench"]["sections"]["Reasoning"]["score"] == pytest.approx(0.5)
    assert m["rewardbench"]["score"] == pytest.approx(0.5)  # the only section present
    assert not m["rewardbench"]["complete"]
    assert m["rewardbench"]["missing_sections"] == ["Chat", "Chat Hard", "Safety"]
    assert m["rewardbench"]["sections"]["Chat"]["score"] is None


def test_uncertainty_filter_hand_computed():
    correct = np.array([True, False, True, True, False, True, False, True, True, True])
    unc = np.array([0.5, 9.0, 0.1, 0.3, 7.0, 0.3, 8.0, 2.0, 1.0, 0.2])
    # Least uncertain first (stable on the 0.3 tie): idx 2, 9, 3, 5, 0, 8, 7, 4, 6, 1.
    pts = {p["keep_percent"]: p for p in uncertainty_filter(correct, unc)}
    assert [pts[p]["pairs"] for p in range(10, 101, 10)] == list(range(1, 11))
    assert pts[10]["accuracy"] == 1.0 and pts[70]["accuracy"] == 1.0
    assert pts[80]["accuracy"] == pytest.approx(7 / 8) and pts[100]["accuracy"] == pytest.approx(7 / 10)
    assert pts[50]["max_uncertainty"] == 0.5
    few = uncertainty_filter(np.array([True, False, True]), np.array([3.0, 1.0, 2.0]))
    assert [p["pairs"] for p in few] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]  # ceil, at least one
    assert few[0]["accuracy"] == 0.0 and few[3]["accuracy"] == 0.5


def test_reliability_bins_hand_computed():
    margin = np.array([0.1, -0.2, 0.0, 3.0, -4.0, 5.0])
    rel = reliability(margin, bins=3)
    bins = rel["bins"]
    assert [b["pairs"] for b in bins] == [2, 2, 2]
    # |m| sorted: 0.0 (tie), 0.1 | 0.2 (wrong), 3.0 | 4.0 (wrong), 5.0
    assert [b["accuracy"] for b in bins] == [0.5, 0.5, 0.5]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    conf = [(sig(0.0) + sig(0.1)) / 2, (sig(0.2) + sig(3.0)) / 2, (sig(4.0) + sig(5.0)) / 2]
    assert [b["confidence"] for b in bins] == pytest.approx(conf)
    assert rel["ece"] == pytest.approx(sum(abs(0.5 - c) for c in conf) / 3)
    assert bins[0]["abs_margin_min"] == 0.0 and bins[2]["abs_margin_max"] == 5.0
    assert len(reliability(np.array([1.0, 2.0]), bins=10)["bins"]) == 2


# --- parsing ------------------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("obj, chosen", [
    ({"prompt": "q", "chosen": "a", "rejected": "b", "subset": "s"}, {"prompt": "q", "response": "a"}),
    ({"prompt": MSGS, "chosen": "a", "rejected": "b"},
     {"messages": MSGS + [{"role": "assistant", "content": "a"}]}),
    ({"prompt": "ignored", "chosen": MSGS + [{"role": "assistant", "content": "a"}], "rejected": MSGS},
     {"messages": MSGS + [{"role": "assistant", "content": "a"}]}),
    ({"prompt": MSGS, "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     {"messages": MSGS + [{"role": "assistant", "content": "a"}]}),
    ({"chosen": {"input_ids": [4, 5]}, "rejected": {"input_ids": [6]}}, {"input_ids": [4, 5]}),
], ids=["rewardbench", "prompt-messages", "full-conversations", "continuation", "ids"])
def test_parse_pair_forms(obj, chosen):
    pair_id, subset, c, _ = parse_pair(obj)
    assert c == chosen
    assert subset == obj.get("subset", "default") and pair_id is None


@pytest.mark.parametrize("obj, needle", [
    ([1, 2], "JSON object"),
    ({"prompt": "q", "chosen": "a"}, "no 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "subset": 3}, "'subset' must be"),
    ({"chosen": "a", "rejected": "b"}, "'prompt' must be"),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, "'chosen' must be"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "starts with an assistant"),
])
def test_parse_pair_errors(obj, needle):
    with pytest.raises(ValueError, match=needle):
        parse_pair(obj)


# --- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return [make_tiny_urm(root / f"m{s}", vocab=VOCAB, gate_dtype="float32", seed=s) for s in (0, 1)]


@pytest.fixture(scope="module")
def id_pairs():
    rng = np.random.default_rng(0)
    subsets = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm", "hep-rust", "shp"]
    ids = lambda: [int(t) for t in rng.integers(0, PAD, rng.integers(2, 90))]  # noqa: E731
    return [{"id": f"p{i}", "subset": subsets[i % len(subsets)],
             "chosen": {"input_ids": ids()}, "rejected": {"input_ids": ids()}} for i in range(30)]


def run_eval_cli(models, pairs, out, *extra):
    args = ["eval", "--pairs", str(pairs), "--output-dir", str(out), "--no-progress", *map(str, extra)]
    for m in models:
        args += ["--model", str(m)]
    return cli_main(args)


def test_eval_end_to_end_matches_score(models, id_pairs, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", id_pairs)
    out = tmp_path / "ev"
    assert run_eval_cli(models[:1], pairs, out, "--batch-size", 4, "--chunk-size", 7) == 0
    summary = capsys.readouterr().out
    assert "30 pairs" in summary and "RewardBench:" in summary and "Other (shp)" in summary
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "pairs.jsonl", "reliability.png",
                                                     "uncertainty_filter.png"]
    for png in ("reliability.png", "uncertainty_filter.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    # Rewards are `urm-jax score`'s for the same token ids.
    sides = [{"id": f"{p['id']}/{side}", **p[side]} for p in id_pairs for side in ("chosen", "rejected")]
    scored = tmp_path / "scored.jsonl"
    assert cli_main(["score", "--model", str(models[0]), "--input", str(write_jsonl(tmp_path / "s.jsonl", sides)),
                     "--output", str(scored), "--no-progress"]) == 0
    by_id = {r["id"]: r for r in read_jsonl(scored)}
    recs = read_jsonl(out / "pairs.jsonl")
    assert [r["id"] for r in recs] == [p["id"] for p in id_pairs] and [r["line"] for r in recs] == list(range(1, 31))
    for r in recs:
        c, j = by_id[f"{r['id']}/chosen"], by_id[f"{r['id']}/rejected"]
        assert r["reward_chosen"] == pytest.approx(c["reward"], rel=1e-6, abs=1e-6)
        assert r["reward_rejected"] == pytest.approx(j["reward"], rel=1e-6, abs=1e-6)
        assert r["uncertainty"] == pytest.approx(c["uncertainty"] + j["uncertainty"], rel=1e-5)
        assert r["correct"] == (r["reward_chosen"] > r["reward_rejected"])

    # metrics.json is compute_metrics of those per-pair numbers.
    metrics = json.loads((out / "metrics.json").read_text())
    want = compute_metrics([r["subset"] for r in recs], [r["reward_chosen"] for r in recs],
                           [r["reward_rejected"] for r in recs], [r["uncertainty"] for r in recs])
    assert metrics["accuracy"] == want["accuracy"] and metrics["rewardbench"] == want["rewardbench"]
    assert metrics["uncertainty_filter"] == want["uncertainty_filter"]
    assert metrics["models"] == [str(models[0])] and metrics["uncertainty_measure"] == "aleatoric"
    assert metrics["attributes"] == [["helpfulness", "correctness", "coherence", "complexity",
                                      "verbosity"]]
    assert metrics["rewardbench"]["complete"] and metrics["rewardbench"]["other"]["subsets"] == ["shp"]


def test_eval_ensemble_reward_gap(models, id_pairs, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", id_pairs[:12])
    out = tmp_path / "ev"
    assert run_eval_cli(models, pairs, out, "--uncertainty", "reward_gap") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["uncertainty_measure"] == "reward_gap" and len(metrics["models"]) == 2
    assert all(r["uncertainty"] >= 0 for r in read_jsonl(out / "pairs.jsonl"))


def test_eval_skip_bad_lines(models, id_pairs, tmp_path, capsys):
    rows = [id_pairs[0], "{oops", id_pairs[1], {"chosen": {"input_ids": [4]}, "rejected": {"input_ids": [VOCAB]}}]
    out = tmp_path / "ev"
    assert run_eval_cli(models[:1], write_jsonl(tmp_path / "pairs.jsonl", rows), out, "--on-bad-line", "skip") == 0
    assert "skipped 2 bad line(s)" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 2 and metrics["skipped_lines"] == 2
    skipped = read_jsonl(out / "skipped_lines.jsonl")
    assert [s["line"] for s in skipped] == [2, 4] and "rejected: input_ids[0]" in skipped[1]["error"]


def eval_err(capsys, models, pairs, out, *extra) -> str:
    capsys.readouterr()
    rc = run_eval_cli(models, pairs, out, *extra)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    return line


@pytest.mark.parametrize("row, needle", [
    ("{bad json", "invalid JSON"),
    ({"chosen": {"input_ids": [4]}}, "no 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "chosen: this model has no tokenizer"),
    ({"chosen": {"input_ids": [4]}, "rejected": {"input_ids": [4]}, "subset": ""}, "'subset' must be"),
    ({"chosen": {"input_ids": list(range(4, 60))}, "rejected": {"input_ids": [4]}}, "chosen: example has 56 tokens"),
], ids=["json", "missing-side", "no-tokenizer", "empty-subset", "too-long"])
def test_eval_bad_line(models, id_pairs, tmp_path, capsys, row, needle):
    good = {"chosen": {"input_ids": [4, 5]}, "rejected": {"input_ids": [6]}}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    out = tmp_path / "ev"
    line = eval_err(capsys, models[:1], pairs, out, "--max-length", 32)
    assert f"{pairs}:2:" in line and needle in line, line
    assert not out.exists() and not list(tmp_path.glob(".ev*"))


def test_eval_ctrl_c_leaves_no_output_dir(models, id_pairs, tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) while pairs.jsonl is being written: one `error:` line, exit
    130, no traceback, no --output-dir and no temporary sibling of it."""
    from refusals import refused
    from urm_jax import eval as eval_module

    pairs = write_jsonl(tmp_path / "pairs.jsonl", id_pairs[:12])
    real, calls = eval_module.dumps, []

    def interrupted_dumps(record, **kwargs):
        calls.append(record)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(record, **kwargs)

    monkeypatch.setattr(eval_module, "dumps", interrupted_dumps)
    out = tmp_path / "ev"
    refused(capsys, cli_main, ["eval", "--pairs", pairs, "--output-dir", out, "--no-progress",
                               "--model", models[0]],
            "error: interrupted (Ctrl-C): urm-jax eval stopped", code=130, absent=[out])
    assert len(calls) == 5


def test_eval_refusals(models, id_pairs, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", id_pairs[:2])
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert "already exists" in eval_err(capsys, models[:1], pairs, existing)
    assert (existing / "keep.txt").read_text() == "mine"
    assert "needs an ensemble" in eval_err(capsys, models[:1], pairs, tmp_path / "o1", "--uncertainty", "reward_gap")
    assert "no such pairs file" in eval_err(capsys, models[:1], tmp_path / "nope.jsonl", tmp_path / "o2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no examples" in eval_err(capsys, models[:1], empty, tmp_path / "o3")
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3"))
    # --overwrite replaces a previous run.
    assert run_eval_cli(models[:1], pairs, existing, "--overwrite") == 0
    assert not (existing / "keep.txt").exists() and (existing / "metrics.json").is_file()


# --- with the real tokenizer: the bundled pair file and best-of-n -------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_tiny_chat_urm(tmp_path_factory.mktemp("eval_chat") / "hf",
                              tmp_path_factory.mktemp("urm_cache"))


def test_bundled_pairs_cover_every_section(chat_model, tmp_path, capsys):
    rows = read_jsonl(bundled_pairs_path())
    assert len(rows) == 24 and all(r["subset"] in sum(SECTIONS.values(), ()) for r in rows)
    out = tmp_path / "ev"
    assert run_eval_cli([chat_model], bundled_pairs_path(), out) == 0
    assert "24 pairs" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rewardbench"]["complete"] and metrics["pairs"] == 24
    assert 0.0 <= metrics["rewardbench"]["score"] <= 1.0


def test_api_best_of_n_with_chat_model(chat_model):
    from urm_jax.api import RewardModel

    rm = RewardModel(chat_model)
    prompt = "Name a prime number."
    candidates = ["Seven is prime.", "Nine.", "2", "Eleven is a prime number."]
    scores = rm.score([(prompt, c) for c in candidates])
    best = rm.best_of_n(prompt, candidates)
    assert best.index == int(np.argmax(scores.reward)) and best.response == candidates[best.index]
    np.testing.assert_allclose(best.scores.reward, scores.reward, rtol=1e-6, atol=1e-6)
    # A huge penalty picks the least uncertain candidate instead.
    cautious = rm.best_of_n(prompt, candidates, penalty=1e6)
    assert cautious.index == int(np.argmin(scores.uncertainty))
    many = rm.best_of_n_batch([prompt, [{"role": "user", "content": "Hi"}]],
                              [candidates, ["Hello!", "Go away."]])
    assert many[0].index == best.index and len(many[1].utility) == 2
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": candidates[0]}]
    assert rm.encode(msgs) == rm.encode((prompt, candidates[0]))
