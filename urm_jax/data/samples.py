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
    return resources.files("urm_jax.data").joinpath(name)
