"""`urm_jax.model.urm.project`: the decoder MLP's projection with a 2-D backward. Its forward must
be the einsum it replaced bit for bit (scores unchanged), its gradients JAX's own for that einsum
(the same sums, laid out differently), and a kernel whose input axes do not match is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from urm_jax.model.urm import project

HIGHEST = jax.lax.Precision.HIGHEST


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_forward_and_gradients_match_the_einsum(dtype, rtol):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 24, 32), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(keys[1], (32, 48), jnp.float32) / 6).astype(dtype)
    cotangent = jax.random.normal(keys[2], (2, 24, 48), jnp.float32).astype(dtype)
    precision = HIGHEST if dtype == "float32" else jax.lax.Precision.DEFAULT

    def loss(fn):
        return jax.jit(jax.grad(lambda a, b: jnp.sum((fn(a, b) * cotangent).astype(jnp.float32)),
                                argnums=(0, 1)))

    mine = jax.jit(lambda a, b: project(a, b, 1, precision))(x, kernel)
    want = jax.jit(lambda a, b: jnp.einsum("ble,ef->blf", a, b, precision=precision))(x, kernel)
    np.testing.assert_array_equal(np.asarray(mine, np.float32), np.asarray(want, np.float32))
    got = loss(lambda a, b: project(a, b, 1, precision))(x, kernel)
    ref = loss(lambda a, b: jnp.einsum("ble,ef->blf", a, b, precision=precision))(x, kernel)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=rtol,
                                   atol=rtol * float(jnp.max(jnp.abs(r.astype(jnp.float32)))))


def test_two_input_axes():
    """A kernel with two input axes ([H, D, E], as o_proj) contracts both."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 4))
    kernel = jax.random.normal(jax.random.key(2), (3, 4, 6))
    want = jnp.einsum("blhd,hde->ble", x, kernel, precision=HIGHEST)
    np.testing.assert_allclose(project(x, kernel, 2, HIGHEST), want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda a, b: jnp.sum(project(a, b, 2, HIGHEST) ** 2), argnums=(0, 1))(x, kernel)
    ref = jax.grad(lambda a, b: jnp.sum(jnp.einsum("blhd,hde->ble", a, b, precision=HIGHEST) ** 2),
                   argnums=(0, 1))(x, kernel)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_mismatched_kernel_is_refused():
    with pytest.raises(ValueError, match="input axes"):
        project(jnp.ones((2, 3, 8)), jnp.ones((7, 4)), 1, HIGHEST)
