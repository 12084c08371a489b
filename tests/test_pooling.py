"""Pooling is one rule on both sides, and the pooled token is the one that closes the final turn.

* The exported PyTorch class pools by the attention mask when one is given (urm-jax's rule), the
  pad id only without a mask; with pad == eos (SmolLM2's `<|im_end|>`) a final eos is pooled.
* `convert` warns when the pad id is an eos id; `urm-jax parity` says "pooling differs" when the
  reference pools by the pad id.
* The tokenisation policy reads the reward at `<|eot_id|>` (Llama-3) and at `<|im_end|>` (ChatML,
  the template's trailing newline dropped), for rendered messages and rendered text alike.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from convert.__main__ import main as convert_main
from hf_fixtures import EOS_IDS, MODELING_FILE, load_reference, make_tiny_urm
from urm_jax.data.datasets import helpsteer2_examples
from urm_jax.data.tokenization import chat_format, render_ids, text_ids
from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir
from urm_jax.parity import run_parity

EOS = EOS_IDS[0]  # the pad id of the pad == eos models here
ROWS = [[1, 40, 41, 42, 43, EOS], [1, 50, 51, EOS], [1, 60, 61, 62, 63, 64, 65, 66]]
CHATML_TEMPLATE = (  # SmolLM2-135M-Instruct's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


@pytest.fixture(scope="module")
def pad_is_eos(tmp_path_factory):
    """A tiny URM whose pad_token_id is its first eos id, fp32 throughout."""
    return make_tiny_urm(tmp_path_factory.mktemp("pad_eos") / "hf", pad_token_id=EOS,
                         gate_dtype="float32", seed=4)


def right_padded(rows):
    width = max(map(len, rows))
    ids = torch.tensor([r + [EOS] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_exported_class_pools_by_the_mask_and_keeps_the_pad_id_rule_without_one(pad_is_eos, caplog):
    model = load_reference(pad_is_eos)
    ids, mask = right_padded(ROWS)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).value_logits
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, row in enumerate(ROWS):
            # the last real token by the mask: the final eos itself where the row ends with one
            # (a vector times the head rounds unlike the batched matmul: 1e-6, not bitwise)
            torch.testing.assert_close(batch[i], model.score(hidden[i, len(row) - 1]), rtol=1e-5, atol=1e-5)
            assert (batch[i] - model.score(hidden[i, len(row) - 2])).abs().max() > 1e-2
            alone = model(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row))).value_logits
            torch.testing.assert_close(batch[i], alone[0], rtol=1e-5, atol=1e-5)
        # No mask: the pad-id rule, as before (rightmost token != pad id), with a warning once.
        with caplog.at_level(logging.WARNING):
            no_mask = model(input_ids=torch.tensor([ROWS[0]])).value_logits
        cut = model(input_ids=torch.tensor([ROWS[0][:-1]])).value_logits
    torch.testing.assert_close(no_mask, cut, rtol=1e-5, atol=1e-5)
    assert "is also an eos token id and no attention_mask" in caplog.text


def test_convert_warns_when_the_pad_id_is_an_eos_id(pad_is_eos, tmp_path, capsys):
    ckpt, export = tmp_path / "ckpt", tmp_path / "hf"
    for argv in (["from_hf", str(pad_is_eos), str(ckpt)], ["to_hf", str(ckpt), str(export)]):
        capsys.readouterr()
        assert convert_main(argv) == 0
        err = capsys.readouterr().err
        warnings = [line for line in err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and f"pad_token_id {EOS} is also an eos_token_id" in warnings[0], err
        assert "Traceback" not in err
    # a model whose pad is not an eos converts silently
    other = make_tiny_urm(tmp_path / "plain", seed=1)
    capsys.readouterr()
    assert convert_main(["from_hf", str(other), str(tmp_path / "plain_ckpt")]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_parity_reports_a_pooling_difference_as_such(pad_is_eos, tmp_path):
    """A directory whose own class pools by the pad id (transformers' stock rule) disagrees on the
    rows that end with the pad id: parity says so instead of only failing numbers."""
    inputs = tmp_path / "ids.jsonl"
    inputs.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ROWS))
    same = run_parity(pad_is_eos, pad_is_eos, input_path=inputs, dtype="float32")
    assert same.ok and same.pooling is None, same.format()

    old = Path(shutil.copytree(pad_is_eos, tmp_path / "old_rule"))
    code = MODELING_FILE.read_text()
    mask_first = ("    if attention_mask is not None:\n        real = (attention_mask != 0).to(device, torch.long)\n"
                  "    elif input_ids is not None and pad_token_id is not None:\n"
                  "        real = (input_ids != pad_token_id).to(device, torch.long)\n")
    ids_first = ("    if input_ids is not None and pad_token_id is not None:\n"
                 "        real = (input_ids != pad_token_id).to(device, torch.long)\n"
                 "    elif attention_mask is not None:\n        real = (attention_mask != 0).to(device, torch.long)\n")
    assert mask_first in code
    (old / "modeling_custom.py").write_text(code.replace(mask_first, ids_first))
    report = run_parity(old, pad_is_eos, input_path=inputs, dtype="float32", trust_remote_code=True)
    assert not report.ok and report.pooling is not None
    text = report.format()
    assert "pooling differs" in text and f"pad_token_id {EOS}" in text and "rows [0, 1]" in text, text


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(Llama-3, ChatML) tokenizers: the real Llama-3 one built offline, and the same vocabulary
    with ChatML's two special tokens and SmolLM2's template."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("URM_JAX_CACHE", str(tmp_path_factory.mktemp("urm_cache")))
        path = cached_llama3_tokenizer_dir()
    llama3, chatml = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    chatml.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    chatml.chat_template = CHATML_TEMPLATE
    return llama3, chatml


MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize("which, end", [(0, "<|eot_id|>"), (1, "<|im_end|>")])
def test_the_reward_is_read_at_the_token_closing_the_final_turn(tokenizers, which, end):
    tok = tokenizers[which]
    assert chat_format(tok).end_of_turn == end
    ids = render_ids(tok, {"messages": MESSAGES}, max_length=None)
    assert tok.convert_ids_to_tokens(ids[-1]) == end
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # the rendered text (ChatML's ends with "\n"), or a text that stops at the end-of-turn token
    # as a policy's generation does: the same ids
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text_ids(tok, text) == ids
    assert text_ids(tok, text.rstrip()) == ids
    assert text.endswith("\n") == (end == "<|im_end|>")


def test_chatml_training_truncation_keeps_the_final_turn_whole(tokenizers):
    """Left truncation finds the final turn by its template's marker (<|im_start|> for ChatML)."""
    _, tok = tokenizers
    row = {"prompt": "long question " * 60 + "\n<extra_id_1>Assistant\nok\n<extra_id_1>User\nand?",
           "response": "Fine.", **{a: 2 for a in ("helpfulness", "correctness", "coherence",
                                                   "complexity", "verbosity")}}
    examples, report = helpsteer2_examples([row, {**row, "response": "word " * 200}], tok,
                                           max_length=64)
    assert report.used == 1 and report.truncated == 1
    assert report.dropped == {"final_turn_too_long": 1}
    ids = examples[0].input_ids.tolist()
    assert len(ids) <= 64 and tok.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
    assert tok.decode(ids).endswith("<|im_start|>assistant\nFine.<|im_end|>")
