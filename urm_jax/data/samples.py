"""Small bundled example files (package data), used by the demo and by `urm-jax parity`."""

from __future__ import annotations

import json
from importlib import resources


def _read(name: str) -> list[dict]:
    text = resources.files("urm_jax.data").joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def sample_examples() -> list[dict]:
    """A few varied conversations: right/wrong answers, code, multi-turn with a system prompt."""
    return _read("samples.jsonl")


def model_card_goldens() -> list[dict]:
    """The model card's sigmoid-range pair with its published rewards (real weights only)."""
    return _read("model_card_goldens.jsonl")


def data_path(name: str):
    """The packaged data file `name` (under `urm_jax/data/`) as an importlib.resources Traversable."""
    return resources.files("urm_jax.data").joinpath(name)


def chained_conversations(rows: list[dict], tokenizer, lengths=(50, 150, 400, 900, 2000)) -> list[dict]:
    """Multi-turn conversations of about `lengths` tokens (each at most its length, and more than
    half of it), built from real HelpSteer2-schema rows (`prompt`, `response`) taken in turn as
    (user, assistant) turns, each conversation starting at another row. Token counts are those of
    the tokenisation policy (`render_ids`) with `tokenizer`. Returns `{"messages": [...]}`
    examples; ValueError when the rows cannot reach a length."""
    from urm_jax.data.tokenization import render_ids  # data -> tokenization, one way

    out, start = [], 0
    for target in lengths:
        messages: list[dict] = []
        for k in range(len(rows)):
            row = rows[(start + k) % len(rows)]
            turn = [{"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["response"]}]
            if len(render_ids(tokenizer, {"messages": messages + turn}, max_length=None)) > target:
                if not messages:
                    continue  # this row alone is longer than the target: try the next
                break
            messages += turn
        length = len(render_ids(tokenizer, {"messages": messages}, max_length=None)) if messages else 0
        if length <= target // 2:
            raise ValueError(f"could not build a conversation of about {target} tokens")
        out.append({"messages": messages})
        start += len(messages) // 2 + 1
    return out
