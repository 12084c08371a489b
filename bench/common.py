"""What several benchmarks share: the ~100M-parameter Llama shape, its random checkpoint, a
full-row stage-1 batch, the load average line and interleaved (ABAB...) timing helpers."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import numpy as np

# ~100M parameters, Llama-3 style GQA (3 query heads per KV head), Llama-3.1 RoPE scaling.
SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
             num_kv_heads=4, original_max_position_embeddings=8192, max_position_embeddings=131072)


def random_checkpoint(path: Path, dtype: str = "float32", gate_dtype: str = "float32", **shape) -> Path:
    """A random HF-layout URM checkpoint of SHAPE (overridden by `shape`) at `path`."""
    from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf

    return write_random_hf(path, tiny_hf_config(**(SHAPE | shape)), dtype=dtype, gate_dtype=gate_dtype, overwrite=True,
                           progress=False)


def make_stage1_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    """Full rows (no padding): ids avoid the pad id (vocab - 1), so HF pools the last token too."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(4, vocab - 2, (rows, seq_len)).astype(np.int32),
            "segment_ids": np.ones((rows, seq_len), np.int32),
            "pool_index": np.full((rows, 1), seq_len - 1, np.int32),
            "pool_mask": np.ones((rows, 1), np.float32),
            "labels": rng.integers(0, 5, (rows, 1, 5)).astype(np.float32)}


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} cores"


def median(values) -> float:
    return statistics.median(values) if values else float("nan")
