"""The EasyDeL worker of bench/compare.py (runs in build/peers/easydel, see
requirements-easydel.txt): EasyDeL's Llama backbone forward, jitted, on random weights of the
same shape. EasyDeL computes attention in `attn_dtype`, bfloat16 by default even for a float32
model; `attn_dtype="float32"` is the like-for-like setting against urm-jax's float32 forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bench.peers.worker import serve

STATE: dict = {}


def forward_init(shape: dict, rows: int, length: int, attn_dtype: str = "bfloat16") -> dict:
    import time

    import easydel as ed
    from flax import nnx

    config = ed.LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                            intermediate_size=shape["intermediate_size"],
                            num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                            num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=8192,
                            rope_theta=500000.0, attn_dtype=jnp.dtype(attn_dtype),
                            attn_softmax_dtype=jnp.float32)
    model = ed.LlamaModel(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        return nnx.merge(graphdef, state)(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]

    ids = jnp.asarray(np.random.default_rng(0).integers(4, 1000, (rows, length)).astype(np.int32))
    mask = jnp.ones((rows, length), bool)
    mesh = model.mesh  # EasyDeL shards by logical axes inside its mesh (one CPU device here)

    def forward_once():
        with mesh:
            return jax.block_until_ready(run(state, ids, mask))

    STATE["forward"] = forward_once
    start = time.perf_counter()
    STATE["forward"]()
    return {"compile_s": time.perf_counter() - start, "easydel": ed.__version__, "jax": jax.__version__,
            "attn_dtype": attn_dtype}


def forward(repeats: int) -> dict:
    for _ in range(repeats):
        STATE["forward"]()
    return {}


if __name__ == "__main__":
    serve({"forward_init": forward_init, "forward": forward})
