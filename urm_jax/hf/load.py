"""HF safetensors -> urm-jax parameters, streamed through the mapping table: into host arrays,
straight onto sharded devices (each device's box read from the files), or into a urm-jax
checkpoint chunk by chunk (`from_hf`). Peak memory is a few units, never the model."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable

import numpy as np

from urm_jax.checkpoint import checkpoint_writer
from urm_jax.config import ModelConfig, np_dtype
from urm_jax.finite import check_cast, check_finite, checked_astype
from urm_jax.hf.mapping import Alloc, Box, get_path, normalize_box, set_path, wider_dtype_flag
from urm_jax.hf.plan import (Plan, hf_chunk_rows, output_dtypes, plan_from_hf,
                             plan_progress, row_units, unit_progress, warn_if_pad_is_eos)
from urm_jax.hf.safetensors_io import HFWeights
from urm_jax.hf.streams import BufferPool, Progress, ordered_map, pooled, readahead
from urm_jax.io_utils import check_outputs


def read_box(weights: HFWeights, plan: Plan, box: Box, allow_nonfinite: bool = False,
             alloc: Alloc = np.empty) -> np.ndarray:
    """The values of JAX box `box` of a parameter, in `plan.out`, reading only the HF tensors
    (and, where the layout allows, only the rows) it covers. Buffers come from `alloc`."""
    def rows_of(key: str):
        def read(start: int, stop: int) -> np.ndarray:
            values = weights.read(key, (start, stop), alloc)
            if not allow_nonfinite:
                check_finite(values, f"{weights.where(key)}: tensor {key}")
            return values
        return read

    entry, out = plan.entry, np_dtype(plan.out)
    if not entry.stacked:
        return checked_astype(np.asarray(entry.to_jax_box(rows_of(entry.hf_key), plan.shape, box, alloc)),
                              out, f"{weights.where(entry.hf_key)}: tensor {entry.hf_key}",
                              wider=wider_dtype_flag(entry))
    layers = range(box[0].start, box[0].stop)
    keys = entry.hf_keys(layers)
    parts = (entry.to_jax_box(rows_of(key), plan.shape[1:], box[1:], alloc) for key in keys)
    if len(layers) == 1:  # one layer: no extra copy into a stacked buffer
        return checked_astype(np.asarray(next(parts))[None], out,
                              f"{weights.where(keys[0])}: tensor {keys[0]}", wider=wider_dtype_flag(entry))
    block = np.empty((len(layers), *(s.stop - s.start for s in box[1:])), out)
    for k, part in enumerate(parts):
        block[k] = part
        check_cast(np.asarray(part), block[k], f"{weights.where(keys[k])}: tensor {keys[k]}",
                   wider=wider_dtype_flag(entry))
    return block


def fill_rows(weights: HFWeights, plan: Plan, start: int, stop: int, out: np.ndarray,
              allow_nonfinite: bool = False, alloc: Alloc = np.empty) -> None:
    """Fill rows [start, stop) of a parameter's JAX array (`out`: a checkpoint chunk mapped from
    its file, or a slice of a host array) from its HF tensors: one layer per row when stacked,
    else rows of the tensor (a kernel: all of it). The source is mapped from the safetensors
    file (no read copy) and copied, or transposed through a pooled buffer, into `out`."""
    entry = plan.entry
    if entry.stacked:
        jobs = [(key, None, dst) for key, dst in plan.unit_tensors(start, stop, out)]
    elif entry.n_in is None:
        jobs = [(entry.hf_key, (start, stop), out)]
    else:
        if (start, stop) != (0, plan.shape[0]):
            raise AssertionError(f"{entry.jax_name}: a kernel converts whole")
        jobs = [(entry.hf_key, None, out)]
    for key, rows, dst in jobs:
        with weights.view(key, rows) as src:  # mapped: read in place, no copy
            if not allow_nonfinite:
                check_finite(src, f"{weights.where(key)}: tensor {key}")
            entry.to_jax_into(src, dst, alloc)
            check_cast(src, dst, f"{weights.where(key)}: tensor {key}", src_finite=not allow_nonfinite,
                       wider=wider_dtype_flag(entry))



def _hf_prefetch(weights: HFWeights) -> Callable:
    def prefetch(unit) -> None:
        plan, start, stop = unit
        entry = plan.entry
        if entry.stacked:
            for key in entry.hf_keys(range(start, stop)):
                weights.prefetch(key)
        else:
            weights.prefetch(entry.hf_key, None if entry.n_in is not None else (start, stop))
    return prefetch



def _stream_from_hf(weights, plans: list[Plan], destination: Callable, bar: Progress,
                    allow_nonfinite: bool) -> None:
    """Fill every parameter from its HF tensors, unit by unit on a few threads, each unit's
    inputs prefetched while earlier ones are transposed. `destination(plan, start, stop, alloc)`
    is a context manager giving the array for the unit's rows (a slice of a host array, or a
    checkpoint chunk's buffer taken from `alloc`, written when the block ends)."""
    def convert(unit, alloc):
        plan, start, stop = unit
        with destination(plan, start, stop, alloc) as out:
            fill_rows(weights, plan, start, stop, out, allow_nonfinite, alloc)
        return unit_progress(*unit)

    units = readahead(row_units(plans, hf_chunk_rows), _hf_prefetch(weights))
    for done in ordered_map(pooled(BufferPool(), convert), units):
        bar.update(*done)


def hf_to_params(weights: HFWeights, cfg: ModelConfig, *, dtype: str = "keep",
                 gate_dtype: str | None = None, allow_nonfinite: bool = False,
                 progress: bool = True, shardings: dict | None = None) -> dict:
    """HF tensors -> the JAX pure-dict params tree (stacked layers).

    Without `shardings`: numpy arrays on the host. With a matching tree of `jax.sharding.Sharding`:
    jax arrays, each device's shard read straight from the safetensors files (only the rows it
    needs where the layout allows; replicas read once) and put on its devices as soon as it is
    read, so the host holds a few shards at a time, never the whole tensor or model."""
    plans = plan_from_hf(weights, cfg, dtype, gate_dtype)
    params: dict = {}
    with plan_progress("load", plans, progress) as bar:
        if shardings is None:
            for plan in plans:
                set_path(params, plan.path, np.empty(plan.shape, np_dtype(plan.out)))
            _stream_from_hf(weights, plans, lambda plan, start, stop, alloc: contextlib.nullcontext(
                get_path(params, plan.path)[start:stop]), bar, allow_nonfinite)
            return params
        for plan in plans:
            set_path(params, plan.path, _device_array(weights, plan, get_path(shardings, plan.path),
                                                      allow_nonfinite, bar))
    return params


def _device_array(weights: HFWeights, plan: Plan, sharding, allow_nonfinite: bool, bar: Progress):
    import jax  # here: from_hf writes a checkpoint with numpy alone, never loading JAX

    boxes: dict[tuple, tuple[Box, list]] = {}  # replicas share a box: read it once
    for device, index in sharding.addressable_devices_indices_map(plan.shape).items():
        box = normalize_box(index, plan.shape)
        boxes.setdefault(tuple((s.start, s.stop) for s in box), (box, []))[1].append(device)
    shards = []

    def place(item):
        box, devices = item
        host = read_box(weights, plan, box, allow_nonfinite)
        return [jax.device_put(host, device) for device in devices], host.size

    for placed, size in ordered_map(place, boxes.values()):
        shards += placed
        bar.update(size * np_dtype(plan.stored).itemsize,
                   size / math.prod(plan.shape) * (plan.shape[0] if plan.entry.stacked else 1))
    return jax.make_array_from_single_device_arrays(plan.shape, sharding, shards)


def from_hf(hf_dir, out_dir, *, dtype="keep", gate_dtype=None, overwrite=False,
            allow_nonfinite=False, progress=True) -> Path:
    """HF dir -> urm-jax checkpoint, one chunk at a time (never the whole model in memory)."""
    hf_dir = Path(hf_dir)
    check_outputs([("HF_DIR", hf_dir)], [("OUT_DIR", out_dir, "dir")], overwrite=overwrite)
    cfg = ModelConfig.from_hf_dir(hf_dir)
    with HFWeights(hf_dir) as weights:
        return write_checkpoint(weights, cfg, out_dir, dtype=dtype, gate_dtype=gate_dtype,
                                tokenizer_dir=hf_dir, overwrite=overwrite,
                                allow_nonfinite=allow_nonfinite, progress=progress)


def write_checkpoint(weights, cfg: ModelConfig, out_dir, *, dtype="keep", gate_dtype=None,
                     tokenizer_dir=None, overwrite=False, allow_nonfinite=False, progress=True,
                     extra_config: dict | None = None, desc: str = "from_hf") -> Path:
    """Stream `weights` (an HFWeights, or anything answering the same questions) into a urm-jax
    checkpoint: plan and check from the headers, then convert unit by unit (`_stream_from_hf`)."""
    plans = plan_from_hf(weights, cfg, dtype, gate_dtype)
    warn_if_pad_is_eos(cfg, str(weights.dir))
    hf_config = {**cfg.to_hf_dict(**output_dtypes(plans, cfg, gate_dtype)), **(extra_config or {})}
    with checkpoint_writer(out_dir, hf_config, tokenizer_dir=tokenizer_dir,
                           overwrite=overwrite) as writer:
        for plan in plans:
            writer.add(plan.path, plan.shape, np_dtype(plan.out), rows=hf_chunk_rows(plan))
        with plan_progress(desc, plans, progress) as bar:
            _stream_from_hf(weights, plans, lambda plan, start, stop, alloc: writer.chunk(
                plan.path, start, alloc),
                            bar, allow_nonfinite)
    return Path(out_dir)

