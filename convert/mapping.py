"""The ONE declarative HF <-> JAX parameter table. Both directions derive from it.

Each entry pairs a JAX parameter path (stacked layout, kernels [in..., out...]) with its HF key
(PyTorch Linear layout [out, in]; `{i}` marks a per-layer key). `n_in` says how many leading JAX
dims are the Linear's inputs; `None` means the tensor is copied as is (embeddings, norms, biases).
Conversion is therefore only transposes and reshapes: no q/k permutation, no folded scaling, so a
round trip is bit-exact by construction.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]
    hf_key: str
    n_in: int | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_key

    @property
    def jax_name(self) -> str:
        return "/".join(self.path)

    def hf_keys(self, num_layers: int) -> list[str]:
        return [self.hf_key.format(i=i) for i in range(num_layers)] if self.stacked else [self.hf_key]

    def hf_shape(self, jax_shape: tuple[int, ...]) -> tuple[int, ...]:
        """HF shape of one HF tensor of this entry (one layer's slice when stacked)."""
        shape = tuple(jax_shape[1:] if self.stacked else jax_shape)
        if self.n_in is None:
            return shape
        return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))

    def to_jax(self, hf_array: np.ndarray, jax_shape: tuple[int, ...]) -> np.ndarray:
        """One HF tensor -> its JAX array (one layer's slice when stacked)."""
        shape = tuple(jax_shape[1:] if self.stacked else jax_shape)
        if self.n_in is None:
            return hf_array.reshape(shape)
        return hf_array.T.reshape(shape)

    def to_hf(self, jax_array: np.ndarray) -> np.ndarray:
        """One JAX array (one layer's slice when stacked) -> its HF tensor, C-contiguous."""
        if self.n_in is None:
            return np.ascontiguousarray(jax_array)
        shape = jax_array.shape
        flat = jax_array.reshape(math.prod(shape[:self.n_in]), math.prod(shape[self.n_in:]))
        return np.ascontiguousarray(flat.T)


LAYER = "model.layers.{i}"
TABLE: tuple[Entry, ...] = (
    Entry(("backbone", "embed_tokens"), "model.embed_tokens.weight"),
    Entry(("backbone", "layers", "input_norm"), f"{LAYER}.input_layernorm.weight"),
    Entry(("backbone", "layers", "q_proj"), f"{LAYER}.self_attn.q_proj.weight", 1),
    Entry(("backbone", "layers", "k_proj"), f"{LAYER}.self_attn.k_proj.weight", 1),
    Entry(("backbone", "layers", "v_proj"), f"{LAYER}.self_attn.v_proj.weight", 1),
    Entry(("backbone", "layers", "o_proj"), f"{LAYER}.self_attn.o_proj.weight", 2),
    Entry(("backbone", "layers", "post_attn_norm"), f"{LAYER}.post_attention_layernorm.weight"),
    Entry(("backbone", "layers", "gate_proj"), f"{LAYER}.mlp.gate_proj.weight", 1),
    Entry(("backbone", "layers", "up_proj"), f"{LAYER}.mlp.up_proj.weight", 1),
    Entry(("backbone", "layers", "down_proj"), f"{LAYER}.mlp.down_proj.weight", 1),
    Entry(("backbone", "final_norm"), "model.norm.weight"),
    Entry(("value_head", "kernel"), "score.weight", 1),
    Entry(("gate", "fc0", "kernel"), "weights.fc.0.weight", 1),
    Entry(("gate", "fc0", "bias"), "weights.fc.0.bias"),
    Entry(("gate", "fc2", "kernel"), "weights.fc.2.weight", 1),
    Entry(("gate", "fc2", "bias"), "weights.fc.2.bias"),
    Entry(("gate", "fc4", "kernel"), "weights.fc.4.weight", 1),
    Entry(("gate", "fc4", "bias"), "weights.fc.4.bias"),
)

# Non-persistent buffers some old exports carry; they hold no learned values and are recomputed.
IGNORED_HF_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def is_gate(entry: Entry) -> bool:
    return entry.path[0] == "gate"


def get_path(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value
