"""Measure JAX-vs-HF parity per dtype combination, over seeds, GQA ratios and two model sizes,
and the bf16 noise floor (HF bf16 vs HF fp32), side by side in one run.

    .venv/bin/python bench/parity_bounds.py [--seeds 3]

Relative difference = max |a - b| / max |b| per output over a batch with a row past 4x the RoPE
original context. The tolerances in urm_jax/parity.py are set from this table with headroom.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hf_fixtures import load_reference, make_tiny_urm, reference_outputs  # noqa: E402

from urm_jax.data.tokenization import pad_batch  # noqa: E402
from urm_jax.loading import load_model  # noqa: E402

OUTPUTS = ("reward", "means", "log_stds", "gate")


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def jax_out(path, ids, mask, **kw):
    model, _ = load_model(path, **kw)
    out = model(ids, mask)
    return {k: np.asarray(getattr(out, k), np.float64) for k in OUTPUTS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    shapes = {"tiny (h64, L2)": dict(hidden=64, layers=2, heads=4, intermediate=128),
              "small (h256, L4)": dict(hidden=256, layers=4, heads=8, intermediate=688)}
    combos = [("float32", "float32"), ("float32", "float16"), ("bfloat16", "float16")]
    worst: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name, shape in shapes.items():
            for kv_div in (1, 2, 4):
                for seed in range(args.seeds):
                    rng = np.random.default_rng(seed)
                    rows = [list(rng.integers(4, 511, n)) for n in (173, 40, 7, 100)]
                    ids, mask = pad_batch(rows, pad_id=511)
                    for backbone, gate in combos:
                        path = make_tiny_urm(Path(tmp) / f"{shape_name}-{kv_div}-{seed}-{backbone}-{gate}",
                                             kv_heads=shape["heads"] // kv_div, backbone_dtype=backbone,
                                             gate_dtype=gate, seed=seed, **shape)
                        ref = reference_outputs(load_reference(path), ids, mask)
                        got = jax_out(path, ids, mask)
                        key = (shape_name, backbone, gate)
                        row = worst.setdefault(key, {k: 0.0 for k in OUTPUTS} | {"floor_" + k: 0.0 for k in OUTPUTS}
                                               | {"jaxtruth_" + k: 0.0 for k in OUTPUTS})
                        for k in OUTPUTS:
                            row[k] = max(row[k], rel(got[k], ref[k]))
                        if backbone == "bfloat16":  # how far HF's own bf16 run is from fp32
                            truth = reference_outputs(load_reference(path, dtype=torch.float32), ids, mask)
                            for k in OUTPUTS:
                                row["floor_" + k] = max(row["floor_" + k], rel(ref[k], truth[k]))
                                row["jaxtruth_" + k] = max(row["jaxtruth_" + k], rel(got[k], truth[k]))
    print(f"worst over {args.seeds} seeds x GQA ratios 1, 2, 4; rows of 7..173 tokens (RoPE original 32)")
    print(f"{'shape':<18} {'compute/gate':<18} " + " ".join(f"{k:>10}" for k in OUTPUTS) + "   HF-bf16 vs fp32 | JAX-bf16 vs fp32")
    for (shape_name, backbone, gate), row in worst.items():
        floor = (" ".join(f"{row['floor_' + k]:.1e}" for k in OUTPUTS) + " | "
                 + " ".join(f"{row['jaxtruth_' + k]:.1e}" for k in OUTPUTS)) if backbone == "bfloat16" else "-"
        print(f"{shape_name:<18} {backbone + '/' + gate:<18} " + " ".join(f"{row[k]:10.2e}" for k in OUTPUTS)
              + f"   {floor}")


if __name__ == "__main__":
    main()
