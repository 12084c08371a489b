"""Compare an HF directory with a urm-jax checkpoint tensor by tensor: names, shapes, dtypes and
values bit for bit, one stored chunk at a time (`python -m convert verify`)."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from urm_jax.checkpoint import ParamsReader, load_config
from urm_jax.hf.plan import Plan, check_keys, ckpt_chunk_rows, plan_from_ckpt, row_units, stored_bytes
from urm_jax.hf.safetensors_io import HFWeights
from urm_jax.hf.streams import BufferPool, Progress, ordered_map, readahead


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

    units = row_units(plans, ckpt_chunk_rows(reader))
    work = readahead(units, lambda unit: reader.prefetch(unit[0].path, *unit[1:]))
    for pieces in ordered_map(unit_pieces, work):
        for piece in pieces:
            yield piece
        pool.give(*(value for _, _, value in pieces))  # consumed: recycle



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


def verify(hf_dir, ckpt_dir, *, progress: bool = True, allow_nonfinite: bool = False) -> list[dict]:
    """Compare every tensor of an HF directory with a urm-jax checkpoint: names, shapes, dtypes
    and values bit for bit, streamed one stored chunk at a time. Returns one row per HF tensor;
    raises nothing for a mismatch (the caller decides), but a missing/unexpected tensor or an
    unreadable file raises as usual, and so does a checkpoint chunk holding NaN/Inf unless
    `allow_nonfinite` (then NaN bits compare like any others)."""
    cfg = load_config(ckpt_dir)
    reader = ParamsReader(ckpt_dir, allow_nonfinite=allow_nonfinite)
    plans = plan_from_ckpt(reader, cfg)
    with HFWeights(hf_dir) as weights:
        check_keys(weights, cfg.num_layers)
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


def format_verify(rows: list[dict], show_all: bool = False) -> tuple[list[str], bool]:
    """(report lines, whether every tensor is identical) for `verify`'s rows: one line per
    differing tensor (per tensor with `show_all`), then the count of identical tensors."""
    bad = [r for r in rows if not r["identical"]]
    lines = []
    for r in rows if show_all else bad:
        state = "identical" if r["identical"] else f"DIFFERS (max |diff| {r['max_abs_diff']:.3e})"
        lines.append(f"{r['key']:<55} {str(r['shape']):<16} {r['hf_dtype']:>9} vs "
                     f"{r['ckpt_dtype']:<9} {state}")
    total = sum(math.prod(r["shape"]) for r in rows)
    lines.append(f"{len(rows) - len(bad)}/{len(rows)} tensors identical ({total:,} values)")
    return lines, not bad
