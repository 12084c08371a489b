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
import sys
from typing import Callable

import numpy as np

from urm_jax.model.paths import HEAD_GROUPS, is_gate as is_gate_path

Box = tuple[slice, ...]  # one [start, stop) slice per dim (step 1), as sharding indices give
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]  # np.empty or a buffer pool's take


def transpose2d(a: np.ndarray, alloc: Alloc = np.empty) -> np.ndarray:
    """C-contiguous a.T, fast. numpy's strided copy moves one element per step and writes each
    destination cache line from many source rows (~0.2 GB/s for bf16). Copying 16 source rows at
    a time keeps them in cache (~4x faster); for 2-byte dtypes, packing two source rows into one
    uint32 row first halves the element count of the strided copy (~1.5x more). numpy drops the
    GIL in these copies, so several threads transpose in parallel. `alloc(shape, dtype)` makes
    the result (conversions pass a buffer pool: faulting in fresh pages costs more than this)."""
    rows, cols = a.shape
    out = alloc((cols, rows), a.dtype)
    if a.itemsize == 2 and rows % 2 == 0 and sys.byteorder == "little":
        bits, packed, block = a.view(np.uint16), out.view(np.uint32), 16
        scratch = np.empty((block, cols), np.uint32)
        for k in range(0, rows // 2, block):
            n = min(block, rows // 2 - k)
            pair = scratch[:n]  # pair[j, c] = a[2(k+j), c] | a[2(k+j)+1, c] << 16
            pair[...] = bits[2 * k + 1:2 * (k + n):2]
            pair <<= 16
            pair |= bits[2 * k:2 * (k + n):2]
            packed[:, k:k + n] = pair.T
        return out
    for i in range(0, rows, 16):
        out[:, i:i + 16] = a[i:i + 16].T
    return out


def normalize_box(box, shape: tuple[int, ...]) -> Box:
    """A sharding index box (slices possibly open, `slice(None)`) as explicit [start, stop) slices for
    `shape`, e.g. (slice(None), slice(0, 64)) on (128, 256) -> (slice(0, 128), slice(0, 64))."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, shape))


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter of the table: JAX `path` (stacked layout, kernels [in..., out...]), `hf_key`
    (`{i}` marks a per-layer key), and `n_in`, the number of leading JAX dims that are the Linear's
    inputs (None: copied as is, no transpose)."""
    path: tuple[str, ...]
    hf_key: str
    n_in: int | None = None

    @property
    def stacked(self) -> bool:
        """Whether the entry is per layer (its HF key has `{i}`; the JAX array has a leading layers axis)."""
        return "{i}" in self.hf_key

    @property
    def jax_name(self) -> str:
        """The JAX path joined with '/', e.g. 'backbone/layers/q_proj', for messages."""
        return "/".join(self.path)

    def hf_keys(self, layers: int | range) -> list[str]:
        """HF keys of the entry: of `layers` (a count from 0, or a range) when stacked."""
        layers = range(layers) if isinstance(layers, int) else layers
        return [self.hf_key.format(i=i) for i in layers] if self.stacked else [self.hf_key]

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
        return transpose2d(hf_array).reshape(shape)

    def to_hf(self, jax_array: np.ndarray, alloc: Alloc = np.empty) -> np.ndarray:
        """One JAX array (one layer's slice when stacked) -> its HF tensor, C-contiguous."""
        if self.n_in is None:
            return np.ascontiguousarray(jax_array)
        shape = jax_array.shape
        return transpose2d(jax_array.reshape(math.prod(shape[:self.n_in]), -1), alloc)

    def to_jax_into(self, hf_array: np.ndarray, out: np.ndarray, alloc: Alloc = np.empty) -> None:
        """Write one HF tensor's JAX form (one layer's slice when stacked) into `out` (memory:
        a converter's buffer or a host array, C-contiguous), cast to out's dtype. A kernel of
        out's dtype is transposed straight into `out`; one that is cast goes through an `alloc`
        buffer first (the transpose keeps its dtype)."""
        with np.errstate(over="ignore"):  # an overflowing down-cast is refused by the caller's check_cast
            if self.n_in is None:
                np.copyto(out, hf_array.reshape(out.shape), casting="unsafe")
                return
            flat = out.reshape(math.prod(out.shape[:self.n_in]), -1)  # a view: out is contiguous
            if flat.dtype == hf_array.dtype:
                transpose2d(hf_array, lambda shape, dtype: flat)
            else:
                np.copyto(flat, transpose2d(hf_array, alloc), casting="unsafe")

    def to_hf_into(self, jax_array: np.ndarray, out: np.ndarray, alloc: Alloc = np.empty) -> None:
        """Write one JAX array's (one layer's slice when stacked) HF form into `out` (memory,
        C-contiguous), cast to out's dtype: a kernel of out's dtype transposed straight into
        it, one that is cast through an `alloc` buffer first (as in to_jax_into)."""
        with np.errstate(over="ignore"):  # an overflowing down-cast is refused by the caller's check_cast
            if self.n_in is None:
                np.copyto(out, jax_array.reshape(out.shape), casting="unsafe")
                return
            flat = jax_array.reshape(math.prod(jax_array.shape[:self.n_in]), -1)
            if out.dtype == flat.dtype:
                transpose2d(flat, lambda shape, dtype: out.reshape(shape))
            else:
                np.copyto(out, transpose2d(flat, alloc), casting="unsafe")

    def to_jax_box(self, read_rows: Callable[[int, int], np.ndarray], shape: tuple[int, ...],
                   box: Box, alloc: Alloc = np.empty) -> np.ndarray:
        """The sub-box `box` of one HF tensor's JAX form (`shape`: one layer's JAX shape when
        stacked), reading only the HF rows it needs through `read_rows(start, stop)`.

        HF rows are the JAX output dims flattened, so a box that cuts only the first output dim
        (tensor parallelism over heads or mlp) is one contiguous row range; other cuts read the
        whole tensor and slice it."""
        if self.n_in is None:  # same shape on both sides: rows are the first JAX dim
            return read_rows(box[0].start, box[0].stop)[(slice(None), *box[1:])]
        ins, outs = shape[:self.n_in], shape[self.n_in:]
        out_box = box[self.n_in:]
        if all(s == slice(0, n) for s, n in zip(out_box[1:], outs[1:])):
            stride = math.prod(outs[1:])
            rows = read_rows(out_box[0].start * stride, out_box[0].stop * stride)
            outs = (out_box[0].stop - out_box[0].start, *outs[1:])
            out_box = (slice(None),) * len(outs)
        else:
            rows = read_rows(0, math.prod(outs))
        value = transpose2d(rows, alloc).reshape(*ins, *outs)
        return value[(*box[:self.n_in], *out_box)]


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
    """Whether the entry is a gate tensor (see urm_jax.model.paths.is_gate)."""
    return is_gate_path(entry.path)


def wider_dtype_flag(entry: Entry) -> str:
    """The convert option that keeps a wider dtype for `entry`'s tensor, for an overflow's advice:
    the gate's dtype is its own flag (--gate-dtype, which has no `keep`), the rest follow --dtype."""
    return "--gate-dtype float32" if is_gate(entry) else "--dtype keep or float32"


def is_head(entry: Entry) -> bool:
    """Value head or gate: the URM parameters a base Llama checkpoint does not have."""
    return entry.path[0] in HEAD_GROUPS


def get_path(tree: dict, path: tuple[str, ...]):
    """The value at `path` in a nested dict (KeyError if a name is missing)."""
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """Set the value at `path` in a nested dict, creating the intermediate dicts."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value
