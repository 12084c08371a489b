"""Will a scoring batch fit: the device memory one forward needs at a batch shape, the memory this
process may use, and, per length bucket, the rows and attention that fit (or a clear refusal).

The estimate (`forward_bytes`) is a model of XLA's buffer assignment of the scoring forward, not a
compile: the engine asks it for every bucket before anything is compiled, and a compile per
candidate shape would cost more than the scoring. Per device, for b rows of L tokens (weights are
already resident and left out; they are part of what the device reports as used):

  per-token tensors   b·L·(2D + 2(Hq+Hkv)·hd + 2·hd) + b·min(L, chunk)·2F elements: the residual
                      stream and its norm, q/k/v and the attention output, the RoPE tables, and
                      the MLP's gate and up projections (XLA fuses the rest of a layer into them)
                      of the tokens it runs on at a time (`mlp_chunk`, MLP_CHUNK); counted at 4 bytes
                      each whatever the compute dtype (XLA's CPU backend computes bf16
                      elementwise ops in float32; an upper bound elsewhere)
  one layer's weights sliced out of the stacked layers by the scan, at 4 bytes per parameter
  attention           reference, xla: the [b, Hq, L, L] scores at SCORE_BYTES_FORWARD bytes per
                      element plus the [b, L, L] bool mask; blockwise: one block pair's logits and
                      probabilities, its accumulators, the output buffer, the softmax statistics,
                      copies of q, k, v padded to whole blocks (when L is not a multiple); splash, cudnn: the kernel-layout copies of q, k, v
                      and the output, the statistics (cudnn also the dense mask and its bias).

tests/test_scoring_memory.py holds the estimate between 1x and 3x XLA's own buffer assignment
(`compiled.memory_analysis()`) of the real forward for both attention paths and both compute
dtypes. The tiny model with 4 heads at 131072 tokens comes to 842 GB with reference attention,
the figure XLA asked for in the issue that motivated this module.

Memory available (`available_bytes`): an accelerator's `memory_stats()` (limit minus in use), else
the host's available RAM (/proc/meminfo MemAvailable) shared by the local CPU devices; minus a
margin (MARGIN) for XLA's own reservations, other processes and the estimate's error.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
from pathlib import Path

from urm_jax.config import ModelConfig
from urm_jax.model.attention import block_size, resolve, target_platform

# Bytes per element of the [B, Hq, L, L] scores in the forward: the logits and the float32
# softmax's exponentials and probabilities (3 float32-sized buffers). XLA's CPU buffer assignment
# of the tiny and a 256-wide model's forward holds 12.3 bytes per element, mask included.
SCORE_BYTES_FORWARD = 12
ACT_BYTES = 4  # per activation element (see the module doc)
STATS_BYTES = 8  # per (row, head, token): softmax max / sum, or log-sum-exp
MARGIN = {"cpu": 0.2, "accelerator": 0.1}  # fraction of the available memory kept free
DENSE = ("reference", "xla")
GB = 1e9
# Tokens per row the scoring forward's MLP runs on at a time, per platform (absent: whole rows; see
# `urm_jax.model.urm.token_chunks`). CPU: on a 2-core CPU at 8192 tokens (hidden 768, intermediate
# 2048, fp32) chunks of 1024 cut the MLP's temporaries from 201 to 25 MB and its CPU time by ~20%
# (cache-sized blocks; 512 as fast, 2048 slower); same values up to summation order (3e-7 relative).
MLP_CHUNK = {"cpu": 1024}


def mlp_chunk(platform: str | None = None) -> int | None:
    """Tokens per row the scoring MLP runs on at a time on `platform` (default: the compile
    target, else this process's JAX backend); None: whole rows."""
    return MLP_CHUNK.get(platform or target_platform())


class SequenceTooLong(ValueError):
    """A sequence whose length bucket cannot run one row per device in the memory available."""


def forward_bytes(cfg: ModelConfig, rows: int, length: int, attention: str, *,
                  platform: str | None = None, mlp_chunk: int | None = None) -> int:
    """Estimated bytes per device of one scoring forward at [rows, length] (rows on this device)
    with `attention` (any name; resolved for `length` on `platform`), weights excluded;
    `mlp_chunk`: tokens per row the MLP runs on at a time (None: whole rows)."""
    impl = resolve(attention, platform, length=length)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_heads, cfg.num_kv_heads
    tokens = rows * length
    mlp_tokens = rows * min(length, mlp_chunk or length)
    per_token = 2 * d + 2 * (hq + hkv) * hd + 2 * hd
    layer_params = 2 * d * hq * hd + 2 * d * hkv * hd + 3 * d * f + 2 * d
    total = (tokens * per_token + mlp_tokens * 2 * f + layer_params) * ACT_BYTES + tokens * 16  # + ids, masks
    if impl in DENSE:
        total += rows * hq * length * length * SCORE_BYTES_FORWARD + rows * length * length
    elif impl == "blockwise":
        block = min(block_size(platform), length)
        padded = -(-length // block) * block
        total += rows * hq * block * (3 * block + 2 * hd) * 4  # logits, probabilities, accumulators
        total += rows * padded * (hq * hd * ACT_BYTES + hq * STATS_BYTES)  # output buffer, statistics
        if padded != length:  # q, k, v padded to whole blocks
            total += rows * padded * (hq + 2 * hkv) * hd * ACT_BYTES
    else:  # splash, cudnn: flash kernels
        total += tokens * 2 * (hq + hkv) * hd * ACT_BYTES + tokens * hq * STATS_BYTES
        if impl == "cudnn":
            total += rows * length * length * 3
    return int(total)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # other POSIX systems: free pages (an underestimate of what could be reclaimed)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def host_available_bytes() -> int | None:
    """The bytes this process may still take on the host, no margin: the available RAM
    (/proc/meminfo MemAvailable, else free pages), capped by the process's address-space limit
    (`ulimit -v`, RLIMIT_AS) when one is set; None when neither can be read."""
    available = _meminfo_available()
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        available = limit if available is None else min(available, limit)
    return available


def available_bytes(devices) -> int | None:
    """Bytes one forward may use on each of `devices` (all of one platform), after the margin:
    the smallest device's free memory by `memory_stats()`, else (CPU) the host's available RAM
    split between the local devices. None when nothing can be measured (no check then)."""
    free = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    if free:
        return int(min(free) * (1 - MARGIN["accelerator"]))
    host = _meminfo_available()
    if host is None:
        return None
    return int(host * (1 - MARGIN["cpu"]) / max(1, len(devices)))


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """How one length bucket runs: `rows` per batch (a multiple of the device count; 0: it does
    not fit), the resolved `attention`, and the estimate per device at those rows."""

    length: int
    rows: int
    attention: str
    bytes_per_device: int
    budget: int | None

    @property
    def fits(self) -> bool:
        """Whether at least one row per device fits in the budget (rows > 0)."""
        return self.rows > 0


def plan_bucket(cfg: ModelConfig, length: int, *, max_rows: int, num_devices: int, attention: str,
                budget: int | None, switch_attention: bool = True,
                platform: str | None = None, mlp_chunk: int | None = None) -> BucketPlan:
    """Rows and attention for the bucket `length`: at most `max_rows` (a multiple of
    `num_devices`), fewer where the estimate says only fewer fit in `budget` bytes per device;
    when not even one row per device fits with a dense attention, `blockwise` (if
    `switch_attention`); rows 0 when nothing fits. `mlp_chunk`: see `forward_bytes`."""
    impl = resolve(attention, platform, length=length)
    estimate = functools.partial(forward_bytes, platform=platform, mlp_chunk=mlp_chunk)
    per_device = max_rows // num_devices
    if budget is None:
        return BucketPlan(length, max_rows, impl, estimate(cfg, per_device, length, impl), budget)
    candidates = [impl] + (["blockwise"] if switch_attention and impl in DENSE else [])
    for name in candidates:
        fixed = estimate(cfg, 0, length, name)
        per_row = estimate(cfg, 1, length, name) - fixed
        rows = min(per_device, (budget - fixed) // per_row if budget > fixed else 0)
        if rows >= 1:
            return BucketPlan(length, rows * num_devices, name, estimate(cfg, rows, length, name), budget)
    return BucketPlan(length, 0, candidates[-1], estimate(cfg, 1, length, candidates[-1]), budget)


def longest_fitting(cfg: ModelConfig, lengths, *, attention: str, budget: int,
                    switch_attention: bool = True, platform: str | None = None,
                    mlp_chunk: int | None = None) -> int | None:
    """The longest of `lengths` (bucket lengths) whose one row fits in `budget`, or None."""
    fitting = [n for n in lengths if plan_bucket(cfg, n, max_rows=1, num_devices=1, attention=attention,
                                                 budget=budget, switch_attention=switch_attention,
                                                 platform=platform, mlp_chunk=mlp_chunk).fits]
    return max(fitting, default=None)


def format_bytes(n: float) -> str:
    """Decimal units: 841.8 GB, 12.3 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def too_long_message(plan: BucketPlan, tokens: int, *, longest: int | None, switch_attention: bool) -> str:
    """One line: what does not fit, by how much, and what to do instead."""
    where = "per device " if plan.budget is not None else ""
    advice = []
    if longest is not None:
        advice.append(f"--max-length {longest} --truncation left (keeps BOS and the last tokens)")
    else:
        advice.append("a machine with more memory")
    if not switch_attention and plan.attention != "blockwise":
        advice.append("--attention blockwise (memory linear in the length)")
    advice.append("--memory-budget if more memory is really free")
    return (f"{tokens} tokens (padded to {plan.length}) need about {format_bytes(plan.bytes_per_device)} "
            f"for one row with {plan.attention} attention, more than the {format_bytes(plan.budget or 0)} "
            f"{where}this run may use; use {' or '.join(advice)}")
