"""Random URM checkpoints in the real HF format, written straight from the mapping table (no
torch, no model in memory: one tensor at a time), for the demo and for benchmarks at any size up
to the real 8B shape.

Values are drawn so a random model gives O(1) rewards: embeddings N(0, 1), Linear weights
N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1). Each tensor is seeded from its
own key, so the same seed gives the same tensor whatever the sharding or write order. The "fast"
fill (benchmarks at 8B scale) tiles a small pool of such draws instead."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np

from urm_jax.checkpoint import copy_tokenizer_files
from urm_jax.config import ModelConfig, np_dtype
from urm_jax.hf.mapping import TABLE, is_gate, is_head
from urm_jax.hf.plan import jax_shapes
from urm_jax.hf.safetensors_io import parse_size, write_sharded
from urm_jax.hf.streams import Progress
from urm_jax.io_utils import atomic_dir

MODELING_FILE = Path(__file__).with_name("modeling_custom.py")


def tiny_hf_config(*, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, pad_token_id=None, bos_token_id=1,
                   eos_token_id=(2, 3), original_max_position_embeddings=32,
                   max_position_embeddings=4096, rope_theta=10000.0) -> dict:
    """A transformers-5 style config.json dict for a small URM with llama3 RoPE scaling."""
    return {
        "model_type": "llama", "architectures": ["LlamaForSequenceClassificationWithNormal_Weights"],
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "head_dim": hidden_size // num_heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": max_position_embeddings,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": rope_theta, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": original_max_position_embeddings},
        "pad_token_id": vocab_size - 1 if pad_token_id is None else pad_token_id,
        "bos_token_id": bos_token_id, "eos_token_id": list(eos_token_id),
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "num_labels": 10, "dtype": "float32", "gate_dtype": "float16",
    }


# Llama-3.1's token ids and context, with Skywork's added [PAD] (vocab 128257): the values a model
# needs for the real Llama-3 tokenizer (urm_jax/data/tokenizer.py) to drive it.
LLAMA3_TOKENS = dict(vocab_size=128257, pad_token_id=128256, bos_token_id=128000,
                     eos_token_id=(128001, 128008, 128009), original_max_position_embeddings=8192,
                     max_position_embeddings=131072)


def llama3_hf_config(**shape) -> dict:
    """`tiny_hf_config` with the Llama-3.1 tokens (LLAMA3_TOKENS) and the given shape/RoPE."""
    return tiny_hf_config(**{**LLAMA3_TOKENS, **shape})


def _kind(key: str) -> str:
    if key.endswith("norm.weight"):
        return "norm"
    if key.endswith(".bias"):
        return "bias"
    return "embed" if key == "model.embed_tokens.weight" else "linear"


def _scaled(kind: str, normal: np.ndarray, fan_in: int) -> np.ndarray:
    if kind == "norm":
        return 1.0 + np.float32(0.1) * normal
    if kind == "bias":
        return np.float32(0.1) * normal
    return normal if kind == "embed" else normal / np.float32(np.sqrt(fan_in))


def _random_tensor(key: str, shape, dtype, seed: int, fan_in: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return _scaled(_kind(key), rng.standard_normal(shape, np.float32), fan_in).astype(dtype)


class _FastFill:
    """Benchmark-scale values without 7.5e9 normal draws: one pool of POOL draws per (value kind,
    fan-in, dtype), and each tensor is that pool read cyclically from an offset given by its key.
    The pieces are views of the pool, so writing costs no more than copying bytes. Same
    distribution per element as the "normal" fill, but values repeat with period POOL."""

    POOL = 4_194_301  # prime, so rows of any width do not line up with the period

    def __init__(self, seed: int):
        self.seed, self.pools = seed, {}

    def pieces(self, key: str, shape, dtype, fan_in: int):
        ident = (_kind(key), fan_in, np.dtype(dtype).name)
        if ident not in self.pools:
            rng = np.random.default_rng([self.seed, zlib.crc32(repr(ident).encode())])
            pool = _scaled(ident[0], rng.standard_normal(self.POOL, np.float32), fan_in).astype(dtype)
            self.pools[ident] = np.concatenate([pool, pool])  # any POOL-long window is one slice
        pool = self.pools[ident]
        start, left = zlib.crc32(key.encode()) % self.POOL, int(np.prod(shape))
        while left:
            take = min(left, self.POOL)
            yield pool[start:start + take]
            left -= take
            start = (start + take) % self.POOL


def write_random_hf(out_dir, hf_config: dict, *, dtype: str = "float32", gate_dtype: str = "float16",
                    seed: int = 0, max_shard_size="5GB", tokenizer_dir=None, overwrite=False,
                    progress: bool = True, fill: str = "normal", heads: str = "urm") -> Path:
    """Write config.json + safetensors (+ index when sharded) + modeling_custom.py (+ tokenizer).
    `fill`: "normal" (an independent draw per value, seeded by key) or "fast" (see _FastFill).
    `heads`: "urm" (value head + gate), or "base": a Skywork-Reward-like
    LlamaForSequenceClassification with one label (`score.weight` [1, hidden], no gate), the
    input of `python -m convert init`."""
    if fill not in ("normal", "fast"):
        raise ValueError(f"fill {fill!r}: normal or fast")
    if heads not in ("urm", "base"):
        raise ValueError(f"heads {heads!r}: urm or base")
    hf = dict(hf_config, dtype=dtype, gate_dtype=gate_dtype)
    cfg = ModelConfig.from_hf_dict(hf)
    specs = []
    for entry, shape in zip(TABLE, jax_shapes(cfg).values()):
        if heads == "base" and is_head(entry):
            continue
        out = gate_dtype if is_gate(entry) else dtype
        specs += [(key, out, entry.hf_shape(shape)) for key in entry.hf_keys(cfg.num_layers)]
    config = cfg.to_hf_dict()
    if heads == "base":
        specs.append(("score.weight", dtype, (1, cfg.hidden_size)))
        for key in ("auto_map", "gate_dtype", "label2id"):
            config.pop(key, None)
        config.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                      id2label={"0": "LABEL_0"})
    fast = _FastFill(seed)

    def pieces():
        for key, out, shape in specs:
            if fill == "fast":
                yield from ((key, p) for p in fast.pieces(key, shape, np_dtype(out), shape[-1]))
            else:
                yield key, _random_tensor(key, shape, np_dtype(out), seed, fan_in=shape[-1])

    total = sum(int(np.prod(shape)) * np_dtype(out).itemsize for _, out, shape in specs)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with Progress("random weights", total, len(specs), progress) as bar:
            write_sharded(tmp, specs, pieces(), parse_size(max_shard_size), progress=bar.update)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if heads == "urm":
            shutil.copy2(MODELING_FILE, tmp / "modeling_custom.py")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(out_dir)
