"""What the per-chunk checksums of a urm-jax checkpoint cost: `convert from_hf` (digests written),
`convert to_hf` and `load_params` (digests checked) with and without them, on one checkpoint of a
few hundred MB, interleaved repetitions, warm page cache (the checksum is CPU work on bytes a
conversion touches anyway; a cold disk only makes the ratio smaller).

    .venv/bin/python bench/checksum_cost.py [--work DIR] [--reps 5] [--layers 8]

"Without" is the same code with the digest function replaced by a constant (writing) or a marker
without `checksums` (reading: what an older checkpoint looks like). Prints median seconds per
step, the ratio with/without, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="build/checksum_cost")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    from urm_jax import checkpoint
    from urm_jax.hf.export import to_hf
    from urm_jax.hf.load import from_hf
    from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    cfg = tiny_hf_config(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_layers=args.layers, num_heads=16, num_kv_heads=8)
    hf = write_random_hf(work / "hf", cfg, dtype="float32", gate_dtype="float32", progress=False,
                         fill="fast")
    size = sum(f.stat().st_size for f in hf.iterdir() if f.suffix == ".safetensors")
    real_digest = checkpoint.chunk_digest

    def strip(ckpt: Path) -> None:  # an older checkpoint: no checksums in its marker
        marker = json.loads((ckpt / checkpoint.MARKER).read_text())
        marker.pop("checksums", None)
        (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))

    times: dict[str, list[float]] = {k: [] for k in (
        "from_hf with", "from_hf without", "to_hf with", "to_hf without", "load with", "load without")}
    for rep in range(args.reps):
        for mode in ("with", "without") if rep % 2 == 0 else ("without", "with"):
            checkpoint.chunk_digest = real_digest if mode == "with" else (lambda data: "0")
            ckpt = work / f"ckpt-{mode}"
            shutil.rmtree(ckpt, ignore_errors=True)
            t = time.perf_counter()
            from_hf(hf, ckpt, progress=False)
            times[f"from_hf {mode}"].append(time.perf_counter() - t)
            checkpoint.chunk_digest = real_digest
            if mode == "without":
                strip(ckpt)
            out = work / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            to_hf(ckpt, out, progress=False)
            times[f"to_hf {mode}"].append(time.perf_counter() - t)
            t = time.perf_counter()
            checkpoint.load_params(ckpt)
            times[f"load {mode}"].append(time.perf_counter() - t)
    print(f"checkpoint {size / 1e6:.0f} MB (float32), {args.reps} interleaved reps, "
          f"load average {os.getloadavg()[0]:.1f}")
    for step in ("from_hf", "to_hf", "load"):
        with_, without = (statistics.median(times[f"{step} {m}"]) for m in ("with", "without"))
        print(f"{step:<8} with {with_:6.3f} s  without {without:6.3f} s  ratio {with_ / without:5.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
