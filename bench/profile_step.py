"""Where the CPU time of the stage-1 train step goes: an XLA per-op breakdown by named scope.

    .venv/bin/python bench/profile_step.py [--quick] [--layers 12] [--batch 2] [--seq-len 256]
        [--steps 3] [--compute float32] [--remat none] [--attention reference]
        [--layer-loop auto] [--top 25]

Builds the ~100M-parameter bench model of `bench/train_throughput.py` (same shape, same step:
`build_trainer`, stage 1, AdamW), compiles the step with its optimised HLO dumped
(`--xla_dump_to`), runs it under `jax.profiler` and joins every executed XLA op (the CPU thunk
events of the trace) with its HLO metadata. Each op is attributed to

- a phase: forward, backward (the op's JAX name is under `transpose(...)`), optimizer (optax's
  update, clipping, norms) or other;
- the decoder layer's `jax.named_scope` (qkv, rope, attention, o_proj, mlp; `urm_jax.model.urm`),
  else embed / head+loss / optimizer / other;
- a kind: dot (matmuls, fused or not), copy/transpose, reduce, loop fusion (element-wise), ...

Durations are the ops' own thunk times summed over the steps (on a loaded machine they stretch
with load; the shares stay meaningful). The table also lists the most expensive single HLO ops
with their JAX source name. Prints the machine's load average.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The optimised HLO of the step goes to a dump directory, read back below to name the ops.
DUMP = tempfile.mkdtemp(prefix="urm-jax-profile-hlo-")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP}"
                           " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_in_mesh.*").strip()

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import SHAPE, make_stage1_batch, random_checkpoint  # noqa: E402
from urm_jax.config import DTypePolicy, ModelConfig  # noqa: E402
from urm_jax.loading import load_params_any  # noqa: E402
from urm_jax.model.urm import ModelOptions  # noqa: E402
from urm_jax.sharding import make_mesh  # noqa: E402
from urm_jax.train.config import OptimConfig, TrainConfig  # noqa: E402
from urm_jax.train.loop import with_accum_axis  # noqa: E402
from urm_jax.train.step import build_trainer  # noqa: E402

SCOPES = ("qkv", "rope", "attention", "o_proj", "mlp")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?|\([^=]*?\))\s+"
                    r"([\w\-]+)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KIND = re.compile(r"kind=(k\w+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def read_hlo(dump: str) -> dict[str, dict]:
    """name -> {opcode, op_name, kind, calls, shape} for every instruction of the optimised step."""
    files = sorted(glob.glob(f"{dump}/*step_in_mesh*after_optimizations.txt"))
    if not files:
        raise SystemExit(f"no optimised HLO of the step in {dump}")
    table, bodies, current = {}, collections.defaultdict(list), None
    for line in Path(files[-1]).read_text().splitlines():
        if line and not line.startswith(" ") and "{" in line and ("%" in line or "ENTRY" in line):
            current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = current.lstrip("%")
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        meta = _OP_NAME.search(rest)
        kind, calls = _KIND.search(rest), _CALLS.search(rest)
        table[name] = dict(opcode=opcode, op_name=meta.group(1) if meta else "", shape=shape,
                           kind=kind.group(1) if kind else "", calls=calls.group(1) if calls else "")
        bodies[current].append(name)
    for info in table.values():  # a fusion's kind: does its body hold a dot / convolution?
        body = bodies.get(info["calls"], [])
        info["has_dot"] = any(table[b]["opcode"] in ("dot", "convolution") for b in body)
        if not info["op_name"]:
            info["op_name"] = next((table[b]["op_name"] for b in body if table[b]["op_name"]), "")
    return table


def phase_of(op_name: str) -> str:
    """Loss and gradients run under `jvp(...)` (the backward under `transpose(jvp(...))`); the
    rest of the step is the optimizer update (clipping, AdamW, norms)."""
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "optimizer" if op_name else "other"


def scope_of(op_name: str, phase: str) -> str:
    parts = op_name.split("/")
    for s in SCOPES:
        if s in parts:
            return s
    if phase == "optimizer":
        return "optimizer"
    if "embed" in op_name or "take" in parts[-1] or "gather" in parts[-1]:
        return "embed/gather"
    if "rms_norm" in op_name or "final" in op_name:
        return "norm"
    if any(s in op_name for s in ("heads", "value_head", "regression", "loss", "dot_general")):
        return "head+loss"
    return "other"


def kind_of(info: dict) -> str:
    op = info["opcode"]
    if op in ("dot", "convolution") or info.get("has_dot"):
        return "dot"
    if op in ("copy", "transpose") or (op == "fusion" and "copy" in info.get("calls", "")):
        return "copy/transpose"
    if op in ("reduce", "reduce-window") or "reduce" in info.get("calls", ""):
        return "reduce"
    if op == "fusion":
        return f"fusion {info['kind'] or '?'}"
    return op


def profile(trainer, batch, steps: int, trace_dir: str) -> dict[str, list[float]]:
    """hlo op name -> per-event seconds over `steps` profiled steps."""
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
        float(trainer.run(batch)["loss"])
    jax.profiler.stop_trace()
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    durations = collections.defaultdict(list)
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if stats.get("hlo_module", "").startswith("jit_step_in_mesh") and "hlo_op" in stats:
                    durations[stats["hlo_op"]].append(event.duration_ns / 1e9)
    return durations


def table(title: str, rows: dict[str, float], total: float) -> None:
    print(f"\n{title:<28} {'s/step':>8} {'share':>7}")
    for key, value in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"{key:<28} {value:>8.3f} {100 * value / total:>6.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=SHAPE["num_layers"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 1 untimed)")
    parser.add_argument("--compute", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--remat", default="none")
    parser.add_argument("--attention", default="reference")
    parser.add_argument("--layer-loop", default="auto", choices=("auto", "scan", "unrolled"),
                        help="the decoder layers' loop (auto: what `urm-jax train` runs)")
    parser.add_argument("--top", type=int, default=25, help="most expensive single ops listed")
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 profiled step")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.steps = 2, 1

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(Path(tmp) / "ckpt", num_layers=args.layers)
        cfg = ModelConfig.from_hf_dir(path)
        params = load_params_any(path, cfg)
    options = ModelOptions(DTypePolicy(param="float32", compute=args.compute, gate="float32"),
                           remat=args.remat, attention=args.attention, layer_loop=args.layer_loop)
    train = TrainConfig(optim=OptimConfig(learning_rate=2e-6, warmup_ratio=0.0))
    trainer = build_trainer(cfg, params, train, total_steps=10_000,
                            mesh=make_mesh((1, 1, 1), jax.devices()[:1]), options=options)
    del params
    batch = jax.device_put(with_accum_axis(make_stage1_batch(args.batch, args.seq_len, cfg.vocab_size), 1),
                           trainer.batch_sharding)
    start = time.perf_counter()
    float(trainer.run(batch)["loss"])  # compile (dumps the HLO) + one step
    compile_s = time.perf_counter() - start
    cpu, wall = [], []
    for _ in range(2):
        t, c = time.perf_counter(), time.process_time()
        float(trainer.run(batch)["loss"])
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    hlo = read_hlo(DUMP)
    with tempfile.TemporaryDirectory() as trace_dir:
        durations = profile(trainer, batch, args.steps, trace_dir)

    per_step = {op: sum(d) / args.steps for op, d in durations.items()}
    total = sum(per_step.values())
    by_phase, by_scope, by_kind, by_phase_scope = (collections.Counter() for _ in range(4))
    for op, seconds in per_step.items():
        info = hlo.get(op, dict(opcode="?", op_name="", kind="", calls=""))
        phase = phase_of(info["op_name"])
        scope = scope_of(info["op_name"], phase)
        by_phase[phase] += seconds
        by_scope[scope] += seconds
        by_kind[kind_of(info)] += seconds
        by_phase_scope[f"{phase[:3]} {scope}"] += seconds

    print(f"\nStage-1 train step profile: {cfg.num_layers} layers, hidden {cfg.hidden_size}, batch "
          f"{args.batch} x {args.seq_len}, compute {args.compute}, remat {args.remat}, attention "
          f"{args.attention}; jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores")
    print(f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; compile+first step "
          f"{compile_s:.1f} s; step wall {statistics.median(wall):.2f} s, CPU {statistics.median(cpu):.2f} s "
          f"(median of 2, unprofiled); XLA ops in the trace: {total:.2f} s/step over {len(per_step)} ops")
    table("phase", by_phase, total)
    table("scope", by_scope, total)
    table("phase x scope", by_phase_scope, total)
    table("kind", by_kind, total)
    groups = collections.defaultdict(list)
    for op, seconds in per_step.items():
        info = hlo.get(op, dict(opcode="?", op_name="", kind="", calls=""))
        phase = phase_of(info["op_name"])
        group = f"{phase[:3]} {scope_of(info['op_name'], phase)}"
        groups[group].append((seconds, op, kind_of(info), info.get("shape", "")))
    print("\nlargest ops of the largest phase x scope groups")
    for group, _ in sorted(by_phase_scope.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  {group}: " + "; ".join(f"{op} {kind} {shape[:28]} {s:.3f}"
                                         for s, op, kind, shape in sorted(groups[group], reverse=True)[:4]))
    print(f"\ntop {args.top} ops{'':<16} {'s/step':>8} {'share':>7}  kind / shape / JAX name")
    for op, seconds in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        info = hlo.get(op, dict(opcode="?", op_name="", kind="", calls="", shape=""))
        print(f"{op[:28]:<28} {seconds:>8.3f} {100 * seconds / total:>6.1f}%  {kind_of(info)} "
              f"{info.get('shape', '')[:40]} {info['op_name'][-110:]}")


if __name__ == "__main__":
    main()
