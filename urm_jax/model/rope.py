"""Rotary position embeddings in HF's rotate-half layout (dim i pairs with i + head_dim/2).

Frequencies are computed in float32 from the config, never hard-coded, exactly as transformers
does (`inv_freq = 1 / theta ** (arange(0, d, 2) / d)`, then the RoPE type's scaling); the cos/sin
tables are float32 and cast to the compute dtype only when applied, like HF.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from urm_jax.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies after the RoPE type's scaling."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
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
    wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = ((np.float32(old_len) / wavelen - np.float32(rope.low_freq_factor))
              / np.float32(rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 cos/sin tables [..., head_dim] for integer positions [...]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, L, H, D]; cos/sin [B, L, D] float32, cast to x's dtype first (as HF does)."""
    cos = cos.astype(x.dtype)[:, :, None, :]
    sin = sin.astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
