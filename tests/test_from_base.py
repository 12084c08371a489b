"""`python -m convert init BASE OUT`: the stage-1 start from a base Llama checkpoint (Skywork-Reward
is a LlamaForSequenceClassification with a [1, hidden] score). The backbone must arrive bit for
bit, the heads fresh as transformers would make them, and bad bases refused cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from convert.__main__ import main
from hf_fixtures import _init_random, _rope_parameters, load_reference
from test_convert import read_tensors, raw, run_err, run_ok
from urm_jax.checkpoint import load_config, load_params

VOCAB, PAD, HIDDEN, LAYERS = 512, 511, 64, 2
INIT_RANGE = 0.05  # not transformers' 0.02 default: proves the std comes from the base's config
HEAD_KEYS = ["score.weight", *(f"weights.fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))]


def base_config(**changes) -> LlamaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
                  max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_parameters=_rope_parameters("llama3", 10000.0, 8.0, 32), pad_token_id=PAD,
                  bos_token_id=1, eos_token_id=[2, 3], tie_word_embeddings=False,
                  initializer_range=INIT_RANGE)
    fields.update(changes)
    return LlamaConfig(**fields)


def save_base(cls, out: Path, dtype=torch.bfloat16, **config) -> Path:
    model = cls(base_config(**config))
    _init_random(model, seed=5)
    model.to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def skywork_like(tmp_path_factory):
    """Skywork-Reward's shape: sequence classification with one label, bf16."""
    return save_base(LlamaForSequenceClassification, tmp_path_factory.mktemp("base") / "seqcls",
                     num_labels=1)


@pytest.fixture(scope="module")
def initialised(skywork_like, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "urm-init"
    run_ok("init", str(skywork_like), str(out), "--seed", "3")
    return out


def test_backbone_is_copied_bit_for_bit_and_heads_are_fresh(skywork_like, initialised, tmp_path):
    base = read_tensors(skywork_like)
    assert base["score.weight"].shape == (1, HIDDEN)
    export = tmp_path / "hf"
    run_ok("to_hf", str(initialised), str(export))
    urm = read_tensors(export)
    assert sorted(urm) == sorted([k for k in base if k != "score.weight"] + HEAD_KEYS)
    for key in base:
        if key != "score.weight":
            assert urm[key].dtype == base[key].dtype and np.array_equal(raw(urm[key]), raw(base[key])), key
    assert urm["score.weight"].shape == (10, HIDDEN) and urm["score.weight"].dtype == base[
        "model.embed_tokens.weight"].dtype  # the value head lives in the backbone's dtype
    for key in HEAD_KEYS:
        value = urm[key].astype(np.float64)
        if key.startswith("weights."):
            assert urm[key].dtype == np.float16, key  # the reference builds the gate in fp16
        if key.endswith(".bias"):
            assert not value.any(), key
        else:  # N(0, initializer_range): 640 .. 4096 draws, so 15% is > 3.5 standard errors
            assert abs(value.mean()) < 0.15 * INIT_RANGE, key
            assert abs(value.std() / INIT_RANGE - 1) < 0.15, (key, value.std())

    cfg = json.loads((export / "config.json").read_text())
    assert cfg["num_labels"] == 10 and cfg["architectures"] == [
        "LlamaForSequenceClassificationWithNormal_Weights"]
    assert cfg["gate_dtype"] == "float16" and cfg["dtype"] == "bfloat16"
    assert cfg["urm_jax_init"]["seed"] == 3 and cfg["urm_jax_init"]["init_std"] == INIT_RANGE
    assert cfg["urm_jax_init"]["base_heads_dropped"] == ["score.weight"]
    assert "problem_type" not in cfg or cfg["problem_type"] is None


def test_exported_init_runs_the_base_backbone_exactly(skywork_like, initialised, tmp_path):
    """The URM reference loaded from the init'd model computes the base's hidden states exactly,
    and its heads are the fresh ones (finite, gate small like HF's init)."""
    export = tmp_path / "hf"
    run_ok("to_hf", str(initialised), str(export))
    base = LlamaForSequenceClassification.from_pretrained(
        skywork_like, dtype="auto", attn_implementation="eager").eval()
    urm = load_reference(export)
    ids = torch.randint(4, VOCAB - 1, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = urm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = urm(input_ids=ids, attention_mask=mask, return_dict=True)
    assert torch.equal(got, want)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.means).all()


def test_jax_loads_the_init_checkpoint(initialised):
    cfg = load_config(initialised)
    params = load_params(initialised)
    assert cfg.num_labels == 10 and cfg.pad_token_id == PAD
    assert params["value_head"]["kernel"].shape == (HIDDEN, 10)  # JAX [in, out]
    assert params["gate"]["fc4"]["kernel"].dtype == np.float16


def test_seed_decides_the_heads_and_nothing_else(skywork_like, initialised, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    run_ok("init", str(skywork_like), str(again), "--seed", "3")
    run_ok("init", str(skywork_like), str(other), "--seed", "4")
    first, same, different = (load_params(p) for p in (initialised, again, other))
    np.testing.assert_array_equal(same["value_head"]["kernel"], first["value_head"]["kernel"])
    np.testing.assert_array_equal(same["gate"]["fc0"]["kernel"], first["gate"]["fc0"]["kernel"])
    assert not np.array_equal(different["value_head"]["kernel"], first["value_head"]["kernel"])
    assert not np.array_equal(different["gate"]["fc2"]["kernel"], first["gate"]["fc2"]["kernel"])
    np.testing.assert_array_equal(raw(different["backbone"]["layers"]["q_proj"]),
                                  raw(first["backbone"]["layers"]["q_proj"]))


@pytest.mark.parametrize("cls", [LlamaForCausalLM, LlamaModel])
def test_causal_lm_and_bare_model_bases(cls, tmp_path, skywork_like):
    """A causal LM's lm_head is dropped; a bare LlamaModel's keys gain their `model.` prefix.
    Either way the backbone equals the sequence-classification base built from the same seed."""
    base = save_base(cls, tmp_path / "base", dtype=torch.float32)
    out = tmp_path / "urm"
    run_ok("init", str(base), str(out), "--dtype", "bfloat16", "--gate-dtype", "float32",
           "--init-std", "0.01")
    params, cfg = load_params(out), json.loads((out / "config.json").read_text())
    tensors = read_tensors(base)
    embed = tensors.get("model.embed_tokens.weight", tensors.get("embed_tokens.weight"))
    np.testing.assert_array_equal(params["backbone"]["embed_tokens"],
                                  embed.astype(params["backbone"]["embed_tokens"].dtype))
    assert params["backbone"]["embed_tokens"].dtype.name == "bfloat16"
    assert params["gate"]["fc0"]["kernel"].dtype == np.float32
    assert cfg["urm_jax_init"]["init_std"] == 0.01
    assert cfg["urm_jax_init"]["base_heads_dropped"] == (["lm_head.weight"] if cls is LlamaForCausalLM
                                                         else [])


def _edit_config(directory: Path, **changes) -> None:
    file = directory / "config.json"
    cfg = json.loads(file.read_text())
    cfg.update(changes)
    file.write_text(json.dumps(cfg))


def test_refusals(skywork_like, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    no_pad = Path(shutil.copytree(skywork_like, tmp_path / "no_pad"))
    _edit_config(no_pad, pad_token_id=None)
    run_err(capsys, ["init", str(no_pad), str(out)], out, "no pad_token_id", "config.json")

    extra = tmp_path / "extra"
    model = LlamaForSequenceClassification(base_config(num_labels=1))
    model.register_buffer("stray", torch.zeros(3), persistent=True)
    model.save_pretrained(extra)
    run_err(capsys, ["init", str(extra), str(out)], out, "unexpected tensor stray")

    run_err(capsys, ["init", str(skywork_like), str(out), "--init-std", "0"], out, "positive")

    no_config = Path(shutil.copytree(skywork_like, tmp_path / "no_config"))
    (no_config / "config.json").unlink()
    run_err(capsys, ["init", str(no_config), str(out)], out, "config.json: not found")

    out.mkdir()
    run_err(capsys, ["init", str(skywork_like), str(out)], out, "already exists", out_existed=True)
    assert main(["init", str(skywork_like), str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("cls", [LlamaForCausalLM, LlamaForSequenceClassification])
def test_tied_embedding_bases_are_untied_and_recorded(cls, tmp_path):
    """Llama-3.2-1B/3B, SmolLM2: `tie_word_embeddings: true`. A URM has no lm_head, so the flag
    means nothing: the embedding is the backbone's, the output config says false, and
    `urm_jax_init` records that the base was tied and what was dropped. The URM runs the base's
    backbone exactly (transformers' own model of the tied base gives the same hidden states)."""
    extra = {"num_labels": 1} if cls is LlamaForSequenceClassification else {}
    base = save_base(cls, tmp_path / "base", dtype=torch.float32, tie_word_embeddings=True, **extra)
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    out, export = tmp_path / "urm", tmp_path / "hf"
    run_ok("init", str(base), str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg["urm_jax_init"]["untied_embeddings"] is True
    assert cfg["urm_jax_init"]["base_architectures"] == [cls.__name__]
    # transformers writes a tied causal LM without lm_head.weight; a classifier has its score
    assert cfg["urm_jax_init"]["base_heads_dropped"] == (
        ["score.weight"] if cls is LlamaForSequenceClassification else [])
    run_ok("to_hf", str(out), str(export))
    assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is False
    reference = cls.from_pretrained(base, dtype=torch.float32, attn_implementation="eager").eval()
    urm = load_reference(export)
    ids = torch.randint(4, VOCAB - 1, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference.model(input_ids=ids).last_hidden_state
        got = urm.model(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)


@pytest.mark.parametrize("field, value, needle", [
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}, "yarn"),
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "dynamic"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor"),
    ("model_type", "mistral", "model_type"),
    ("head_dim", 32, "config.json implies"),  # heads x head_dim disagrees with the weights
    # a flag of the wrong type (not read as truthy)
    ("tie_word_embeddings", "yes", "field tie_word_embeddings: expected true or false"),
    # Duplicate spellings that disagree: transformers reads rope_scaling/rope_theta and dtype, so
    # the base would run something else there.
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "fields rope_parameters and rope_scaling disagree"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "fields rope_parameters and rope_scaling disagree"),
    ("rope_theta", 5e5, "fields rope_parameters and rope_theta disagree"),
    ("rope_parameters", {"rope_type": "linear", "type": "default", "rope_theta": 1e4, "factor": 2.0},
     "fields rope_parameters.rope_type 'linear' and rope_parameters.type 'default' disagree"),
    ("torch_dtype", "float16", "fields dtype 'bfloat16' and torch_dtype 'float16' disagree"),
])
def test_fields_the_backbone_cannot_represent_are_refused_by_name(skywork_like, tmp_path, capsys,
                                                                   field, value, needle):
    import shutil

    base = Path(shutil.copytree(skywork_like, tmp_path / "base"))
    _edit_config(base, **{field: value})
    out = tmp_path / "out"
    run_err(capsys, ["init", str(base), str(out)], out, needle)


def test_attribute_names_in_two_fields_must_agree(initialised, tmp_path, capsys):
    """`urm_attributes` and an `id2label` of attribute names are two spellings of one set."""
    import shutil

    ckpt = Path(shutil.copytree(initialised, tmp_path / "ckpt"))
    cfg = json.loads((ckpt / "config.json").read_text())
    _edit_config(ckpt, id2label={k: v.replace("verbosity", "brevity") for k, v in cfg["id2label"].items()})
    out = tmp_path / "hf"
    run_err(capsys, ["to_hf", str(ckpt), str(out)], out,
            "fields urm_attributes", "and id2label (names", "brevity", "disagree")


def test_head_dim_other_than_hidden_over_heads_is_represented(tmp_path):
    """Llama allows head_dim != hidden / heads (an explicit `head_dim`): the backbone follows it."""
    base = save_base(LlamaForCausalLM, tmp_path / "base", dtype=torch.float32, head_dim=32)
    out, export = tmp_path / "urm", tmp_path / "hf"
    run_ok("init", str(base), str(out))
    assert load_params(out)["backbone"]["layers"]["q_proj"].shape == (LAYERS, HIDDEN, 4, 32)
    run_ok("to_hf", str(out), str(export))
    reference = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = torch.randint(4, VOCAB - 1, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_reference(export).model(input_ids=ids).last_hidden_state,
                           reference.model(input_ids=ids).last_hidden_state)


def test_synthetic_base_is_a_transformers_classifier_that_init_takes(tmp_path):
    """`write_random_hf(heads="base")` (the demo's Skywork-like base) is what transformers writes
    for a one-label LlamaForSequenceClassification, and `init` keeps its backbone."""
    from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf

    base = write_random_hf(tmp_path / "base", tiny_hf_config(), dtype="bfloat16", heads="base",
                           progress=False)
    model = LlamaForSequenceClassification.from_pretrained(base, dtype="auto")
    assert model.config.num_labels == 1 and model.score.weight.shape == (1, 64)
    assert not (base / "modeling_custom.py").exists()
    tensors = read_tensors(base)
    assert not any(k.startswith("weights.") for k in tensors)
    for name, param in model.state_dict().items():
        np.testing.assert_array_equal(raw(param.float().numpy().astype(tensors[name].dtype)),
                                      raw(tensors[name]), err_msg=name)
    run_ok("init", str(base), str(tmp_path / "urm"))
    params = load_params(tmp_path / "urm")
    assert np.array_equal(raw(params["backbone"]["final_norm"]), raw(tensors["model.norm.weight"]))


def test_using_a_base_directly_points_at_init(skywork_like, tmp_path, capsys):
    """Scoring (or training) a one-label base fails in one line that says how to start from it."""
    from urm_jax.cli import main as cli_main

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"input_ids": [4, 5, 6]}) + "\n")
    capsys.readouterr()
    rc = cli_main(["score", "--model", str(skywork_like), "--input", str(inp),
                   "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "num_labels is 1" in err and "python -m convert init" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_duplicate_spellings_that_agree_and_activation_aliases_are_accepted(skywork_like, tmp_path):
    """The legacy spelling beside the new one is fine when both say the same (what `to_hf`
    itself writes); `swish` is transformers' other name for SiLU (ACT2CLS)."""
    import shutil

    base = Path(shutil.copytree(skywork_like, tmp_path / "base"))
    cfg = json.loads((base / "config.json").read_text())
    rope = cfg["rope_parameters"]
    _edit_config(base, hidden_act="swish", torch_dtype=cfg["dtype"], rope_theta=rope["rope_theta"],
                 rope_scaling={("type" if k == "rope_type" else k): v for k, v in rope.items()
                               if k != "rope_theta"})
    run_ok("init", str(base), str(tmp_path / "out"))
    assert load_config(tmp_path / "out").rope.rope_type == "llama3"
