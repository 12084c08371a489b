"""Conversion at the real 8B shape: time and peak memory of `cp`, `convert from_hf` and
`convert to_hf` on the same bytes, and a bit-exact round trip (`convert verify`).

    .venv/bin/python bench/convert_8b.py [--work DIR] [--layers N] [--keep] [--with-init]

Writes an 8B-shaped HF checkpoint (the real key names and shapes, random bf16 backbone + fp16
gate, 4 shards, `synthetic.write_random_hf(fill="fast")`), then runs each step as its own process
under `/usr/bin/time -v` (peak RSS; getrusage of the child where that tool is missing), after a
`sync` and, when permitted, dropping the page cache so every step starts cold. Each artefact is
deleted as soon as it has been measured. Needs about 3x the model's size free on --work (source +
checkpoint + export); it checks first and says so if short. `--layers 2` is a quick dry run.

Targets (issue #4): peak RSS <= 2.5 GB per direction; each direction within 1.5x of `cp`;
round trip bit-exact. Results go to stdout and to WORK/convert_8b.json; exit 0 when all met.
`--with-init` then also times `convert init` (stage-1 start) from an 8B-shaped Skywork-like base
(backbone + score [1, 4096], no gate) once the other artefacts are gone, with its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9


def real_8b_config(layers: int) -> dict:
    from urm_jax.hf.synthetic import llama3_hf_config

    return llama3_hf_config(hidden_size=4096, intermediate_size=14336, num_layers=layers,
                            num_heads=32, num_kv_heads=8, rope_theta=500000.0)


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(name: str, argv: list[str], cold: bool, check: bool = True) -> dict:
    """Run argv as a child; wall seconds, peak RSS (bytes) and the time a following sync takes
    (cp and the converters both leave dirty pages; the sync shows what was still unwritten)."""
    dropped = drop_caches() if cold else False
    gnu_time = Path("/usr/bin/time")
    full = [str(gnu_time), "-v", *argv] if gnu_time.exists() else argv
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(full, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["sync"], check=True)
    sync = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if match:
        rss = int(match.group(1)) * 1024
    else:  # RUSAGE_CHILDREN is the max over all children so far: only trust it if it grew
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        rss = rss if rss > before * 1024 else float("nan")
    cpu = {key: float(m.group(1)) for key, pattern in (("user_s", r"User time \(seconds\): ([\d.]+)"),
                                                       ("sys_s", r"System time \(seconds\): ([\d.]+)"))
           if (m := re.search(pattern, proc.stderr))}
    row = {"step": name, "wall_s": round(wall, 2), "sync_after_s": round(sync, 2),
           "peak_rss_gb": round(rss / GB, 3), **cpu, "cold_cache": dropped, "rc": proc.returncode,
           "load_avg_1m": os.getloadavg()[0]}
    print(f"{name:<16} {wall:8.2f} s  (+ sync {sync:5.2f} s)  peak RSS {rss / GB:6.3f} GB  "
          f"cpu {cpu.get('user_s', 0):.1f} user + {cpu.get('sys_s', 0):.1f} sys  "
          f"load {os.getloadavg()[0]:.1f}  rc {proc.returncode}", flush=True)
    if proc.stdout.strip():
        print("    " + proc.stdout.strip().splitlines()[-1])
    return row


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(REPO.parent / "convert_bench"),
                        help="scratch directory (needs ~3x the model size free)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: the real 8B)")
    parser.add_argument("--keep", action="store_true", help="keep the artefacts")
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache")
    parser.add_argument("--with-init", action="store_true",
                        help="also time `convert init` from a Skywork-like base of the same shape")
    args = parser.parse_args()

    from urm_jax.hf.plan import jax_shapes
    from urm_jax.hf.mapping import TABLE, is_gate
    from urm_jax.hf.synthetic import write_random_hf
    from urm_jax.config import ModelConfig

    hf_cfg = real_8b_config(args.layers)
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    shapes = jax_shapes(cfg)
    params = sum(math.prod(shapes[e.path]) for e in TABLE)
    model_bytes = sum(math.prod(shapes[e.path]) * 2 for e in TABLE)  # bf16 backbone, fp16 gate
    largest = max(math.prod(e.hf_shape(shapes[e.path])) * 2 for e in TABLE)
    print(f"model: {args.layers} layers, {params:,} parameters, {model_bytes / GB:.2f} GB; "
          f"largest HF tensor {largest / GB:.3f} GB; gate "
          f"{sum(math.prod(shapes[e.path]) for e in TABLE if is_gate(e)):,} parameters")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    need = 3.1 * model_bytes
    print(f"free on {work}: {free / GB:.1f} GB, need ~{need / GB:.1f} GB")
    if free < need:
        print(f"NOT ENOUGH DISK: {free / GB:.1f} GB free on {work}, need ~{need / GB:.1f} GB "
              "(source + checkpoint + export); pass --work on a bigger disk or --layers N")
        return 3
    src, copy, ckpt, export = (work / n for n in ("hf_src", "cp_copy", "ckpt", "hf_export"))
    for path in (src, copy, ckpt, export):
        shutil.rmtree(path, ignore_errors=True)

    results: dict = {"layers": args.layers, "parameters": params,
                     "model_gb": round(model_bytes / GB, 3), "largest_tensor_gb": round(largest / GB, 3),
                     "cpu_count": os.cpu_count(), "steps": []}
    try:
        start = time.perf_counter()
        # greedy packing: each full shard holds > limit - largest, so this gives exactly 4
        shard = math.ceil((model_bytes / 4 + largest) / 1e6)  # MB
        write_random_hf(src, hf_cfg, dtype="bfloat16", gate_dtype="float16", seed=0,
                        max_shard_size=f"{shard}MB", fill="fast", progress=False)
        shards = sorted(p.name for p in src.glob("*.safetensors"))
        results["generate_s"] = round(time.perf_counter() - start, 1)
        results["source_bytes"] = dir_bytes(src)
        print(f"generated {len(shards)} shards, {results['source_bytes'] / GB:.2f} GB in "
              f"{results['generate_s']} s")

        cold = not args.warm
        steps = results["steps"]
        steps.append(timed("cp", ["cp", "-r", str(src), str(copy)], cold))
        shutil.rmtree(copy)
        python = [sys.executable, "-m", "convert"]
        steps.append(timed("from_hf", [*python, "from_hf", str(src), str(ckpt)], cold))
        results["ckpt_bytes"] = dir_bytes(ckpt)
        steps.append(timed("to_hf", [*python, "to_hf", str(ckpt), str(export),
                                     "--max-shard-size", f"{shard}MB"], cold))
        results["export_shards"] = sorted(p.name for p in export.glob("*.safetensors"))
        # verify exits 0 only when every tensor is identical (names, shapes, dtypes, bits)
        steps.append(timed("verify src", [*python, "verify", str(src), str(ckpt)], cold, False))
        steps.append(timed("verify export", [*python, "verify", str(export), str(ckpt)], cold, False))
        if args.with_init:
            base, start = work / "base_src", work / "urm_init"
            for path in (src, copy, ckpt, export, base, start):
                shutil.rmtree(path, ignore_errors=True)
            write_random_hf(base, hf_cfg, dtype="bfloat16", seed=1, max_shard_size=f"{shard}MB",
                            fill="fast", progress=False, heads="base")
            steps.append(timed("init", [*python, "init", str(base), str(start)], cold))
            results["init_bytes"] = dir_bytes(start)
    finally:
        if not args.keep:
            for path in (src, copy, ckpt, export, work / "base_src", work / "urm_init"):
                shutil.rmtree(path, ignore_errors=True)

    by = {row["step"]: row for row in results["steps"]}
    cp = by["cp"]["wall_s"]
    summary = {
        "from_hf_over_cp": round(by["from_hf"]["wall_s"] / cp, 2),
        "to_hf_over_cp": round(by["to_hf"]["wall_s"] / cp, 2),
        "from_hf_over_cp_with_sync": round((by["from_hf"]["wall_s"] + by["from_hf"]["sync_after_s"])
                                           / (cp + by["cp"]["sync_after_s"]), 2),
        "to_hf_over_cp_with_sync": round((by["to_hf"]["wall_s"] + by["to_hf"]["sync_after_s"])
                                         / (cp + by["cp"]["sync_after_s"]), 2),
        "peak_rss_gb": {k: by[k]["peak_rss_gb"] for k in by},
        "round_trip_bit_exact": by["verify src"]["rc"] == 0 and by["verify export"]["rc"] == 0,
    }
    summary["targets_met"] = {
        "rss<=2.5GB": all(by[k]["peak_rss_gb"] <= 2.5 for k in ("from_hf", "to_hf", "init") if k in by),
        "from_hf<=1.5x cp": summary["from_hf_over_cp"] <= 1.5,
        "to_hf<=1.5x cp": summary["to_hf_over_cp"] <= 1.5,
        "bit_exact": summary["round_trip_bit_exact"],
    }
    results["summary"] = summary
    text = json.dumps(results, indent=2)
    print(text)
    (work / "convert_8b.json").write_text(text + "\n")
    return 0 if all(summary["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
