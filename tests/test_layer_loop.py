"""`ModelOptions.layer_loop`: the decoder layers as a scan or unrolled. Both must compute the same
rewards and gradients (the same ops per layer, only the loop differs); `auto` unrolls on XLA:CPU
and scans on accelerators (and on a CPU host compiling for a TPU); training asks for `auto`,
scoring keeps the scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from urm_jax.config import DTypePolicy, ModelConfig
from urm_jax.hf.synthetic import tiny_hf_config
from urm_jax.model.attention import compile_target
from urm_jax.model.urm import ModelOptions, init_random, model_from_params, resolve_layer_loop
from urm_jax.train.config import TrainConfig

FP32 = DTypePolicy(compute="float32", gate="float32")


def test_auto_unrolls_on_cpu_only():
    assert resolve_layer_loop("auto", "cpu") == "unrolled"
    assert resolve_layer_loop("auto", "tpu") == "scan"
    assert resolve_layer_loop("auto", "gpu") == "scan"
    assert resolve_layer_loop("scan", "cpu") == "scan"
    assert resolve_layer_loop("auto") == "unrolled"  # this process: CPU
    with compile_target("tpu"):  # `urm-jax plan` compiling a TPU program on a CPU host
        assert resolve_layer_loop("auto") == "scan"
    with pytest.raises(ValueError, match="layer_loop 'loop' not in"):
        ModelOptions(layer_loop="loop")


def test_training_asks_for_auto_scoring_keeps_the_scan():
    assert TrainConfig().model_options().layer_loop == "auto"
    assert ModelOptions().layer_loop == "scan"
    # with remat, unrolled layers keep more recomputed activations live (test_memory's bound)
    assert TrainConfig(remat="full").model_options().layer_loop == "scan"
    assert TrainConfig(remat="dots").model_options().layer_loop == "scan"


def _while_loops(fn, *args) -> int:
    """`while` ops in fn's lowered program: a scan lowers to one (its backward to another), an
    unrolled scan to straight-line code (the tiny model's reference attention has no loop)."""
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.while")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_match_the_scan(remat):
    cfg = ModelConfig.from_hf_dict(tiny_hf_config())  # 2 layers
    model = init_random(cfg, ModelOptions(FP32))
    params = nnx.state(model).to_pure_dict()
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 500, (2, 48)))
    mask = jnp.ones((2, 48), jnp.int32).at[1, 30:].set(0)
    results = {}
    for loop in ("scan", "unrolled"):
        graphdef, state = nnx.split(model_from_params(cfg, params, ModelOptions(FP32, remat=remat, layer_loop=loop)))

        def loss(state):
            out = nnx.merge(graphdef, state)(ids, mask)
            return jnp.sum(out.reward) + jnp.sum(out.log_stds)

        loops = _while_loops(jax.grad(loss), state)
        assert (loops > 0) == (loop == "scan"), (loop, loops)
        results[loop] = jax.jit(jax.value_and_grad(loss))(state)
    (value, grads), (value_u, grads_u) = results["scan"], results["unrolled"]
    np.testing.assert_allclose(value_u, value, rtol=1e-6)
    flat, flat_u = jax.tree.leaves(grads), jax.tree.leaves(grads_u)
    assert len(flat) == len(flat_u)
    for g, g_u in zip(flat, flat_u):
        scale = float(jnp.max(jnp.abs(g))) or 1.0
        np.testing.assert_allclose(np.asarray(g_u), np.asarray(g), rtol=1e-5, atol=1e-6 * scale)
