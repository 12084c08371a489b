"""The one tokenisation policy shared by scoring, training and evaluation.

URM pools the hidden state of the last real token, which must be the token that closes the final
assistant turn; scoring and training must therefore render conversations identically.
Everything that turns an example into token ids goes through :func:`render_ids` (chats through
:func:`text_ids`).

**Where the reward is read, per chat template** (:data:`CHAT_FORMATS`, detected from the
tokenizer's template by :func:`chat_format`):

* Llama-3 (URM-LLaMa-3.1-8B, Skywork-Reward): ``<|eot_id|>``, the template's last token.
* ChatML (SmolLM2, Qwen, many small bases): ``<|im_end|>``. The template writes a newline after
  every ``<|im_end|>``; the newline after the *final* one is dropped, so the pooled token is
  ``<|im_end|>`` itself. Why: a policy's generation stops at ``<|im_end|>`` (it is the eos), so
  texts from an RLHF loop (OpenRLHF's ``query``) end there, and a rendered chat must score exactly
  like them; and the token closing the turn, not template formatting, is what Llama-3 pools too.
  SmolLM2's pad token is also ``<|im_end|>``: urm-jax and the exported class pool by the
  attention mask, never by the pad id, so the final ``<|im_end|>`` is pooled, not skipped.
* Any other template: the rendered text as is (its last token).

Errors are ``ValueError`` with a message about the example only; callers add file and line.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import weakref
from pathlib import Path
from typing import Any

import numpy as np

TRUNCATION_MODES = ("error", "left")
TRUNCATION_ADVICE = "use truncation='left' to drop tokens from the start"


class TooManyTokens(ValueError):
    """An example longer than max_length under truncation 'error'. ``num_tokens`` is its length,
    or (``at_least``) a proven lower bound when the text was refused without tokenising it in
    full (`min_tokens`). ``with_advice`` rewords the remedy for a caller's own flag name."""

    def __init__(self, subject: str, num_tokens: int, max_length: int, *, at_least: bool = False,
                 advice: str = TRUNCATION_ADVICE):
        self.subject, self.num_tokens, self.max_length, self.at_least = subject, num_tokens, max_length, at_least
        count = f"at least {num_tokens} tokens (refused before tokenising it)" if at_least else f"{num_tokens} tokens"
        super().__init__(f"{subject} has {count}, more than max_length={max_length} ({advice})")

    def with_advice(self, advice: str) -> "TooManyTokens":
        """The same error with `advice` (what the caller's user should change) in its message."""
        return TooManyTokens(self.subject, self.num_tokens, self.max_length, at_least=self.at_least, advice=advice)


def check_text(value: str, field: str) -> str:
    """`value` unchanged when it can be encoded as UTF-8 (what every tokenizer needs); else a
    ValueError naming `field` and the first bad character (a lone UTF-16 surrogate such as
    ``\\ud800``, which JSON escapes and Python strings can hold)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{field} is not valid Unicode text: a lone surrogate U+{ord(value[err.start]):04X} "
                         f"at character {err.start} cannot be encoded as UTF-8") from None
    return value


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Special tokens of a chat template family: the one that opens a turn (training's left
    truncation keeps the final turn whole from it) and the one that closes it (the pooled token)."""

    name: str
    turn_start: str
    end_of_turn: str


CHAT_FORMATS = (ChatFormat("llama3", "<|start_header_id|>", "<|eot_id|>"),
                ChatFormat("chatml", "<|im_start|>", "<|im_end|>"))


def load_tokenizer(path: str | Path):
    """The checkpoint's own tokenizer (a transformers fast tokenizer), or None when it ships none
    (then only `input_ids` inputs work). Code in the directory never runs: a tokenizer that
    exists only as the directory's own Python class (`auto_map` in tokenizer_config.json) is
    refused with a ValueError naming the directory (transformers would otherwise ask on a
    terminal, or fail with advice to trust it)."""
    if not (Path(path) / "tokenizer_config.json").is_file() and not (Path(path) / "tokenizer.json").is_file():
        return None
    # Imported only when there is a tokenizer to load: the converters call this, and need
    # transformers for nothing else (its import takes seconds).
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ValueError(f"{path}: its tokenizer is the directory's own code (`auto_map` in "
                         "tokenizer_config.json), and urm-jax never runs code from a model "
                         "directory; ship a standard tokenizer (tokenizer.json with a transformers "
                         "tokenizer_class) instead") from None


def chat_format(tokenizer: Any) -> ChatFormat | None:
    """The family of the tokenizer's chat template (both markers written by the template and
    single tokens of the vocabulary), or None for another template or no tokenizer."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    for fmt in CHAT_FORMATS:
        if all(t in template and _is_token(tokenizer, t) for t in (fmt.turn_start, fmt.end_of_turn)):
            return fmt
    return None


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The id of the token that closes a turn in the tokenizer's chat template (where the reward
    is read), or None when the template is not a known family (`chat_format`)."""
    fmt = chat_format(tokenizer)
    return None if fmt is None else tokenizer.convert_tokens_to_ids(fmt.end_of_turn)


def _is_token(tokenizer: Any, token: str) -> bool:
    """Whether `token` is one token of the vocabulary (unknown tokens map to None or to the unk
    id, which maps back to another string)."""
    index = tokenizer.convert_tokens_to_ids(token)
    return isinstance(index, int) and tokenizer.convert_ids_to_tokens(index) == token


def policy_description() -> str:
    """One line describing the policy, for logs and checkpoint metadata."""
    return (
        "chat: apply_chat_template(messages, tokenize=False), whitespace after the final "
        "end-of-turn token (<|eot_id|>, <|im_end|>) dropped, then tokenizer(text, add_special_tokens=True), "
        "exactly one BOS kept; last message must be the assistant's; input_ids used as given; "
        "over max_length: 'error' raises, 'left' drops tokens after the BOS and keeps the tail"
    )


def render_ids(
    tokenizer: Any,
    example: dict,
    *,
    max_length: int | None,
    truncation: str = "error",
    vocab_size: int | None = None,
) -> list[int]:
    """Token ids for one example.

    ``example`` is one of
      * ``{"messages": [{"role": ..., "content": ...}, ...]}`` (last role must be "assistant"),
      * ``{"prompt": str, "response": str}`` (a user turn then an assistant turn),
      * ``{"input_ids": [int, ...]}`` (used as given after validation).
    Other keys (``id``, labels, ...) are ignored. ``tokenizer`` may be None for ``input_ids``
    examples (checked against ``vocab_size``, the model's, when given).

    Chats render as ``tokenizer.apply_chat_template(messages, tokenize=False)`` followed by
    ``tokenizer(text, add_special_tokens=True)``.  If both the template and the tokenizer add a
    BOS, one is dropped so exactly one remains; a tokenizer without a BOS gets none.

    Longer than ``max_length``: ``truncation="error"`` raises; ``truncation="left"`` drops tokens
    from the start of the conversation, keeping the BOS (when the sequence starts with one) as
    the first token and always keeping the end, so the final end-of-turn token stays the pooled
    token.  The cut is token-level: if even the final assistant turn does not fit, the result is
    BOS + the tail of that turn (its header and the start of the response are lost).
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if not isinstance(example, dict):
        raise ValueError(f"example must be a JSON object (dict), got {type(example).__name__}")

    bos = tokenizer.bos_token_id if tokenizer is not None else None
    if "input_ids" in example:
        _only_schema(example, "input_ids")
        given = example["input_ids"]
        if (truncation == "error" and max_length is not None and isinstance(given, (list, tuple, np.ndarray))
                and len(given) > max_length):  # refused before validating every id of a huge list
            raise TooManyTokens("example", len(given), max_length)
        ids = _validate_ids(given, vocab_size or len(tokenizer))
    else:
        messages = _messages(example)  # schema errors first: they say what is wrong with the line
        if tokenizer is None:
            raise ValueError("this model has no tokenizer files, so examples must give 'input_ids'")
        limit = max_length if truncation == "error" else None  # 'left' keeps the tail: tokenise all
        ids = text_ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False),
                       max_tokens=limit, field="the rendered chat")

    if max_length is None or len(ids) <= max_length:
        return ids
    if truncation == "error":
        raise TooManyTokens("example", len(ids), max_length)
    if bos is not None and ids[0] == bos and max_length >= 2:
        return [bos] + ids[len(ids) - (max_length - 1) :]
    return ids[len(ids) - max_length :]  # max_length 1: the end token beats the BOS


def text_ids(tokenizer: Any, text: str, *, max_tokens: int | None = None, field: str = "the text") -> list[int]:
    """Token ids of a chat text already rendered by a chat template (what `render_ids` makes of
    ``apply_chat_template(messages, tokenize=False)``; what OpenRLHF sends as ``query``).

    When the text ends with its template's end-of-turn token followed by whitespace (ChatML's
    ``<|im_end|>\\n``), the whitespace is dropped, so the reward is read at the end-of-turn token
    (module docstring). Then ``tokenizer(text, add_special_tokens=True)``, and when the text itself
    began with the BOS (a template that writes it, like stock Llama-3's) and the tokenizer added
    another, one of the two is dropped: the result starts with exactly one BOS whether or not the
    text had one (none for a tokenizer without a BOS). Special tokens written in the text
    (``<|eot_id|>``) become their ids; nothing else is stripped or appended, so the reward is read
    at the text's last token, which should close the final assistant turn. ValueError (naming
    ``field``) for a non-string, empty or non-UTF-8 text; with ``max_tokens``, `TooManyTokens`
    for a text `min_tokens` proves longer, before tokenising it (a huge text costs no tokenizer
    time). Longer texts are expected here (the caller cuts or refuses them), so the tokenizer's
    "sequence length is longer than the specified maximum" warning is off.
    """
    if not isinstance(text, str):
        raise ValueError(f"a rendered text must be a string, got {type(text).__name__}")
    check_text(text, field)
    if not text.strip():
        raise ValueError("the rendered text is empty")
    fmt = chat_format(tokenizer)
    if fmt is not None and text.rstrip().endswith(fmt.end_of_turn):
        text = text.rstrip()
    if max_tokens is not None:
        bound = min_tokens(tokenizer, text)
        if bound > max_tokens:
            raise TooManyTokens(field, bound, max_tokens, at_least=True)
    ids = list(tokenizer(text, add_special_tokens=True, **_quiet(tokenizer))["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def _quiet(tokenizer: Any) -> dict:
    """``verbose=False`` for tokenizers that take it (transformers'), so a text longer than the
    tokenizer's model_max_length does not log "Token indices sequence length is longer ...": the
    caller cuts or refuses it by its own max_length."""
    kind = type(tokenizer)
    if kind not in _TAKES_VERBOSE:
        try:
            _TAKES_VERBOSE[kind] = "verbose" in inspect.signature(kind.__call__).parameters
        except (TypeError, ValueError):
            _TAKES_VERBOSE[kind] = False
    return {"verbose": False} if _TAKES_VERBOSE[kind] else {}


_TAKES_VERBOSE: dict[type, bool] = {}
_TOKEN_BYTES: "weakref.WeakKeyDictionary[Any, int | None]" = weakref.WeakKeyDictionary()
_LOSSLESS_PRE_TOKENIZERS = ("ByteLevel", "Split", "Digits", "Punctuation")


def max_token_bytes(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes of text one token can stand for, when that is bounded, else None.

    Why this is sound only for some tokenizers: ``tokens >= bytes / max_token_bytes`` needs every
    byte of the text to end up inside some token, each covering a bounded number of bytes. A
    byte-level BPE (Llama-3, GPT-2, Qwen, SmolLM2) with no normalizer does that: the pre-tokenizer
    maps each byte to one symbol (nothing is dropped, and there is no unknown token that could
    swallow a run of characters), so a vocabulary entry of n symbols covers exactly n bytes, and an
    added token (``<|eot_id|>``) matched in the text covers its own UTF-8 bytes. It fails for
    others: a normalizer can shrink text (NFKC, stripping), WordPiece and whitespace
    pre-tokenizers drop whitespace entirely, a Split with behaviour "removed" drops its matches,
    an unknown token (``fuse_unk``, WordPiece's over-long words) covers any number of characters,
    and an added token with lstrip/rstrip absorbs the whitespace around it. For those this
    returns None (no bound: such texts are tokenised in full). Read once per tokenizer from its
    serialized pipeline (``backend_tokenizer.to_str()``)."""
    try:
        return _TOKEN_BYTES[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        pre = spec.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        model = spec.get("model") or {}
        added = spec.get("added_tokens") or []
        lossless = (spec.get("normalizer") is None and model.get("type") == "BPE"
                    and any(p.get("type") == "ByteLevel" for p in parts)
                    and all(p.get("type") in _LOSSLESS_PRE_TOKENIZERS
                            and str(p.get("behavior", "")).lower() != "removed" for p in parts)
                    and not any(a.get("lstrip") or a.get("rstrip") for a in added))
        if lossless and model.get("vocab"):
            longest = max([len(token) for token in model["vocab"]]
                          + [len(a["content"].encode("utf-8")) for a in added])
    try:
        _TOKEN_BYTES[tokenizer] = longest
    except TypeError:
        pass  # not weak-referenceable: computed again next time
    return longest


def min_tokens(tokenizer: Any, text: str) -> int:
    """A lower bound on the number of tokens `text_ids` makes of `text`, computed without
    tokenising: ceil(UTF-8 bytes / `max_token_bytes`) where the tokenizer bounds it (a BOS added
    on top only raises the count, and `text_ids` drops a second BOS only when the text's own
    covers its bytes), else 0 (no bound)."""
    per_token = max_token_bytes(tokenizer)
    if not per_token:
        return 0
    return math.ceil(len(text.encode("utf-8")) / per_token)


_SCHEMAS = ("messages", "prompt", "input_ids")


def _only_schema(example: dict, key: str) -> None:
    others = [k for k in _SCHEMAS if k != key and k in example]
    if others:
        raise ValueError(f"example mixes schemas: has {key!r} and also {others}; give only one")


def _messages(example: dict) -> list[dict]:
    """Validated chat messages for a ``messages`` or ``prompt``/``response`` example."""
    if "messages" in example:
        _only_schema(example, "messages")
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                found = sorted(m) if isinstance(m, dict) else type(m).__name__
                raise ValueError(f"messages[{i}] must have 'role' and 'content', found {found}")
            if not isinstance(m["role"], str) or not m["role"]:
                raise ValueError(f"messages[{i}].role must be a non-empty string, got {m['role']!r}")
            if not isinstance(m["content"], str):
                raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
            check_text(m["role"], f"messages[{i}].role")
            check_text(m["content"], f"messages[{i}].content")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise ValueError(
                f"last message has role {out[-1]['role']!r}; it must be 'assistant' "
                "(the reward is read at the end of the final assistant turn)"
            )
        if not out[-1]["content"].strip():
            raise ValueError("the final assistant message is empty")
        return out
    if "prompt" in example and "response" in example:
        _only_schema(example, "prompt")
        prompt, response = example["prompt"], example["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(
                f"'prompt' and 'response' must be strings, got {type(prompt).__name__} and {type(response).__name__}"
            )
        check_text(prompt, "'prompt'")
        check_text(response, "'response'")
        if not response.strip():
            raise ValueError("'response' is empty")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise ValueError(
        f"unknown example schema with keys {sorted(example)}; expected 'messages', "
        "'prompt' + 'response', or 'input_ids'"
    )


def _validate_ids(ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(ids, (list, tuple, np.ndarray)) or len(ids) == 0:
        raise ValueError("'input_ids' must be a non-empty list of ints")
    out = []
    for i, t in enumerate(ids):
        # bool is an int subclass; a JSON true/false here is a data bug, not token 1/0.
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"input_ids[{i}] is {t!r}, not an int")
        if not 0 <= t < vocab_size:
            raise ValueError(f"input_ids[{i}]={t} is outside the vocabulary [0, {vocab_size})")
        out.append(int(t))
    return out


def pad_batch(
    seqs: list[list[int]],
    *,
    pad_id: int,
    length: int | None = None,
    side: str = "right",
) -> tuple[np.ndarray, np.ndarray]:
    """Pad sequences to ``length`` (default: the longest) on ``side``.

    Returns ``(input_ids, attention_mask)``, both ``np.int32 [B, L]``; the mask is 1 on real
    tokens.  Sequences are never cut here: truncate with :func:`render_ids` first.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty")
    width = max(lengths) if length is None else length
    if max(lengths) > width:
        raise ValueError(f"a sequence has {max(lengths)} tokens, more than length={width}")
    ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), width), dtype=np.int32)
    for row, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[row, cols] = s
        mask[row, cols] = 1
    return ids, mask


# HelpSteer2 embeds earlier turns of a multi-turn prompt with NeMo's "<extra_id_1>" markers.
_HS2_MARKER = re.compile(r"<extra_id_1>(\w*)")
_HS2_ROLES = {"User": "user", "Assistant": "assistant"}


def helpsteer_prompt_to_messages(prompt: str, response: str) -> list[dict]:
    """Split a HelpSteer2 prompt into alternating user/assistant turns, then add the response.

    ``"q1\\n<extra_id_1>Assistant\\na1\\n<extra_id_1>User\\nq2"`` becomes user q1, assistant a1,
    user q2, assistant ``response``.  Text before the first marker is a user turn; a prompt
    without markers is a single user turn.  Turns are whitespace-stripped.
    """
    parts = _HS2_MARKER.split(prompt)  # [text, role, text, role, text, ...]
    messages = [{"role": "user", "content": parts[0].strip()}]
    for marker, text in zip(parts[1::2], parts[2::2]):
        if marker not in _HS2_ROLES:
            raise ValueError(f"unknown HelpSteer2 turn marker '<extra_id_1>{marker}'")
        messages.append({"role": _HS2_ROLES[marker], "content": text.strip()})
    # A prompt that starts with a User marker has nothing before it.
    if len(messages) > 1 and not messages[0]["content"] and messages[1]["role"] == "user":
        messages.pop(0)
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"HelpSteer2 prompt turns do not alternate user/assistant: turn {i} is {m['role']}")
    if messages[-1]["role"] != "user":
        raise ValueError("HelpSteer2 prompt ends with an assistant turn; the response needs a user turn before it")
    messages.append({"role": "assistant", "content": response.strip()})
    return messages
