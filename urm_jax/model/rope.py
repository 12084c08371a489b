"""Rotary position embeddings in HF's rotate-half layout (dim i pairs with i + head_dim/2).

Frequencies are computed in float32 from the config, never hard-coded, exactly as transformers
does (`inv_freq = 1 / theta ** (arange(0, d, 2) / d)`, then the RoPE type's scaling); the cos/sin
tables are float32 and cast to the compute dtype only when applied, like HF.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from urm_jax.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies after the RoPE type's scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # theta ** e in float64 rounded once to float32 reproduces torch's float32 pow bit for bit
    # (numpy's float32 pow is off by an ulp on ~10% of entries, which at position 1e5 moves the
    # angle by ~1e-2 rad).
    powers = np.power(np.float64(rope.theta), exponents.astype(np.float64)).astype(np.float32)
    inv = (np.float32(1.0) / powers).astype(np.float32)
    if rope.rope_type == "default":
        return inv
    if rope.rope_type == "linear":
        return (inv / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        return _llama3_scaling(inv, rope)
    raise ValueError(f"unsupported RoPE type {rope.rope_type!r}")


def _llama3_scaling(inv: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama-3.1: long wavelengths slowed by `factor`, short ones untouched, a smooth ramp between."""
    old_len = float(rope.original_max_position_embeddings)
    factor = np.float32(rope.factor)
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    # torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar; doing the same keeps
    # every entry bit-identical to transformers (a plain division differs by an ulp in ~20%).
    wavelen = ((np.float32(1) / inv) * np.float32(2 * math.pi)).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = (((np.float32(1) / wavelen) * np.float32(old_len) - np.float32(rope.low_freq_factor))
              / np.float32(rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


@functools.lru_cache(maxsize=16)
def rope_tables(rope: RopeConfig, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos/sin [length, head_dim] for positions 0..length-1, built on the host.

    The angle is the float32 product position * inv_freq, rounded exactly as transformers rounds
    it; its cos/sin are then taken in float64 and rounded once. Computing them on the device
    instead is wrong at long range: XLA's float32 cos/sin reduce large arguments (positions in
    the thousands times ~1 rad) inaccurately, off by up to 5e-3 at position 1000 on CPU, while
    torch's are accurate to an ulp. Positions never exceed the padded length, so a per-length
    table covers packed and padded rows alike."""
    inv = inv_frequencies(rope, head_dim)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]  # float32 product
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def cos_sin(positions: jnp.ndarray, rope: RopeConfig, head_dim: int,
            length: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 cos/sin [..., head_dim] for integer positions [...] < length (default: last dim)."""
    cos, sin = rope_tables(rope, head_dim, int(length or positions.shape[-1]))
    return jnp.take(jnp.asarray(cos), positions, axis=0), jnp.take(jnp.asarray(sin), positions, axis=0)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, L, H, D]; cos/sin [B, L, D] float32, cast to x's dtype first (as HF does)."""
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
