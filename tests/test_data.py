"""Training data: HelpSteer2 / preference parsing with row accounting, fixed-shape batches,
packing, and the resumable multi-host iterator.  Uses the real Llama-3 tokenizer (built
offline) on the bundled sample files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from urm_jax.attributes import HELPSTEER2
from urm_jax.data import tokenizer as tokmod
from urm_jax.data.batching import BatchIterator, epoch_order, first_fit_rows, padding_efficiency
from urm_jax.data.datasets import (
    DatasetSchemaError,
    helpsteer2_examples,
    load_helpsteer2,
    load_preference_pairs,
    load_rows,
    preference_pair_examples,
    synthetic_helpsteer_lengths,
)
from urm_jax.data.tokenization import helpsteer_prompt_to_messages, render_ids

BOS, EOT, START_HEADER = 128000, 128009, 128006
SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
HS2_SAMPLE = SAMPLES / "helpsteer2_sample.jsonl"
PAIR_SAMPLE = SAMPLES / "preference_sample.jsonl"
SEQ_LEN = 640  # the longest sample conversation is just under 600 tokens


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("URM_JAX_CACHE", str(tmp_path_factory.mktemp("urm_cache")))
        yield AutoTokenizer.from_pretrained(str(tokmod.cached_llama3_tokenizer_dir()))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_datasets"))


@pytest.fixture(scope="session")
def hs2(tok, hf_cache):
    examples, report = load_helpsteer2(str(HS2_SAMPLE), tok, max_length=SEQ_LEN, cache_dir=hf_cache)
    return examples, report


@pytest.fixture(scope="session")
def pairs(tok, hf_cache):
    return load_preference_pairs(str(PAIR_SAMPLE), tok, max_length=SEQ_LEN, cache_dir=hf_cache)


def hs_row(prompt="What is 2+2?", response="4.", **labels):
    row = {"prompt": prompt, "response": response, **{a: 2 for a in HELPSTEER2}}
    row.update(labels)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def all_batches(it: BatchIterator) -> list[dict]:
    return list(it)


def assert_batches_equal(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- parsing ----------------------------------------------------------------------------------


def test_helpsteer_rows_render_with_the_shared_policy(tok):
    multi = "Hi there.\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nName a prime."
    labels = dict(helpfulness=4, correctness=3, coherence=4, complexity=0, verbosity=1)
    rows = [hs_row(), hs_row(prompt=multi, response="7", **labels)]
    examples, report = helpsteer2_examples(rows, tok, max_length=256)
    assert (report.total, report.used, report.truncated, report.dropped) == (2, 2, 0, {})

    single, turns = examples
    assert single.input_ids.dtype == np.int32 and single.labels.dtype == np.float32
    expected = render_ids(tok, {"prompt": "What is 2+2?", "response": "4."}, max_length=None)
    np.testing.assert_array_equal(single.input_ids, expected)

    np.testing.assert_array_equal(turns.labels, [4, 3, 4, 0, 1])  # HELPSTEER2 order
    ids = turns.input_ids.tolist()
    assert ids[0] == BOS and ids[-1] == EOT and ids.count(BOS) == 1
    assert ids.count(START_HEADER) == 4  # user, assistant, user, assistant
    text = tok.decode(ids)
    order = [text.index(s) for s in ("Hi there.", "Hello! How can I help?", "Name a prime.", "7<|eot_id|>")]
    assert order == sorted(order)
    assert "<extra_id_1>" not in text
    headers = [tok.decode(ids[i + 1]) for i, t in enumerate(ids) if t == START_HEADER]
    assert headers == ["user", "assistant", "user", "assistant"]


def test_sample_file_parses_completely(hs2, tok):
    examples, report = hs2
    assert report.total == report.used == len(examples) == 96
    assert report.dropped == {} and report.truncated == 0
    assert "96 rows, 96 used" in report.format()
    multi_turn = [e for e in examples if e.input_ids.tolist().count(START_HEADER) > 2]
    assert len(multi_turn) >= 4
    lengths = [len(e.input_ids) for e in examples]
    assert min(lengths) < 30 and max(lengths) > 400
    for e in examples:
        assert e.input_ids[0] == BOS and e.input_ids[-1] == EOT
        assert e.labels.shape == (5,) and 0 <= e.labels.min() and e.labels.max() <= 4


def test_sample_labels_track_quality():
    # The sample holds three responses of falling quality per prompt; helpfulness should follow.
    rows = [json.loads(line) for line in HS2_SAMPLE.read_text().splitlines()]
    by_prompt: dict[str, list[int]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r["helpfulness"])
    best_first = [h[0] >= h[-1] for h in by_prompt.values()]
    assert sum(best_first) == len(by_prompt) == 32


def test_missing_column_is_an_error_naming_column_and_source(tmp_path, tok, hf_cache):
    rows = [hs_row()]
    del rows[0]["verbosity"]
    path = write_jsonl(tmp_path / "wrong.jsonl", rows)
    with pytest.raises(DatasetSchemaError, match=r"verbosity") as e:
        load_helpsteer2(path, tok, max_length=64, cache_dir=hf_cache)
    assert "wrong.jsonl" in str(e.value)

    pair_path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(DatasetSchemaError, match=r"rejected.*pairs\.jsonl|pairs\.jsonl.*rejected"):
        load_preference_pairs(pair_path, tok, max_length=64, cache_dir=hf_cache)


def test_unusable_rows_are_counted_per_reason(tok):
    long_answer = "word " * 400
    rows = [
        hs_row(),                                          # used
        hs_row(response="   "),                            # empty_response
        hs_row(correctness=None),                          # missing_label
        hs_row(coherence=float("nan")),                    # missing_label
        hs_row(verbosity=5),                               # label_out_of_range
        hs_row(helpfulness=-1),                            # label_out_of_range
        hs_row(complexity=True),                           # bad_label
        hs_row(prompt="q\n<extra_id_1>Narrator\nx"),       # bad_turn_markers
        hs_row(prompt="q\n<extra_id_1>Assistant\na"),      # bad_turn_markers (ends with assistant)
        hs_row(response=long_answer),                      # final_turn_too_long
        hs_row(prompt=None),                               # not_text
        hs_row(prompt="Fine?", response="Yes."),           # used
    ]
    examples, report = helpsteer2_examples(rows, tok, max_length=128, source="unit")
    assert report.dropped == {
        "empty_response": 1,
        "missing_label": 2,
        "label_out_of_range": 2,
        "bad_label": 1,
        "bad_turn_markers": 2,
        "final_turn_too_long": 1,
        "not_text": 1,
    }
    assert report.used == len(examples) == 2
    assert report.total == report.used + report.num_dropped == len(rows)
    assert report.dropped_rows["missing_label"] == [3, 4]  # 1-based rows of the list
    line = report.format()
    assert line.startswith("unit: 12 rows, 2 used (0 truncated), 10 dropped")
    assert "bad_turn_markers=2 [rows 8, 9]" in line and "empty_response=1 [row 2]" in line and "\n" not in line


def test_left_truncation_keeps_bos_first_and_final_eot_last(tok):
    early = " ".join(f"fact{i}" for i in range(300))
    prompt = f"{early}\n<extra_id_1>Assistant\nNoted.\n<extra_id_1>User\nWhat was the last fact?"
    row = hs_row(prompt=prompt, response="It was fact299.")
    full = render_ids(tok, {"messages": helpsteer_prompt_to_messages(prompt, "It was fact299.")}, max_length=None)
    assert len(full) > 200
    examples, report = helpsteer2_examples([row], tok, max_length=100)
    assert report.used == 1 and report.truncated == 1
    ids = examples[0].input_ids.tolist()
    assert len(ids) == 100 and ids[0] == BOS and ids[-1] == EOT
    assert ids[1:] == full[-99:]  # the tail, including the whole final turn, is kept
    tail = "What was the last fact?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nIt was fact299.<|eot_id|>"
    assert tok.decode(ids).endswith(tail)


def test_preference_pairs_parse(pairs, tok):
    examples, report = pairs
    assert report.total == report.used == len(examples) >= 90 and report.dropped == {}
    first = json.loads(PAIR_SAMPLE.read_text().splitlines()[0])
    for side in ("chosen", "rejected"):
        expected = render_ids(tok, {"messages": first[side]}, max_length=None)
        np.testing.assert_array_equal(getattr(examples[0], f"{side}_ids"), expected)
    for e in examples:
        for ids in (e.chosen_ids, e.rejected_ids):
            assert ids.dtype == np.int32 and ids[0] == BOS and ids[-1] == EOT

    user = {"role": "user", "content": "Pick a colour."}
    good = [user, {"role": "assistant", "content": "Blue."}]
    bad = [user, {"role": "assistant", "content": "No."}]
    rows = [
        {"chosen": good, "rejected": bad},
        {"chosen": good, "rejected": good},                                       # identical_pair
        {"chosen": good, "rejected": [user, {"role": "assistant", "content": " "}]},  # empty_response
        {"chosen": [user], "rejected": bad},                                      # bad_messages (ends with user)
        {"chosen": "Blue.", "rejected": bad},                                     # not_messages
        {"chosen": [user, {"role": "assistant", "content": "x " * 300}],          # final_turn_too_long
         "rejected": bad},
    ]
    examples, report = preference_pair_examples(rows, tok, max_length=64)
    assert report.used == len(examples) == 1
    assert report.dropped == {"identical_pair": 1, "empty_response": 1, "bad_messages": 1, "not_messages": 1,
                              "final_turn_too_long": 1}


# --- sources ----------------------------------------------------------------------------------


def test_load_rows_local_formats_and_errors(tmp_path, hf_cache):
    rows = [hs_row(), hs_row(prompt="b")]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    loaded = load_rows(jsonl, cache_dir=hf_cache)  # read line by line here: rows as given
    assert loaded == rows
    assert len(load_rows(jsonl, "validation", cache_dir=hf_cache)) == 2  # a local file is whatever split you name
    json_file = tmp_path / "a.json"
    json_file.write_text(json.dumps(rows))
    loaded = load_rows(str(json_file), cache_dir=hf_cache)  # other local formats: through datasets
    assert loaded.column_names[:2] == ["prompt", "response"] and len(loaded) == 2

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert load_rows(str(tmp_path / "a.parquet"), cache_dir=hf_cache)[1]["prompt"] == "b"

    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    with pytest.raises(ValueError, match=r"a\.csv.*unsupported"):
        load_rows(str(tmp_path / "a.csv"))
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: invalid JSON"):
        load_rows(str(tmp_path / "broken.jsonl"), cache_dir=hf_cache)


def test_report_numbers_are_file_lines_or_1_based_rows(tmp_path, tok, hf_cache):
    """The data report's numbers point at the dropped rows the way errors do: a .jsonl file's
    1-based line numbers (`file:line`; blank lines counted), a parquet file's 1-based rows, for
    stage 1 and stage 2 alike."""
    rows = [hs_row(), hs_row(helpfulness=-1), hs_row(), hs_row(), hs_row(helpfulness="abc"), hs_row()]
    jsonl = tmp_path / "neg.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    _, report = load_helpsteer2(str(jsonl), tok, max_length=SEQ_LEN)
    assert "label_out_of_range=1 [line 3]" in report.format() and "bad_label=1 [line 6]" in report.format()

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{**r, "helpfulness": float(r["helpfulness"]) if r["helpfulness"] != "abc"
                                          else 9.0} for r in rows]), tmp_path / "neg.parquet")
    _, report = load_helpsteer2(str(tmp_path / "neg.parquet"), tok, max_length=SEQ_LEN, cache_dir=hf_cache)
    assert "label_out_of_range=2 [rows 2, 5]" in report.format(), report.format()

    good = json.loads(PAIR_SAMPLE.read_text().splitlines()[0])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": good["chosen"]}) + "\n\n"
                     + json.dumps({**good, "chosen": "text"}) + "\n")
    _, report = load_preference_pairs(str(pairs), tok, max_length=SEQ_LEN)
    assert "identical_pair=1 [line 2]" in report.format() and "not_messages=1 [line 4]" in report.format()


@pytest.mark.parametrize("name, text", [("fake.parquet", "not parquet\n"), ("fake.json", "{oops")])
def test_a_corrupt_file_is_one_error_not_logged_lines(name, text, tmp_path, hf_cache, capfd):
    """datasets logs the read error of a corrupt local file (`Failed to read schema ...`, again
    through a root handler) before raising it: only the raised error, naming the file, remains;
    the loader's logger is as it was afterwards."""
    import logging

    data = tmp_path / name
    data.write_text(text)
    root = logging.getLogger()
    handler = logging.StreamHandler()  # as a CLI with logging configured has
    root.addHandler(handler)
    try:
        with pytest.raises(ValueError, match=f"could not load dataset '{data}'"):
            load_rows(str(data), cache_dir=hf_cache)
    finally:
        root.removeHandler(handler)
    out, err = capfd.readouterr()
    assert "Failed to" not in err and "ERROR" not in err, err
    fmt = "parquet" if name.endswith("parquet") else "json"
    assert not logging.getLogger(f"datasets.packaged_modules.{fmt}.{fmt}").filters


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, cache_dir=None, **kw):
        calls.append((name, split, kw))
        if name == "nobody/nothing":
            raise ConnectionError("offline")
        return ["rows"]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_rows("nvidia/HelpSteer2", "validation") == ["rows"]
    assert calls[0] == ("nvidia/HelpSteer2", "validation", {})
    with pytest.raises(ValueError, match=r"nobody/nothing.*ConnectionError: offline"):
        load_rows("nobody/nothing")


# --- batches ---------------------------------------------------------------------------------


def check_regression_batch(batch: dict, rows: int, seq_len: int, segments: int):
    shapes = {"input_ids": ((rows, seq_len), np.int32), "segment_ids": ((rows, seq_len), np.int32),
              "pool_index": ((rows, segments), np.int32), "pool_mask": ((rows, segments), np.float32),
              "labels": ((rows, segments, 5), np.float32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes


def segments_of(batch: dict) -> list[tuple[int, int, int]]:
    """(row, slot, example-identity) for every real segment, checking the layout on the way."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        seg, n = batch["segment_ids"][r], int(batch["pool_mask"][r].sum())
        assert np.all(batch["pool_mask"][r, :n] == 1) and np.all(batch["pool_mask"][r, n:] == 0)
        real = seg[seg > 0]
        # Segments are contiguous runs 1, 1, ..., 2, 2, ... n, then padding only: no overlap, no gaps.
        assert np.all(seg[: len(real)] > 0) and np.all(seg[len(real):] == 0)
        assert np.all(np.diff(real) >= 0) and set(real.tolist()) == set(range(1, n + 1))
        for s in range(n):
            positions = np.flatnonzero(seg == s + 1)
            assert positions[-1] == batch["pool_index"][r, s]
            assert batch["input_ids"][r, positions[-1]] == EOT
            assert batch["input_ids"][r, positions[0]] == BOS
            out.append((r, s, hash(batch["input_ids"][r, positions].tobytes())))
        assert np.all(batch["pool_index"][r, n:] == 0) and np.all(batch["labels"][r, n:] == 0)
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_fixed_shapes_layout_and_each_example_once_per_epoch(hs2, pack):
    examples, _ = hs2
    segments = 8 if pack else 1
    it = BatchIterator(examples, batch_size=8, seq_len=SEQ_LEN, seed=3, pack=pack, max_segments=8, num_epochs=2)
    expected = Counter(hash(e.input_ids.tobytes()) for e in examples)
    label_of = {hash(e.input_ids.tobytes()): e.labels for e in examples}
    for epoch in range(2):
        seen = Counter()
        for _ in range(it.steps_in_epoch(epoch)):
            batch = next(it)
            check_regression_batch(batch, 8, SEQ_LEN, segments)
            for r, s, key in segments_of(batch):
                seen[key] += 1
                np.testing.assert_array_equal(batch["labels"][r, s], label_of[key])
        assert seen == expected, f"epoch {epoch}"
    with pytest.raises(StopIteration):
        next(it)


def test_final_partial_batch_is_padded_not_dropped(hs2):
    examples, _ = hs2
    batches = list(BatchIterator(examples, batch_size=10, seq_len=SEQ_LEN, seed=0, pack=False, num_epochs=1))
    assert len(batches) == 10  # 96 examples -> 9 full batches + 6 rows
    last = batches[-1]
    check_regression_batch(last, 10, SEQ_LEN, 1)
    np.testing.assert_array_equal(last["pool_mask"][:, 0], [1] * 6 + [0] * 4)
    assert np.all(last["segment_ids"][6:] == 0)


def test_pair_batches(pairs):
    examples, _ = pairs
    n = len(examples)
    batches = list(BatchIterator(examples, batch_size=8, seq_len=SEQ_LEN, seed=1, pack=False, num_epochs=1))
    assert len(batches) == -(-n // 8)
    order = epoch_order(n, 1, 0)
    for step, batch in enumerate(batches):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            "input_ids": ((16, SEQ_LEN), np.int32), "segment_ids": ((16, SEQ_LEN), np.int32),
            "pool_index": ((16, 1), np.int32), "pool_mask": ((16, 1), np.float32), "pair_mask": ((8,), np.float32)}
        idx = order[step * 8 : (step + 1) * 8]
        np.testing.assert_array_equal(batch["pair_mask"], [1] * len(idx) + [0] * (8 - len(idx)))
        for j, i in enumerate(idx):
            for row, ids in ((2 * j, examples[i].chosen_ids), (2 * j + 1, examples[i].rejected_ids)):
                np.testing.assert_array_equal(batch["input_ids"][row, : len(ids)], ids)
                assert batch["pool_index"][row, 0] == len(ids) - 1 and batch["input_ids"][row, len(ids) - 1] == EOT
                assert batch["segment_ids"][row].sum() == len(ids) and batch["pool_mask"][row, 0] == 1
    with pytest.raises(ValueError, match="even max_segments"):
        BatchIterator(examples, batch_size=8, seq_len=SEQ_LEN, seed=1, pack=True, max_segments=5)


def test_packed_pair_batches(pairs):
    """Packed stage-2 rows hold whole pairs side by side (chosen, rejected as segments 2j, 2j+1
    of one row of 2 x seq_len tokens); every pair appears once per epoch; real tokens go from 13%
    (one side per seq_len row) to >= 90% on the bundled pairs."""
    examples, _ = pairs
    it = BatchIterator(examples, batch_size=2, seq_len=SEQ_LEN, seed=3, pack=True, max_segments=32,
                       num_epochs=1)
    stats = it.epoch_stats(0)
    unpacked = BatchIterator(examples, batch_size=2, seq_len=SEQ_LEN, seed=3, pack=False).epoch_stats(0)
    assert unpacked["padding_efficiency"] < 0.15 and stats["padding_efficiency"] >= 0.90, (unpacked, stats)
    seen = []
    for batch in it:
        assert batch["input_ids"].shape == (2, 2 * SEQ_LEN) and batch["pool_index"].shape == (2, 32)
        assert batch["pair_mask"].shape == (2, 16)
        for r in range(2):
            for j in np.flatnonzero(batch["pair_mask"][r]):
                sides = []
                for s in (2 * j, 2 * j + 1):
                    end = batch["pool_index"][r, s]
                    assert batch["pool_mask"][r, s] == 1 and batch["input_ids"][r, end] == EOT
                    assert batch["segment_ids"][r, end] == s + 1
                    sides.append(batch["input_ids"][r, batch["segment_ids"][r] == s + 1])
                match = [i for i, e in enumerate(examples) if np.array_equal(e.chosen_ids, sides[0])
                         and np.array_equal(e.rejected_ids, sides[1])]
                assert match, "a packed pair is not one of the examples"
                seen.append(match[0])
            assert np.all(batch["pool_mask"][r][2 * int(batch["pair_mask"][r].sum()):] == 0)
    assert sorted(seen) == list(range(len(examples)))
    with pytest.raises(ValueError, match="even max_segments"):
        BatchIterator(examples, batch_size=2, seq_len=SEQ_LEN, seed=3, pack=True, max_segments=7)


def test_stage2_default_segment_cap_packs_the_bundled_pairs_and_a_binding_cap_is_named(pairs):
    """A stage-2 config without `data.max_segments` packs 8 pairs (16 sides) per 2 x seq_len row:
    >= 90% real tokens on the bundled pairs (median 51 tokens a side), where the stage-1 default
    of 8 sides (4 pairs) leaves about half of each row empty; the run's log then names the cap and
    what twice it would give. Stage 1 keeps the recipe's 8; an explicit value is kept."""
    from urm_jax.train.config import DataConfig, LossConfig, TrainConfig

    stage2 = TrainConfig(stage=2, loss=LossConfig(kind="bt"), stage2_cached_features=False)
    assert stage2.data.max_segments == 16 and TrainConfig(stage=1).data.max_segments == 8
    assert TrainConfig(stage=2, loss=LossConfig(kind="bt"), data=DataConfig(max_segments=4)).data.max_segments == 4
    examples, _ = pairs
    default = BatchIterator(examples, batch_size=2, seq_len=SEQ_LEN, seed=0, pack=True,
                            max_segments=stage2.data.max_segments)
    capped = BatchIterator(examples, batch_size=2, seq_len=SEQ_LEN, seed=0, pack=True, max_segments=8)
    assert default.epoch_stats(0)["padding_efficiency"] >= 0.90
    assert capped.epoch_stats(0)["padding_efficiency"] < 0.60
    assert default.segment_cap_hint(0) is None
    hint = capped.segment_cap_hint(0)
    assert hint is not None and hint.startswith("data.max_segments=8 limits packing: 16 would make 9"), hint
    assert BatchIterator(examples, batch_size=2, seq_len=SEQ_LEN, seed=0, pack=False).segment_cap_hint(0) is None


def test_packed_pairs_on_a_helpsteer2_like_mix():
    """>= 90% real tokens for HelpSteer2-like pairs (median ~600 tokens a side) at seq_len 4096."""
    from urm_jax.data.batching import plan_epoch

    lengths = synthetic_helpsteer_lengths(4000, 0) + synthetic_helpsteer_lengths(4000, 1)
    packed = plan_epoch(lengths, batch_size=16, seq_len=8192, seed=0, epoch=0, pack=True,
                        max_segments=8, tokens_per_row=8192)  # 8 pairs (16 sides) per row
    padded = plan_epoch(lengths, batch_size=16, seq_len=8192, seed=0, epoch=0, pack=False,
                        max_segments=1, tokens_per_row=8192)
    assert padded.padding_efficiency < 0.2 and packed.padding_efficiency >= 0.9


def test_packing_beats_padding_on_the_sample(hs2):
    examples, _ = hs2
    packed = BatchIterator(examples, batch_size=8, seq_len=SEQ_LEN, seed=0, pack=True, max_segments=8)
    unpacked = BatchIterator(examples, batch_size=8, seq_len=SEQ_LEN, seed=0, pack=False)
    p, u = packed.epoch_stats(0), unpacked.epoch_stats(0)
    assert p["real_tokens"] == u["real_tokens"]
    assert p["padding_efficiency"] > 2 * u["padding_efficiency"]
    # Cross-check against the tokens actually placed in the batches.
    batches = BatchIterator(examples, 8, SEQ_LEN, 0, pack=True, num_epochs=1)
    placed = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert placed / (p["batches"] * 8 * SEQ_LEN) == pytest.approx(p["padding_efficiency"])


def test_first_fit_respects_capacity_and_segment_limit():
    lengths = [5, 3, 4, 2, 6, 1, 1, 1, 1, 9]
    rows = first_fit_rows(range(len(lengths)), lengths, seq_len=10, max_segments=3)
    assert sorted(i for r in rows for i in r) == list(range(10))
    assert all(sum(lengths[i] for i in r) <= 10 and len(r) <= 3 for r in rows)
    assert rows[0] == [0, 1, 3]  # 5 + 3 + 2: the first row takes what fits, in order, up to 3
    assert rows[1] == [2, 4]  # 4 + 6 fills the second


# --- determinism, resumption, multi-host --------------------------------------------------------


@pytest.mark.parametrize("pack", [True, False])
def test_resume_after_k_batches_yields_identical_remaining_batches(hs2, pack):
    examples, _ = hs2
    make = lambda: BatchIterator(examples, batch_size=8, seq_len=SEQ_LEN, seed=7, pack=pack, num_epochs=3)
    uninterrupted = all_batches(make())
    for k in (0, 1, 5, len(uninterrupted) // 3 + 1):  # k past one epoch crosses an epoch boundary
        it = make()
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(it.state()))
        assert set(state) >= {"epoch", "step", "seed"}
        resumed = make()
        resumed.restore(state)
        assert_batches_equal(head + all_batches(resumed), uninterrupted)


def test_restore_refuses_other_settings(hs2):
    examples, _ = hs2
    state = BatchIterator(examples, 8, SEQ_LEN, seed=7).state()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(examples, 8, SEQ_LEN, seed=8).restore(state)
    with pytest.raises(ValueError, match="num_examples"):
        BatchIterator(examples[:-1], 8, SEQ_LEN, seed=7).restore(state)


@pytest.mark.parametrize("pack", [True, False])
def test_host_slices_union_is_the_global_batch(hs2, pack):
    examples, _ = hs2
    glob = all_batches(BatchIterator(examples, batch_size=8, seq_len=SEQ_LEN, seed=5, pack=pack, num_epochs=1))
    for hosts in (2, 4):
        per_host = [all_batches(BatchIterator(examples, batch_size=8, seq_len=SEQ_LEN, seed=5, pack=pack,
                                              num_epochs=1, process_index=k, process_count=hosts))
                    for k in range(hosts)]
        assert all(len(h) == len(glob) for h in per_host)
        for step, g in enumerate(glob):
            for key in g:
                assert per_host[0][step][key].shape[0] == 8 // hosts
                np.testing.assert_array_equal(np.concatenate([h[step][key] for h in per_host]), g[key])


def test_pair_host_slices_union_is_the_global_batch(pairs):
    examples, _ = pairs
    glob = all_batches(BatchIterator(examples, 8, SEQ_LEN, seed=2, pack=False, num_epochs=1))
    hosts = [all_batches(BatchIterator(examples, 8, SEQ_LEN, seed=2, pack=False, num_epochs=1,
                                       process_index=k, process_count=2)) for k in range(2)]
    for step, g in enumerate(glob):
        # Interleaved pairs: the hosts' slices concatenate to the global batch.
        np.testing.assert_array_equal(np.concatenate([h[step]["input_ids"] for h in hosts]), g["input_ids"])
        np.testing.assert_array_equal(np.concatenate([h[step]["pair_mask"] for h in hosts]), g["pair_mask"])


def test_reshuffle_differs_per_epoch_and_is_reproducible(hs2):
    examples, _ = hs2
    assert not np.array_equal(epoch_order(96, 0, 0), epoch_order(96, 0, 1))
    np.testing.assert_array_equal(epoch_order(96, 0, 1), epoch_order(96, 0, 1))
    assert not np.array_equal(epoch_order(96, 0, 0), epoch_order(96, 1, 0))

    run = lambda seed: all_batches(BatchIterator(examples, 8, SEQ_LEN, seed=seed, pack=False, num_epochs=2))
    a, b = run(11), run(11)
    assert_batches_equal(a, b)
    epoch0, epoch1 = a[:12], a[12:]
    assert not np.array_equal(epoch0[0]["input_ids"], epoch1[0]["input_ids"])
    assert not np.array_equal(run(12)[0]["input_ids"], a[0]["input_ids"])


def test_synthetic_lengths_look_like_helpsteer2():
    lengths = synthetic_helpsteer_lengths(20_000, seed=0)
    assert lengths.dtype == np.int32 and lengths.max() <= 4000 and lengths.min() >= 1
    assert 550 <= np.median(lengths) <= 650
    assert np.percentile(lengths, 99) > 2500  # long tail
    np.testing.assert_array_equal(lengths, synthetic_helpsteer_lengths(20_000, seed=0))
    assert padding_efficiency(lengths, batch_size=64, seq_len=4096, pack=True) > 0.9
    assert padding_efficiency(lengths, batch_size=64, seq_len=4096, pack=False) < 0.3


def test_examples_longer_than_seq_len_are_rejected(hs2):
    examples, _ = hs2
    with pytest.raises(ValueError, match="seq_len=64"):
        BatchIterator(examples, 8, 64, seed=0)


def test_feature_pass_packs_sides_to_over_90_percent_real_tokens(pairs):
    """The stage-2 feature pass packs every side as its own segment into rows of a few fixed
    lengths: >= 90% real tokens on the bundled pairs and on a HelpSteer2-like mix (one side per
    power-of-two row gave ~40%), every side placed exactly once, rows within their length."""
    from urm_jax.data.datasets import PairExample
    from urm_jax.train.features import FeaturePlan, row_lengths, segments_per_row

    examples, _ = pairs
    plan = FeaturePlan.build(examples, seq_len=SEQ_LEN, rows_per_batch=8)
    assert plan.real_token_fraction >= 0.9, plan.real_token_fraction
    placed = []
    for length, segments, rows in plan.batches():
        assert length in row_lengths(SEQ_LEN) and segments == segments_per_row(length)
        assert 1 <= len(rows) <= 8  # full, or a partial batch's rows (a device multiple)
        for row in rows:
            used = sum(len(examples[i].rejected_ids if s else examples[i].chosen_ids) for i, s in row)
            assert used <= length and len(row) <= segments
            placed += row
    assert sorted(placed) == [(i, s) for i in range(len(examples)) for s in (0, 1)]
    mix = [PairExample(np.zeros(a, np.int32), np.zeros(b, np.int32))
           for a, b in zip(synthetic_helpsteer_lengths(2000, 0), synthetic_helpsteer_lengths(2000, 1))]
    assert FeaturePlan.build(mix, seq_len=4096, rows_per_batch=64).real_token_fraction >= 0.9
