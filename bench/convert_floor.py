"""What each guarantee of `convert` costs next to `cp -r`: the same conversion with its work taken
away step by step, as whole processes, interleaved, warm page cache.

    .venv/bin/python bench/convert_floor.py [--rounds 5] [--layers 16] [--workdir build/convert_floor]

The ~1B bf16 HF checkpoint of `compare.py --only convert` (hidden 2048, 16 layers, vocab 128256).
Variants of `python -m convert from_hf` and `to_hf`, each a fresh process that patches the
library before running the real command line (`convert.__main__.main`):

    full            the command as shipped
    -transpose      kernels copied (memcpy) instead of transposed: the output is WRONG; this is
                    what storing kernels in HF's [out, in] orientation would leave
    -fsync          ... and no fsync before the atomic rename (os.fsync a no-op): not durable
    -checks         ... and no finiteness check, no per-chunk checksum (written or verified)

against `cp -r` (copy_file_range: the kernel copies page cache to page cache, no fsync, no
check) and `cp -r` followed by an fsync of every copied file (`sync FILE...`). Every command
starts after a `sync` (untimed): without it, one that leaves its output unwritten (cp, the
-fsync variants) hands its write-back to the next. The rows show
how far from `cp` the conversion could get if each guarantee were dropped; none of the
stripped variants is a usable converter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import random_checkpoint  # noqa: E402
from bench.peers.worker import REPO, run_process  # noqa: E402

LEVELS = ("full", "-transpose", "-fsync", "-checks")

# Runs in the child: strip the work named by URM_FLOOR (a level of LEVELS, cumulative), then run
# the real command line.
CHILD = r"""
import os, sys
import numpy as np
level = ("full", "-transpose", "-fsync", "-checks").index(os.environ["URM_FLOOR"])
if level >= 1:
    import urm_jax.hf.mapping as mapping
    def copy_not_transpose(a, alloc=np.empty):
        out = alloc(a.shape[::-1], a.dtype)
        np.copyto(out.reshape(-1), a.reshape(-1))
        return out
    mapping.transpose2d = copy_not_transpose
if level >= 2:
    os.fsync = lambda fd: None
if level >= 3:
    import urm_jax.checkpoint as checkpoint, urm_jax.hf.load as load
    load.check_finite = checkpoint.check_finite = lambda *a, **k: None
    checkpoint.chunk_digest = lambda data: "0" * 16
    checkpoint.ParamsReader._check_digest = lambda self, meta, first, data, file: None
from convert.__main__ import main
sys.exit(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--workdir", default="build/convert_floor")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = random_checkpoint(work / "hf", dtype="bfloat16", gate_dtype="float16", vocab_size=128256,
                            hidden_size=2048, intermediate_size=5632, num_layers=args.layers,
                            num_heads=16, num_kv_heads=8)
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    ckpt = work / "ckpt"
    env = {"PYTHONPATH": str(REPO)}
    if run_process([sys.executable, "-m", "convert", "from_hf", str(src), str(ckpt), "--overwrite"],
                   env=env)["returncode"]:
        raise SystemExit("error: the source conversion failed")
    out = work / "out"

    def copy_and_sync(dst: Path) -> list[str]:
        return ["sh", "-c", 'cp -r "$1" "$2" && find "$2" -type f -exec sync {} +', "sh", str(src), str(dst)]

    commands = {"cp -r": lambda dst: ["cp", "-r", str(src), str(dst)], "cp -r + fsync": copy_and_sync}
    for direction, source in (("from_hf", src), ("to_hf", ckpt)):
        for level in LEVELS:
            commands[f"{direction} {level}"] = (
                lambda dst, d=direction, s=source: [sys.executable, "-c", CHILD, d, str(s), str(dst)])
    levels = {name: name.split(" ", 1)[1] for name in commands if name.startswith(("from_hf", "to_hf"))}
    results: dict[str, list[dict]] = {name: [] for name in commands}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        names = list(commands) if r % 2 == 0 else list(commands)[::-1]
        for name in names:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # untimed: no command pays the write-back of the one before (cp never fsyncs)
            got = run_process(commands[name](out), env=dict(env, URM_FLOOR=levels.get(name, "full")),
                              log=work / "floor.log")
            if got["returncode"]:
                raise SystemExit(f"error: {name} failed (exit {got['returncode']}); see {work / 'floor.log'}")
            results[name].append(got)
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.rounds} done, load {load[-1]:.1f}", file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)

    cp = statistics.median(g["wall_s"] for g in results["cp -r"])
    print(f"\n### What each guarantee of `convert` costs, {size / 1e9:.2f} GB bf16, warm page cache, "
          f"medians of {args.rounds} interleaved rounds; {os.cpu_count()} cores, load average "
          f"{min(load):.1f}-{max(load):.1f}\n")
    print("| command | wall s | CPU s | wall / cp -r |\n|---|---|---|---|")
    for name, gs in results.items():
        wall = statistics.median(g["wall_s"] for g in gs)
        cpu = statistics.median(g["cpu_s"] for g in gs)
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / cp:.2f}x |")


if __name__ == "__main__":
    main()
