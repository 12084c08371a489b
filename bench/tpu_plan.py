"""The TPU compiler's memory per chip for recipes and their variants, compiled on this CPU host
(`urm_jax.plan`), one case at a time, each in a fresh process, each result appended to a JSON
lines file as soon as it finishes (a 20-minute compile is never lost), then a Markdown table.

    # needs libtpu: pip install 'jax[tpu]==0.10.2' (a separate venv, see urm_jax/plan.py)
    nice -n 10 python bench/tpu_plan.py --out bench/tpu_plan_results.jsonl \\
        --case "configs/hardware/v5p-8.yaml" --case "configs/hardware/v6e-8.yaml remat=dots" \\
        [--layers 2] [--topology v5p:2x2x1]
    python bench/tpu_plan.py --out bench/tpu_plan_results.jsonl --report   # the table

A case is a recipe and `key=value` overrides. `--layers N` compiles the model with N decoder
layers instead of its own (the 8B at 2 and 4 layers compiles in minutes instead of ~20): every
per-chip term is affine in the layer count (stacked weights, their gradients and moments, the
saved residuals), so two depths give the 32-layer figure; `--report` prints that extrapolation
next to the full compiles. Records hold the compiler's arguments, outputs, aliases, temporaries
and total per program, the estimate, the compile time and the load average (compile times on a
shared 2-core host vary 2x with the load).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def run_one(case: str, layers: int | None, topology: str | None) -> dict:
    """Compile one case in this process and return its record."""
    from urm_jax.plan import compiler_versions, plan, use_cpu_host

    use_cpu_host()
    from urm_jax.memory import model_config_for_plan
    from urm_jax.train.config import load_train_config, to_dict

    words = shlex.split(case)
    recipe, overrides = words[0], words[1:]
    train = load_train_config(ROOT / recipe, overrides, runnable=False)
    cfg = model_config_for_plan(train)
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=layers)
    topo = topology or train.plan.topology
    start = time.time()
    result = plan(cfg, train, topo)
    # The resolved config: a recipe file may change later, the record must keep meaning this run.
    return {"case": case, "recipe": recipe, "overrides": overrides, "layers": cfg.num_layers,
            "grad_accum": train.grad_accum, "config": to_dict(train), **result.to_dict(),
            "wall_seconds": round(time.time() - start, 1), "loadavg": os.getloadavg(),
            "compiler": compiler_versions(result.chip),
            "host": f"{platform.node()} {os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def peak(record: dict) -> dict:
    """The program needing the most memory; a refused one (it did not fit) counts as the peak."""
    return max(record["programs"], key=lambda p: float("inf") if "refused" in p else p["total"])


def extrapolated(records: list[dict]) -> dict[tuple, dict]:
    """(case, topology) -> the 32-layer figures, from the two shallowest depths compiled."""
    by_case: dict[tuple, dict[int, dict]] = {}
    for r in records:
        by_case.setdefault((r["case"], r["topology"]), {})[r["layers"]] = r
    out = {}
    for key, depths in by_case.items():
        shallow = sorted(d for d in depths if d < 32)[:2]
        if len(shallow) < 2:
            continue
        (l1, r1), (l2, r2) = ((d, depths[d]) for d in shallow)
        p1, p2 = peak(r1), peak(r2)
        line = {k: p1[k] + (p2[k] - p1[k]) * (32 - l1) / (l2 - l1)
                for k in ("arguments", "outputs", "aliases", "temporaries", "total")}
        out[key] = {"from": shallow, **line}
    return out


def calibrated(record: dict) -> int:
    """The estimate for the record's config by the estimator as it is now (the record's own
    `estimate` is the one at compile time)."""
    from urm_jax.memory import estimate, model_config_for_plan
    from urm_jax.plan import PLATFORMS
    from urm_jax.train.config import config_from_dict

    train = config_from_dict(record["config"])
    cfg = dataclasses.replace(model_config_for_plan(train), num_layers=record["layers"])
    return estimate(cfg, train, mesh_shape=tuple(record["mesh"]), num_devices=record["chips"],
                    platform=PLATFORMS[record["chip"]])["total"]


def report(records: list[dict]) -> str:
    lines = ["| case | topology | layers | program | arguments | outputs | aliases | temporaries | "
             "compiled total | estimate then | estimate now | now/compiled | HBM free | compile s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        then, now = r["estimate"]["total"], calibrated(r)
        for p in r["programs"]:
            if "refused" in p:
                lines.append(f"| `{r['case']}` | {r['topology']} | {r['layers']} | {p['name']} | refused by the "
                             f"compiler: {p['refused']} | | | | | {then / GB:.2f} | {now / GB:.2f} | | no | "
                             f"{p['compile_seconds']:.0f} | {r['loadavg'][0]:.1f} |")
                continue
            ratio = f"{now / p['total']:.3f}" if p is peak(r) else ""
            lines.append(
                f"| `{r['case']}` | {r['topology']} | {r['layers']} | {p['name']} | {p['arguments'] / GB:.2f} | "
                f"{p['outputs'] / GB:.2f} | {p['aliases'] / GB:.2f} | {p['temporaries'] / GB:.2f} | "
                f"{p['total'] / GB:.2f} | {then / GB:.2f} | {now / GB:.2f} | {ratio} | {1 - p['total'] / r['hbm']:.0%} | "
                f"{p['compile_seconds']:.0f} | {r['loadavg'][0]:.1f} |")
    extra = extrapolated(records)
    if extra:
        lines += ["", "32 layers from two shallow compiles (affine in the layer count), next to the full "
                  "compile where there is one:", "",
                  "| case | topology | from layers | arguments | temporaries | total | full compile |",
                  "|---|---|---|---|---|---|---|"]
        full = {(r["case"], r["topology"]): peak(r)["total"] for r in records if r["layers"] == 32}
        for (case, topo), e in extra.items():
            f = full.get((case, topo))
            lines.append(f"| `{case}` | {topo} | {e['from']} | {e['arguments'] / GB:.2f} | "
                         f"{e['temporaries'] / GB:.2f} | {e['total'] / GB:.2f} | "
                         f"{f'{f / GB:.2f}' if f else ''} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", default=[], help='"RECIPE [key=value ...]"')
    parser.add_argument("--layers", type=int, action="append", default=None,
                        help="decoder layers to compile with (repeat for several; default: the model's)")
    parser.add_argument("--topology", default=None, help="default: the recipe's plan.topology")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/tpu_plan_results.jsonl")
    parser.add_argument("--report", action="store_true", help="print the Markdown table of --out")
    parser.add_argument("--header", action="store_true",
                        help="print each --case's latest full-depth record as a recipe header block")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.report:
        records = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        print(report(records))
        return 0
    if args.header:
        from urm_jax.memory import estimate, model_config_for_plan
        from urm_jax.plan import PLATFORMS, Plan, format_header
        from urm_jax.train.config import config_from_dict, load_train_config

        records = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        for case in args.case:  # the latest full-depth compile of exactly this config
            words = shlex.split(case)
            train = load_train_config(ROOT / words[0], words[1:], runnable=False)
            same = [r for r in records if r["layers"] == 32 and config_from_dict(r["config"]) == train]
            if not same:
                print(f"no full-depth record resolves to {case}", file=sys.stderr)
                return 1
            record = same[-1]
            result = Plan.from_dict(record)
            result = dataclasses.replace(result, estimate=estimate(
                model_config_for_plan(train), train, mesh_shape=result.mesh, num_devices=result.num_chips,
                platform=PLATFORMS[result.chip]))  # the estimator as it is now
            versions = record.get("compiler") or f"jax {record['jax']}, libtpu {record['libtpu']}"
            print("\n".join(format_header(result, f"urm-jax plan {case}", versions)))
        return 0
    if args.one:
        record = run_one(args.case[0], args.layers[0] if args.layers else None, args.topology)
        with open(args.out, "a") as handle:  # one line per case, appended whole
            handle.write(json.dumps(record) + "\n")
        p = peak(record)
        size = p["refused"] if "refused" in p else f"{p['total'] / GB:.2f} GB"
        print(f"{record['case']} @ {record['topology']} x{record['layers']} layers: {p['name']} "
              f"{size} (estimate {record['estimate']['total'] / GB:.2f}), {p['compile_seconds']:.0f} s", flush=True)
        return 0
    failed = 0
    for case in args.case:
        for layers in args.layers or [None]:
            cmd = [sys.executable, __file__, "--one", "--case", case, "--out", str(args.out)]
            cmd += (["--layers", str(layers)] if layers else []) + (["--topology", args.topology] if args.topology else [])
            done = subprocess.run(cmd, cwd=ROOT)
            if done.returncode:
                print(f"FAILED ({done.returncode}): {case} layers={layers}", file=sys.stderr, flush=True)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
