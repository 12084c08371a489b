"""Blockwise (online-softmax, flash-style) causal attention within segments, in plain JAX.

Memory is linear in the sequence length, forward and backward: queries and keys are cut into
blocks of `block` tokens; for each query block the key blocks it can see are visited one at a time
while a running maximum, sum and weighted value sum (float32) are kept, as FlashAttention does.
The backward (a `jax.custom_vjp`) saves only q, k, v, the output and the log-sum-exp per query
(O(L)) and recomputes each block's probabilities from them.

Blocks that cannot hold an allowed (query, key) pair are never computed: key blocks above the
causal diagonal, and key blocks before the first token of the earliest segment present in the
query block (for packed rows, other sequences' blocks; for left padding, the padding). Both loop
bounds come from the data (`lax.fori_loop` with traced bounds), taken over the whole batch.

Numerics follow `reference` (HF's eager attention): logits in the compute dtype, scaled by
head_dim**-0.5 in the compute dtype, then softmax statistics in float32; probabilities are cast
to the compute dtype for the value matmul (accumulated in float32). In float32 it equals the
reference up to summation order (~1e-7). Queries with no allowed key (padding) output zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def blockwise_attention(q, k, v, segment_ids, precision, block: int = 512):
    """q [B, L, Hq, D], k/v [B, L, Hkv, D] (Hq a multiple of Hkv), segment_ids [B, L] int
    (0 = padding; a token attends causally to earlier tokens of its own segment) -> [B, L, Hq, D]
    in q's dtype. `block`: tokens per query/key block (rows shorter than a block use one block
    of their own length; others are padded to a multiple of it)."""
    batch, length, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    block = min(block, length)
    padded = -(-length // block) * block
    extra = padded - length
    q = q.reshape(batch, length, kv_heads, q_heads // kv_heads, head_dim)
    seg = segment_ids.astype(jnp.int32)
    if extra:  # padding tokens (segment 0) are never attended to and their outputs dropped
        q = jnp.pad(q, ((0, 0), (0, extra), (0, 0), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, extra), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, extra), (0, 0), (0, 0)))
        seg = jnp.pad(seg, ((0, 0), (0, extra)))
    out = _attention(q, k, v, seg, precision, block)
    return out[:, :length].reshape(batch, length, q_heads, head_dim)


def _visit_bounds(seg, block: int):
    """first[i]: the first key block query block i must visit ([n] int32; i + 1 when no row has a
    real query there), last[j]: the last query block that visits key block j ([n] int32).

    A query's keys start at the first position of its segment id (a segment may restart after
    other segments: allowed_mask lets it see its earlier part too). Ids are folded into [1, L]
    for the lookup; folding can only merge ids, which lowers a bound: never skips a needed block."""
    batch, length = seg.shape
    n = length // block
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), seg.shape)
    ids = jnp.where(seg == 0, 0, jnp.clip(seg, 1, length))
    start = jax.vmap(lambda p, s: jax.ops.segment_min(p, s, num_segments=length + 1))(pos, ids)
    first_key = jnp.take_along_axis(start, ids, axis=1)  # [B, L]: first key position of each query
    first_key = jnp.where(seg == 0, length, first_key)  # padding queries need no key
    first = jnp.min(first_key.reshape(batch, n, block), axis=(0, 2)) // block
    first = jnp.minimum(first, jnp.arange(n, dtype=jnp.int32) + 1)  # [n]
    # Query block i visits key blocks first[i]..i, so key block j is visited by i >= j with
    # first[i] <= j; the last such i bounds the backward's loop over query blocks.
    blocks = jnp.arange(n, dtype=jnp.int32)
    visits = (first[None, :] <= blocks[:, None]) & (blocks[None, :] >= blocks[:, None])  # [j, i]
    last = jnp.max(jnp.where(visits, blocks[None, :], -1), axis=1)
    return first, last


def _slice(x, index, block: int, axis: int = 1):
    return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=axis)


def _update(x, update, index, block: int, axis: int = 1):
    return jax.lax.dynamic_update_slice_in_dim(x, update, index * block, axis=axis)


def _block_mask(seg, i, j, block: int):
    """[B, 1, 1, block, block] bool: which (query of block i, key of block j) pairs may attend."""
    sq, sk = _slice(seg, i, block), _slice(seg, j, block)
    pq = i * block + jnp.arange(block)
    pk = j * block + jnp.arange(block)
    allowed = (pq[:, None] >= pk[None, :])[None] & (sq[:, :, None] == sk[:, None, :]) & (sk[:, None, :] != 0)
    return allowed[:, None, None]


def _logits(qi, kj, precision):
    """[B, Hkv, G, bq, bk] float32 logits, computed and scaled in the compute dtype (as HF)."""
    scale = jnp.asarray(qi.shape[-1] ** -0.5, qi.dtype)
    return (jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, precision=precision) * scale).astype(F32)


def _forward(q, k, v, seg, precision, block: int):
    """q [B, Lp, Hkv, G, D], k/v [B, Lp, Hkv, D], seg [B, Lp] with Lp a multiple of block ->
    (out [B, Lp, Hkv, G, D] in q's dtype, lse [B, Hkv, G, Lp] float32: log-sum-exp of each query's
    allowed logits, +inf for a query with none, so the backward's probabilities are 0 there)."""
    batch, length, kv_heads, group, head_dim = q.shape
    n = length // block
    first, _ = _visit_bounds(seg, block)

    def query_block(i, buffers):
        out, lse = buffers
        qi = _slice(q, i, block)

        def key_block(j, carry):
            m, l, acc = carry
            s = jnp.where(_block_mask(seg, i, j, block), _logits(qi, _slice(k, j, block), precision), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing allowed yet
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(q.dtype), _slice(v, j, block),
                            precision=precision, preferred_element_type=F32)
            return m_new, alpha * l + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        stats = jnp.full((batch, kv_heads, group, block), -jnp.inf, F32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros((batch, kv_heads, group, block, head_dim), F32))
        m, l, acc = jax.lax.fori_loop(first[i], i + 1, key_block, init)
        seen = l > 0
        oi = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        out = _update(out, oi.transpose(0, 3, 1, 2, 4).astype(q.dtype), i, block)
        lse = _update(lse, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf), i, block, axis=3)
        return out, lse

    buffers = (jnp.zeros_like(q), jnp.zeros((batch, kv_heads, group, length), F32))
    return jax.lax.fori_loop(0, n, query_block, buffers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, seg, precision, block):
    return _forward(q, k, v, seg, precision, block)[0]


def _attention_fwd(q, k, v, seg, precision, block):
    out, lse = _forward(q, k, v, seg, precision, block)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(precision, block, residuals, dout):
    """FlashAttention-2's backward: per key block j (dk_j, dv_j carried), per query block i that
    sees it, recompute p = exp(s - lse) and accumulate dv += p^T dO, dk += ds^T q, dq_i += ds k
    with ds = p (dO v^T - rowsum(dO * O)), scaled as the forward was."""
    q, k, v, seg, out, lse = residuals
    n = q.shape[1] // block
    first, last = _visit_bounds(seg, block)
    # rowsum(dO * O) = sum_j p_j (dO . v_j): the softmax backward's per-query term, [B, Hkv, G, Lp]
    delta = jnp.einsum("blkgd,blkgd->bkgl", dout.astype(F32), out.astype(F32), precision=precision)
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

    def key_block(j, grads):
        dq, dk, dv = grads
        kj, vj = _slice(k, j, block), _slice(v, j, block)

        def query_block(i, carry):
            dq, dk_j, dv_j = carry

            def visit(carry):
                dq, dk_j, dv_j = carry
                qi, doi = _slice(q, i, block), _slice(dout, i, block)
                allowed = _block_mask(seg, i, j, block)
                p = jnp.where(allowed, jnp.exp(_logits(qi, kj, precision) - _slice(lse, i, block, 3)[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(q.dtype), doi,
                                         precision=precision, preferred_element_type=F32)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, precision=precision, preferred_element_type=F32)
                ds = ((p * (dp - _slice(delta, i, block, 3)[..., None])).astype(q.dtype) * scale)
                dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, precision=precision, preferred_element_type=F32)
                dk_j = dk_j + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, precision=precision,
                                         preferred_element_type=F32)
                return _update(dq, _slice(dq, i, block) + dq_i, i, block), dk_j, dv_j

            # Blocks in j..last[j] whose queries start after key block j (another segment) skip.
            return jax.lax.cond(first[i] <= j, visit, lambda c: c, carry)

        zeros = jnp.zeros(kj.shape, F32)
        dq, dk_j, dv_j = jax.lax.fori_loop(j, last[j] + 1, query_block, (dq, zeros, zeros))
        return dq, _update(dk, dk_j, j, block), _update(dv, dv_j, j, block)

    init = (jnp.zeros(q.shape, F32), jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    dq, dk, dv = jax.lax.fori_loop(0, n, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
