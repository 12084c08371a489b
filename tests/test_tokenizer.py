"""The offline Llama-3.1 tokenizer (URM/Skywork form) and the shared tokenisation policy."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from urm_jax.data import tokenizer as tokmod
from urm_jax.data.tokenization import helpsteer_prompt_to_messages, pad_batch, policy_description, render_ids

BOS, EOT, SH, EH, PAD = 128000, 128009, 128006, 128007, 128256

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("URM_JAX_CACHE", str(tmp_path_factory.mktemp("urm_cache")))
        path = tokmod.cached_llama3_tokenizer_dir()
        # Second call reuses the cache instead of rebuilding.
        mtime = (path / "tokenizer.json").stat().st_mtime_ns
        assert tokmod.cached_llama3_tokenizer_dir() == path
        assert (path / "tokenizer.json").stat().st_mtime_ns == mtime
        yield path


@pytest.fixture(scope="session")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="session")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# --- the tokenizer itself -------------------------------------------------------------------


def test_cache_dir_honours_env(tok_dir):
    assert tok_dir.name == f"llama3-tokenizer-{tokmod.BUILD_VERSION}"
    assert "urm_cache" in str(tok_dir)
    assert not [p for p in tok_dir.parent.iterdir() if ".tmp-" in p.name]


def test_vocab_and_special_ids(tok):
    assert len(tok) == 128257
    assert tok.vocab_size == 128000  # BPE part; the 257 added tokens come on top
    assert (tok.bos_token, tok.bos_token_id) == ("<|begin_of_text|>", BOS)
    assert (tok.eos_token, tok.eos_token_id) == ("<|eot_id|>", EOT)
    assert (tok.pad_token, tok.pad_token_id) == ("[PAD]", PAD)
    expected = {
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004,
        "<|reserved_special_token_2|>": 128005,  # Llama-3.1 name (Meta's 3.2 list: <|step_id|>)
        "<|start_header_id|>": SH,
        "<|end_header_id|>": EH,
        "<|eom_id|>": 128008,
        "<|python_tag|>": 128010,
        "<|reserved_special_token_3|>": 128011,  # Meta's 3.2 list: <|image|>
        "<|reserved_special_token_247|>": 128255,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    decoder = tok.added_tokens_decoder
    assert sorted(decoder) == list(range(128000, 128257))
    assert all(decoder[i].special for i in decoder)


def test_names_match_meta_ids(tok, meta):
    # Every token Llama-3.1 names sits on Meta's id.
    for name in ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]:
        assert tok.convert_tokens_to_ids(name) == meta.special_tokens[name]


def test_pretokenizer_regex_is_metas(tok_dir, meta):
    pre = json.loads((tok_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre["pretokenizers"][0]["pattern"]["Regex"] == type(meta).pat_str


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "I'LL say it's   fine, don't you'd?",
        "Zürich, naïve café — 日本語のテキスト, Здравствуйте, مرحبا 😀🎉👩‍👩‍👧",
        "3.14159 1234567 -42 1e-10 0x1F 12,345,678",
        "def f(a, b):\n    return a ** b  # comment\n\n\tif x:\r\n\t\tpass\n",
        "   leading and trailing   \n\n\n   \t  ",
        "a\u00a0b\u2003c  \u3000d",
        "",
    ],
)
def test_matches_meta_encoding(tok, meta, text):
    assert enc(tok, text) == meta.encode(text, bos=False, eos=False)
    assert tok(text)["input_ids"] == meta.encode(text, bos=True, eos=False)
    assert tok.decode(enc(tok, text)) == text


def test_special_token_text_matches_meta(tok, meta):
    text = "x<|eot_id|>y<|start_header_id|>"
    assert enc(tok, text) == meta.encode(text, bos=False, eos=False, allowed_special="all")


def test_built_and_reloaded_agree(tok):
    built = tokmod.build_llama3_tokenizer()
    assert len(built) == len(tok)
    for text in ["Hello world", "日本語 12345", "<|eot_id|> [PAD]"]:
        assert built(text)["input_ids"] == tok(text)["input_ids"]
    assert built.apply_chat_template(MESSAGES, tokenize=False) == tok.apply_chat_template(MESSAGES, tokenize=False)


def test_save_is_atomic_and_replaces(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert tokmod.save_llama3_tokenizer(out) == out.resolve()
    assert (out / "tokenizer.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp siblings left


def test_missing_dependency_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_models.llama3", None)
    with pytest.raises(ImportError, match=r"urm-jax\[tokenizer\]"):
        tokmod.build_llama3_tokenizer()


# --- rendering ----------------------------------------------------------------------------


def test_prompt_response_exact_ids(tok):
    prompt, response = "What is the capital of France?", "Paris is the capital of France."
    ids = render_ids(tok, {"prompt": prompt, "response": response}, max_length=None)
    expected = (
        [BOS, SH] + enc(tok, "user") + [EH] + enc(tok, "\n\n") + enc(tok, prompt) + [EOT]
        + [SH] + enc(tok, "assistant") + [EH] + enc(tok, "\n\n") + enc(tok, response) + [EOT]
    )
    assert ids == expected
    assert enc(tok, "user") == [882] and enc(tok, "assistant") == [78191] and enc(tok, "\n\n") == [271]
    assert ids.count(BOS) == 1 and ids[0] == BOS and ids[-1] == EOT


def test_messages_match_meta_chat_format(tok, meta):
    from llama_models.datatypes import RawMessage, ToolPromptFormat
    from llama_models.llama3.chat_format import ChatFormat

    cf = ChatFormat(meta)
    expected = [BOS]
    for m in MESSAGES:  # Meta's dialog encoder minus its trailing generation header
        expected += cf.encode_message(RawMessage(role=m["role"], content=m["content"]), ToolPromptFormat.json)[0]
    ids = render_ids(tok, {"messages": MESSAGES, "id": "x"}, max_length=None)
    assert ids == expected
    assert ids.count(SH) == len(MESSAGES) and ids.count(EOT) == len(MESSAGES)


def test_content_is_trimmed(tok):
    a = render_ids(tok, {"prompt": "  hi \n", "response": "\n yo  "}, max_length=None)
    b = render_ids(tok, {"prompt": "hi", "response": "yo"}, max_length=None)
    assert a == b


class _Wrapped:
    """A tokenizer whose template adds BOS itself, or that has no BOS at all."""

    def __init__(self, tok, *, template=None, no_bos=False):
        self.tok, self.template, self.no_bos = tok, template, no_bos
        self.bos_token_id = None if no_bos else tok.bos_token_id

    def __len__(self):
        return len(self.tok)

    def apply_chat_template(self, messages, tokenize):
        return self.tok.apply_chat_template(messages, tokenize=tokenize, chat_template=self.template)

    def __call__(self, text, add_special_tokens):
        return self.tok(text, add_special_tokens=add_special_tokens and not self.no_bos)


def test_exactly_one_bos_with_bos_template(tok):
    ex = {"prompt": "hi", "response": "yo"}
    stock_llama3 = "{{ bos_token }}" + tokmod.CHAT_TEMPLATE
    doubled = _Wrapped(tok, template=stock_llama3)
    text = doubled.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert doubled(text, add_special_tokens=True)["input_ids"][:2] == [BOS, BOS]  # the case being fixed
    assert render_ids(doubled, ex, max_length=None) == render_ids(tok, ex, max_length=None)


# The model card's Usage example, word for word (LxzGordon/URM-LLaMa-3.1-8B; the card's text is in
# the project's shared reference files): its prompt, its two responses and the rewards it prints.
CARD_PROMPT = "What is the range of the numeric output of a sigmoid node in a neural network?"
CARD_RESPONSES = ("The output of a sigmoid node is bounded between -1 and 1.",
                  "The output of a sigmoid node is bounded between 0 and 1.")
CARD_REWARDS = (2.3285412788391113, 12.438033103942871)


def test_model_card_goldens_are_the_cards_example(tok):
    """urm_jax/data/model_card_goldens.jsonl holds the card's example verbatim and the loading
    its rewards came from, and urm-jax tokenises it exactly as the card's code does:
    `apply_chat_template(resp, tokenize=False)` then `tokenizer(text, return_tensors="pt")`.
    With URM's tokenizer (Skywork's: BOS-free template, BOS added by the tokenizer) that is one
    BOS; a stock Llama-3 template would make the card's code produce two (see the test above)."""
    from urm_jax.data.samples import model_card_goldens

    goldens = model_card_goldens()
    assert [g["messages"] for g in goldens] == [
        [{"role": "user", "content": CARD_PROMPT}, {"role": "assistant", "content": r}]
        for r in CARD_RESPONSES]
    assert [g["expected_reward"] for g in goldens] == list(CARD_REWARDS)
    assert all((g["compute_dtype"], g["gate_dtype"]) == ("float32", "float16") for g in goldens)
    assert "reconstruct" not in json.dumps(goldens)
    for golden, response in zip(goldens, CARD_RESPONSES):
        conversation = [{"role": "user", "content": CARD_PROMPT}, {"role": "assistant", "content": response}]
        text = tok.apply_chat_template(conversation, tokenize=False)  # the card's code, step by step
        assert text == ("<|start_header_id|>user<|end_header_id|>\n\n" + CARD_PROMPT + "<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n" + response + "<|eot_id|>")
        card = tok(text, return_tensors="np")
        card_ids = card["input_ids"][0].tolist()
        assert card["attention_mask"].all()
        assert render_ids(tok, golden, max_length=None) == card_ids
        assert card_ids[0] == BOS and card_ids.count(BOS) == 1 and card_ids[-1] == EOT
        assert card_ids[1:] == [SH] + enc(tok, "user") + [EH] + enc(tok, "\n\n") + enc(tok, CARD_PROMPT) + [
            EOT, SH] + enc(tok, "assistant") + [EH] + enc(tok, "\n\n") + enc(tok, response) + [EOT]


def test_no_bos_tokenizer_gets_none(tok):
    ids = render_ids(_Wrapped(tok, no_bos=True), {"prompt": "hi", "response": "yo"}, max_length=None)
    assert BOS not in ids and ids[0] == SH and ids[-1] == EOT


# --- truncation ---------------------------------------------------------------------------


def test_truncation_error_names_length_and_limit(tok):
    ex = {"messages": MESSAGES}
    n = len(render_ids(tok, ex, max_length=None))
    assert render_ids(tok, ex, max_length=n) == render_ids(tok, ex, max_length=None)
    with pytest.raises(ValueError, match=rf"{n} tokens.*max_length={n - 1}"):
        render_ids(tok, ex, max_length=n - 1)


def test_truncation_left_keeps_bos_and_end(tok):
    ex = {"messages": MESSAGES}
    full = render_ids(tok, ex, max_length=None)
    for limit in (len(full) - 1, 20, 5, 2):  # 5 and 2 cut into the final assistant turn itself
        ids = render_ids(tok, ex, max_length=limit, truncation="left")
        assert len(ids) == limit
        assert ids == [BOS] + full[len(full) - limit + 1 :]
        assert ids[0] == BOS and ids[-1] == EOT
    assert render_ids(tok, ex, max_length=1, truncation="left") == [EOT]


def test_bad_arguments(tok):
    ex = {"prompt": "a", "response": "b"}
    with pytest.raises(ValueError, match="truncation must be one of"):
        render_ids(tok, ex, max_length=10, truncation="right")
    with pytest.raises(ValueError, match="max_length"):
        render_ids(tok, ex, max_length=0)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "example, pattern",
    [
        ({"text": "hi", "label": 1}, r"unknown example schema with keys \['label', 'text'\]"),
        ({"prompt": "hi"}, r"unknown example schema with keys \['prompt'\]"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"messages\[0\].*found \['role'\]"),
        ({"messages": [{"content": "x"}]}, r"messages\[0\] must have 'role' and 'content'"),
        ({"messages": [{"role": "assistant", "content": ["x"]}]}, r"messages\[0\].content must be a string"),
        ({"messages": [{"role": "user", "content": "x"}]}, "last message has role 'user'"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}, "assistant message is empty"),
        ({"prompt": "hi", "response": " \n"}, "'response' is empty"),
        ({"prompt": "hi", "response": 3}, "must be strings"),
        ({"messages": MESSAGES, "input_ids": [1, 2]}, "mixes schemas"),
        ("not a dict", "must be a JSON object"),
    ],
)
def test_schema_errors(tok, example, pattern):
    with pytest.raises(ValueError, match=pattern):
        render_ids(tok, example, max_length=None)


def test_input_ids_passthrough(tok):
    ids = [BOS, 9906, 1917, EOT]
    assert render_ids(tok, {"input_ids": ids, "id": 7}, max_length=None) == ids
    assert render_ids(tok, {"input_ids": np.array(ids)}, max_length=None) == ids
    assert render_ids(tok, {"input_ids": [5, 6]}, max_length=None) == [5, 6]  # no BOS added
    assert render_ids(tok, {"input_ids": ids}, max_length=3, truncation="left") == [BOS, 1917, EOT]
    assert render_ids(tok, {"input_ids": [PAD]}, max_length=None) == [PAD]


@pytest.mark.parametrize(
    "ids, pattern",
    [
        ([], "non-empty list"),
        ("1 2 3", "non-empty list"),
        ([1, 2.0], r"input_ids\[1\] is 2.0, not an int"),
        ([1, True], r"input_ids\[1\] is True"),
        ([1, -1], r"input_ids\[1\]=-1 is outside the vocabulary \[0, 128257\)"),
        ([128257], r"input_ids\[0\]=128257 is outside"),
    ],
)
def test_input_ids_validation(tok, ids, pattern):
    with pytest.raises(ValueError, match=pattern):
        render_ids(tok, {"input_ids": ids}, max_length=None)


# --- padding ------------------------------------------------------------------------------


def test_pad_batch_right_and_left():
    seqs = [[1, 2, 3], [4]]
    ids, mask = pad_batch(seqs, pad_id=PAD)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    np.testing.assert_array_equal(ids, [[1, 2, 3], [4, PAD, PAD]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0]])
    ids, mask = pad_batch(seqs, pad_id=PAD, side="left", length=5)
    np.testing.assert_array_equal(ids, [[PAD, PAD, 1, 2, 3], [PAD, PAD, PAD, PAD, 4]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])


def test_pad_batch_errors():
    with pytest.raises(ValueError, match="more than length=2"):
        pad_batch([[1, 2, 3]], pad_id=0, length=2)
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], pad_id=0, side="middle")
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([], pad_id=0)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        pad_batch([[1], []], pad_id=0)


# --- HelpSteer2 ---------------------------------------------------------------------------


def test_helpsteer_multi_turn_split():
    prompt = "first user text\n<extra_id_1>Assistant\nassistant text\n<extra_id_1>User\nsecond user text"
    assert helpsteer_prompt_to_messages(prompt, " the response \n") == [
        {"role": "user", "content": "first user text"},
        {"role": "assistant", "content": "assistant text"},
        {"role": "user", "content": "second user text"},
        {"role": "assistant", "content": "the response"},
    ]


def test_helpsteer_single_turn_and_leading_marker():
    assert helpsteer_prompt_to_messages("  just a question \n", "answer") == [
        {"role": "user", "content": "just a question"},
        {"role": "assistant", "content": "answer"},
    ]
    assert helpsteer_prompt_to_messages("<extra_id_1>User\nq", "a")[0] == {"role": "user", "content": "q"}


def test_helpsteer_bad_markers():
    with pytest.raises(ValueError, match="unknown HelpSteer2 turn marker '<extra_id_1>System'"):
        helpsteer_prompt_to_messages("q\n<extra_id_1>System\nx", "a")
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        helpsteer_prompt_to_messages("q\n<extra_id_1>Assistant\nx", "a")
    with pytest.raises(ValueError, match="do not alternate"):
        helpsteer_prompt_to_messages("q\n<extra_id_1>User\nq2", "a")


def test_helpsteer_renders_through_policy(tok):
    msgs = helpsteer_prompt_to_messages("q1\n<extra_id_1>Assistant\na1\n<extra_id_1>User\nq2", "a2")
    ids = render_ids(tok, {"messages": msgs}, max_length=None)
    assert ids.count(SH) == 4 and ids[-1] == EOT and ids.count(BOS) == 1


def test_policy_description_mentions_bos():
    assert "one BOS" in policy_description()
