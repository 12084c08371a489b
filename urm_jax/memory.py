"""Per-device memory estimate for training a URM on a (data, fsdp, tensor) mesh.

    urm-jax memory configs/hardware/v5p-8.yaml [key=value ...] [--devices N] [--chip v5p]
        [--header] [--xla]

It is an estimate from a stated model, calibrated against the TPU compiler: every 8B layout
`urm-jax plan` compiled (bench/tpu_plan_results.jsonl: recipes and variants over remat
none/dots/full, 1-4 rows per chip, splash and reference attention, fsdp 4-16, tensor 1-4) is
matched within 10% (tests/test_memory.py). The terms below that are not the obvious ones were
read off those compiles. `xla_bytes` (`--xla`) adds a CPU measurement to compare with: XLA's buffer assignment of the real stage-1 train step compiled for N
simulated CPU devices, next to the estimate for that same CPU step (reference attention; CPU also
stores the bf16 matmul outputs that remat `dots` saves in fp32, so it reads high there). Decimal
GB (1e9 bytes).

Static state, from the model's real parameter shapes (`abstract_model`) and the sharding rules
(`urm_jax.sharding.AxisRules`), so every tensor is divided by exactly the mesh axes it is sharded
over (norm weights and the odd-sized vocab axis stay replicated where the rules say so):
  params            trainable parameters in their storage dtype (stage 1: backbone + value head in
                    `precision.param`; stage 2: the gate in `precision.gate_param`; LoRA: the
                    adapters, in their kernel's dtype, + the value head in stage 1).
  frozen_params     the rest (stage 1: the gate; stage 2: backbone + value head; LoRA: the base
                    weights too), no grads/moments.
  gradients         one gradient per trainable parameter, in the parameter dtype.
  grad_accumulator  grad_accum > 1 only: the running gradient sum the step scans with, and the
                    copy of it the scan's loop carries (2 x params, as compiled).
  grad_update       the averaged, clipped gradient the AdamW update reads (1 x params).
  optimizer         AdamW: optax's mu and nu follow the parameter dtype (mu_dtype=None), so
                    2 x params (fp32 master weights -> 8 bytes/param). Clipping holds no state.
  layer_grads       the layer scan's backward emits each layer's weight gradient in the compute
                    dtype, stacked over layers, before it is added in the parameter dtype.
A full fp32 fine-tune is 4 + 4 + 8 = 16 bytes/param: 120.1 GB for the 7.5e9 trainable parameters,
the "~128 GB for an 8B model" floor, divided by fsdp x tensor.

Activations (B = rows per device per micro-batch = micro_batch / (data x fsdp), L = seq_len,
D = hidden, F = intermediate / tensor, Hq, Hkv = heads / tensor, c = bytes of the compute dtype):
  activations_residuals  what the layer scan saves for the backward pass, per layer:
      remat full: the residual stream entering the layer, B·L·D·c;
      remat dots: the outputs of the weight matmuls (q, k, v, o, gate, up, down), from which
        the compiler rebuilds the residual stream;
      remat none: every intermediate of the layer (with the scores, for unfused attention) and
        the float32 copies the backward reads (both RMSNorm inputs, the SiLU input).
  activations_layer  the working set of the one layer being (re)computed and differentiated: its
      per-token intermediates, B·L·(4D + 2(Hq+Hkv)·hd + 3F)·c (the compiler reuses them for
      their cotangents), plus
      attention, by implementation (`attention`; auto = splash on TPU, cudnn on GPU, reference
      on CPU, as urm_jax.model.attention resolves it on that platform):
        reference, xla: the [B, Hq, L, L] scores exist; on TPU (and GPU, unmeasured)
          SCORE_BYTES_ACCELERATOR = 7 bytes per element, as compiled; on CPU SCORE_BYTES = 17
          (logits, probabilities and their two gradients, each counted in fp32, + the broadcast
          bool mask: what XLA's CPU buffer assignment of the 8B layer at L=4096 keeps live), and
          the [B, L, L] mask;
        splash, cudnn (flash attention): no L x L tensor, only softmax statistics (B·Hq·L·8
          bytes) and the [B, Hkv, G, L, hd] layout copies of q, k, v and the output; cudnn also
          takes the dense [B, L, L] mask (bool, and as a bf16 bias);
        blockwise: as flash, plus one block pair's logits, probabilities and their gradients
          (B·Hq·block² float32 each) and the float32 dq/dk/dv accumulators.
  fsdp_gather  one layer's weights all-gathered over fsdp (still split over tensor) in the
      compute dtype (the compiler casts before it gathers), twice: forward and backward copies.
  LoRA adds, per adapted projection of a layer and per token (in/out: the kernel's input/output
  size on one device, r the rank): r for x A and out for (x A) B, and with dropout the dropped
  input (in) that A's gradient needs; they are in the layer's working set (x A and the dropped
  input with their cotangents, the dropout's random bits, 4 bytes each; (x A) B's cotangent is
  its projection's), saved for the backward pass by remat none (x A, the dropped input) and dots
  (the two matmul outputs), and not at all by remat full. Adapted head kernels act on one pooled
  row per sequence: nothing to count.
Stage 2 runs no backward through the backbone: activations are the forward working set of one
layer (the feature-cache pass, or the uncached step) and the gathered layer weights, no grads.
Not counted (the margin covers them): XLA temporaries beyond the above, the input batch, the RoPE
tables, the runtime's own reservation. Configs under configs/hardware keep >= 10% of HBM free,
by the compiled figure in their header (`urm-jax plan`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from urm_jax.config import ModelConfig, read_json_file
from urm_jax.model.attention import block_size, resolve as resolve_attention
from urm_jax.model.paths import is_gate, matches
from urm_jax.model.urm import ModelOptions, abstract_model, lora_targets, param_logical_axes
from urm_jax.scoring.fit import format_bytes, host_available_bytes
from urm_jax.sharding import MESH_AXES, AxisRules, make_mesh, resolve_mesh_shape
from urm_jax.train.config import TrainConfig, TrainConfigError, check_model_context
from urm_jax.train.step import abstract_step_args, batch_shapes, step_layout

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per element of the [B, H, L, L] attention scores that one layer keeps live at its peak:
# backward: 4 fp32-sized buffers (logits, probabilities, their gradients) + the broadcast bool
# mask; forward only: 2 fp32-sized (logits, probabilities) + the mask. XLA's CPU buffer assignment
# of the real 8B layer at L=4096 holds exactly that (the TPU compiler fuses more: below).
SCORE_BYTES = 4 * 4 + 1
SCORE_BYTES_FORWARD = 2 * 4 + 1
# The TPU compiler fuses the softmax and its gradient around one float32 logits buffer, the bf16
# probabilities and the mask: 4 + 2 + 1 bytes per element, in the backward and the forward alike
# (the 8B step with reference attention at 4 rows per chip compiles 15.3 GB above splash).
SCORE_BYTES_ACCELERATOR = 4 + 2 + 1
FLASH_STATS_BYTES = 8  # per (row, head, token): softmax max/log-sum-exp and the backward's sum(dO*O)
FLASH = ("splash", "cudnn", "blockwise")
DROPOUT_BITS_BYTES = 4  # LoRA dropout: the uint32 random bits drawn per dropped input element
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
    ("grad_accumulator", "accumulation: the running sum + its loop copy"),
    ("grad_update", "the averaged, clipped gradient AdamW reads"),
    ("optimizer", "AdamW mu + nu (parameter dtype)"),
    ("layer_grads", "per-layer gradients in the compute dtype"),
    ("activations_residuals", "saved per layer for the backward pass"),
    ("activations_layer", "one layer's working set incl. attention"),
    ("fsdp_gather", "one layer's weights gathered, compute dtype"),
)
STATIC = ("params", "frozen_params", "gradients", "grad_accumulator", "grad_update", "optimizer", "layer_grads")
ACTIVATIONS = ("activations_residuals", "activations_layer", "fsdp_gather")


def _sharded_counts(cfg: ModelConfig, mesh: tuple[int, int, int], options: ModelOptions) -> list[dict]:
    """Per parameter (LoRA adapters included when `options.lora`): its path, total elements,
    elements per device, and (stacked layers) one layer's elements gathered over fsdp (still
    split over tensor), from the abstract model and the sharding rules."""
    rules = AxisRules()
    full = _MeshSizes(dict(zip(MESH_AXES, mesh)))
    tensor_only = _MeshSizes({"data": 1, "fsdp": 1, "tensor": mesh[2]})
    model = abstract_model(cfg, options)
    shapes = nnx.state(model).to_pure_dict()
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    flat_axes = jax.tree.leaves(param_logical_axes(model), is_leaf=is_axes)
    out = []
    for (path, leaf), logical in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], flat_axes):
        shape = tuple(leaf.shape)
        size = int(np.prod(shape))
        layer = 0
        if logical[0] == "layers":
            layer = size // shape[0] // _split(rules.spec(logical, tensor_only, shape), tensor_only.shape)
        out.append({"path": tuple(str(k.key) for k in path), "total": size, "layer": layer,
                    "per_device": size // _split(rules.spec(logical, full, shape), full.shape)})
    return out


@dataclasses.dataclass(frozen=True)
class _MeshSizes:
    """What AxisRules.spec reads of a mesh (its axis sizes), without building one."""

    shape: dict


def _split(spec, sizes: dict) -> int:
    n = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= sizes[axis]
    return n


def _lora_per_token(cfg: ModelConfig, train: TrainConfig, tensor: int) -> tuple[int, int, int]:
    """LoRA's extra elements per token of one layer on one device: (x A outputs, (x A) B outputs,
    dropped inputs), summed over the adapted stacked kernels; zeros without LoRA."""
    if train.lora is None:
        return 0, 0, 0
    rules, sizes = AxisRules(), _MeshSizes({"data": 1, "fsdp": 1, "tensor": tensor})
    xa = xab = dropped = 0
    for kernel in lora_targets(train.lora, abstract_model(cfg)).values():
        if not kernel.stacked:
            continue
        spec = rules.spec(kernel.axes, sizes, kernel.shape)
        per_axis = [n // _split((entry,), sizes.shape) for n, entry in zip(kernel.shape, spec)]
        n_in = math.prod(per_axis[1:1 + kernel.in_axes])
        xa += train.lora.r
        xab += math.prod(per_axis[1 + kernel.in_axes:])
        dropped += n_in if train.lora.dropout > 0 else 0
    return xa, xab, dropped


def estimate(cfg: ModelConfig, train: TrainConfig, *, mesh_shape=None, num_devices: int | None = None,
             platform: str | None = "tpu") -> dict:
    """Per-device memory in bytes for training `cfg` as `train` says (stage, trainable patterns,
    precision, batch, sequence length, remat, attention, mesh).

    `mesh_shape` defaults to the config's mesh; -1 needs `num_devices`. `platform` (tpu | gpu |
    cpu) resolves `attention: auto`. Returns the COMPONENTS keys, `activations`, `static` and
    `total` (ints, bytes per device), plus the derived layout: mesh, rows_per_device,
    attention, param_count, trainable_param_count. ValueError for a mesh that does not fit.
    """
    attention = resolve_attention(train.attention, platform, length=train.data.seq_len)
    mesh = resolve_mesh_shape(mesh_shape if mesh_shape is not None else train.mesh, num_devices)
    data, fsdp, tensor = mesh
    counts = _sharded_counts(cfg, mesh, ModelOptions(lora=train.lora))
    precision = train.precision

    def nbytes(leaves, key="per_device"):
        return sum(c[key] * DTYPE_BYTES[precision.gate_param if is_gate(c["path"]) else precision.param]
                   for c in leaves)

    patterns = train.trainable_patterns
    trained = [c for c in counts if any(matches(c["path"], p) for p in patterns)]
    frozen = [c for c in counts if c not in trained]
    params = nbytes(trained)
    c = DTYPE_BYTES[precision.compute]
    # Gradient-sized buffers the TPU compiler keeps (bench/tpu_plan_results.jsonl): the gradient,
    # the averaged and clipped copy the AdamW update reads, and with accumulation the scan's
    # running sum plus the copy its loop carries; the layer scan's backward also emits each
    # layer's weight gradient in the compute dtype, stacked, before adding it in the parameter dtype.
    out = {
        "params": params,
        "frozen_params": nbytes(frozen),
        "gradients": params,
        "grad_accumulator": 2 * params if train.grad_accum > 1 else 0,
        # The TPU compiler keeps it; the GPU compiler fuses averaging and clipping into the
        # update (the one H100 compile recorded).
        "grad_update": 0 if platform == "gpu" else params,
        "optimizer": 2 * params,
        "layer_grads": sum(c_["per_device"] for c_ in trained if c_["layer"]) * c,
    }

    # Rows per device per micro-batch (TrainConfig.micro_batch_rows / row_length).
    rows = math.ceil(train.micro_batch_rows / (data * fsdp))
    d, hd = cfg.hidden_size, cfg.head_dim
    length = train.row_length
    split = lambda n: n // tensor if n % tensor == 0 else n  # noqa: E731  (as AxisRules.spec)
    hq, hkv, f = split(cfg.num_heads), split(cfg.num_kv_heads), split(cfg.intermediate_size)
    tokens = rows * length
    per_token = 4 * d + 2 * (hq + hkv) * hd + 3 * f  # norms, q/k/v/attn, o, gate/up/act, down
    dots = (hq + 2 * hkv) * hd + 2 * d + 2 * f  # matmul outputs: q, k, v, o, gate, up, down
    # Attention beyond the per-token tensors: the L x L scores (unfused), or flash statistics.
    scores = rows * hq * length * length  # elements of one [B, H, L, L] score matrix
    # The dense [B, L, L] mask: bool; cudnn also turns it into a bf16 bias.
    mask = rows * length * length * {"reference": 1, "xla": 1, "cudnn": 3}.get(attention, 0)
    if attention in FLASH:  # softmax statistics and the kernel-layout copies of q, k, v, out
        attn_backward = attn_forward = attn_saved = (rows * hq * length * FLASH_STATS_BYTES
                                                     + tokens * 2 * (hq + hkv) * hd * c)
        if attention == "blockwise":  # one block pair in flight; float32 gradient accumulators
            block = min(block_size(platform), length)
            attn_forward += rows * hq * block * block * 3 * 4
            attn_backward += rows * hq * block * block * 5 * 4 + tokens * (hq + 2 * hkv) * hd * 4
    else:
        cpu = platform == "cpu" or (platform is None and jax.default_backend() == "cpu")
        attn_backward = (SCORE_BYTES if cpu else SCORE_BYTES_ACCELERATOR) * scores
        attn_forward = attn_saved = (SCORE_BYTES_FORWARD if cpu else SCORE_BYTES_ACCELERATOR) * scores
    # One layer's weights (adapters included) as the matmuls read them: gathered over fsdp and
    # cast to the compute dtype (the compiler gathers after the cast); the backward holds a
    # second (transposed) copy.
    layer_weights = sum(c_["layer"] for c_ in counts) * c
    layers = cfg.num_layers
    if train.stage == 2:  # forward only through the frozen backbone
        # Without a backward nothing is kept for later: the peak is inside one layer, at the MLP
        # (residual stream, normed input, one F-wide intermediate: 2D + F per token, as the 8B
        # feature pass compiles) or, unfused, at the attention scores.
        out["activations_residuals"] = 0
        out["activations_layer"] = max(tokens * (2 * d + f) * c,
                                       attn_forward + mask + tokens * (d + (hq + 2 * hkv) * hd) * c)
        out["fsdp_gather"] = layer_weights
    else:
        # remat dots saves exactly the weight matmuls' outputs (the residual stream is
        # rebuilt from them); full, the layer input; none, every intermediate, plus the float32
        # copies the backward reads: both RMSNorm inputs and the SiLU's input. LoRA's x A, (x A) B
        # and dropped inputs join them as the docstring says.
        xa, xab, dropped = _lora_per_token(cfg, train, tensor)
        saved = {"full": tokens * d * c,
                 "dots": tokens * (dots + xa + xab) * c,
                 "none": tokens * ((d + per_token + xa + dropped) * c + (2 * d + f) * 4) + attn_saved}[train.remat]
        out["activations_residuals"] = layers * saved
        # The layer being differentiated: its per-token intermediates once (the compiler
        # reuses buffers between the recomputed forward and its cotangents), LoRA's with their
        # cotangents and the dropout's random bits.
        out["activations_layer"] = (attn_backward + mask
                                    + tokens * (per_token + 2 * (xa + dropped) + xab) * c
                                    + tokens * dropped * DROPOUT_BITS_BYTES)
        out["fsdp_gather"] = 2 * layer_weights
    out["static"] = sum(out[k] for k in STATIC)
    out["activations"] = sum(out[k] for k in ACTIVATIONS)
    out["total"] = out["static"] + out["activations"]
    if train.use_features:
        # Two programs that are never live together: the feature pass (every parameter, no
        # gradient or optimiser state, the forward working set) and the gate-only step.
        out["total"] = max(out["params"] + out["frozen_params"] + out["activations"], out["static"])
    out.update(mesh=mesh, num_devices=data * fsdp * tensor, rows_per_device=rows, seq_len=length,
               stage=train.stage, remat=train.remat, attention=attention,
               param_count=sum(c_["total"] for c_ in counts),
               trainable_param_count=sum(c_["total"] for c_ in trained))
    return out


def check_host_memory(cfg: ModelConfig, train: TrainConfig, mesh_shape: tuple[int, int, int],
                      *, available: int | None = None, devices: int | None = None) -> None:
    """Refuse a CPU-backend training run whose estimate (`estimate`, times `devices`, the CPU
    devices of the mesh on this host by default) exceeds the host's available memory
    (`available` bytes; default MemAvailable), before anything is allocated: the OOM killer
    would otherwise end it with SIGKILL and no message. TrainConfigError names the estimate,
    what is available, the largest component and what to change. No check when the available
    memory cannot be read."""
    available = host_available_bytes() if available is None else available
    if available is None:
        return
    if devices is None:  # this host's share of the mesh
        devices = max(1, math.prod(mesh_shape) // jax.process_count())
    est = estimate(cfg, train, mesh_shape=mesh_shape, platform="cpu")
    need = est["total"] * devices
    if need <= available:
        return
    largest = max((k for k, _ in COMPONENTS), key=lambda k: est[k])
    advice = ("lower `lora.r` or train fewer parameters (`trainable`, `lora.targets`)"
              if largest in STATIC else
              "raise `grad_accum` (fewer rows per micro-batch), lower `global_batch_size` or "
              "`data.seq_len`, or use `remat: full` or `attention: blockwise`")
    raise TrainConfigError(
        f"training needs about {format_bytes(need)} on this host ({devices} CPU device(s) x "
        f"{format_bytes(est['total'])} by `urm-jax memory ... --platform cpu`; largest: {largest} "
        f"{format_bytes(est[largest])}), but only {format_bytes(available)} is available: "
        f"{advice}, or run on a machine with more memory")


def xla_attention(attention: str) -> str:
    """What a CPU compile can run in place of `attention` (flash kernels are TPU/GPU only;
    blockwise runs anywhere)."""
    return attention if attention in ("xla", "blockwise") else "reference"


def xla_bytes(cfg: ModelConfig, train: TrainConfig, mesh_shape: tuple[int, int, int]) -> int:
    """Peak bytes per device of the real stage-1 train step as XLA assigns them (arguments +
    outputs - donated aliases + temporaries), compiled, never run, on the current devices (use
    --xla_force_host_platform_device_count for a pod's worth of CPU devices). Attention is
    replaced by what the CPU can compile (`xla_attention`)."""
    if train.stage != 1:
        raise ValueError("--xla compiles the stage-1 step only")
    train = dataclasses.replace(train, attention=xla_attention(train.attention))
    layout = step_layout(cfg, train, 100, make_mesh(mesh_shape))
    state, frozen = abstract_step_args(cfg, train, layout)
    batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=layout.batch_sh)
             for k, s in batch_shapes(cfg, train).items()}
    compiled = layout.step_fn.lower(state, frozen, batch).compile()
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def format_table(est: dict, hbm: float | None = None, chip: str | None = None) -> list[str]:
    """The lines `urm-jax memory` prints for an `estimate` dict: the setup, each component in decimal GB
    per device, and the total (with the share of `hbm` bytes left free when given)."""
    data, fsdp, tensor = est["mesh"]
    lines = [f"stage {est['stage']}, {est['num_devices']} devices, mesh data={data} fsdp={fsdp} "
             f"tensor={tensor}, remat {est['remat']}, {est['attention']} attention,",
             f"{est['rows_per_device']} row(s) x {est['seq_len']} tokens per device per micro-batch; "
             f"{est['param_count']:,} parameters, {est['trainable_param_count']:,} trainable.",
             "Per device, decimal GB:"]
    for key, what in COMPONENTS:
        lines.append(f"  {key:<22} {est[key] / GB:8.2f} GB  {what}")
    if est["total"] != est["static"] + est["activations"]:  # stage 2 on cached features
        lines.append("  (two programs: the total is the feature pass's parameters + activations, or the "
                     "gate step's state, whichever is larger)")
    total = f"  {'total':<22} {est['total'] / GB:8.2f} GB"
    if hbm:
        free = 1 - est["total"] / hbm
        total += f"  of {hbm / GB:.2f} GB ({chip or 'HBM'}), {free:.0%} free"
    return lines + [total]


def model_config_for_plan(train: TrainConfig, model_config: str | Path | None = None) -> ModelConfig:
    """The model a memory plan is for: `model_config` (an HF config.json), else the config in
    `train.model` when it is a directory, else the real 8B model's (DEFAULT_MODEL_CONFIG).
    TrainConfigError when `data.seq_len` exceeds its context (as training's preflight)."""
    path = Path(model_config) if model_config is not None else None
    if path is None:
        model_dir = Path(train.model) if train.model else None
        path = (model_dir / "config.json" if model_dir is not None and (model_dir / "config.json").is_file()
                else DEFAULT_MODEL_CONFIG)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no such model config")
    cfg = ModelConfig.from_hf_dict(read_json_file(path), source=str(path))
    check_model_context(train, cfg, path)
    return cfg


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("use `urm-jax memory CONFIG ...`")
