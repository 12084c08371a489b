"""HF <-> JAX conversion, both directions driven by `mapping.TABLE`, streamed.

Every direction works one *unit* at a time: a chunk of rows of one JAX parameter (one layer of a
stacked array, a block of embedding rows, a small tensor whole). from_hf maps the HF tensors a
unit needs from the safetensors files and transposes them into a mapped checkpoint chunk; to_hf
reads one checkpoint chunk and transposes it into its tensors' mapped regions of the shards
(laid out and reserved up front); verify compares chunk by chunk; loading onto devices reads
each device shard's box. A few units run at once on threads (copies and transposes drop the
GIL), so peak memory is a small multiple of the largest unit (one layer of gate_proj, 117 MB in
the 8B model), whatever the model's size. Everything checkable from headers (keys, shapes,
dtypes) is checked before the first byte is written.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from convert.hf_io import HFWeights, SafetensorsWriter, parse_size
from convert.mapping import (IGNORED_HF_KEYS, LAYER_KEY, TABLE, Alloc, Box, Entry, get_path,
                             is_gate, normalize_box, set_path)
from urm_jax.checkpoint import (ParamsReader, checkpoint_writer, chunk_rows, copy_tokenizer_files,
                                load_config)
from urm_jax.config import ModelConfig, canonical_dtype, np_dtype

MODELING_FILE = Path(__file__).with_name("modeling_custom.py")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
EXPONENT_MASKS = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00),
                  "float32": (np.uint32, 0x7F800000)}
# Threads converting units at once; each holds a unit's source and destination mapped and maybe a
# buffer or two, so memory grows with it. URM_CONVERT_THREADS overrides (e.g. 1 on a busy host).
WORKERS = int(os.environ.get("URM_CONVERT_THREADS") or min(4, os.cpu_count() or 1))


class ConversionError(ValueError):
    pass


def jax_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """JAX shape of every table entry, from the model's own parameter declarations."""
    from urm_jax.model.urm import abstract_model
    from flax import nnx

    tree = nnx.state(abstract_model(cfg)).to_pure_dict()
    return {e.path: tuple(get_path(tree, e.path).shape) for e in TABLE}


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
        return self.entry.path

    def hf_keys(self) -> list[str]:
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
        shape = self.entry.hf_shape(self.shape)
        return [(key, self.out, shape) for key in self.hf_keys()]


def stored_bytes(plans: list[Plan]) -> int:
    return sum(math.prod(p.shape) * np_dtype(p.stored).itemsize for p in plans)


def output_dtypes(plans: list[Plan]) -> dict:
    """{'torch_dtype', 'gate_dtype'} an output config.json records: what is actually stored."""
    def pick(gate: bool) -> str:
        names = {p.out for p in plans if is_gate(p.entry) == gate}
        return "float32" if "float32" in names else sorted(names)[0]

    return {"torch_dtype": pick(False), "gate_dtype": pick(True)}


# ------------------------------------------------------------------------------------------------
# plumbing: parallel units with bounded memory, progress


def ordered_map(fn: Callable, items: Iterable, workers: int = WORKERS) -> Iterator:
    """`map(fn, items)` on `workers` threads, results in order, at most workers + 1 items started
    and not yet consumed (so memory stays bounded). An error cancels what has not started and is
    raised once the running items finish (they may write into a temporary directory)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def readahead(units: list, prefetch: Callable, ahead: int = 2) -> Iterator:
    """Yield `units`, calling `prefetch` on the unit `ahead` places further as each is handed
    out: the kernel reads the next inputs into the page cache while threads work on this one,
    so the disk streams the way it does for `cp`."""
    for unit in units[:ahead]:
        prefetch(unit)
    for i, unit in enumerate(units):
        if i + ahead < len(units):
            prefetch(units[i + ahead])
        yield unit


class BufferPool:
    """Recycled big buffers. A fresh 100 MB numpy array costs more to fault in (the kernel zeroes
    every page) than to fill from disk: profiling from_hf showed 40% of its CPU there. Units take
    their read and transpose buffers here and give them back when the data is written; the pool
    holds at most what was in flight at once."""

    def __init__(self):
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape, dtype) -> np.ndarray:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        with self._lock:  # the smallest free block that fits (by identity: no array ==)
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            best = min(fits, key=lambda i: self._free[i].nbytes, default=None)
            block = None if best is None else self._free.pop(best)
        if block is None:
            block = np.empty(max(nbytes, 1), np.uint8)
        return block[:nbytes].view(dtype).reshape(shape)

    def give(self, *arrays: np.ndarray) -> None:
        """Return buffers from `take` (arrays not from the pool are ignored)."""
        with self._lock:
            for array in arrays:
                block = array.base
                if (isinstance(block, np.ndarray) and block.dtype == np.uint8 and block.ndim == 1
                        and block.flags.owndata and all(b is not block for b in self._free)):
                    self._free.append(block)


class Progress:
    """A tqdm bar in bytes (so it shows MB/s) with a tensors counter."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool):
        self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=not enabled, file=sys.stderr, dynamic_ncols=True)
        self.tensors, self.total = 0.0, total_tensors

    def update(self, nbytes: int, tensors: float) -> None:
        self.tensors += tensors
        self.bar.set_postfix_str(f"{round(self.tensors)}/{self.total} tensors", refresh=False)
        self.bar.update(nbytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


# ------------------------------------------------------------------------------------------------
# HF side


def _check_keys(weights: HFWeights, num_layers: int) -> None:
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
    _check_keys(weights, cfg.num_layers)
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


def _check_finite(values: np.ndarray, what: str) -> None:
    """NaN/Inf test on the bits: |x| as an integer reaches the all-ones exponent. A block at a
    time through one small scratch buffer (cache-resident, no float32 copy of a 1 GB embedding;
    numpy's isfinite on bfloat16 runs at a tenth of the speed)."""
    uint, exponent = EXPONENT_MASKS[values.dtype.name]
    magnitude = np.iinfo(uint).max >> 1
    bits = values.reshape(-1).view(uint)
    scratch = np.empty(max(1, min(bits.size, 1 << 20)), uint)
    for start in range(0, bits.size, scratch.size):
        block = bits[start:start + scratch.size]
        if np.bitwise_and(block, magnitude, out=scratch[:block.size]).max() >= exponent:
            raise ConversionError(f"{what} holds NaN or Inf (pass --allow-nonfinite to convert "
                                  "it anyway)")


def read_box(weights: HFWeights, plan: Plan, box: Box, allow_nonfinite: bool = False,
             alloc: Alloc = np.empty) -> np.ndarray:
    """The values of JAX box `box` of a parameter, in `plan.out`, reading only the HF tensors
    (and, where the layout allows, only the rows) it covers. Buffers come from `alloc`."""
    def rows_of(key: str):
        def read(start: int, stop: int) -> np.ndarray:
            values = weights.read(key, (start, stop), alloc)
            if not allow_nonfinite:
                _check_finite(values, f"{weights.where(key)}: tensor {key}")
            return values
        return read

    entry, out = plan.entry, np_dtype(plan.out)
    if not entry.stacked:
        return np.asarray(entry.to_jax_box(rows_of(entry.hf_key), plan.shape, box, alloc)).astype(
            out, copy=False)
    layers = range(box[0].start, box[0].stop)
    parts = (entry.to_jax_box(rows_of(key), plan.shape[1:], box[1:], alloc)
             for key in entry.hf_keys(layers))
    if len(layers) == 1:  # one layer: no extra copy into a stacked buffer
        return np.asarray(next(parts))[None].astype(out, copy=False)
    block = np.empty((len(layers), *(s.stop - s.start for s in box[1:])), out)
    for k, part in enumerate(parts):
        block[k] = part
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
                _check_finite(src, f"{weights.where(key)}: tensor {key}")
            entry.to_jax_into(src, dst, alloc)


def _into_shaped(out: np.ndarray) -> Alloc:
    """An Alloc handing out `out` under another shape of the same size (HF and JAX shapes of an
    untransposed tensor differ only by reshape)."""
    return lambda shape, dtype: out.reshape(shape)


def _pooled(pool: BufferPool, fn: Callable) -> Callable:
    """fn(unit, alloc) with buffers taken from `pool` for the call and given back after it."""
    def run(unit):
        taken: list[np.ndarray] = []

        def alloc(shape, dtype):
            taken.append(pool.take(shape, dtype))
            return taken[-1]
        try:
            return fn(unit, alloc)
        finally:
            pool.give(*taken)
    return run


def _row_units(plans: list[Plan], rows_of: Callable[[Plan], int]) -> list[tuple[Plan, int, int]]:
    return [(p, start, min(start + rows_of(p), p.shape[0]))
            for p in plans for start in range(0, p.shape[0], rows_of(p))]


def _unit_progress(plan: Plan, start: int, stop: int,
                   itemsize: int | None = None) -> tuple[int, float]:
    """(bytes, HF tensors) a unit of rows accounts for (bytes at `itemsize`, default stored)."""
    itemsize = itemsize or np_dtype(plan.stored).itemsize
    nbytes = (stop - start) * math.prod(plan.shape[1:]) * itemsize
    return nbytes, (stop - start) if plan.entry.stacked else (stop - start) / plan.shape[0]


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


def _hf_chunk_rows(plan: Plan) -> int:
    if plan.whole:
        return plan.shape[0]
    return chunk_rows(plan.shape, np_dtype(plan.out), plan.entry.stacked)


def _progress(desc: str, plans: list[Plan], enabled: bool) -> Progress:
    return Progress(desc, stored_bytes(plans), sum(len(p.hf_keys()) for p in plans), enabled)


def _stream_from_hf(weights, plans: list[Plan], destination: Callable, bar: Progress,
                    allow_nonfinite: bool) -> None:
    """Fill every parameter from its HF tensors, unit by unit on a few threads, each unit's
    inputs prefetched while earlier ones are transposed. `destination(plan, start)` is a context
    manager giving the array for the unit's rows (a slice of a host array, a checkpoint chunk)."""
    def convert(unit, alloc):
        plan, start, stop = unit
        with destination(plan, start, stop) as out:
            fill_rows(weights, plan, start, stop, out, allow_nonfinite, alloc)
        return _unit_progress(*unit)

    units = readahead(_row_units(plans, _hf_chunk_rows), _hf_prefetch(weights))
    for done in ordered_map(_pooled(BufferPool(), convert), units):
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
    with _progress("load", plans, progress) as bar:
        if shardings is None:
            for plan in plans:
                set_path(params, plan.path, np.empty(plan.shape, np_dtype(plan.out)))
            _stream_from_hf(weights, plans, lambda plan, start, stop: contextlib.nullcontext(
                get_path(params, plan.path)[start:stop]), bar, allow_nonfinite)
            return params
        for plan in plans:
            set_path(params, plan.path, _device_array(weights, plan, get_path(shardings, plan.path),
                                                      allow_nonfinite, bar))
    return params


def _device_array(weights: HFWeights, plan: Plan, sharding, allow_nonfinite: bool, bar: Progress):
    import jax

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
    hf_config = {**cfg.to_hf_dict(**output_dtypes(plans)), **(extra_config or {})}
    with checkpoint_writer(out_dir, hf_config, tokenizer_dir=tokenizer_dir,
                           overwrite=overwrite) as writer:
        for plan in plans:
            writer.add(plan.path, plan.shape, np_dtype(plan.out), rows=_hf_chunk_rows(plan))
        with _progress(desc, plans, progress) as bar:
            _stream_from_hf(weights, plans, lambda plan, start, stop: writer.chunk(plan.path, start),
                            bar, allow_nonfinite)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------------
# checkpoint side


def plan_from_ckpt(reader: ParamsReader, cfg: ModelConfig, dtype: str = "keep",
                   gate_dtype: str | None = None) -> list[Plan]:
    plans = []
    for entry, shape in zip(TABLE, jax_shapes(cfg).values()):
        got = reader.shape(entry.path)
        if got != shape:
            raise ConversionError(f"parameter {entry.jax_name} has shape {list(got)}, "
                                  f"config.json implies {list(shape)}")
        stored = canonical_dtype(reader.dtype(entry.path).name)
        plans.append(Plan(entry, shape, stored, target_dtype(entry, stored, dtype, gate_dtype)))
    return plans


def _ckpt_chunk_rows(reader: ParamsReader) -> Callable[[Plan], int]:
    def rows(plan: Plan) -> int:
        if plan.whole:
            return plan.shape[0]
        return reader.chunk_rows(plan.path)  # aligned with storage: each chunk read once
    return rows


def ckpt_pieces(reader: ParamsReader, plans: list[Plan]) -> Iterator[tuple[str, int, np.ndarray]]:
    """(HF key, first HF row, HF-layout values in the stored dtype) in table order, one stored
    chunk read at a time on worker threads; a key comes whole or in consecutive row pieces. A
    piece's buffer is recycled once the consumer asks for the next one: use it (or copy it)
    before."""
    pool = BufferPool()

    def unit_pieces(unit):
        plan, start, stop = unit
        block = reader.read(plan.path, start, stop, pool.take)
        tensors = plan.unit_tensors(start, stop, block)
        if plan.entry.n_in is None:  # no transpose: the block itself holds the pieces
            return [(key, 0 if plan.entry.stacked else start, value) for key, value in tensors]
        pieces = [(key, 0, plan.entry.to_hf(value, pool.take)) for key, value in tensors]
        pool.give(block)  # transposed out of: each pooled buffer is given back exactly once
        return pieces

    units = _row_units(plans, _ckpt_chunk_rows(reader))
    work = readahead(units, lambda unit: reader.prefetch(unit[0].path, *unit[1:]))
    for pieces in ordered_map(unit_pieces, work):
        for piece in pieces:
            yield piece
        pool.give(*(value for _, _, value in pieces))  # consumed: recycle


def to_hf(ckpt_dir, out_dir, *, dtype="keep", gate_dtype=None, max_shard_size="5GB",
          overwrite=False, progress=True) -> Path:
    """urm-jax checkpoint -> HF dir. Shard files are laid out and reserved first; then each
    stored chunk is read (one per thread at a time) and written, transposed, into its tensors'
    mapped regions of the shards, in any order."""
    from urm_jax.io_utils import atomic_dir

    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    reader = ParamsReader(ckpt_dir)
    plans = plan_from_ckpt(reader, cfg, dtype, gate_dtype)
    limit = parse_size(max_shard_size)
    specs = [spec for plan in plans for spec in plan.hf_specs()]

    def export(unit, alloc):
        plan, start, stop = unit
        entry = plan.entry
        if not entry.stacked and entry.n_in is None:  # rows of one tensor, untransposed
            with writer.region(entry.hf_key, start, stop - start) as out:
                same = out.dtype == reader.dtype(plan.path)
                rows = reader.read(plan.path, start, stop, _into_shaped(out) if same else alloc)
                if not same:
                    np.copyto(out, rows, casting="unsafe")
        else:
            block = reader.read(plan.path, start, stop, alloc)
            for key, value in plan.unit_tensors(start, stop, block):
                with writer.region(key) as out:
                    entry.to_hf_into(value, out, alloc)
        return _unit_progress(plan, start, stop, np_dtype(plan.out).itemsize)

    units = _row_units(plans, _ckpt_chunk_rows(reader))
    total = sum(math.prod(shape) * np_dtype(d).itemsize for _, d, shape in specs)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = SafetensorsWriter(tmp, specs, limit)
        writer.create()
        with Progress("to_hf", total, len(specs), progress) as bar:
            work = readahead(units, lambda unit: reader.prefetch(unit[0].path, *unit[1:]))
            for done in ordered_map(_pooled(BufferPool(), export), work):
                bar.update(*done)
        writer.finish()
        hf = cfg.to_hf_dict(**output_dtypes(plans))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        shutil.copy2(MODELING_FILE, tmp / "modeling_custom.py")
        copy_tokenizer_files(ckpt_dir, tmp)
    return Path(out_dir)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaN payloads and -0.0 included), a block at a time."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize]
    a, b, block = a.reshape(-1).view(uint), b.reshape(-1).view(uint), 1 << 22
    return all(np.array_equal(a[i:i + block], b[i:i + block]) for i in range(0, a.size, block))


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b, worst, block = a.reshape(-1), b.reshape(-1), 0.0, 1 << 22
    for start in range(0, a.size, block):  # float64 temporaries a block at a time
        part = slice(start, start + block)
        d = np.abs(a[part].astype(np.float64) - b[part].astype(np.float64))
        worst = max(worst, float(np.max(d, initial=0.0)))
    return worst


def verify(hf_dir, ckpt_dir, *, progress: bool = True) -> list[dict]:
    """Compare every tensor of an HF directory with a urm-jax checkpoint: names, shapes, dtypes
    and values bit for bit, streamed one stored chunk at a time. Returns one row per HF tensor;
    raises nothing for a mismatch (the caller decides), but a missing/unexpected tensor or an
    unreadable file raises as usual."""
    cfg = load_config(ckpt_dir)
    reader = ParamsReader(ckpt_dir)
    plans = plan_from_ckpt(reader, cfg)
    with HFWeights(hf_dir) as weights:
        _check_keys(weights, cfg.num_layers)
        rows: dict[str, dict] = {}
        for key, ckpt_dtype, shape in (s for p in plans for s in p.hf_specs()):
            rows[key] = {"key": key, "shape": list(weights.shape(key)), "hf_dtype": weights.dtype(key),
                         "ckpt_dtype": ckpt_dtype, "identical": weights.shape(key) == shape,
                         "max_abs_diff": 0.0 if weights.shape(key) == shape else float("nan")}
        comparable = [p for p in plans if all(rows[k]["identical"] for k in p.hf_keys())]
        with Progress("verify", stored_bytes(comparable), len(rows), progress) as bar:
            pieces = ckpt_pieces(reader, comparable)
            try:
                for key, start, ours in pieces:
                    span = (start, start + ours.shape[0]) if ours.ndim else None
                    with weights.view(key, span) as theirs:  # mapped: compared in place
                        same = _same_bits(ours, theirs)
                        row = rows[key]
                        if not same:
                            row["max_abs_diff"] = max(row["max_abs_diff"], _max_abs_diff(ours, theirs))
                    row["identical"] &= same
                    bar.update(ours.nbytes, ours.shape[0] / weights.shape(key)[0] if ours.ndim else 1)
            finally:
                pieces.close()
    return list(rows.values())
