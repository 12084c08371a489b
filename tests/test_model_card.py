"""`convert to_hf` writes a model card: the Hub's metadata block, the attribute set, how the model
was trained (init and training records carried in config.json), evaluation numbers, and a usage
snippet that runs as written from the exported directory and scores like urm-jax."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from hf_fixtures import make_tiny_chat_urm, make_tiny_urm
from test_convert import run_err, run_ok
from test_pooling import CHATML_TEMPLATE
from urm_jax.checkpoint import weights_fingerprint
from urm_jax.eval import bundled_pairs_path, run_eval
from urm_jax.hf.card import EXAMPLE_MESSAGES, PLAIN_TEXT, example_ids
from urm_jax.scoring import Ensemble, Scorer


def card_parts(export: Path) -> tuple[dict, str, str]:
    """(YAML metadata, body, the python snippet) of an export's README.md."""
    text = (export / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, text[:200]
    snippets = re.findall(r"```python\n(.*?)```", match.group(2), re.S)
    assert len(snippets) == 1
    return yaml.safe_load(match.group(1)), match.group(2), snippets[0]


def run_snippet(code: str, export: Path, tmp_path: Path) -> float:
    """Run the snippet as written, from inside the export; its printed reward."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    done = subprocess.run([sys.executable, "-c", code], cwd=export, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(re.search(r"^reward (\S+)$", done.stdout, re.M).group(1))


def eval_metrics(ckpt: Path, tmp_path: Path) -> Path:
    """`urm-jax eval` of `ckpt` on three bundled pairs; its metrics.json."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(bundled_pairs_path().read_text().splitlines(keepends=True)[:3]))
    run_eval(Ensemble.load([ckpt]), pairs, tmp_path / "eval", progress=False)
    return tmp_path / "eval" / "metrics.json"


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    """A tiny URM with the Llama-3 tokenizer, as a urm-jax checkpoint, and its eval metrics."""
    tmp = tmp_path_factory.mktemp("card")
    src = make_tiny_chat_urm(tmp / "src", tmp / "cache")
    run_ok("from_hf", str(src), str(tmp / "ckpt"))
    return tmp / "ckpt", eval_metrics(tmp / "ckpt", tmp)


def test_card_metadata_attributes_eval_and_snippet(chat_ckpt, tmp_path):
    ckpt, metrics = chat_ckpt
    export = tmp_path / "hf"
    run_ok("to_hf", str(ckpt), str(export), "--base-model", "org/base-model", "--license",
           "apache-2.0", "--eval", str(metrics))
    meta, body, code = card_parts(export)
    assert meta == {"library_name": "transformers", "pipeline_tag": "text-classification",
                    "tags": ["reward-model", "urm", "uncertainty", "urm-jax"],
                    "base_model": "org/base-model", "license": "apache-2.0"}
    for name in ("helpfulness", "correctness", "coherence", "complexity", "verbosity"):
        assert f"- `{name}`" in body
    evaluated = json.loads(metrics.read_text())
    assert evaluated["weights_sha256"] == [weights_fingerprint(ckpt)] and evaluated["models"] == [
        str(ckpt.absolute())]
    assert f"`pairs.jsonl`: 3 pairs, accuracy {evaluated['accuracy']:.4f}" in body
    assert "no training record" in body
    reward = run_snippet(code, export, tmp_path)
    want = float(Scorer(ckpt).score([{"messages": EXAMPLE_MESSAGES}]).reward[0])
    assert abs(reward - want) <= 1e-5 * max(1.0, abs(want)), (reward, want)


@pytest.mark.parametrize("edit, needles", [
    ({"weights_sha256": ["0" * 64]}, ["field weights_sha256", "another model's weights"]),
    ({"weights_sha256": [None], "models": ["/elsewhere/final"]}, ["field models", "/elsewhere/final"]),
    ({"weights_sha256": None, "models": ["/elsewhere/final"]}, ["field models"]),
    ({"attributes": [["fluency", "safety"]]}, ["field attributes", "fluency"]),
    ({"models": ["a", "b"]}, ["field models", "one evaluated model"]),
    ({"pairs": "24"}, ["field pairs", "integer"]),
    ({"accuracy": True}, ["field accuracy"]),
])
def test_eval_numbers_of_another_model_are_refused(chat_ckpt, tmp_path, capsys, edit, needles):
    """`to_hf --eval` puts numbers on the card only when metrics.json evaluated this checkpoint
    (weights fingerprint, else path) with its attribute set; fields are typed."""
    ckpt, metrics = chat_ckpt
    other = tmp_path / "metrics.json"
    other.write_text(json.dumps({**json.loads(metrics.read_text()), **edit}))
    run_err(capsys, ["to_hf", str(ckpt), str(tmp_path / "hf"), "--eval", str(other)],
            tmp_path / "hf", str(other), *needles)


def assert_card_as_with_transformers(ckpt: Path, tmp_path: Path, *argv: str) -> None:
    """`to_hf`'s card, written from the tokenizer's JSON files, is the text it was when the
    tokenizer was loaded with transformers (`load_tokenizer`) for it."""
    from urm_jax.data.tokenization import load_tokenizer
    from urm_jax.hf import export

    run_ok("to_hf", str(ckpt), str(tmp_path / "card_json"), *argv)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "card_tokenizer", load_tokenizer)
        run_ok("to_hf", str(ckpt), str(tmp_path / "card_tf"), *argv)
    assert ((tmp_path / "card_json" / "README.md").read_text()
            == (tmp_path / "card_tf" / "README.md").read_text())


def test_card_from_tokenizer_files_as_from_transformers(chat_ckpt, tmp_path):
    assert_card_as_with_transformers(chat_ckpt[0], tmp_path, "--license", "apache-2.0")


def test_to_hf_with_a_tokenizer_imports_neither_torch_nor_transformers(chat_ckpt, tmp_path):
    """The card's tokenizer facts come from its JSON files: `python -m convert to_hf` of a
    checkpoint carrying a tokenizer never imports transformers or torch (seconds of imports)."""
    ckpt, out = chat_ckpt[0], tmp_path / "hf"
    assert (ckpt / "tokenizer.json").is_file()
    script = ("import sys\n"
              "from convert.__main__ import main\n"
              f"assert main(['to_hf', {str(ckpt)!r}, {str(out)!r}]) == 0\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert "apply_chat_template" in card_parts(out)[2]


def test_chatml_card_reads_the_reward_at_im_end(tmp_path):
    """A ChatML model's snippet cuts the template's trailing newline, as urm-jax's policy does."""
    with pytest.MonkeyPatch.context() as mp:
        from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

        mp.setenv("URM_JAX_CACHE", str(tmp_path / "cache"))
        tok = AutoTokenizer.from_pretrained(cached_llama3_tokenizer_dir())
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML_TEMPLATE
    src = make_tiny_urm(tmp_path / "src", vocab=len(tok), pad_token_id=128256, hidden=32,
                        intermediate=64, gate_dtype="float32")
    tok.save_pretrained(tmp_path / "tok")
    for f in (tmp_path / "tok").iterdir():
        shutil.copy2(f, src / f.name)
    run_ok("from_hf", str(src), str(tmp_path / "ckpt"))
    run_ok("to_hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert_card_as_with_transformers(tmp_path / "ckpt", tmp_path)
    meta, _, code = card_parts(tmp_path / "hf")
    assert "base_model" not in meta and "license" not in meta  # unknown: left out
    assert 'text.rindex(\'<|im_end|>\')' in code
    reward = run_snippet(code, tmp_path / "hf", tmp_path)
    want = float(Scorer(tmp_path / "ckpt").score([{"messages": EXAMPLE_MESSAGES}]).reward[0])
    assert abs(reward - want) <= 1e-5 * max(1.0, abs(want)), (reward, want)


def tiny_base(out: Path, vocab: int, tokenizer=None) -> Path:
    """A tiny LlamaForCausalLM base (tied embeddings, as small bases ship), with `tokenizer`'s
    files when given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=vocab - 1,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("ships", ["no tokenizer", "no chat template"])
def test_snippet_runs_without_tokenizer_or_chat_template(tmp_path, capsys, ships):
    """A base without tokenizer files or without a chat template: `init` warns in one line and
    the card's snippet scores token ids / a text formed by hand, runs as written and scores like
    urm-jax on the same ids."""
    tokenizer = None
    if ships == "no chat template":
        with pytest.MonkeyPatch.context() as mp:
            from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

            mp.setenv("URM_JAX_CACHE", str(tmp_path / "cache"))
            tokenizer = AutoTokenizer.from_pretrained(cached_llama3_tokenizer_dir())
        tokenizer.chat_template = None
    base = tiny_base(tmp_path / "base", len(tokenizer) if tokenizer else 64, tokenizer)
    assert not (base / "chat_template.jinja").exists()
    capsys.readouterr()
    run_ok("init", str(base), str(tmp_path / "init"), "--gate-dtype", "float32")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    needle = "no tokenizer files" if tokenizer is None else "has no chat template"
    assert len(warnings) == 1 and needle in warnings[0], warnings
    hub = [] if tokenizer is None else ["--base-model", "org/tiny"]
    run_ok("to_hf", str(tmp_path / "init"), str(tmp_path / "hf"), *hub)
    assert_card_as_with_transformers(tmp_path / "init", tmp_path, *hub)
    _, body, code = card_parts(tmp_path / "hf")
    assert "apply_chat_template" not in code
    # Published files carry no local path: the base is its Hub id, else its directory's name.
    init = json.loads((tmp_path / "hf" / "config.json").read_text())["urm_jax_init"]
    for published in ("config.json", "README.md"):
        assert str(tmp_path) not in (tmp_path / "hf" / published).read_text(), published
    if hub:
        assert (init["base"], init["base_model"], init["base_is_local"]) == ("org/tiny", "org/tiny", False)
    else:
        assert (init["base"], init["base_is_local"]) == ("base", True)
        assert "from `base` (LlamaForCausalLM; a local directory, no Hub id recorded)" in body
    scorer = Scorer(tmp_path / "init")
    if tokenizer is None:
        assert "ships no tokenizer files" in body and "AutoTokenizer" not in code
        ids = example_ids(scorer.cfg)
    else:
        assert "ships no chat template" in body
        ids = tokenizer(PLAIN_TEXT)["input_ids"]
    reward = run_snippet(code, tmp_path / "hf", tmp_path)
    want = float(scorer.score([{"input_ids": ids}]).reward[0])
    assert abs(reward - want) <= 1e-5 * max(1.0, abs(want)), (reward, want)
