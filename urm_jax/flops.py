"""Explicit FLOP counts for the URM model, and model FLOP utilisation (MFU).

Conventions (the ones MaxText and the PaLM paper use, so numbers compare across codebases):

* One multiply-add is 2 FLOPs. A matmul of an [n, k] input with a [k, m] weight costs 2·n·k·m.
* Training costs 3× the forward pass (backward = 2× forward: grads w.r.t. inputs and weights).
  Rematerialisation is NOT counted: MFU measures useful model work, not work the hardware did.
* Per-token matmul parameters N_matmul: in every layer the q, k, v, o projections and the
  gate/up/down MLP. The token embedding is a lookup (no FLOPs), RMSNorm scales are elementwise,
  and URM has no lm_head. The value head (score) and the gating MLP run on ONE pooled token per
  sequence, so they are excluded: per sequence they cost about half a percent of ONE token's
  backbone work (8B: 33.6M vs 6.98G weights), i.e. ~10⁻⁶ of a 4096-token sequence.
* Attention is causal: per layer QKᵀ and AV each cost 2·len²·H·d_h for the full square, half
  of it for the causal triangle, so 2·len²·H·d_h forward in total, 6·len²·H·d_h for training.
  With packing, each segment only attends to itself, so the term is Σ len² over real segments,
  not (packed length)²; padding is not counted at all.
* Per token, for a segment of length T: training 6·N_matmul + 6·L·T·H·d_h, forward a third of it.

For Llama-3.1-8B this gives 6·N_matmul ≈ 41.9 GFLOP/token; at T = 4096, 100% MFU is ≈ 21.9k
tokens/s on an H100 and ≈ 10.2k on a TPU v5p chip (see /work/shared/reference/anchors.md).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax

from urm_jax.config import ModelConfig

PEAK_ENV_VAR = "URM_JAX_PEAK_TFLOPS"

# Dense bf16 peak per chip in TFLOP/s (vendor numbers; NVIDIA's 1979 for H100 is 2:4-sparse).
PEAK_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6e": 918.0,
    "A100": 312.0,
    "H100": 989.0,  # SXM; the PCIe card is lower, see _DEVICE_KIND_PATTERNS
    "H100 PCIe": 756.0,
    "H200": 989.0,
}

# device.device_kind strings → PEAK_TFLOPS key, most specific first. JAX reports v5e as
# "TPU v5 lite", v6e as "TPU v6 lite" and v5p as "TPU v5p" (older runtimes: "TPU v5").
_DEVICE_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("tpu v5 lite", "TPU v5e"),
    ("tpu v5litepod", "TPU v5e"),
    ("tpu v5e", "TPU v5e"),
    ("tpu v5p", "TPU v5p"),
    ("tpu v5", "TPU v5p"),
    ("tpu v6 lite", "TPU v6e"),
    ("tpu v6e", "TPU v6e"),
    ("tpu v4", "TPU v4"),
    ("h100 pcie", "H100 PCIe"),
    ("h100", "H100"),
    ("h200", "H200"),
    ("a100", "A100"),
)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights used in a matmul by every token: q, k, v, o and gate/up/down in each layer."""
    d = cfg.hidden_size
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    attention = d * q + 2 * d * kv + q * d  # q, k, v (GQA: fewer kv heads), o
    mlp = 3 * d * cfg.intermediate_size  # gate, up, down
    return cfg.num_layers * (attention + mlp)


def train_flops(cfg: ModelConfig, segment_lengths: Sequence[int]) -> float:
    """FLOPs of one optimiser step (forward + backward) over sequences of these real lengths."""
    lengths = [int(n) for n in segment_lengths]
    dense = 6.0 * matmul_params(cfg) * sum(lengths)
    # Causal attention grows with len², so it is summed per segment (packing does not pay it).
    attention = 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * sum(n * n for n in lengths)
    return dense + attention


def forward_flops(cfg: ModelConfig, segment_lengths: Sequence[int]) -> float:
    """FLOPs of scoring (forward only): a third of `train_flops`."""
    return train_flops(cfg, segment_lengths) / 3.0


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6·N_matmul + 6·L·T·H·d_h: training FLOPs per token of a segment of length `seq_len`."""
    return train_flops(cfg, [seq_len]) / seq_len


def _peak_tflops_for_kind(kind: str) -> float | None:
    text = kind.lower()
    for pattern, key in _DEVICE_KIND_PATTERNS:
        if pattern in text:
            return PEAK_TFLOPS[key]
    return None


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device (default: jax.devices()[0]); None if unknown (CPU).

    `URM_JAX_PEAK_TFLOPS` (in TFLOP/s) overrides the table: for chips it does not know, or to
    report MFU against another precision's peak.
    """
    override = os.environ.get(PEAK_ENV_VAR)
    if override:
        return float(override) * 1e12
    if device is None:
        device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    tflops = _peak_tflops_for_kind(getattr(device, "device_kind", ""))
    return None if tflops is None else tflops * 1e12


def mfu(flops: float, seconds: float, num_devices: int, peak_per_device: float | None) -> float | None:
    """Achieved / peak FLOP/s over all devices, as a fraction; None when the peak is unknown."""
    if peak_per_device is None or peak_per_device <= 0 or seconds <= 0 or num_devices <= 0:
        return None
    return flops / (seconds * num_devices * peak_per_device)
