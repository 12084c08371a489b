"""The one tokenisation policy shared by scoring, training and evaluation.

URM pools the hidden state of the last real token, which must be the final assistant
``<|eot_id|>``; scoring and training must therefore render conversations identically.
Everything that turns an example into token ids goes through :func:`render_ids`.

Errors are ``ValueError`` with a message about the example only; callers add file and line.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

TRUNCATION_MODES = ("error", "left")


def policy_description() -> str:
    """One line describing the policy, for logs and checkpoint metadata."""
    return (
        "chat: apply_chat_template(messages, tokenize=False) then tokenizer(text, add_special_tokens=True), "
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
    the first token and always keeping the end, so the final ``<|eot_id|>`` stays the pooled
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
        ids = _validate_ids(example["input_ids"], vocab_size or len(tokenizer))
    else:
        messages = _messages(example)  # schema errors first: they say what is wrong with the line
        if tokenizer is None:
            raise ValueError("this model has no tokenizer files, so examples must give 'input_ids'")
        ids = text_ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))

    if max_length is None or len(ids) <= max_length:
        return ids
    if truncation == "error":
        raise ValueError(
            f"example has {len(ids)} tokens, more than max_length={max_length} "
            "(use truncation='left' to drop tokens from the start)"
        )
    if bos is not None and ids[0] == bos and max_length >= 2:
        return [bos] + ids[len(ids) - (max_length - 1) :]
    return ids[len(ids) - max_length :]  # max_length 1: the end token beats the BOS


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a chat text already rendered by a chat template (what `render_ids` makes of
    ``apply_chat_template(messages, tokenize=False)``; what OpenRLHF sends as ``query``).

    ``tokenizer(text, add_special_tokens=True)``, then, when the text itself began with the BOS
    (a template that writes it, like stock Llama-3's) and the tokenizer added another, one of the
    two is dropped: the result starts with exactly one BOS whether or not the text had one
    (none for a tokenizer without a BOS). Special tokens written in the text (``<|eot_id|>``)
    become their ids; nothing is stripped or appended, so the reward is read at the text's last
    token, which should be the final ``<|eot_id|>``. ValueError for a non-string or empty text.
    """
    if not isinstance(text, str):
        raise ValueError(f"a rendered text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the rendered text is empty")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


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
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise ValueError(
                f"last message has role {out[-1]['role']!r}; it must be 'assistant' "
                "(the reward is read at the final assistant <|eot_id|>)"
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
