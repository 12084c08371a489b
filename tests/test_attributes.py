"""Any attribute set: `convert init --attributes NAME|a,b,c` sizes the value head 2 x K and the
gate K; config.json names them (`urm_attributes`, `id2label`); scoring output and exports carry
the names; the exported PyTorch class and the HF round trip work for any K (1, 4, 5, 7) with fp32
parity; datasets map label columns by name, within the preset's (or a recorded) label range."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

from urm_jax.attributes import (HELPSTEER2, PRESETS, ULTRAFEEDBACK, id2label, label_range_for,
                                parse_attributes, parse_label_range)
from urm_jax.data.datasets import DatasetSchemaError, helpsteer2_examples
from urm_jax.hf.load import from_hf
from urm_jax.parity import TOLERANCES, differences
from urm_jax.scoring import Scorer
from urm_jax.train.config import TrainConfigError, load_train_config
from test_convert import assert_bit_exact, read_tensors, run_err, run_ok
from test_from_base import VOCAB, save_base

SETS = {1: "overall,", 4: "ultrafeedback", 5: "helpsteer2", 7: "a1,a2,a3,a4,a5,a6,a7"}
SEQUENCES = [[1, 5, 9, 200, 17, 2], [1, *range(100, 160), 3], [1, 44, 2]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(LlamaForCausalLM, tmp_path_factory.mktemp("base") / "lm", dtype=torch.float32)


@pytest.mark.parametrize("k", sorted(SETS))
def test_any_k_round_trips_through_transformers_with_fp32_parity(base, tmp_path, k):
    names = parse_attributes(SETS[k])
    assert len(names) == k
    init, export, again = tmp_path / "init", tmp_path / "hf", tmp_path / "again"
    run_ok("init", str(base), str(init), "--attributes", SETS[k], "--gate-dtype", "float32",
           "--init-std", "0.3")  # large heads: outputs O(1), so relative parity bites
    cfg = json.loads((init / "config.json").read_text())
    assert cfg["urm_attributes"] == list(names) and cfg["num_labels"] == 2 * k
    assert cfg["id2label"] == id2label(names)
    run_ok("to_hf", str(init), str(export))
    exported = json.loads((export / "config.json").read_text())
    assert exported["id2label"] == id2label(names) and exported["urm_attributes"] == list(names)
    tensors = read_tensors(export)
    assert tensors["score.weight"].shape == (2 * k, 64) and tensors["weights.fc.4.weight"].shape == (k, 64)

    # the HF round trip is bit exact for any K
    ckpt = from_hf(export, tmp_path / "ckpt", progress=False)
    run_ok("to_hf", str(ckpt), str(again))
    assert_bit_exact(read_tensors(export), read_tensors(again))

    # the exported class (trust_remote_code, as users load it) equals urm-jax within fp32 bounds
    model = AutoModelForSequenceClassification.from_pretrained(
        export, trust_remote_code=True, dtype=torch.float32, attn_implementation="eager").eval()
    scorer = Scorer(init, batch_size=4)
    got = scorer.score_ids(SEQUENCES)
    width = max(map(len, SEQUENCES))
    ids = torch.tensor([s + [VOCAB - 1] * (width - len(s)) for s in SEQUENCES])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in SEQUENCES])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert out.means.shape == out.gate_weights.shape == (len(SEQUENCES), k)
    hf = {"reward": out.logits[:, 0].double().numpy(), "means": out.means.double().numpy(),
          "log_stds": out.log_stds.double().numpy(), "gate": out.gate_weights.double().numpy()}
    jx = {"reward": got.reward, "means": got.means, "log_stds": got.log_stds, "gate": got.gate}
    _, rel = differences({n: np.asarray(v, np.float64) for n, v in jx.items()}, hf)
    assert max(rel.values()) <= TOLERANCES[("float32", "float32")], rel

    # scoring output carries the names
    record = got.record(0)
    for field in ("mean", "log_std", "variance", "gate"):
        assert list(record[field]) == list(names), field


def test_presets_and_label_ranges(base, tmp_path):
    assert PRESETS["helpsteer2"].attributes == HELPSTEER2
    assert PRESETS["ultrafeedback"].attributes == (
        "instruction_following", "honesty", "truthfulness", "helpfulness") == ULTRAFEEDBACK
    assert parse_attributes("UltraFeedback") == ULTRAFEEDBACK
    assert parse_label_range("1,10") == (1.0, 10.0)
    for bad in ("5,1", "1", "a,b", "1,inf"):
        with pytest.raises(ValueError, match="label-range"):
            parse_label_range(bad)

    run_ok("init", str(base), str(tmp_path / "uf"), "--attributes", "ultrafeedback")
    run_ok("init", str(base), str(tmp_path / "custom"), "--attributes", "x,y")
    run_ok("init", str(base), str(tmp_path / "ranged"), "--attributes", "x,y", "--label-range", "1,10")
    recorded = {name: json.loads((tmp_path / name / "config.json").read_text())["urm_label_range"]
                for name in ("uf", "custom", "ranged")}
    assert recorded == {"uf": [1.0, 5.0], "custom": None, "ranged": [1.0, 10.0]}
    assert label_range_for(("x", "y"), {"urm_label_range": [1.0, 10.0]}) == (1.0, 10.0)
    assert label_range_for(HELPSTEER2, {}) == (0.0, 4.0)
    assert label_range_for(("x",), {}) is None
    assert label_range_for(HELPSTEER2, {}, override=(0.0, 1.0)) == (0.0, 1.0)

    for value in ("[3, 1]", "[0]"):
        with pytest.raises(TrainConfigError, match="data.label_range"):
            load_train_config("configs/train/tiny_stage1.yaml", [f"data.label_range={value}"])


def test_a_single_name_is_a_preset_or_marked_as_a_list(base, tmp_path, capsys):
    """A misspelt preset must not become a 1-attribute model: a single name that is not a preset
    is refused with the close preset named; one custom attribute takes a trailing comma."""
    for typo, close in (("helpsteer3", "helpsteer2"), ("ultrafeedbak", "ultrafeedback"),
                        ("HelpSteer", "helpsteer2"), ("quality", None)):
        with pytest.raises(ValueError, match="not a preset") as err:
            parse_attributes(typo)
        assert (f"did you mean {close!r}" in str(err.value)) == (close is not None), err.value
        assert f"--attributes {typo}," in str(err.value)
    assert parse_attributes("quality,") == ("quality",)
    assert parse_attributes(" a, b ,") == ("a", "b")
    for bad in (",", "a,,b", "a,b,,"):
        with pytest.raises(ValueError, match="not an identifier"):
            parse_attributes(bad)
    with pytest.raises(ValueError, match="ASCII letters"):
        parse_attributes("qualit\u00e9,")
    out = tmp_path / "out"
    run_err(capsys, ["init", str(base), str(out), "--attributes", "helpsteer3"], out,
            "'helpsteer3' is not a preset", "did you mean 'helpsteer2'")
    run_ok("init", str(base), str(out), "--attributes", "quality,")
    assert json.loads((out / "config.json").read_text())["urm_attributes"] == ["quality"]


def test_negative_values_are_read_as_values(base, tmp_path):
    """`--label-range -3,3` as written (HelpSteer3-style scores), not only `--label-range=-3,3`;
    every option taking a value, in both command lines."""
    from convert.__main__ import build_parser as convert_parser
    from urm_jax.cli import build_parser as cli_parser
    from urm_jax.cli_args import join_negative_values, value_options

    for spelling in (["--label-range", "-3,3"], ["--label-range=-3,3"]):
        out = tmp_path / f"r{len(spelling)}"
        run_ok("init", str(base), str(out), "--attributes", "fluency,safety", *spelling)
        assert json.loads((out / "config.json").read_text())["urm_label_range"] == [-3.0, 3.0]
    parser = convert_parser()
    argv = ["init", "B", "O", "--label-range", "-3.5,-1e-1", "--init-std", "-2", "--overwrite"]
    assert join_negative_values(parser, argv)[3:5] == ["--label-range=-3.5,-1e-1", "--init-std=-2"]
    args = parser.parse_args(join_negative_values(parser, argv[:-3] + ["--overwrite"]))
    assert (args.label_range, args.overwrite) == ("-3.5,-1e-1", True)
    # an option-like token is never taken as a value; flags take none
    assert join_negative_values(parser, ["init", "--label-range", "--overwrite"]) == [
        "init", "--label-range", "--overwrite"]
    assert join_negative_values(parser, ["init", "--overwrite", "-3,3"]) == ["init", "--overwrite", "-3,3"]
    assert {"--label-range", "--max-shard-size", "--attributes"} <= value_options(parser)
    assert "--std-penalty" in value_options(cli_parser())


def test_datasets_map_columns_by_name_and_say_which_are_missing(tmp_path):
    from transformers import AutoTokenizer

    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("URM_JAX_CACHE", str(tmp_path / "cache"))
        tok = AutoTokenizer.from_pretrained(cached_llama3_tokenizer_dir())
    row = {"prompt": "What is 2+2?", "response": "4.", "helpfulness": "5", "honesty": 4,
           "truthfulness": 5.0, "instruction_following": 3}
    rows = [row, {**row, "honesty": "N/A"}, {**row, "truthfulness": 0}, {**row, "helpfulness": "x"}]
    examples, report = helpsteer2_examples(rows, tok, max_length=64, attributes=ULTRAFEEDBACK,
                                           label_range=PRESETS["ultrafeedback"].label_range)
    assert report.used == 1 and report.dropped == {"missing_label": 1, "label_out_of_range": 1,
                                                    "bad_label": 1}
    np.testing.assert_array_equal(examples[0].labels, [3, 4, 5, 5])  # the model's order
    with pytest.raises(DatasetSchemaError, match=r"\['correctness', 'coherence', 'complexity', "
                                                 r"'verbosity'\]"):
        helpsteer2_examples([row], tok, max_length=64, attributes=HELPSTEER2)
