"""Causal grouped-query attention within segments, behind one switch.

    reference  einsum + float32 softmax, mirroring HF's eager attention op by op (any backend)
    xla        jax.nn.dot_product_attention(implementation="xla")
    cudnn      jax.nn.dot_product_attention(implementation="cudnn"): fused flash attention on GPU
    splash     Pallas splash attention on TPU (segment ids, causal mask, blocks skipped)
    blockwise  online-softmax (flash-style) attention in plain JAX, any backend: no L x L tensor,
               key blocks above the causal diagonal or outside the query block's segments are
               skipped, and the backward recomputes blocks from q, k, v, the output and the
               log-sum-exp (a custom VJP), so memory is linear in L forward and backward
    auto       splash on TPU, cudnn on GPU; on CPU reference for rows shorter than
               AUTO_BLOCKWISE_LENGTH tokens (as fast there, and HF's exact op order), blockwise from it

Every implementation takes q [B, L, Hq, D], k/v [B, L, Hkv, D] and segment ids [B, L] (0 = pad;
a token attends causally to earlier tokens of its own segment) and returns [B, L, Hq, D]. Tests
check each available one against `reference`; splash also runs on CPU in Pallas interpret mode.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from urm_jax.model.blockwise import blockwise_attention
from urm_jax.sharding import active_mesh

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "splash", "blockwise")


# What `auto` picks per platform: the fused kernel where one exists.
AUTO = {"tpu": "splash", "gpu": "cudnn", "cpu": "reference"}
# On CPU, rows of at least this many (padded) tokens run `blockwise` under `auto`. Measured on a
# 2-core CPU (jitted forward, interleaved medians; 8 q / 2 kv heads of 64 and 32 / 8 of 128):
# up to 128 tokens both take the same time (one block); blockwise is 2-3x faster at 256 tokens
# (3.3 vs 7.0 ms and 50 vs 170 ms), 4-8x at 1024 (79 vs 322 ms and 247 vs 1997 ms), and the gap
# grows with L (no L x L softmax through memory, the blocks above the diagonal skipped). Below
# the threshold `auto` keeps the reference's exact op order.
AUTO_BLOCKWISE_LENGTH = {"cpu": 256}
# Block edge (tokens) of `blockwise`, for queries and keys alike, per platform. CPU: 128 was the
# fastest of 64..512 at 512-4096 tokens (a 128 x 128 float32 block per head stays in L2);
# accelerators: larger blocks, since each loop step is a kernel launch.
BLOCK = {"cpu": 128}
BLOCK_DEFAULT = 512

# The platform a program is being compiled for when it is not this process's backend: a TPU
# topology compiled ahead of time on a CPU host (`urm-jax plan`). None: this process's backend.
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str) -> Iterator[None]:
    """Resolve `auto` and check kernel availability for `platform` (tpu | gpu | cpu) instead of
    this process's backend, while building and tracing a program for that platform's devices."""
    if platform not in AUTO:
        raise ValueError(f"compile target {platform!r} not in {sorted(AUTO)}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform programs are built for: the `compile_target` in force, else the backend."""
    return _TARGET.get() or jax.default_backend()


def block_size(platform: str | None = None) -> int:
    """`blockwise`'s block edge on `platform` (default: the compile target, else this process's
    JAX backend)."""
    return BLOCK.get(platform or target_platform(), BLOCK_DEFAULT)


# Implementations that never build an L x L tensor (nor take the dense mask, except cudnn).
LINEAR_MEMORY = ("splash", "cudnn", "blockwise")


def resolve(implementation: str, platform: str | None = None, length: int | None = None) -> str:
    """The implementation `implementation` means on `platform` (tpu | gpu | cpu; default: the
    `compile_target` in force, else this process's JAX backend) for rows of `length` tokens
    (None: short rows): `auto` becomes the platform's fused kernel (AUTO), or `blockwise` for rows
    of at least AUTO_BLOCKWISE_LENGTH tokens; the others stay."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    if platform is None:  # the compile target or this process; an unknown backend: the portable paths
        platform = target_platform()
        if platform not in AUTO:
            platform = "cpu"
    if platform not in AUTO:
        raise ValueError(f"attention 'auto' depends on the platform: one of {sorted(AUTO)}, "
                         f"got {platform!r}")
    long_rows = AUTO_BLOCKWISE_LENGTH.get(platform)
    if long_rows is not None and length is not None and length >= long_rows:
        return "blockwise"
    return AUTO[platform]


# The platform each kernel exists on: asking for it elsewhere fails here, in one line, instead of
# deep inside Pallas lowering or a cuDNN call. Splash also runs anywhere in interpret mode (tests).
PLATFORM = {"cudnn": "gpu", "splash": "tpu"}


def check_available(implementation: str, interpret: bool = False) -> str:
    """The resolved implementation (short rows), if it can run on this process's backend (or on
    the `compile_target` in force: a TPU program compiled on a CPU host may use splash)."""
    impl = resolve(implementation)
    need, backend = PLATFORM.get(impl), target_platform()
    if need and backend != need and not (impl == "splash" and interpret):
        raise ValueError(f"attention {impl!r} needs a {need.upper()}; this run's JAX backend is "
                         f"{backend!r}: use blockwise (any backend, memory linear in the length) or "
                         "auto (--attention, or `attention:` in a recipe)")
    return impl


# Splash's block edge (tokens, queries and keys alike): the kernel's default and TPU-friendly.
SPLASH_BLOCK = 512


def splash_length_problem(length: int, block: int = SPLASH_BLOCK) -> str | None:
    """Why splash attention cannot run rows of `length` tokens (None when it can): the length
    must be a multiple of 128 (TPU lanes) and of the block edge (min(block, length))."""
    block = min(block, length)
    if length % block or block % 128:
        return (f"splash attention needs the sequence length ({length}) to be a multiple of 128 and "
                f"of its block size ({block})")
    return None


def allowed_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, L, L] bool: causal, same segment, never a padding key."""
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    return causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)


def reference_attention(q, k, v, allowed, precision):
    """Plain-XLA grouped-query attention, softmax in float32 (HF's eager attention).

    q [B, L, Hq, hd], k and v [B, L, Hkv, hd] (Hq a multiple of Hkv), `allowed` [B, L, L] bool (see
    `allowed_mask`) -> [B, L, Hq, hd] in q's dtype; scores scaled by hd ** -0.5. Fully masked rows
    (padding queries) give finite values, not NaN."""
    batch, length, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, q_heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, precision=precision) * jnp.asarray(
        head_dim ** -0.5, q.dtype)
    # A finite minimum instead of -inf: fully masked rows (padding queries) stay NaN-free.
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, precision=precision)
    return out.reshape(batch, length, q_heads, head_dim)


def fused_attention(q, k, v, allowed, implementation: str):
    """jax.nn.dot_product_attention handles GQA (Hq a multiple of Hkv) natively."""
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation=implementation)


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False, block: int = SPLASH_BLOCK):
    """Pallas splash attention, one MQA kernel per KV head (vmapped), one call per row (vmapped).
    Under an active mesh the call is wrapped in shard_map (batch over data/fsdp, KV heads over
    tensor), since a Pallas kernel cannot be partitioned by GSPMD."""

    active = active_mesh()
    if active is None:
        return _splash_local(q, k, v, segment_ids, interpret=interpret, block=block)
    mesh, rules = active

    batch = rules.spec(("batch",), mesh, q.shape[:1])[0]
    heads = rules.spec(("kv_heads",), mesh, k.shape[2:3])[0]
    qkv_spec = P(batch, None, heads, None)
    local = functools.partial(_splash_local, interpret=interpret, block=block)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, segment_ids)


def _splash_local(q, k, v, segment_ids, *, interpret: bool, block: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)

    batch, length, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    problem = splash_length_problem(length, block)
    if problem:
        raise ValueError(f"{problem}; pad sequences accordingly")
    block = min(block, length)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                  block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                  block_q_dq=block, block_kv_dq=block)
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length))] * group)
    kernel = kernel_lib.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
    scale = jnp.asarray(head_dim ** -0.5, q.dtype)
    # [B, L, Hkv, G, D] -> [B, Hkv, G, L, D]; k, v -> [B, Hkv, L, D]
    qg = (q * scale).reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_row(q_row, k_row, v_row, seg):
        ids = kernel_lib.SegmentIds(q=seg, kv=seg)
        per_head = jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))
        return per_head(q_row, k_row, v_row)

    out = jax.vmap(one_row)(qg, kg, vg, segment_ids)  # [B, Hkv, G, L, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, q_heads, head_dim)


def needs_dense_mask(implementation: str, length: int) -> bool:
    """Whether `attention` reads the [B, L, L] `allowed` mask for rows of `length` tokens (the
    others build what they need from the segment ids)."""
    return resolve(implementation, length=length) in ("reference", "xla", "cudnn")


def attention(q, k, v, segment_ids, allowed, implementation: str, precision, interpret: bool = False):
    """q [B, L, Hq, D], k/v [B, L, Hkv, D], segment_ids [B, L], allowed [B, L, L] bool (or None
    where `needs_dense_mask` is false) -> [B, L, Hq, D] by `implementation` (resolved for L)."""
    impl = resolve(implementation, length=q.shape[1])
    if impl == "reference":
        return reference_attention(q, k, v, allowed, precision)
    if impl in ("xla", "cudnn"):
        return fused_attention(q, k, v, allowed, impl)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, segment_ids, precision, block=block_size())
    return splash_attention(q, k, v, segment_ids, interpret=interpret)
