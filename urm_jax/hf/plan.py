"""What a conversion will do, decided from headers alone: one `Plan` per entry of the mapping
table (JAX shape, stored and written dtype), checked against config.json (keys, shapes, dtypes)
before the first byte is read or written, and the units of rows the streamed converters work in
(one layer of a stacked array, a block of embedding rows, a small tensor whole)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import numpy as np

from urm_jax.checkpoint import ParamsReader, chunk_rows
from urm_jax.config import ModelConfig, canonical_dtype, np_dtype
from urm_jax.errors import NoticeWarning
from urm_jax.hf.mapping import IGNORED_HF_KEYS, LAYER_KEY, TABLE, Entry, get_path, is_gate
from urm_jax.hf.safetensors_io import HFWeights
from urm_jax.hf.streams import Progress

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class ConversionError(ValueError):
    """A source whose tensors disagree with its config.json (missing, unexpected or extra-layer keys, a
    shape or dtype the model does not take); a ValueError, so commands report it as one `error:` line."""


class PoolingWarning(NoticeWarning):
    """A checkpoint whose pad token is also an end-of-sequence token (see `warn_if_pad_is_eos`)."""


def warn_if_pad_is_eos(cfg: ModelConfig, where: str) -> None:
    """Warn when pad_token_id is one of the eos ids (SmolLM2: `<|im_end|>` is both). urm-jax and
    the exported class pool at the last token of the attention mask, so scores are right, but any
    reader that finds the last real token by the pad id (transformers' stock classifiers, code
    calling the model without an attention_mask) skips the final eos and scores another token."""
    if cfg.pad_token_id is not None and cfg.pad_token_id in cfg.eos_token_ids:
        warnings.warn(PoolingWarning(
            f"{where}: pad_token_id {cfg.pad_token_id} is also an eos_token_id; urm-jax and the "
            "exported class pool the last real token by the attention mask, but anything that "
            "pools by the pad id (or calls the model without an attention_mask) skips a final "
            "eos and reads the reward elsewhere: always pass the attention mask"), stacklevel=3)


def jax_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """JAX shape of every table entry, in table order: the shapes `urm_jax.model.urm` declares
    (stacked layers, kernels [in, out], q/k/v/o split by head), written out from the config so
    that the converters plan without JAX and Flax (their import was a third of a conversion's
    time); tests/test_plan.py holds them equal to the model's `abstract_model`."""
    n, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    hq, hkv, hd, k = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_attributes
    layer = {"input_norm": (d,), "q_proj": (d, hq, hd), "k_proj": (d, hkv, hd),
             "v_proj": (d, hkv, hd), "o_proj": (hq, hd, d), "post_attn_norm": (d,),
             "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    tree = {"backbone": {"embed_tokens": (cfg.vocab_size, d), "final_norm": (d,),
                         "layers": {name: (n, *shape) for name, shape in layer.items()}},
            "value_head": {"kernel": (d, cfg.num_labels)},
            "gate": {"fc0": {"kernel": (d, d), "bias": (d,)}, "fc2": {"kernel": (d, d), "bias": (d,)},
                     "fc4": {"kernel": (d, k), "bias": (k,)}}}
    return {e.path: get_path(tree, e.path) for e in TABLE}


def target_dtype(entry: Entry, stored: str, dtype: str, gate_dtype: str | None) -> str:
    """`dtype` ('keep' or a name) applies to backbone and value head; the gate keeps its own
    dtype unless `gate_dtype` is given (the HF reference builds the gate in its own dtype)."""
    if is_gate(entry):
        return canonical_dtype(gate_dtype) if gate_dtype else stored
    return stored if dtype == "keep" else canonical_dtype(dtype)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One table entry as it will be converted."""
    entry: Entry
    shape: tuple[int, ...]  # JAX shape (stacked)
    stored: str  # dtype in the source
    out: str  # dtype written

    @property
    def path(self) -> tuple[str, ...]:
        """JAX parameter path of the entry, e.g. ('backbone', 'layers', 'q_proj')."""
        return self.entry.path

    def hf_keys(self) -> list[str]:
        """HF keys of this parameter: one per layer (`shape[0]` of them) when stacked, else one."""
        return self.entry.hf_keys(self.shape[0])

    @property
    def whole(self) -> bool:
        """A non-stacked kernel: its HF rows are JAX columns, so it converts as one unit (the
        HF tensor is read, or written, once)."""
        return not self.entry.stacked and self.entry.n_in is not None

    def unit_tensors(self, start: int, stop: int, block: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(HF key, JAX-layout value) of each HF tensor in rows [start, stop) of the parameter
        (`block`): one per layer when stacked, else the block itself."""
        if not self.entry.stacked:
            return [(self.entry.hf_key, block)]
        return list(zip(self.entry.hf_keys(range(start, stop)), block))

    def hf_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(HF key, written dtype name, HF shape) of every HF tensor of this parameter, in key order: the
        `specs` a `SafetensorsWriter` takes (HF shape: Linear kernels [out, in], one layer's when stacked)."""
        shape = self.entry.hf_shape(self.shape)
        return [(key, self.out, shape) for key in self.hf_keys()]


def stored_bytes(plans: list[Plan]) -> int:
    """Bytes the planned parameters occupy in their source dtype (the progress bar's total)."""
    return sum(math.prod(p.shape) * np_dtype(p.stored).itemsize for p in plans)


def output_dtypes(plans: list[Plan], cfg: ModelConfig, gate_dtype: str | None = None) -> dict:
    """{'torch_dtype', 'gate_dtype'} an output config.json records. torch_dtype: what the
    backbone is actually stored in. gate_dtype: the gate's compute dtype, by the one rule of
    `urm_jax.config.DEFAULT_GATE_DTYPE` (the `gate_dtype` asked for, else the source's), never the
    stored tensors' dtype, so the output scores exactly like its source."""
    names = {p.out for p in plans if not is_gate(p.entry)}
    backbone = "float32" if "float32" in names else sorted(names)[0]
    return {"torch_dtype": backbone,
            "gate_dtype": canonical_dtype(gate_dtype) if gate_dtype else cfg.gate_dtype}


def check_keys(weights: HFWeights, num_layers: int) -> None:
    """Check the HF key set against the table for `num_layers` layers, from the headers alone.

    Raises ConversionError when the file's layer indices are not exactly 0..num_layers-1, when a
    table key is missing, or when a tensor outside the URM architecture is present (ignoring
    `IGNORED_HF_KEYS`, e.g. old `rotary_emb.inv_freq` buffers)."""
    layers_in_file = sorted({int(m.group(1)) for k in weights.keys() if (m := LAYER_KEY.match(k))})
    if layers_in_file and layers_in_file != list(range(num_layers)):
        raise ConversionError(
            f"config.json says num_hidden_layers={num_layers} but the weights hold layers "
            f"{layers_in_file[0]}..{layers_in_file[-1]} ({len(layers_in_file)} layers)")
    expected = [k for e in TABLE for k in e.hf_keys(num_layers)]
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ConversionError(f"{weights.dir}: tensor {missing[0]} missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(weights.keys()) - set(expected))
    unexpected = [k for k in unexpected if not IGNORED_HF_KEYS.fullmatch(k)]
    if unexpected:
        raise ConversionError(f"{weights.where(unexpected[0])}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + " - not part of the URM architecture")


def plan_from_hf(weights: HFWeights, cfg: ModelConfig, dtype: str = "keep",
                 gate_dtype: str | None = None) -> list[Plan]:
    """Check keys, shapes and dtypes of every HF tensor from the headers alone (nothing read)."""
    check_keys(weights, cfg.num_layers)
    plans = []
    for entry, shape in zip(TABLE, jax_shapes(cfg).values()):
        want = entry.hf_shape(shape)
        keys = entry.hf_keys(cfg.num_layers)
        for key in keys:
            got = weights.dtype(key)
            if got not in FLOAT_DTYPES:
                raise ConversionError(f"{weights.where(key)}: tensor {key} has dtype {got}; "
                                      f"the model takes {', '.join(FLOAT_DTYPES)}")
            if weights.shape(key) != want:
                raise ConversionError(f"{weights.where(key)}: tensor {key} has shape "
                                      f"{list(weights.shape(key))}, config.json implies {list(want)}")
            if got != weights.dtype(keys[0]):
                raise ConversionError(f"{weights.where(key)}: tensor {key} is {got}, {keys[0]} is "
                                      f"{weights.dtype(keys[0])}; a stacked tensor needs one dtype")
        stored = weights.dtype(keys[0])
        plans.append(Plan(entry, shape, stored, target_dtype(entry, stored, dtype, gate_dtype)))
    return plans



def row_units(plans: list[Plan], rows_of: Callable[[Plan], int]) -> list[tuple[Plan, int, int]]:
    """Units of work: (plan, start, stop) for every block of `rows_of(plan)` rows of each parameter's
    first (stacked layers or embedding rows) dimension, the last block shorter, in table order."""
    return [(p, start, min(start + rows_of(p), p.shape[0]))
            for p in plans for start in range(0, p.shape[0], rows_of(p))]


def unit_progress(plan: Plan, start: int, stop: int,
                   itemsize: int | None = None) -> tuple[int, float]:
    """(bytes, HF tensors) a unit of rows accounts for (bytes at `itemsize`, default stored)."""
    itemsize = itemsize or np_dtype(plan.stored).itemsize
    nbytes = (stop - start) * math.prod(plan.shape[1:]) * itemsize
    return nbytes, (stop - start) if plan.entry.stacked else (stop - start) / plan.shape[0]




def hf_chunk_rows(plan: Plan) -> int:
    """Rows per unit when reading an HF source: a whole non-stacked kernel at once (its HF rows are the
    JAX columns), else `checkpoint.chunk_rows` (one layer when stacked, else up to CHUNK_BYTES = 64 MiB
    of rows at the written dtype)."""
    if plan.whole:
        return plan.shape[0]
    return chunk_rows(plan.shape, np_dtype(plan.out), plan.entry.stacked)


def plan_progress(desc: str, plans: list[Plan], enabled: bool) -> Progress:
    """A `Progress` bar over the plans' stored bytes and HF tensor count (disabled when not `enabled`)."""
    return Progress(desc, stored_bytes(plans), sum(len(p.hf_keys()) for p in plans), enabled)



def plan_from_ckpt(reader: ParamsReader, cfg: ModelConfig, dtype: str = "keep",
                   gate_dtype: str | None = None) -> list[Plan]:
    """Plan a urm-jax checkpoint -> HF conversion from the Orbax metadata alone (nothing read).

    `dtype` ('keep' or a float name) is the written dtype of backbone and value head; the gate keeps its
    stored dtype unless `gate_dtype` is given (see `target_dtype`). Raises ConversionError when a
    parameter's shape differs from the one config.json implies, CheckpointError when one cannot be
    opened."""
    plans = []
    for entry, shape in zip(TABLE, jax_shapes(cfg).values()):
        got = reader.shape(entry.path)
        if got != shape:
            raise ConversionError(f"parameter {entry.jax_name} has shape {list(got)}, "
                                  f"config.json implies {list(shape)}")
        stored = canonical_dtype(reader.dtype(entry.path).name)
        plans.append(Plan(entry, shape, stored, target_dtype(entry, stored, dtype, gate_dtype)))
    return plans


def ckpt_chunk_rows(reader: ParamsReader) -> Callable[[Plan], int]:
    """`rows_of` for `row_units` over a checkpoint: whole non-stacked kernels, else the checkpoint's own
    chunk rows (units aligned with storage, so each chunk is read once)."""
    def rows(plan: Plan) -> int:
        if plan.whole:
            return plan.shape[0]
        return reader.chunk_rows(plan.path)  # aligned with storage: each chunk read once
    return rows

