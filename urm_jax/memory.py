"""Per-device memory estimate for training a URM on a (data, fsdp, tensor) mesh.

    python -m urm_jax.memory configs/hardware/v5p-8.yaml [key=value ...] [--devices N] [--chip v5p]
        [--header] [--xla]

It is an estimate from a stated model, not a measurement. `--xla` adds a measurement to compare
with: XLA's buffer assignment of the real stage-1 train step compiled for N simulated CPU devices,
next to the estimate for that same CPU step (reference attention; CPU also stores the bf16 matmul
outputs that remat `dots` saves in fp32, so it reads high there). Decimal GB (1e9 bytes).

Static state, from the model's real parameter shapes (`abstract_model`) and the sharding rules
(`urm_jax.sharding.AxisRules`), so every tensor is divided by exactly the mesh axes it is sharded
over (norm weights and the odd-sized vocab axis stay replicated where the rules say so):
  params            trainable parameters in their storage dtype (stage 1: backbone + value head in
                    `precision.param`; stage 2: the gate in `precision.gate_param`).
  frozen_params     the rest (stage 1: the gate; stage 2: backbone + value head), no grads/moments.
  gradients         one gradient per trainable parameter, in the parameter dtype.
  grad_accumulator  grad_accum > 1 only: the running gradient sum the step scans with.
  optimizer         AdamW: optax's mu and nu follow the parameter dtype (mu_dtype=None), so
                    2 x params (fp32 master weights -> 8 bytes/param). Clipping holds no state.
A full fp32 fine-tune is 4 + 4 + 8 = 16 bytes/param: 120.1 GB for the 7.5e9 trainable parameters,
the "~128 GB for an 8B model" floor, divided by fsdp x tensor.

Activations (B = rows per device per micro-batch = micro_batch / (data x fsdp), L = seq_len,
D = hidden, F = intermediate / tensor, Hq, Hkv = heads / tensor, c = bytes of the compute dtype):
  activations_residuals  what the layer scan saves for the backward pass, per layer:
      remat full: the residual stream entering the layer, B·L·D·c;
      remat dots: that, plus the outputs of the weight matmuls (q, k, v, o, gate, up, down);
      remat none: every intermediate of the layer (with the scores, for unfused attention).
  activations_layer  the working set of the one layer being (re)computed and differentiated: its
      per-token intermediates and their cotangents, 2 x B·L·(4D + 2(Hq+Hkv)·hd + 3F)·c, plus
      attention, by implementation (`attention`; auto = splash on TPU, cudnn on GPU, reference
      on CPU, as urm_jax.model.attention resolves it on that platform):
        reference, xla: the [B, Hq, L, L] scores exist, SCORE_BYTES = 17 bytes per element
          (logits, probabilities and their two gradients, each counted in fp32, + the broadcast
          bool mask: what XLA's CPU buffer assignment of the 8B layer at L=4096 keeps live), and
          the [B, L, L] mask;
        splash, cudnn (flash attention): no L x L tensor, only softmax statistics (B·Hq·L·8
          bytes) and the [B, Hkv, G, L, hd] layout copies of q, k, v and the output; cudnn also
          takes the dense [B, L, L] mask (bool, and as a bf16 bias).
  fsdp_gather  one layer's weights all-gathered over fsdp (still split over tensor) and their
      unsharded gradient before the reduce-scatter, both in the parameter dtype.
Stage 2 runs no backward through the backbone: activations are the forward working set of one
layer (the feature-cache pass, or the uncached step) and the gathered layer weights, no grads.
Not counted (the margin covers them): XLA temporaries beyond the above, the input batch, the RoPE
tables, the runtime's own reservation. Configs under configs/hardware keep >= 10% of HBM free.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per element of the [B, H, L, L] attention scores that one layer keeps live at its peak:
# backward: 4 fp32-sized buffers (logits, probabilities, their gradients) + the broadcast bool
# mask; forward only: 2 fp32-sized (logits, probabilities) + the mask. XLA's CPU buffer assignment
# of the real 8B layer at L=4096 holds exactly that (TPU fuses more: an upper estimate).
SCORE_BYTES = 4 * 4 + 1
SCORE_BYTES_FORWARD = 2 * 4 + 1
FLASH_STATS_BYTES = 8  # per (row, head, token): softmax max/log-sum-exp and the backward's sum(dO*O)
FLASH = ("splash", "cudnn")
AUTO_ATTENTION = {"tpu": "splash", "gpu": "cudnn", "cpu": "reference"}  # as urm_jax.model.attention
MARGIN = 0.10  # hardware recipes keep at least this fraction of HBM free

# HBM per device in decimal GB (the vendors' GiB figures are a few % larger: extra cushion).
CHIPS = {
    "v5e": 16 * GB,
    "v5p": 95 * GB,
    "v6e": 32 * GB,
    "h100": 80 * GB,
    "h200": 141 * GB,
}
PLATFORMS = {"v5e": "tpu", "v5p": "tpu", "v6e": "tpu", "h100": "gpu", "h200": "gpu"}

DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parent.parent / "configs/model/urm-llama-3.1-8b.json"

# (key, description) in table order; each key is an int number of bytes per device in `estimate`.
COMPONENTS = (
    ("params", "trainable parameters"),
    ("frozen_params", "frozen parameters"),
    ("gradients", "gradients (parameter dtype)"),
    ("grad_accumulator", "gradient sum across micro-batches"),
    ("optimizer", "AdamW mu + nu (parameter dtype)"),
    ("activations_residuals", "saved per layer for the backward pass"),
    ("activations_layer", "one layer's working set incl. attention"),
    ("fsdp_gather", "one layer gathered over fsdp + its gradient"),
)
STATIC = ("params", "frozen_params", "gradients", "grad_accumulator", "optimizer")
ACTIVATIONS = ("activations_residuals", "activations_layer", "fsdp_gather")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the estimate needs from a TrainConfig (any field may be given explicitly instead)."""

    stage: int = 1
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    gate_param_dtype: str = "float32"
    global_batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 4096
    remat: str = "full"
    mesh: tuple[int, int, int] = (1, -1, 1)
    attention: str = "auto"  # auto | reference | xla | cudnn | splash
    gate_compute_dtype: str | None = None  # None: the checkpoint's gate dtype
    max_segments: int = 8

    @classmethod
    def from_train(cls, train) -> "Setup":
        return cls(stage=train.stage, param_dtype=train.precision.param,
                   compute_dtype=train.precision.compute, gate_param_dtype=train.precision.gate_param,
                   global_batch_size=train.global_batch_size, grad_accum=train.grad_accum,
                   seq_len=train.data.seq_len, remat=train.remat, mesh=tuple(train.mesh),
                   attention=train.attention, gate_compute_dtype=train.precision.gate_compute, max_segments=train.data.max_segments)


def resolve_mesh(shape, num_devices: int | None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with -1 filled in, checked against the device count (as make_mesh)."""
    shape = [int(s) for s in shape]
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh {tuple(shape)}: need 3 positive sizes (data, fsdp, tensor), at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices is None:
            raise ValueError(f"mesh {tuple(shape)} has a -1: give the number of devices")
        if num_devices % known:
            raise ValueError(f"mesh {tuple(shape)} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if num_devices is not None and math.prod(shape) != num_devices:
        raise ValueError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices, not {num_devices}")
    return tuple(shape)


def _sharded_counts(cfg, mesh: tuple[int, int, int]) -> dict[str, dict]:
    """Per top-level group: total elements, elements per device, and one layer's elements
    gathered over fsdp (still split over tensor), from the abstract model and the sharding rules."""
    import jax
    import numpy as np
    from flax import nnx

    from urm_jax.model.urm import abstract_model, param_logical_axes
    from urm_jax.sharding import MESH_AXES, AxisRules

    rules = AxisRules()
    full = SimpleNamespace(shape=dict(zip(MESH_AXES, mesh)))
    tensor_only = SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": mesh[2]})
    model = abstract_model(cfg)
    shapes = nnx.state(model).to_pure_dict()
    axes = param_logical_axes(model)
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    out = {}
    for group in shapes:
        total = per_device = layer = 0
        flat_axes = jax.tree.leaves(axes[group], is_leaf=is_axes)
        for shape_leaf, logical in zip(jax.tree.leaves(shapes[group]), flat_axes):
            shape = tuple(shape_leaf.shape)
            size = int(np.prod(shape))
            total += size
            per_device += size // _split(rules.spec(logical, full, shape), full.shape)
            if logical[0] == "layers":
                layer += size // shape[0] // _split(rules.spec(logical, tensor_only, shape), tensor_only.shape)
        out[group] = {"total": total, "per_device": per_device, "layer": layer}
    return out


def _split(spec, sizes: dict) -> int:
    n = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= sizes[axis]
    return n


def resolve_attention(attention: str, platform: str | None) -> str:
    if attention not in ("auto", "reference", "xla", "splash", "cudnn"):
        raise ValueError(f"attention {attention!r} not in auto, reference, xla, cudnn, splash")
    if attention != "auto":
        return attention
    if platform not in AUTO_ATTENTION:
        raise ValueError(f"attention 'auto' depends on the platform: give one of {sorted(AUTO_ATTENTION)} "
                         "(or a chip), or name the attention implementation")
    return AUTO_ATTENTION[platform]


def estimate(cfg, train=None, *, mesh_shape=None, num_devices: int | None = None,
             platform: str | None = "tpu", **explicit) -> dict:
    """Per-device memory in bytes for training `cfg` (a ModelConfig).

    `train`: a TrainConfig (or a `Setup`); keyword arguments named like `Setup`'s fields override
    it (stage, param_dtype, compute_dtype, gate_param_dtype, global_batch_size, grad_accum,
    seq_len, remat, attention). `mesh_shape` defaults to the config's mesh; -1 needs
    `num_devices`. `platform` (tpu | gpu | cpu) resolves `attention: auto`.
    Returns the COMPONENTS keys, `activations`, `static` and `total` (ints, bytes per device),
    plus the derived layout: mesh, rows_per_device, attention, param_count, trainable_param_count.
    """
    from urm_jax.train.step import STAGE_TRAINABLE

    setup = train if isinstance(train, Setup) else Setup.from_train(train) if train is not None else Setup()
    unknown = set(explicit) - {f.name for f in dataclasses.fields(Setup)}
    if unknown:
        raise TypeError(f"unknown estimate arguments {sorted(unknown)}")
    setup = dataclasses.replace(setup, **explicit)
    if setup.remat not in ("none", "full", "dots"):
        raise ValueError(f"remat {setup.remat!r} not in none, full, dots")
    attention = resolve_attention(setup.attention, platform)
    mesh = resolve_mesh(mesh_shape if mesh_shape is not None else setup.mesh, num_devices)
    data, fsdp, tensor = mesh
    counts = _sharded_counts(cfg, mesh)
    trainable = STAGE_TRAINABLE[setup.stage]

    def dtype_of(group):
        return setup.gate_param_dtype if group == "gate" else setup.param_dtype

    def nbytes(groups, key="per_device"):
        return sum(counts[g][key] * DTYPE_BYTES[dtype_of(g)] for g in groups)

    train_groups = [g for g in counts if g in trainable]
    frozen_groups = [g for g in counts if g not in trainable]
    params = nbytes(train_groups)
    out = {
        "params": params,
        "frozen_params": nbytes(frozen_groups),
        "gradients": params,
        "grad_accumulator": params if setup.grad_accum > 1 else 0,
        "optimizer": 2 * params,
    }

    # Rows per device per micro-batch: stage 2 rows are chosen + rejected of each pair.
    micro = setup.global_batch_size // setup.grad_accum * (2 if setup.stage == 2 else 1)
    rows = math.ceil(micro / (data * fsdp))
    c = DTYPE_BYTES[setup.compute_dtype]
    d, hd, length = cfg.hidden_size, cfg.head_dim, setup.seq_len
    split = lambda n: n // tensor if n % tensor == 0 else n  # noqa: E731  (as AxisRules.spec)
    hq, hkv, f = split(cfg.num_heads), split(cfg.num_kv_heads), split(cfg.intermediate_size)
    tokens = rows * length
    per_token = 4 * d + 2 * (hq + hkv) * hd + 3 * f  # norms, q/k/v/attn, o, gate/up/act, down
    dots = (hq + 2 * hkv) * hd + 2 * d + 2 * f  # matmul outputs: q, k, v, o, gate, up, down
    # Attention beyond the per-token tensors: the L x L scores (unfused), or flash statistics.
    scores = rows * hq * length * length  # elements of one [B, H, L, L] score matrix
    # The dense [B, L, L] mask: bool; cudnn also turns it into a bf16 bias.
    mask = rows * length * length * {"reference": 1, "xla": 1, "cudnn": 3, "splash": 0}[attention]
    if attention in FLASH:  # softmax statistics and the kernel-layout copies of q, k, v, out
        attn_backward = attn_forward = attn_saved = (rows * hq * length * FLASH_STATS_BYTES
                                                     + tokens * 2 * (hq + hkv) * hd * c)
    else:
        attn_backward = SCORE_BYTES * scores
        attn_forward = attn_saved = SCORE_BYTES_FORWARD * scores
    layer_weights = counts["backbone"]["layer"] * DTYPE_BYTES[setup.param_dtype]
    layers = cfg.num_layers
    if setup.stage == 2:  # forward only through the frozen backbone
        out["activations_residuals"] = 0
        out["activations_layer"] = attn_forward + mask + tokens * per_token * c
        out["fsdp_gather"] = layer_weights
    else:
        saved = {"full": tokens * d * c,
                 "dots": tokens * (d + dots) * c,
                 "none": tokens * (d + per_token) * c + attn_saved}[setup.remat]
        out["activations_residuals"] = layers * saved
        out["activations_layer"] = attn_backward + mask + 2 * tokens * per_token * c
        out["fsdp_gather"] = 2 * layer_weights
    out["static"] = sum(out[k] for k in STATIC)
    out["activations"] = sum(out[k] for k in ACTIVATIONS)
    out["total"] = out["static"] + out["activations"]
    out.update(mesh=mesh, num_devices=data * fsdp * tensor, rows_per_device=rows, seq_len=length,
               stage=setup.stage, remat=setup.remat, attention=attention,
               param_count=sum(v["total"] for v in counts.values()),
               trainable_param_count=sum(counts[g]["total"] for g in train_groups))
    return out


def xla_attention(attention: str) -> str:
    """What a CPU compile can run in place of `attention` (flash kernels are TPU/GPU only)."""
    return "xla" if attention == "xla" else "reference"


def xla_bytes(cfg, setup: Setup, mesh_shape: tuple[int, int, int]) -> int:
    """Peak bytes per device of the real stage-1 train step as XLA assigns them (arguments +
    outputs - donated aliases + temporaries), compiled, never run, on the current devices (use
    --xla_force_host_platform_device_count for a pod's worth of CPU devices)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from urm_jax.config import DTypePolicy
    from urm_jax.model.urm import ModelOptions, abstract_model, param_shardings
    from urm_jax.sharding import batch_sharding, make_mesh
    from urm_jax.train.step import (STAGE_TRAINABLE, OptimizerSettings, StepSettings, TrainState,
                                    jit_train_step, make_optimizer, make_train_step,
                                    optimizer_state_shardings, split_params)

    if setup.stage != 1:
        raise ValueError("--xla compiles the stage-1 step only")
    options = ModelOptions(DTypePolicy(param=setup.param_dtype, compute=setup.compute_dtype,
                                       gate=setup.gate_compute_dtype, gate_param=setup.gate_param_dtype),
                           remat=setup.remat, attention=xla_attention(setup.attention))
    mesh = make_mesh(mesh_shape)
    shardings = param_shardings(cfg, mesh, None, options)
    shapes = nnx.state(abstract_model(cfg, options)).to_pure_dict()
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    trainable, frozen = split_params(params, STAGE_TRAINABLE[1])
    train_sh, frozen_sh = split_params(shardings, STAGE_TRAINABLE[1])
    optimizer, schedule = make_optimizer(OptimizerSettings(), 100, trainable)
    replicated = NamedSharding(mesh, P())
    opt_abstract, opt_sh = optimizer_state_shardings(optimizer, trainable, train_sh, mesh)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_sh)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), trainable, opt_state)
    batch_sh = batch_sharding(mesh, accum_axis=True)
    a, b, length, segs = setup.grad_accum, setup.global_batch_size // setup.grad_accum, setup.seq_len, setup.max_segments
    layout = {"input_ids": ((a, b, length), jnp.int32), "segment_ids": ((a, b, length), jnp.int32),
              "pool_index": ((a, b, segs), jnp.int32), "pool_mask": ((a, b, segs), jnp.float32),
              "labels": ((a, b, segs, cfg.num_attributes), jnp.float32)}
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh) for k, (s, d) in layout.items()}
    step = make_train_step(cfg, options, StepSettings(), optimizer, schedule)
    compiled = jit_train_step(step, mesh, None, TrainState(replicated, train_sh, opt_sh), frozen_sh,
                              batch_sh).lower(state, frozen, batch).compile()
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def format_table(est: dict, hbm: float | None = None, chip: str | None = None) -> list[str]:
    data, fsdp, tensor = est["mesh"]
    lines = [f"stage {est['stage']}, {est['num_devices']} devices, mesh data={data} fsdp={fsdp} "
             f"tensor={tensor}, remat {est['remat']}, {est['attention']} attention,",
             f"{est['rows_per_device']} row(s) x {est['seq_len']} tokens per device per micro-batch; "
             f"{est['param_count']:,} parameters, {est['trainable_param_count']:,} trainable.",
             "Per device, decimal GB:"]
    for key, what in COMPONENTS:
        lines.append(f"  {key:<22} {est[key] / GB:8.2f} GB  {what}")
    total = f"  {'total':<22} {est['total'] / GB:8.2f} GB"
    if hbm:
        free = 1 - est["total"] / hbm
        total += f"  of {hbm / GB:.2f} GB ({chip or 'HBM'}), {free:.0%} free"
    return lines + [total]


def main(argv: list[str] | None = None) -> int:
    from urm_jax.config import ModelConfig
    from urm_jax.train.config import load_train_config

    p = argparse.ArgumentParser(prog="python -m urm_jax.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="training YAML, e.g. configs/hardware/v5p-8.yaml")
    p.add_argument("overrides", nargs="*", help="key=value, as for `urm-jax train`")
    p.add_argument("--devices", type=int, default=None, help="device count (needed when mesh has -1)")
    p.add_argument("--chip", choices=sorted(CHIPS), default=None,
                   help="print the fraction of its HBM left; sets the platform (tpu or gpu)")
    p.add_argument("--platform", choices=sorted(AUTO_ATTENTION), default=None,
                   help="resolves `attention: auto` (default: the chip's, else tpu)")
    p.add_argument("--model-config", default=None,
                   help="HF config.json of the model (default: the config in `model=` if it is a "
                   f"directory, else {DEFAULT_MODEL_CONFIG.name})")
    p.add_argument("--header", action="store_true", help="print the table as a YAML comment block")
    p.add_argument("--xla", action="store_true",
                   help="also compile the real stage-1 step for N simulated CPU devices and print "
                   "XLA's peak bytes per device next to the estimate for that CPU step (slow: "
                   "~30 s for the 8B model; needs --devices)")
    args = p.parse_intermixed_args(argv)
    if args.xla:
        if args.devices is None:
            p.error("--xla needs --devices")
        if "jax" in sys.modules:
            p.error("--xla must run in a fresh process (python -m urm_jax.memory ...)")
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    try:
        overrides = list(args.overrides)
        keys = {o.split("=", 1)[0] for o in overrides}
        # Planning needs no checkpoint: placeholders satisfy the required keys.
        overrides += [f"{k}=unset" for k in ("model", "output_dir") if k not in keys]
        train = load_train_config(args.config, overrides)
        model_json = args.model_config
        if model_json is None:
            model_dir = Path(train.model)
            model_json = model_dir / "config.json" if (model_dir / "config.json").is_file() else DEFAULT_MODEL_CONFIG
        if not Path(model_json).is_file():
            raise ValueError(f"{model_json}: no such model config")
        cfg = ModelConfig.from_hf_dict(json.loads(Path(model_json).read_text()), source=str(model_json))
        platform = args.platform or (PLATFORMS[args.chip] if args.chip else "tpu")
        est = estimate(cfg, train, num_devices=args.devices, platform=platform)
        if args.xla:
            cpu_setup = dataclasses.replace(Setup.from_train(train), attention=xla_attention(train.attention))
            measured = xla_bytes(cfg, cpu_setup, est["mesh"])
            cpu_estimate = estimate(cfg, cpu_setup, num_devices=args.devices, platform="cpu")["total"]
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hbm = CHIPS[args.chip] if args.chip else None
    lines = format_table(est, hbm, args.chip)
    if args.xla:
        lines.append(f"  {'xla_cpu_peak':<22} {measured / GB:8.2f} GB  the same step compiled for "
                     f"{est['num_devices']} CPU devices with {cpu_setup.attention} attention "
                     f"(estimate for it: {cpu_estimate / GB:.2f} GB)")
    if args.header:
        cmd = " ".join(["python -m urm_jax.memory", args.config, *args.overrides]
                       + ([f"--chip {args.chip}"] if args.chip else [])
                       + ([f"--platform {args.platform}"] if args.platform else [])
                       + [f"--devices {est['num_devices']}"] + (["--xla"] if args.xla else []))
        lines = [f"Memory per device, estimated by `{cmd}`:"] + lines
        lines = ["# " + line if line else "#" for line in lines]
    print("\n".join(lines))
    if hbm and est["total"] > hbm:
        print(f"warning: the estimate exceeds the {args.chip} HBM", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
