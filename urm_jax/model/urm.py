"""The URM reward model in Flax NNX: a Llama-3.1 backbone, a value head (mean and log-std for five
attributes) and a gating MLP whose outputs weigh the means into one reward.

Numerics follow the HF reference op by op so fp32 parity is tight and bf16 parity is explainable:
RMSNorm in float32 then cast back before the weight multiply; RoPE tables in float32 cast to the
compute dtype; attention logits in the compute dtype, softmax in float32; the gate in its own dtype
(float16 in the real model) on the pooled hidden state; reward in the promoted dtype of means and
gate weights (bf16 x fp16 -> fp32, as torch promotes).

Layers are stacked on a leading `layers` axis and run with `jax.lax.scan`: one compile for any
depth and one on-disk layout (training on XLA:CPU unrolls that scan: `ModelOptions.layer_loop`). Every parameter carries `logical_axes` metadata for the sharding
rules in `urm_jax.sharding`; projection kernels also carry `kernel_in_axes` (how many axes after
`layers` are contracted with the input), which is what makes them LoRA targets
(`urm_jax.model.lora`: with `ModelOptions.lora` the model holds adapters under `lora/` and adds
them to their kernels' outputs, inside the layer scan for stacked kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from urm_jax.config import DTypePolicy, ModelConfig, RopeConfig
from urm_jax.finite import check_device_casts
from urm_jax.model import lora as lora_lib
from urm_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from urm_jax.model.attention import allowed_mask, attention, needs_dense_mask, target_platform
from urm_jax.model.attention import check_available as check_attention
from urm_jax.model.lora import LORA_A, LORA_B, Kernel, LoraConfig
from urm_jax.model.paths import LORA, Path, is_gate, leaf_paths, matches
from urm_jax.model.rope import apply_rope, cos_sin
from urm_jax.sharding import constrain, named_sharding

SELU_SCALE = 1.0507009873554805
SELU_ALPHA = 1.6732632423543772

MLP_KERNELS = ("gate_proj", "up_proj", "down_proj")

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# How the decoder layers run: `scan` (one traced layer, a loop: compile time independent of the
# depth; what accelerators use), `unrolled` (every layer traced: no loop), `auto` (LAYER_LOOP_AUTO
# by platform, else scan). Training on XLA:CPU, unrolled skips the loop's per-layer bookkeeping:
# the scan's backward zero-fills a stacked [layers, ...] gradient buffer per kernel and
# dynamic-update-slices each layer in, and the forward stacks the saved activations the same way;
# the ~100M bench model's stage-1 step (12 layers, fp32, 2 x 512 tokens, attention auto) took
# 7.46 -> 6.86 CPU s/step unrolled (-8%), 3.53 -> 3.43 at 2 x 256 (interleaved, load ~4).
# Scoring keeps `scan`: a forward has no such buffers and compiles once per bucket shape; so does
# training with remat (TrainConfig.model_options: unrolled, XLA keeps more recomputed activations
# live and the step's peak memory grows ~1.5x).
LAYER_LOOPS = ("scan", "unrolled", "auto")
LAYER_LOOP_AUTO = {"cpu": "unrolled"}


def resolve_layer_loop(layer_loop: str, platform: str | None = None) -> str:
    """`scan` or `unrolled`: what `layer_loop` means on `platform` (default: the compile target in
    force, else this process's backend). ValueError for a name outside LAYER_LOOPS."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop {layer_loop!r} not in {LAYER_LOOPS}")
    if layer_loop != "auto":
        return layer_loop
    return LAYER_LOOP_AUTO.get(platform or target_platform(), "scan")


class URMOutputs(NamedTuple):
    """What a URM returns per row: `reward` [B] (sum_k means_k * gate_k, in the promoted dtype of the
    two), `means`, `log_stds` and `gate` [B, K] (K attributes; value head in the compute dtype, gate in
    the gate compute dtype), `uncertainty` [B] float32 (sum_k exp(2 log_std_k), the total variance).
    Leading dims follow the pooled input ([B, S] for packed rows)."""
    reward: jax.Array  # [B]
    means: jax.Array  # [B, 5]
    log_stds: jax.Array  # [B, 5]
    gate: jax.Array  # [B, 5]
    uncertainty: jax.Array  # [B]: sum_k exp(2 log_std_k), float32


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a URM is built and run, apart from its shape (`ModelConfig`): the dtype policy, the remat
    policy (`none` | `full` | `dots`, per decoder layer), the attention implementation (see
    `urm_jax.model.attention`), Pallas interpret mode (CPU tests), LoRA adapters (training), and
    `mlp_chunk`: tokens per row the MLP runs on at a time (None: whole rows; see `token_chunks`),
    and `layer_loop`: how the decoder layers run (`scan` | `unrolled` | `auto`; LAYER_LOOPS).
    ValueError for an unknown remat, attention or layer_loop name, or an mlp_chunk under 1."""
    dtypes: DTypePolicy = DTypePolicy()
    remat: str = "none"
    attention: str = "reference"  # see urm_jax.model.attention: auto | reference | xla | cudnn | splash | blockwise
    attention_interpret: bool = False  # run Pallas kernels in interpret mode (CPU tests)
    lora: LoraConfig | None = None  # adapters on the kernels its targets select (training)
    mlp_chunk: int | None = None  # scoring: bounds the [B, L, intermediate] buffers of long rows
    layer_loop: str = "scan"  # training passes "auto" (TrainConfig.model_options)

    def __post_init__(self):
        resolve_layer_loop(self.layer_loop, "tpu")  # the name only: the platform is known at trace time
        if self.mlp_chunk is not None and self.mlp_chunk < 1:
            raise ValueError(f"mlp_chunk must be at least 1 token, got {self.mlp_chunk}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} not in {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:  # availability: when a model is built
            raise ValueError(f"attention implementation {self.attention!r} not in "
                             f"{ATTENTION_IMPLEMENTATIONS}")


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str, fan_in: int = 1,
           kernel_in_axes: int | None = None) -> nnx.Param:
    """A parameter with its logical axes; `kernel_in_axes` marks a projection kernel (a LoRA
    target) and says how many of its axes after `layers` are inputs."""
    assert len(shape) == len(axes), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros" or rngs is None:
        value = jnp.zeros(shape, dtype)
    else:  # unit-variance outputs: random models give O(1) rewards, so relative parity is meaningful
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)
    if kernel_in_axes is not None:
        return nnx.Param(value, logical_axes=tuple(axes), kernel_in_axes=kernel_in_axes)
    return nnx.Param(value, logical_axes=tuple(axes))


def _precision(dtype) -> jax.lax.Precision:
    # fp32 compute means "exact": without HIGHEST, TPUs and GPUs would run fp32 matmuls in bf16/tf32.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in float32, cast back to the input dtype, then scale."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its contiguous run of equal segment ids (0 at each run start).

    For a padding mask (segment 1 = real tokens) this equals cumsum(mask) - 1 on real tokens for
    left and right padding alike, so a row's numbers never depend on how it was padded."""
    idx = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - run_start


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the rightmost real token of each row (derived from the mask, not from pad ids)."""
    length = attention_mask.shape[-1]
    return length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading `layers` axis (kernels are [in, out])."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None):
        n, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.input_norm = _param(rngs, (n, d), ("layers", "norm"), dtype, "ones")
        self.q_proj = _param(rngs, (n, d, hq, hd), ("layers", "embed", "q_heads", "head_dim"), dtype, "normal", d, 1)
        self.k_proj = _param(rngs, (n, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), dtype, "normal", d, 1)
        self.v_proj = _param(rngs, (n, d, hkv, hd), ("layers", "embed", "kv_heads", "head_dim"), dtype, "normal", d, 1)
        self.o_proj = _param(rngs, (n, hq, hd, d), ("layers", "q_heads", "head_dim", "embed"), dtype, "normal", hq * hd, 2)
        self.post_attn_norm = _param(rngs, (n, d), ("layers", "norm"), dtype, "ones")
        self.gate_proj = _param(rngs, (n, d, f), ("layers", "embed", "mlp"), dtype, "normal", d, 1)
        self.up_proj = _param(rngs, (n, d, f), ("layers", "embed", "mlp"), dtype, "normal", d, 1)
        self.down_proj = _param(rngs, (n, f, d), ("layers", "mlp", "embed"), dtype, "normal", f, 1)


def decoder_layer(cfg: ModelConfig, options: ModelOptions, x, w: dict, cos, sin, segment_ids, allowed,
                  adapters: dict | None = None, lora_key: jax.Array | None = None):
    """One pre-norm Llama block on one layer's slice of the stacked weights.

    x [B, L, D] in the compute dtype; w: this layer's weights (kernels [in, out]); cos/sin
    [B, L, head_dim] RoPE tables; segment_ids [B, L]; allowed [B, L, L] bool or None (kernels that
    build their own mask); adapters: this layer's slice of the LoRA adapters by kernel name
    ({"q_proj": {"lora_a", "lora_b"}}), added to those projections' outputs; lora_key: this
    layer's dropout key (training) or None. Each sub-step runs under a `jax.named_scope` (qkv,
    rope, attention, o_proj, mlp) so profiles read by name, and the projection outputs carry
    `checkpoint_name` tags (q, k, v, attn_out, o_proj, mlp_gate, mlp_up, mlp_out) that remat
    policies can name."""
    dtype = x.dtype
    prec = _precision(dtype)
    adapters = adapters or {}

    def proj(equation, h, name):
        kernel = w[name].astype(dtype)
        # The MLP's projections take the 2-D backward (see `project` for why q/k/v/o do not).
        y = project(h, kernel, 1, prec) if name in MLP_KERNELS else jnp.einsum(equation, h, kernel, precision=prec)
        if name not in adapters:
            return y
        key = None if lora_key is None else lora_lib.dropout_key(lora_key, ("backbone", "layers", name))
        return y + lora_lib.delta(h, adapters[name][LORA_A], adapters[name][LORA_B], options.lora, key, prec)

    with jax.named_scope("qkv"):
        h = rms_norm(x, w["input_norm"], cfg.rms_norm_eps)
        q = checkpoint_name(proj("ble,ehd->blhd", h, "q_proj"), "q")
        k = checkpoint_name(proj("ble,ehd->blhd", h, "k_proj"), "k")
        v = checkpoint_name(proj("ble,ehd->blhd", h, "v_proj"), "v")
    with jax.named_scope("rope"):
        q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "q_heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
    with jax.named_scope("attention"):
        attn = checkpoint_name(attention(q, k, v, segment_ids, allowed, options.attention, prec,
                                         interpret=options.attention_interpret), "attn_out")
    with jax.named_scope("o_proj"):
        o = checkpoint_name(proj("blhd,hde->ble", attn, "o_proj"), "o_proj")
        x = constrain(x + o, ("batch", "seq", "act_embed"))
    def mlp(x):
        h = rms_norm(x, w["post_attn_norm"], cfg.rms_norm_eps)
        gate = checkpoint_name(proj("ble,ef->blf", h, "gate_proj"), "mlp_gate")
        up = checkpoint_name(proj("ble,ef->blf", h, "up_proj"), "mlp_up")
        act = constrain(swiglu(gate, up), ("batch", "seq", "mlp"))
        down = checkpoint_name(proj("blf,fe->ble", act, "down_proj"), "mlp_out")
        return x + down

    with jax.named_scope("mlp"):
        # Chunks only without dropout: a LoRA dropout key would repeat its mask in every chunk.
        chunk = options.mlp_chunk if lora_key is None else None
        return constrain(token_chunks(mlp, x, chunk), ("batch", "seq", "act_embed"))


def token_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int | None) -> jax.Array:
    """fn(x) for a token-wise `fn` ([B, l, D] -> [B, l, D], each token on its own, as the MLP),
    run on at most `chunk` tokens of every row at a time (None, or rows of at most `chunk` tokens:
    one call), so its intermediates ([B, chunk, F] instead of [B, L, F]) stay small on long rows.

    n = ceil(L / chunk) equal chunks of c = ceil(L / n) tokens; the last one starts at L - c and
    may overlap its neighbour, recomputing a few tokens from the same inputs (no padded copy of
    x). Same values as one call up to the matmuls' summation order (XLA picks kernels per shape)."""
    length = x.shape[1]
    if chunk is None or length <= chunk:
        return fn(x)
    n = -(-length // chunk)
    size = -(-length // n)

    def step(i, out):
        start = jnp.minimum(i * size, length - size)
        part = jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, fn(part).astype(out.dtype), start, axis=1)

    return jax.lax.fori_loop(0, n, step, jnp.zeros_like(x))


def _flat(x: jax.Array, kernel: jax.Array, in_axes: int):
    """(tokens, inputs, outputs): the sizes of the 2-D matmul `project` is."""
    lead, inner = x.shape[:x.ndim - in_axes], kernel.shape[:in_axes]
    if x.shape[x.ndim - in_axes:] != inner:
        raise ValueError(f"project: input axes {x.shape[x.ndim - in_axes:]} do not match the kernel's "
                         f"{inner} (kernel {kernel.shape}, {in_axes} input axes)")
    return math.prod(lead), math.prod(inner), math.prod(kernel.shape[in_axes:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def project(x: jax.Array, kernel: jax.Array, in_axes: int, precision) -> jax.Array:
    """x [..., in...] contracted with kernel [in..., out...] over the `in_axes` trailing axes of x
    and the leading ones of the kernel -> [..., out...] in their (common) dtype; ValueError when
    the axes differ. The forward is the einsum this replaced ("ble,ef->blf": scores are
    unchanged, bit for bit); the backward runs as two 2-D matmuls on [tokens, in] / [tokens, out] views.

    Why a custom backward: on XLA:CPU, JAX's own transpose of the 3-D contraction lays the output
    gradient out as [out, batch, seq] for the weight gradient, a transposing copy per projection
    that cost ~25% of the MLP's forward+backward at 1024 tokens (jax 0.10.2, 2-core CPU). The 2-D
    form computes the same sums (bit-identical gradients in that measurement); collapsing
    (batch, seq) is free in row-major layout and never merges a sharded axis into another: seq
    is never sharded and batch is the major one. The decoder uses it for the MLP only: routed
    through it, the attention projections' forward (kernels [E, H, D] / [H, D, E]) rounded
    differently from the inlined einsum (~1e-6 on scores, over test_model_parity's
    batch-composition bound), while the MLP's forward stays bit-identical."""
    _flat(x, kernel, in_axes)
    lead = x.ndim - in_axes
    letters = "abcdefghijklmnopqrstuvwxyz"
    xs, ks = letters[:x.ndim], letters[lead:lead + kernel.ndim]  # e.g. "abc,cde->abde"
    return jnp.einsum(f"{xs},{ks}->{xs[:lead]}{ks[in_axes:]}", x, kernel, precision=precision)


def _project_fwd(x, kernel, in_axes, precision):
    return project(x, kernel, in_axes, precision), (x, kernel)


def _project_bwd(in_axes, precision, residuals, grad):
    x, kernel = residuals
    tokens, inputs, outputs = _flat(x, kernel, in_axes)
    g = grad.reshape(tokens, outputs)
    k = kernel.reshape(inputs, outputs)
    dx = jax.lax.dot_general(g, k, (((1,), (1,)), ((), ())), precision=precision)
    dk = jax.lax.dot_general(x.reshape(tokens, inputs), g, (((0,), (0,)), ((), ())), precision=precision)
    return dx.reshape(x.shape).astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


project.defvjp(_project_fwd, _project_bwd)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up [..., F], in the inputs' dtype (the Llama MLP's activation, as HF computes it).

    JAX's own derivative is used. A hand-written backward (keeping only gate and up, recomputing
    the sigmoid) saved CPU step time but changed the rounding between one device and a mesh enough
    for Adam to amplify it on LoRA's near-zero gradients (tests/test_lora.py mesh test): kept out
    until it can be made rounding-stable."""
    return jax.nn.silu(gate) * up


class Backbone(nnx.Module):
    """Llama backbone weights: `embed_tokens` [vocab, D], the stacked `layers`, `final_norm` [D] (no
    lm_head)."""
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None):
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, "normal")
        self.layers = DecoderLayers(cfg, dtype, rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), dtype, "ones")


class Dense(nnx.Module):
    """A Linear layer with a [d_in, d_out] kernel (JAX layout: HF's weight transposed) and an optional
    [d_out] bias, both in `dtype`; normal init scaled by 1/sqrt(d_in), zero bias."""
    def __init__(self, d_in: int, d_out: int, axes, dtype, rngs: nnx.Rngs | None, bias: bool = True):
        self.kernel = _param(rngs, (d_in, d_out), axes, dtype, "normal", d_in, 1)
        self.bias = _param(rngs, (d_out,), axes[1:], dtype, "zeros") if bias else None

    def __call__(self, x, adapter: dict | None = None, lora: LoraConfig | None = None,
                 lora_key: jax.Array | None = None):
        """x [..., d_in] -> [..., d_out] in x's dtype; `adapter` ({"lora_a", "lora_b"}) adds its
        LoRA update after the bias, as peft does (dropout keyed by `lora_key` when given)."""
        prec = _precision(x.dtype)
        y = jnp.dot(x, self.kernel[...].astype(x.dtype), precision=prec)
        y = y if self.bias is None else y + self.bias[...].astype(x.dtype)
        if adapter is None:
            return y
        return y + lora_lib.delta(x, adapter[LORA_A], adapter[LORA_B], lora, lora_key, prec)


class Gate(nnx.Module):
    """weights.fc: Linear -> SELU -> Linear -> SELU -> Linear, with biases (indices 1 and 3 are
    the parameter-free SELUs of the HF Sequential)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs | None):
        d, k = cfg.hidden_size, cfg.num_attributes
        self.fc0 = Dense(d, d, ("embed", "gate_hidden"), dtype, rngs)
        self.fc2 = Dense(d, d, ("gate_hidden", "embed"), dtype, rngs)
        self.fc4 = Dense(d, k, ("embed", "attributes"), dtype, rngs)

    def __call__(self, x, adapters: dict | None = None, lora: LoraConfig | None = None,
                 lora_key: jax.Array | None = None):
        """adapters: the gate's LoRA adapters by layer ({"fc0": {"kernel": {...}}}), if any."""
        adapters = adapters or {}

        def fc(name, h):
            adapter = adapters.get(name, {}).get("kernel")
            key = None if lora_key is None else lora_lib.dropout_key(lora_key, ("gate", name, "kernel"))
            return getattr(self, name)(h, adapter, lora, key)

        return fc("fc4", selu(fc("fc2", selu(fc("fc0", x)))))


def selu(x):
    """SELU in x's dtype: scale * (x if x > 0 else alpha * (exp(x) - 1)), torch.nn.SELU's constants
    (Klambauer et al. 2017, "Self-Normalizing Neural Networks")."""
    return (SELU_SCALE * jnp.where(x > 0, x, SELU_ALPHA * jnp.expm1(x))).astype(x.dtype)


class URM(nnx.Module):
    """URM-LLaMa-3.1-8B in Flax NNX: Llama backbone, value head `value_head` ([D, 2K], no bias,
    interleaved (mean_k, log_std_k)), and gating MLP `gate` (D -> D -> D -> K, SELUs between), K =
    `cfg.num_attributes`. Backbone and value head are stored in `options.dtypes.param` (else
    `cfg.torch_dtype`), the gate in the policy's gate dtype (float16 by default, as the released
    model). `rngs=None` builds zero/one-filled parameters (for `abstract_model` and loading).
    ValueError when the attention implementation cannot run on this backend."""
    def __init__(self, cfg: ModelConfig, options: ModelOptions = ModelOptions(), *,
                 rngs: nnx.Rngs | None = None):
        # Here, not in ModelOptions: asking the backend at import time would start it before
        # jax.distributed.initialize can run.
        check_attention(options.attention, options.attention_interpret)
        self.cfg = cfg
        self.options = options
        dt = options.dtypes
        param_dtype = jnp.dtype(dt.param or cfg.torch_dtype)
        self.backbone = Backbone(cfg, param_dtype, rngs)
        self.value_head = Dense(cfg.hidden_size, cfg.num_labels, ("embed", "labels"), param_dtype,
                                rngs, bias=False)
        self.gate = Gate(cfg, jnp.dtype(dt.gate_param_dtype(cfg)), rngs)
        self.lora = None
        if options.lora is not None:
            targets = lora_targets(options.lora, self)
            values = lora_lib.init_adapters(options.lora, targets, None if rngs is None else rngs.params())
            self.lora = nnx.data(_adapter_params(values[LORA], targets, options.lora.r))

    def _adapters(self) -> dict:
        """The LoRA adapters as a pure dict of arrays (empty without LoRA)."""
        if self.lora is None:
            return {}
        return jax.tree.map(lambda p: p[...], self.lora, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def hidden_states(self, input_ids: jax.Array, segment_ids: jax.Array,
                      lora_key: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states [B, L, D] in the compute dtype.

        `segment_ids` [B, L]: 0 marks padding, equal positive ids mark one sequence; an attention
        mask is the one-sequence case. Tokens attend causally within their own segment only, and
        positions restart at each segment, so packed rows equal their sequences run alone.
        `lora_key`: LoRA dropout in training (None: no dropout)."""
        cfg = self.cfg
        compute = jnp.dtype(self.options.dtypes.compute)
        segment_ids = segment_ids.astype(jnp.int32)
        positions = segment_positions(segment_ids)
        cos, sin = cos_sin(positions, cfg.rope, cfg.head_dim)
        # The dense mask only for implementations that take one (splash, blockwise: from the ids).
        needs_mask = needs_dense_mask(self.options.attention, segment_ids.shape[-1])
        allowed = allowed_mask(segment_ids) if needs_mask else None

        x = jnp.take(self.backbone.embed_tokens[...], input_ids, axis=0).astype(compute)
        x = constrain(x, ("batch", "seq", "act_embed"))
        layer_weights = {name: p[...] for name, p in vars(self.backbone.layers).items()
                         if isinstance(p, nnx.Param)}

        options = self.options
        # Stacked adapters ride the scan with their kernels: each step sees one layer's slice.
        xs = {"w": layer_weights,
              "lora": self._adapters().get("backbone", {}).get("layers", {})}
        if lora_key is not None:
            xs["layer"] = jnp.arange(cfg.num_layers)

        def body(carry, xs):
            key = None if lora_key is None else jax.random.fold_in(lora_key, xs["layer"])
            return decoder_layer(cfg, options, carry, xs["w"], cos, sin, segment_ids, allowed,
                                 xs["lora"], key), None

        policy = REMAT_POLICIES[self.options.remat]
        if self.options.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        unrolled = resolve_layer_loop(self.options.layer_loop) == "unrolled"
        x, _ = jax.lax.scan(body, x, xs, unroll=unrolled)  # unroll=True: no loop at all
        return rms_norm(x, self.backbone.final_norm[...], cfg.rms_norm_eps)

    def pooled(self, input_ids: jax.Array, attention_mask: jax.Array,
               lora_key: jax.Array | None = None) -> jax.Array:
        """Hidden state of each row's last real token [B, D] (all the heads ever look at)."""
        h = self.hidden_states(input_ids, attention_mask, lora_key)
        idx = last_token_index(attention_mask)
        return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]

    def pooled_segments(self, input_ids: jax.Array, segment_ids: jax.Array,
                        pool_index: jax.Array, lora_key: jax.Array | None = None) -> jax.Array:
        """Hidden states at `pool_index` [B, S] (each packed sequence's last token) -> [B, S, D]."""
        h = self.hidden_states(input_ids, segment_ids, lora_key)
        return jnp.take_along_axis(h, pool_index[:, :, None], axis=1)

    def heads(self, pooled: jax.Array, lora_key: jax.Array | None = None) -> URMOutputs:
        """Value head, gate and reward on pooled hidden states [..., D] (stage 2 trains on cached
        ones). Leading dims are kept: [B, D] -> [B] rewards, [B, S, D] -> [B, S]. `lora_key`:
        LoRA dropout of adapted head kernels in training (None: no dropout)."""
        adapters, lora = self._adapters(), self.options.lora
        value_key = None if lora_key is None else lora_lib.dropout_key(lora_key, ("value_head", "kernel"))
        z = self.value_head(pooled.astype(self.options.dtypes.compute),
                            adapters.get("value_head", {}).get("kernel"), lora, value_key)
        means, log_stds = z[..., 0::2], z[..., 1::2]  # interleaved: view(B, 5, 2)
        gate = self.gate(pooled.astype(self.options.dtypes.gate_dtype(self.cfg)), adapters.get("gate"),
                         lora, lora_key)
        reward_dtype = jnp.promote_types(means.dtype, gate.dtype)
        reward = jnp.sum(means.astype(reward_dtype) * gate.astype(reward_dtype), axis=-1)
        uncertainty = jnp.sum(jnp.exp(2.0 * log_stds.astype(jnp.float32)), axis=-1)
        return URMOutputs(reward, means, log_stds, gate, uncertainty)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> URMOutputs:
        """Score a batch: `input_ids` [B, L] int token ids, `attention_mask` [B, L] (1 = real token, left or
        right padding) -> `URMOutputs` pooled at each row's last real token (see `heads` for dtypes)."""
        return self.heads(self.pooled(input_ids, attention_mask))


def kernel_table(model: nnx.Module) -> dict[Path, Kernel]:
    """Every projection kernel of a model (the parameters marked with `kernel_in_axes`), by
    path in tree order: what LoRA can adapt."""
    state = nnx.state(model, nnx.Param)
    out = {}
    for path, var in jax.tree_util.tree_flatten_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        meta = var.get_metadata()
        if meta.get("kernel_in_axes") is not None:
            value = var.get_value()  # an array, or a ShapeDtypeStruct in an abstract model
            out[tuple(str(k.key) for k in path)] = Kernel(tuple(value.shape), tuple(meta["logical_axes"]),
                                                          int(meta["kernel_in_axes"]), jnp.dtype(value.dtype))
    return out


def lora_targets(lora: LoraConfig, model: nnx.Module) -> dict[Path, Kernel]:
    """The kernels `lora.targets` select in `model` (ValueError naming the pattern otherwise)."""
    kernels = kernel_table(model)
    params = leaf_paths(nnx.state(model, nnx.Param).to_pure_dict())
    return {p: kernels[p] for p in lora_lib.resolve_targets(lora.targets, kernels, params)}


@functools.lru_cache(maxsize=1)
def _structure() -> nnx.Module:
    """A one-layer abstract URM: the parameter tree's structure (names, which are kernels), which
    no model size changes."""
    tiny = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, max_position_embeddings=8,
                       rope=RopeConfig(theta=1e4), pad_token_id=None, bos_token_id=None, eos_token_ids=())
    return abstract_model(tiny)


def lora_target_paths(lora: LoraConfig) -> list[Path]:
    """The kernel paths `lora.targets` select in any URM (ValueError naming the pattern when one
    selects no projection kernel): the check a training config runs before any model exists."""
    return list(lora_targets(lora, _structure()))


@functools.lru_cache(maxsize=64)
def reaches_backbone(patterns: tuple[str, ...]) -> bool:
    """Whether the trainable path `patterns` select a backbone parameter (e.g. `backbone`,
    `*q_proj*`). Stage 2 cannot train those on features pooled once (the features would not
    follow them); its LoRA adapters sit on gate kernels only (TrainConfig refuses others)."""
    paths = leaf_paths(nnx.state(_structure(), nnx.Param).to_pure_dict())
    return any(matches(path, pattern) for path in paths if path[0] == "backbone" for pattern in patterns)


def _adapter_params(values: dict, targets: dict[Path, Kernel], r: int) -> dict:
    """The adapter arrays as nnx.Params with their logical axes (the kernel's, plus lora_rank)."""
    out: dict = {}
    for target, kernel in targets.items():
        _, a_axes, _, b_axes = kernel.adapter_shapes(r)
        node, src = out, values
        for part in target:
            node, src = node.setdefault(part, {}), src[part]
        node[LORA_A] = nnx.Param(src[LORA_A], logical_axes=a_axes)
        node[LORA_B] = nnx.Param(src[LORA_B], logical_axes=b_axes)
    return out


def init_lora(cfg: ModelConfig, options: ModelOptions, seed: int) -> dict:
    """Fresh adapters for `options.lora` as a pure-dict tree ({"lora": ...}) that
    `merge`s with a checkpoint's parameters; A from `seed`'s LoRA stream, B zeros. Only the
    adapters are allocated (the model is abstract)."""
    targets = lora_targets(options.lora, abstract_model(cfg, dataclasses.replace(options, lora=None)))
    return lora_lib.init_adapters(options.lora, targets, lora_lib.training_key(seed))


def init_random(cfg: ModelConfig, options: ModelOptions = ModelOptions(), seed: int = 0) -> URM:
    """A URM with random parameters from `seed` (normal / sqrt(fan_in) kernels, unit norms, zero biases):
    tests and demos."""
    return URM(cfg, options, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, options: ModelOptions = ModelOptions()) -> URM:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and logical axes, nothing allocated."""
    return nnx.eval_shape(lambda: URM(cfg, options, rngs=None))


def param_logical_axes(model: URM) -> dict:
    """Pure-dict tree of each parameter's logical axes, matching `nnx.state(model).to_pure_dict()`."""
    state = nnx.state(model, nnx.Param)
    axes = jax.tree.map(lambda p: p.get_metadata()["logical_axes"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.State(axes).to_pure_dict() if not isinstance(axes, dict) else axes


def model_from_params(cfg: ModelConfig, params: dict, options: ModelOptions = ModelOptions()) -> URM:
    """A URM holding `params` (the pure-dict tree of a checkpoint, numpy or jax arrays, possibly
    sharded). Backbone and value head are cast to `options.dtypes.param` when set (else each keeps
    its dtype); the gate to the policy's gate dtype."""
    graphdef, abstract = nnx.split(abstract_model(cfg, options))
    expected = abstract.to_pure_dict()
    got_paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    want_paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if got_paths != want_paths:
        fmt = lambda ps: sorted(jax.tree_util.keystr(p) for p in ps)  # noqa: E731
        raise ValueError(f"parameter tree mismatch: missing {fmt(want_paths - got_paths)}, "
                         f"unexpected {fmt(got_paths - want_paths)}")
    gate_dtype = jnp.dtype(options.dtypes.gate_param_dtype(cfg))
    param_dtype = options.dtypes.param

    casts = []

    def cast(path, value, want):
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"{jax.tree_util.keystr(path)}: shape {tuple(value.shape)}, "
                             f"model expects {tuple(want.shape)}")
        dtype = gate_dtype if is_gate(path) else (jnp.dtype(param_dtype) if param_dtype else value.dtype)
        if value.dtype == dtype:
            return value
        source = jnp.asarray(value)
        out = source.astype(dtype)
        casts.append((".".join(str(k.key) for k in path), source, out))
        return out

    values = jax.tree_util.tree_map_with_path(cast, params, expected)
    check_device_casts(casts, "model parameters")  # a down-cast never turns a weight into Inf
    abstract.replace_by_pure_dict(values)
    return nnx.merge(graphdef, abstract)


def param_shardings(cfg: ModelConfig, mesh, rules=None, options: ModelOptions = ModelOptions()) -> dict:
    """Pure-dict tree of NamedSharding for every parameter, from its logical axes and shape."""
    model = abstract_model(cfg, options)
    shapes = nnx.state(model).to_pure_dict()
    return jax.tree.map(lambda axes, s: named_sharding(mesh, axes, s.shape, rules),
                        param_logical_axes(model), shapes,
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x))


class ModelBinder:
    """Rebuilds a URM from a pure-dict params tree inside traced code (train steps, gradients):
    the graph structure is fixed once from the abstract model; each call only swaps leaves."""

    def __init__(self, cfg: ModelConfig, options: ModelOptions = ModelOptions()):
        self.graphdef, self._abstract = nnx.split(abstract_model(cfg, options))

    def __call__(self, params: dict) -> URM:
        """A URM whose parameters are the leaves of `params` (pure-dict tree, same structure as the abstract
        model; arrays or tracers, not cast or checked)."""
        state = jax.tree.map(lambda x: x, self._abstract)
        state.replace_by_pure_dict(params)
        return nnx.merge(self.graphdef, state)
