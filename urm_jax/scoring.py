"""Batch scoring: examples in, per-example reward, attribute means/log-stds, gate weights and
uncertainty out, in input order.

Sequences are grouped into a small fixed set of padded shapes (lengths rounded up to a power of
two, a fixed batch size), so a run compiles at most a handful of programs whatever the input mix.
Pooling comes from the attention mask, so the padding never changes a score.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from urm_jax.config import ATTRIBUTES, ModelConfig
from urm_jax.data.tokenization import pad_batch, render_ids
from urm_jax.io_utils import atomic_file
from urm_jax.loading import load_model
from urm_jax.model.urm import URM

MIN_BUCKET = 16


class InputError(ValueError):
    """A bad input line; the message names the file and line."""


def bucket_length(n: int, max_length: int | None = None) -> int:
    """Next power of two >= n (at least MIN_BUCKET), capped at max_length."""
    length = max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())
    return min(length, max_length) if max_length and n <= max_length else length


def load_tokenizer(path: str | Path):
    """The checkpoint's own tokenizer, or None when it ships none (then only input_ids work)."""
    if not (Path(path) / "tokenizer_config.json").is_file() and not (Path(path) / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@dataclasses.dataclass
class ScoreResult:
    reward: float
    means: np.ndarray
    log_stds: np.ndarray
    gate: np.ndarray
    uncertainty: float
    num_tokens: int

    def to_json(self) -> dict:
        named = lambda v: {a: float(x) for a, x in zip(ATTRIBUTES, v)}  # noqa: E731
        return {"reward": float(self.reward), "mean": named(self.means),
                "log_std": named(self.log_stds),
                "variance": named(np.exp(2.0 * self.log_stds.astype(np.float64))),
                "gate": named(self.gate), "uncertainty": float(self.uncertainty),
                "num_tokens": self.num_tokens}


class Scorer:
    """Load once, score many. `model` may be an HF directory or a urm-jax checkpoint."""

    def __init__(self, model: str | Path, *, compute_dtype: str | None = None,
                 param_dtype: str | None = None, gate_dtype: str | None = None,
                 batch_size: int = 8, max_length: int | None = None, truncation: str = "error"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        self.model, self.cfg = load_model(model, compute_dtype=compute_dtype,
                                          param_dtype=param_dtype, gate_dtype=gate_dtype)
        self.tokenizer = load_tokenizer(model)
        self.batch_size = batch_size
        self.max_length = max_length or self.cfg.max_position_embeddings
        self.truncation = truncation
        graphdef, state = nnx.split(self.model)
        self._state = state
        self._forward = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask))

    @property
    def pad_id(self) -> int:
        return self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0

    def encode(self, example: dict) -> list[int]:
        return render_ids(self.tokenizer, example, max_length=self.max_length,
                          truncation=self.truncation, vocab_size=self.cfg.vocab_size)

    def score_ids(self, sequences: Sequence[list[int]], progress: bool = False) -> list[ScoreResult]:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        results: list[ScoreResult | None] = [None] * len(sequences)
        bar = tqdm(total=len(sequences), desc="score", unit="seq", disable=not progress, file=sys.stderr)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = [sequences[i] for i in idx]
            length = bucket_length(max(map(len, rows)), self.max_length)
            rows += [rows[0]] * (self.batch_size - len(rows))  # fixed batch shape: no recompiles
            ids, mask = pad_batch(rows, pad_id=self.pad_id, length=length)
            out = jax.device_get(self._forward(self._state, jnp.asarray(ids), jnp.asarray(mask)))
            for row, i in enumerate(idx):
                results[i] = ScoreResult(float(out.reward[row]), np.asarray(out.means[row], np.float32),
                                         np.asarray(out.log_stds[row], np.float32),
                                         np.asarray(out.gate[row], np.float32),
                                         float(out.uncertainty[row]), len(sequences[i]))
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]

    def score(self, examples: Iterable[dict], progress: bool = False) -> list[ScoreResult]:
        return self.score_ids([self.encode(e) for e in examples], progress=progress)


def read_jsonl(path: str | Path, encode) -> tuple[list[dict], list[list[int]]]:
    """Parse and encode every line; the first bad line raises InputError naming file and line."""
    examples, sequences = [], []
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            try:
                sequences.append(encode(example))
            except ValueError as err:
                raise InputError(f"{path}:{lineno}: {err}") from None
            examples.append(example)
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples, sequences


def score_file(scorer: Scorer, input_path: str | Path, output_path: str | Path) -> int:
    examples, sequences = read_jsonl(input_path, scorer.encode)
    results = scorer.score_ids(sequences, progress=True)
    with atomic_file(output_path) as out:
        for example, result in zip(examples, results):
            record = {"id": example["id"]} if "id" in example else {}
            record.update(result.to_json())
            out.write(json.dumps(record) + "\n")
    return len(results)


def describe(cfg: ModelConfig, model: URM) -> str:
    dt = model.options.dtypes
    return (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
            f"compute {dt.compute}, gate {dt.gate_dtype(cfg)}")
