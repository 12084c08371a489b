"""LoRA (low-rank adaptation, Hu et al. 2021) of the URM's projection kernels, in the meaning the
field standardised on (Hugging Face peft's `LoraConfig`):

    y = x W + s * (dropout(x) A) B        A: [in..., r]   B: [r, out...]
    s = alpha / r                         (`use_rslora: true`: s = alpha / sqrt(r), rsLoRA)

* `r` is the rank, `alpha` the scaling numerator (peft `lora_alpha`), `dropout` the probability
  of zeroing an input element of the adapter path (peft `lora_dropout`), in training only; the
  base path always sees the undropped input.
* A starts Kaiming-uniform as peft's default and `nn.Linear` (U(-1/sqrt(fan_in), +1/sqrt(fan_in)),
  fan_in = the kernel's input size), or Gaussian N(0, 1/r^2) (`init: gaussian`, peft's
  "gaussian"); B starts at zero, so a fresh adapter leaves every output bit for bit unchanged.
* Targets are path patterns over the parameter tree (`urm_jax.model.paths`), e.g.
  `backbone/layers/q_proj` or `backbone/layers/*_proj` (peft's `target_modules`, by path). A
  pattern adapts the projection kernels among what it selects: the parameters the model marks
  with `kernel_in_axes` (how many of their axes, after `layers`, are contracted with the input);
  norms, embeddings and biases are never adapted, and a pattern that selects none is refused.

Adapters are parameters like any other. They live in the tree under `lora/<target path>/`
(`lora/backbone/layers/q_proj/lora_a`), are stacked on the `layers` axis like their kernel
([L, in..., r] and [L, r, out...]) and sliced per layer inside the layer scan, and carry logical
axes (the kernel's input axes + `lora_rank`; `lora_rank` + its output axes) so every mesh shards
them like their kernel. They train when a trainable pattern selects them (`lora`).

Merging (`merge_kernel`) folds an adapter into its kernel for saving: W + s * A B is computed in
float32 (W upcast exactly, the product at HIGHEST precision) and rounded once, by the caller, to
the save dtype; no adapter tensor is ever saved in a model checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Literal

import jax
import jax.numpy as jnp

from urm_jax.model.paths import LORA, Path, check_patterns, matches, path_name

LORA_A, LORA_B = "lora_a", "lora_b"
RANK_AXIS = "lora_rank"
INITS = ("kaiming", "gaussian")
# Streams of the training seed that belong to LoRA: adapter init, and the dropout masks (folded
# into each micro-batch's key). Far from the small integers steps and micro-batches use.
INIT_STREAM = 2**31 - 3
DROPOUT_STREAM = 2**31 - 4


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora:` section of a training recipe (see the module docstring for the meaning).
    ValueError names the `lora.<field>` key on a value out of range."""

    targets: tuple[str, ...] = ("backbone/layers/*_proj",)  # every projection of every layer
    r: int = 8  # peft's default rank
    alpha: float = 8.0  # peft's default lora_alpha: s = alpha / r = 1
    dropout: float = 0.0
    use_rslora: bool = False
    init: Literal[INITS] = "kaiming"

    def __post_init__(self):
        try:
            object.__setattr__(self, "targets", check_patterns(self.targets))
        except ValueError as err:
            raise ValueError(f"`lora.targets`: {err}") from None
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"`lora.r`: the rank must be an integer >= 1, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"`lora.alpha`: must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"`lora.dropout`: must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"`lora.init`: {self.init!r} is not one of {list(INITS)}")

    @property
    def scaling(self) -> float:
        """s: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """What LoRA needs to know of a projection kernel: its shape and logical axes (a leading
    `layers` axis when stacked) and how many of the following axes are inputs."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    in_axes: int
    dtype: jnp.dtype

    @property
    def stacked(self) -> bool:
        """Whether the kernel has a leading `layers` axis (a decoder-layer projection)."""
        return self.axes[:1] == ("layers",)

    def adapter_shapes(self, r: int) -> tuple[tuple, tuple, tuple, tuple]:
        """(A shape, A logical axes, B shape, B logical axes)."""
        lead = 1 if self.stacked else 0
        cut = lead + self.in_axes
        return ((*self.shape[:cut], r), (*self.axes[:cut], RANK_AXIS),
                (*self.shape[:lead], r, *self.shape[cut:]), (*self.axes[:lead], RANK_AXIS, *self.axes[cut:]))

    @property
    def fan_in(self) -> int:
        """Input features of one (layer's) kernel: the product of its input axes (e.g. D for q_proj)."""
        lead = 1 if self.stacked else 0
        return math.prod(self.shape[lead:lead + self.in_axes])

    @property
    def fan_out(self) -> int:
        """Output features of one matrix (elements after the input axes; a stacked layer axis excluded)."""
        return math.prod(self.shape[(1 if self.stacked else 0) + self.in_axes:])

    @property
    def max_rank(self) -> int:
        """min(in, out): the rank of a full update of this kernel."""
        return min(self.fan_in, self.fan_out)


def resolve_targets(patterns, kernels: dict[Path, Kernel], params: list[Path]) -> list[Path]:
    """The kernel paths `patterns` select, in tree order. A pattern adapts every projection
    kernel among the parameters it selects (`gate/fc0`: its kernel, not its bias; `backbone`:
    every projection of every layer). ValueError names a pattern that selects no parameter, or
    only parameters that are not projection kernels (norms, embeddings, biases: LoRA adapts
    matrices that multiply an input)."""
    kernel_names = ", ".join(path_name(p) for p in kernels)
    for pattern in check_patterns(list(patterns)):
        hit = [p for p in params if matches(p, pattern)]
        if not hit:
            raise ValueError(f"`lora.targets`: pattern {pattern!r} selects no parameter; projection "
                             f"kernels are {kernel_names}")
        if not any(p in kernels for p in hit):
            shown = ", ".join(path_name(p) for p in hit[:3]) + (", ..." if len(hit) > 3 else "")
            raise ValueError(f"`lora.targets`: pattern {pattern!r} selects {shown}, not a projection "
                             f"kernel; LoRA adapts {kernel_names}")
    return [p for p in params if p in kernels and any(matches(p, q) for q in patterns)]


def check_rank(cfg: LoraConfig, targets: dict[Path, Kernel]) -> None:
    """ValueError naming `lora.r` and the matrix when the rank exceeds min(in, out) of a
    targeted kernel (the smallest such, named): A B then has more parameters than the
    full-rank update it stands for and no more capacity."""
    if not targets:
        return
    target, kernel = min(targets.items(), key=lambda item: item[1].max_rank)
    if cfg.r > kernel.max_rank:
        raise ValueError(f"`lora.r`: rank {cfg.r} is larger than min(in, out) = {kernel.max_rank} "
                         f"of {path_name(target)} ({kernel.fan_in} x {kernel.fan_out}); a rank "
                         f"above it adds parameters, not capacity: use `lora.r` <= "
                         f"{kernel.max_rank} for these targets")


def adapter_path(target: Path, which: str) -> Path:
    """`lora/<target>/lora_a|lora_b`."""
    return (LORA, *target, which)


def _stream_key(key: jax.Array, target: Path) -> jax.Array:
    # By name, not by position: adding a target never changes another target's numbers.
    return jax.random.fold_in(key, zlib.crc32(path_name(target).encode()) & 0x7FFFFFFF)


def init_adapter(key: jax.Array, target: Path, kernel: Kernel, cfg: LoraConfig, dtype) -> tuple:
    """(A, B) of one target: A drawn per `cfg.init` in float32 then cast to `dtype`, B zeros."""
    a_shape, _, b_shape, _ = kernel.adapter_shapes(cfg.r)
    k = _stream_key(key, target)
    if cfg.init == "kaiming":  # kaiming_uniform(a=sqrt(5)): bound = 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(kernel.fan_in)
        a = jax.random.uniform(k, a_shape, jnp.float32, -bound, bound)
    else:
        a = jax.random.normal(k, a_shape, jnp.float32) / cfg.r
    return a.astype(dtype), jnp.zeros(b_shape, dtype)


def init_adapters(cfg: LoraConfig, targets: dict[Path, Kernel], key: jax.Array | None) -> dict:
    """Pure-dict tree {"lora": {<target path>: {"lora_a": A, "lora_b": B}}} for `targets` (as
    `resolve_targets` chose them). Each adapter takes its kernel's dtype. `key` None: zeros
    (shapes only, e.g. under eval_shape)."""
    tree: dict = {}
    for target, kernel in targets.items():
        if key is None:
            a_shape, _, b_shape, _ = kernel.adapter_shapes(cfg.r)
            a, b = jnp.zeros(a_shape, kernel.dtype), jnp.zeros(b_shape, kernel.dtype)
        else:
            a, b = init_adapter(key, target, kernel, cfg, kernel.dtype)
        node = tree.setdefault(LORA, {})
        for part in target:
            node = node.setdefault(part, {})
        node[LORA_A], node[LORA_B] = a, b
    return tree


def training_key(seed: int) -> jax.Array:
    """The key adapters of a training run start from (a stream of the run's seed)."""
    return jax.random.fold_in(jax.random.key(seed), INIT_STREAM)


def dropout_key(key: jax.Array, target: Path, layer: jax.Array | None = None) -> jax.Array:
    """The dropout key of one target (and one layer of a stacked target) from a micro-batch's."""
    if layer is not None:
        key = jax.random.fold_in(key, layer)
    return _stream_key(key, target)


def delta(x: jax.Array, a: jax.Array, b: jax.Array, cfg: LoraConfig, key: jax.Array | None,
          precision) -> jax.Array:
    """s * (dropout(x) A) B in x's dtype. x [..., in...]; a [in..., r]; b [r, out...] (one layer's
    slice of a stacked adapter) -> [..., out...]. `key` None: no dropout (evaluation, scoring)."""
    dtype = x.dtype
    if key is not None and cfg.dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - cfg.dropout, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1.0 - cfg.dropout, dtype), jnp.zeros((), dtype))
    xa = jnp.tensordot(x, a.astype(dtype), axes=a.ndim - 1, precision=precision)  # [..., r]
    return jnp.tensordot(xa, b.astype(dtype), axes=1, precision=precision) * cfg.scaling


def merge_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scaling: float, stacked: bool) -> jax.Array:
    """W + s * A B in float32 (rounding to a storage dtype is the caller's, once). Works on row
    blocks: a stacked kernel's layers [l0:l1] with A and B's same layers, or an unstacked
    kernel's input rows [i0:i1] with A's same rows and all of B."""
    if stacked:
        return jax.vmap(lambda w_, a_, b_: merge_kernel(w_, a_, b_, scaling, False))(w, a, b)
    ab = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1,
                       precision=jax.lax.Precision.HIGHEST)
    return w.astype(jnp.float32) + jnp.float32(scaling) * ab
