"""Every attention implementation available on this backend agrees with the reference (HF's
eager attention op by op), for GQA, padding and packed segments, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urm_jax.model.attention import allowed_mask, attention, resolve

HIGHEST = jax.lax.Precision.HIGHEST


def inputs(seed=0, batch=2, length=128, q_heads=4, kv_heads=2, dim=16):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, length, h, dim)), jnp.float32)
               for h in (q_heads, kv_heads, kv_heads))
    seg = np.zeros((batch, length), np.int32)
    seg[0, :100] = 1  # right padding
    seg[1, :40], seg[1, 40:90], seg[1, 90:120] = 1, 2, 3  # three packed sequences + padding
    return q, k, v, jnp.asarray(seg)


def run(impl, q, k, v, seg, **kw):
    return attention(q, k, v, seg, allowed_mask(seg), impl, HIGHEST, **kw)


@pytest.mark.parametrize("impl, kw", [("xla", {}), ("splash", {"interpret": True})])
def test_implementations_match_reference(impl, kw):
    q, k, v, seg = inputs()
    want = run("reference", q, k, v, seg)
    got = run(impl, q, k, v, seg, **kw)
    real = np.asarray(seg) > 0  # padding queries are never read
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-5, atol=2e-5)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.where(seg[:, :, None, None] > 0, out, 0.0) ** 2)

    ref_grads = jax.grad(lambda *a: loss(lambda *b: run("reference", *b, seg), *a), argnums=(0, 1, 2))(q, k, v)
    got_grads = jax.grad(lambda *a: loss(lambda *b: run(impl, *b, seg, **kw), *a), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got_grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_auto_picks_reference_on_cpu_and_rejects_unknown():
    assert resolve("auto") == {"tpu": "splash", "gpu": "cudnn"}.get(jax.default_backend(), "reference")
    with pytest.raises(ValueError, match="not in"):
        resolve("flash9000")


def test_model_forward_with_each_attention_matches():
    from flax import nnx

    from urm_jax.hf.synthetic import tiny_hf_config
    from urm_jax.config import DTypePolicy, ModelConfig
    from urm_jax.model.urm import ModelOptions, init_random, model_from_params

    cfg = ModelConfig.from_hf_dict(tiny_hf_config())
    base = ModelOptions(DTypePolicy(compute="float32", gate="float32"))
    model = init_random(cfg, base)
    params = nnx.state(model).to_pure_dict()
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 500, (2, 128)))
    mask = jnp.ones((2, 128), jnp.int32).at[1, 50:].set(0)
    want = model(ids, mask).reward
    for impl, kw in (("xla", {}), ("splash", {"attention_interpret": True})):
        other = model_from_params(cfg, params, ModelOptions(base.dtypes, attention=impl, **kw))
        np.testing.assert_allclose(np.asarray(other(ids, mask).reward), np.asarray(want), rtol=1e-5, atol=1e-5)
