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
    for impl, kw in (("xla", {}), ("splash", {"attention_interpret": True}), ("blockwise", {})):
        other = model_from_params(cfg, params, ModelOptions(base.dtypes, attention=impl, **kw))
        np.testing.assert_allclose(np.asarray(other(ids, mask).reward), np.asarray(want), rtol=1e-5, atol=1e-5)


# --- blockwise: the linear-memory path every backend runs -------------------------------------


def segments(length: int) -> np.ndarray:
    """[3, L] segment ids: right padding, left padding, and packed sequences (+ right padding)."""
    seg = np.zeros((3, length), np.int32)
    seg[0, :length - 7] = 1  # right padding
    seg[1, 9:] = 1  # left padding
    a, b = length // 3, 2 * length // 3
    seg[2, :a], seg[2, a:b], seg[2, b:length - 3] = 1, 2, 3  # packed
    return seg


def values_and_grads(fn, q, k, v, seg, cotangent):
    """fn's output and the gradients of <output at real queries, cotangent> wrt q, k, v."""
    real = (seg > 0)[:, :, None, None]

    def loss(q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v), 0.0) * cotangent)

    return jax.jit(lambda q, k, v: (fn(q, k, v),) + jax.grad(loss, argnums=(0, 1, 2))(q, k, v))(q, k, v)


def assert_close_to_reference(got, want, seg, tol=1e-6):
    """Values at real queries and all gradients within tol x the largest reference magnitude
    (padding queries' outputs are never read; blockwise gives them zeros)."""
    real = np.asarray(seg) > 0
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        if i == 0:
            g, w = g[real], w[real]
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale, err_msg=f"output {i} (0: values, 1-3: dq, dk, dv)")


@pytest.mark.parametrize("length, block", [(100, 32), (77, 16), (50, 512)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # GQA groups of 1, 2, 4 query heads
def test_blockwise_matches_reference_fp32(length, block, kv_heads):
    from urm_jax.model.blockwise import blockwise_attention

    rng = np.random.default_rng(length + kv_heads)
    q, k, v = (jnp.asarray(rng.standard_normal((3, length, h, 16)), jnp.float32) for h in (4, kv_heads, kv_heads))
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seg = jnp.asarray(segments(length))
    want = values_and_grads(lambda *a: run("reference", *a, seg), q, k, v, seg, cotangent)
    got = values_and_grads(lambda *a: blockwise_attention(*a, seg, HIGHEST, block=block), q, k, v, seg, cotangent)
    assert_close_to_reference(got, want, seg)
    assert np.all(np.asarray(got[0])[np.asarray(seg) == 0] == 0)  # padding queries: zeros, never NaN


def test_blockwise_segment_that_resumes_and_bf16():
    """A segment id that reappears after another one still sees its earlier part (allowed_mask's
    rule), the block bounds never skip it; bf16 compute stays within bf16 rounding of reference."""
    from urm_jax.model.blockwise import blockwise_attention

    rng = np.random.default_rng(3)
    length = 96
    q, k, v = (jnp.asarray(rng.standard_normal((1, length, h, 16)), jnp.float32) for h in (4, 2, 2))
    seg = np.ones((1, length), np.int32)
    seg[0, 20:60] = 2  # 1 ... 2 ... 1 again: the last part attends to the first
    seg = jnp.asarray(seg)
    cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    want = values_and_grads(lambda *a: run("reference", *a, seg), q, k, v, seg, cotangent)
    got = values_and_grads(lambda *a: blockwise_attention(*a, seg, HIGHEST, block=16), q, k, v, seg, cotangent)
    assert_close_to_reference(got, want, seg)

    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    want16 = run("reference", qb, kb, vb, seg).astype(jnp.float32)
    got16 = blockwise_attention(qb, kb, vb, seg, jax.lax.Precision.DEFAULT, block=16)
    assert got16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got16.astype(jnp.float32)), np.asarray(want16), atol=3e-2)


def test_blockwise_skips_masked_blocks():
    """Query block i visits key blocks first[i]..i only: nothing above the diagonal, nothing
    before its earliest segment's start (packing, left padding), no block for padding queries."""
    from urm_jax.model.blockwise import _visit_bounds

    seg = np.zeros((1, 128), np.int32)
    seg[0, :40], seg[0, 40:100] = 1, 2  # blocks of 16: 0-2 segment 1, 2-6 segment 2, 7 padding
    first, last = _visit_bounds(jnp.asarray(seg), 16)
    assert np.asarray(first).tolist() == [0, 0, 0, 2, 2, 2, 2, 8]
    assert np.asarray(last).tolist() == [2, 2, 6, 6, 6, 6, 6, -1]
    left = np.zeros((2, 64), np.int32)
    left[0, 40:], left[1, 20:] = 1, 1  # left padding: rows' real tokens start in blocks 2 and 1
    first, _ = _visit_bounds(jnp.asarray(left), 16)
    assert np.asarray(first).tolist() == [1, 1, 1, 1]


def test_blockwise_memory_is_linear():
    """XLA's buffer assignment of the blockwise forward and backward at L=4096 holds less than
    one L x L float32 matrix (the reference needs one per head, and more)."""
    from urm_jax.model.blockwise import blockwise_attention

    length = 4096
    spec = lambda h: jax.ShapeDtypeStruct((1, length, h, 16), jnp.float32)  # noqa: E731
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)
    fn = lambda q, k, v, s: blockwise_attention(q, k, v, s, HIGHEST, block=256)  # noqa: E731
    grad = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s) ** 2), argnums=(0, 1, 2)))
    temp = grad.lower(spec(2), spec(1), spec(1), seg).compile().memory_analysis().temp_size_in_bytes
    dense = jax.jit(lambda q, k, v, s: run("reference", q, k, v, s))
    dense_temp = dense.lower(spec(2), spec(1), spec(1), seg).compile().memory_analysis().temp_size_in_bytes
    assert temp < length * length * 4 < dense_temp, (temp, dense_temp)


def test_auto_uses_blockwise_for_long_rows_on_cpu():
    from urm_jax.model.attention import AUTO_BLOCKWISE_LENGTH

    threshold = AUTO_BLOCKWISE_LENGTH["cpu"]
    assert resolve("auto", "cpu", length=threshold - 1) == "reference"
    assert resolve("auto", "cpu", length=threshold) == "blockwise"
    assert resolve("auto", "cpu") == "reference"  # length unknown: short rows
    assert resolve("auto", "tpu", length=10 ** 6) == "splash"
    assert resolve("reference", "cpu", length=10 ** 6) == "reference"  # only auto switches


def test_blockwise_in_the_sharded_training_step(tmp_path, monkeypatch):
    """The stage-1 step with blockwise attention on a (data 2, fsdp 2, tensor 2) mesh, packed
    rows, blocks of 16 over 48 tokens, trains as the reference attention on one device: loss,
    gradient norm and parameters after two steps agree to float32 rounding."""
    import dataclasses

    from flax import nnx

    from hf_fixtures import make_tiny_urm
    from urm_jax.config import DTypePolicy
    from urm_jax.loading import load_model
    from urm_jax.model import attention as attention_module
    from urm_jax.model.urm import ModelOptions
    from urm_jax.sharding import make_mesh
    from urm_jax.train.config import OptimConfig, PrecisionConfig, TrainConfig
    from urm_jax.train.step import build_trainer

    monkeypatch.setitem(attention_module.BLOCK, "cpu", 16)
    model, cfg = load_model(make_tiny_urm(tmp_path / "m", gate_dtype="float32", seed=3), compute_dtype="float32")
    params = nnx.state(model).to_pure_dict()
    rng = np.random.default_rng(0)
    length, rows = 48, 8
    batch = {"input_ids": rng.integers(4, 500, (1, rows, length)).astype(np.int32),
             "segment_ids": np.zeros((1, rows, length), np.int32),
             "pool_index": np.zeros((1, rows, 2), np.int32), "pool_mask": np.ones((1, rows, 2), np.float32),
             "labels": rng.integers(0, 5, (1, rows, 2, 5)).astype(np.float32)}
    for r in range(rows):  # two packed sequences and right padding per row
        a, b = int(rng.integers(5, 25)), int(rng.integers(5, 20))
        batch["segment_ids"][0, r, :a], batch["segment_ids"][0, r, a:a + b] = 1, 2
        batch["pool_index"][0, r] = [a - 1, a + b - 1]
    # The recipe's learning rate (as test_train_step's mesh test: at large ones Adam turns
    # float32-rounding differences of near-zero gradients into full-size updates).
    train = TrainConfig(stage=1, optim=OptimConfig(learning_rate=2e-6, warmup_ratio=0.0),
                        precision=PrecisionConfig(param="float32", compute="float32",
                                                  gate_compute="float32", gate_param="float32"))
    fp32 = DTypePolicy(param="float32", compute="float32", gate="float32")

    def run(attention, mesh_shape):
        devices = jax.devices()[:int(np.prod(mesh_shape))]
        trainer = build_trainer(cfg, params, dataclasses.replace(train, attention=attention), 100,
                                make_mesh(mesh_shape, devices), options=ModelOptions(fp32, attention=attention))
        metrics = [jax.device_get(trainer.run(batch)) for _ in range(2)]
        return jax.device_get(trainer.state.params), metrics

    want, want_m = run("reference", (1, 1, 1))
    got, got_m = run("blockwise", (2, 2, 2))
    for m, w in zip(got_m, want_m):
        assert abs(m["loss"] - w["loss"]) <= 1e-5 * abs(w["loss"])
        assert abs(m["grad_norm"] - w["grad_norm"]) <= 1e-5 * abs(w["grad_norm"])
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert np.max(np.abs(a - b)) <= 1e-6, jax.tree_util.keystr(path)
