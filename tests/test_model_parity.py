"""The Flax URM against the HF PyTorch reference, and RoPE against transformers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import load_reference, make_tiny_urm, reference_outputs
from flax import nnx
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from urm_jax.config import ConfigError, ModelConfig, RopeConfig
from urm_jax.data.tokenization import pad_batch
from urm_jax.loading import load_model
from urm_jax.model.rope import cos_sin, inv_frequencies
from urm_jax.model.urm import ModelOptions, param_shardings, token_chunks
from urm_jax.sharding import make_mesh, use_mesh

OUTPUTS = ("reward", "means", "log_stds", "gate")
ORIG = 32  # original_max_position_embeddings of the tiny configs
LONG = 4 * ORIG + 45  # past 4x the RoPE original context: short prompts hide RoPE bugs


def rel(a, b):
    """max |a - b| / max |b|: relative to the output's scale."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def jax_outputs(model, ids, mask):
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    return {k: np.asarray(getattr(out, k), np.float64) for k in OUTPUTS} | {
        "uncertainty": np.asarray(out.uncertainty, np.float64)}


def random_rows(lengths, vocab=512, pad=511, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(4, pad, n)] for n in lengths]


@pytest.fixture(scope="module", params=[4, 2, 1], ids=lambda kv: f"gqa{4 // kv}")
def fp32_pair(request, tmp_path_factory):
    path = make_tiny_urm(tmp_path_factory.mktemp("fp32"), kv_heads=request.param, gate_dtype="float32",
                         original_max_position_embeddings=ORIG, seed=request.param)
    model, _ = load_model(path)
    return model, load_reference(path)


@pytest.mark.parametrize("side", ["right", "left"])
def test_fp32_parity_padded_batches(fp32_pair, side):
    model, ref = fp32_pair
    rows = random_rows([LONG, 7, 64, 1])
    ids, mask = pad_batch(rows, pad_id=511, side=side)
    got = jax_outputs(model, ids, mask)
    # Reference on each row alone: unpadded truth (HF pools by pad id, we pool by the mask).
    want = {k: np.concatenate([reference_outputs(ref, np.array([r]), np.ones((1, len(r))))[k]
                               for r in rows]) for k in OUTPUTS}
    for k in OUTPUTS:
        assert rel(got[k], want[k]) < 1e-5, (k, rel(got[k], want[k]))
    # Same padded batch through the reference (it also handles padding): equal too.
    batch_ref = reference_outputs(ref, ids, mask)
    for k in OUTPUTS:
        assert rel(got[k], batch_ref[k]) < 1e-5, k
    np.testing.assert_allclose(got["uncertainty"], np.exp(2 * got["log_stds"]).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mlp_in_chunks_scores_the_same(fp32_pair, side):
    """Scoring's chunked MLP (`ModelOptions.mlp_chunk`, what `Scorer` runs on CPU): rows of LONG
    = 173 tokens in 4 chunks of 44, the last overlapping its neighbour, score what whole rows
    score (1e-6) and what the reference scores; rows shorter than a chunk run one call."""
    model, ref = fp32_pair
    rows = random_rows([LONG, 7, 64, 1])
    ids, mask = pad_batch(rows, pad_id=511, side=side)
    chunked = nnx.merge(*nnx.split(model))
    chunked.options = dataclasses.replace(chunked.options, mlp_chunk=50)
    got, whole = jax_outputs(chunked, ids, mask), jax_outputs(model, ids, mask)
    batch_ref = reference_outputs(ref, ids, mask)
    for k in OUTPUTS:
        assert rel(got[k], whole[k]) < 1e-6, (k, rel(got[k], whole[k]))
        assert rel(got[k], batch_ref[k]) < 1e-5, k


def test_token_chunks_cover_every_token_once():
    """Each token's output comes from its own input, whatever the chunking: a token-wise function
    that would show a double application (x -> 2x + position) is applied exactly once."""
    x = jnp.arange(2 * 103 * 3, dtype=jnp.float32).reshape(2, 103, 3)
    fn = lambda h: 2 * h + 1  # noqa: E731
    for chunk in (None, 1, 10, 50, 102, 103, 500):
        np.testing.assert_array_equal(np.asarray(token_chunks(fn, x, chunk)), np.asarray(fn(x)), str(chunk))
    with pytest.raises(ValueError, match="mlp_chunk must be at least 1"):
        ModelOptions(mlp_chunk=0)


def test_batch_composition_does_not_change_scores(fp32_pair):
    model, _ = fp32_pair
    rows = random_rows([LONG, 9, 30, 2, 77], seed=3)
    alone = [jax_outputs(model, *pad_batch([r], pad_id=511))["reward"][0] for r in rows]
    for side in ("left", "right"):
        for perm in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
            ids, mask = pad_batch([rows[i] for i in perm], pad_id=511, side=side, length=LONG + 11)
            got = jax_outputs(model, ids, mask)["reward"]
            # Not bit-identical: XLA's CPU kernels block reductions by shape, so a padded
            # length changes summation order. Measured <= 2.5e-6 absolute on rewards ~2.
            assert rel(got, np.array([alone[i] for i in perm])) < 2e-6


def test_rope_matters_at_this_length(tmp_path):
    """Guard against a vacuous test: without llama3 scaling the long row's reward moves."""
    a = make_tiny_urm(tmp_path / "a", gate_dtype="float32")
    b = make_tiny_urm(tmp_path / "b", gate_dtype="float32", rope_type="default")
    ids, mask = pad_batch(random_rows([LONG]), pad_id=511)
    ra = jax_outputs(load_model(a)[0], ids, mask)["reward"]
    rb = jax_outputs(load_model(b)[0], ids, mask)["reward"]
    assert abs(ra[0] - rb[0]) > 1e-3


BF16_BOUND = 6e-2  # measured by bench/parity_bounds.py; see the closing note of issue #2


def test_bf16_parity_bound_and_noise_floor(tmp_path):
    path = make_tiny_urm(tmp_path / "bf16", backbone_dtype="bfloat16", gate_dtype="float16", seed=7)
    rows = random_rows([LONG, 20, 90], seed=5)
    ids, mask = pad_batch(rows, pad_id=511)
    got = jax_outputs(load_model(path)[0], ids, mask)
    ref_bf16 = reference_outputs(load_reference(path), ids, mask)
    truth = reference_outputs(load_reference(path, dtype=torch.float32), ids, mask)
    jax_f32 = jax_outputs(load_model(path, compute_dtype="float32", param_dtype="float32")[0], ids, mask)
    for k in OUTPUTS:
        assert rel(got[k], ref_bf16[k]) < BF16_BOUND, k
        # JAX in bf16 is no further from the fp32 truth than HF itself is in bf16 (within 2x).
        assert rel(got[k], truth[k]) <= 2 * rel(ref_bf16[k], truth[k]) + 1e-3, k
        # And the fp32 JAX run on the bf16 weights matches the fp32 reference (fp16 gate aside).
        assert rel(jax_f32[k], truth[k]) < (5e-3 if k in ("gate", "reward") else 1e-5), k


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
], ids=["llama3-8b", "llama3-tiny", "default", "linear"])
def test_rope_tables_match_transformers(rope):
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=dict(rope),
                     max_position_embeddings=131072)
    fn = (ROPE_INIT_FUNCTIONS[rope["rope_type"]] if rope["rope_type"] != "default" else
          __import__("transformers").models.llama.modeling_llama.LlamaRotaryEmbedding
          .compute_default_rope_parameters)
    want_inv, scaling = fn(hf) if rope["rope_type"] == "default" else fn(hf, "cpu")
    assert scaling == 1.0
    ours = inv_frequencies(RopeConfig.from_hf({"rope_parameters": rope}), 128)
    # Bit-identical inverse frequencies: at position 1e5 one ulp moves the angle by ~1e-2 rad.
    np.testing.assert_array_equal(ours, want_inv.numpy())
    positions = np.array([[0, 1, 5, 1000, 8191, 8192, 40000, 131071]])
    cos, sin = cos_sin(jnp.asarray(positions), RopeConfig.from_hf({"rope_parameters": rope}), 128,
                       length=131072)
    freqs = torch.as_tensor(positions, dtype=torch.float32)[..., None] * want_inv
    emb = torch.cat([freqs, freqs], -1)
    np.testing.assert_allclose(np.asarray(cos), emb.cos().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), emb.sin().numpy(), atol=1e-6)


def test_v4_and_v5_configs_read_the_same(tmp_path):
    a = ModelConfig.from_hf_dir(make_tiny_urm(tmp_path / "v4", config_style="v4"))
    b = ModelConfig.from_hf_dir(make_tiny_urm(tmp_path / "v5", config_style="v5"))
    assert a.rope == b.rope and a.rope.rope_type == "llama3" and a == b


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "unsupported RoPE type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "llama3 RoPE scaling lacks"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"num_labels": 2, "id2label": {"0": "a", "1": "b"}}, "num_labels is 2 and no attribute names"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' unsupported"),
    ({"attention_bias": True}, "attention_bias"),
    ({"pad_token_id": 10**6}, "pad_token_id"),
])
def test_bad_configs_fail_at_load(tmp_path, change, message):
    import json

    path = make_tiny_urm(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dir(path)


def test_real_8b_shapes_and_counts():
    hf = {"model_type": "llama", "vocab_size": 128257, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
          "pad_token_id": 128256, "num_labels": 10, "torch_dtype": "bfloat16"}
    counts = ModelConfig.from_hf_dict(hf).param_count()
    assert counts == {"backbone": 7_504_928_768, "score": 40_960, "gate": 33_583_109,
                      "total": 7_538_552_837}
    from flax import nnx

    from urm_jax.model.urm import abstract_model

    shapes = nnx.state(abstract_model(ModelConfig.from_hf_dict(hf))).to_pure_dict()
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == counts["total"]


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1), (1, 2, 4)])
def test_sharded_forward_matches_single_device(tmp_path_factory, mesh_shape):
    path = make_tiny_urm(tmp_path_factory.mktemp("mesh"), heads=8, kv_heads=4, gate_dtype="float32")
    model, cfg = load_model(path)
    ids, mask = pad_batch(random_rows([LONG, 33, 5, 70, 12, 9, 100, 64], seed=1), pad_id=511)
    want = jax_outputs(model, ids, mask)

    from flax import nnx

    from urm_jax.model.urm import model_from_params

    mesh = make_mesh(mesh_shape)
    params = jax.device_put(nnx.state(model).to_pure_dict(), param_shardings(cfg, mesh))
    sharded = model_from_params(cfg, params, model.options)
    graphdef, state = nnx.split(sharded)
    with use_mesh(mesh):
        fwd = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
        out = fwd(state, jnp.asarray(ids), jnp.asarray(mask))
    assert any(len(a.sharding.device_set) > 1 for a in jax.tree.leaves(params))
    for k in OUTPUTS:
        np.testing.assert_allclose(np.asarray(getattr(out, k)), want[k], rtol=1e-5, atol=1e-6)


def test_shipped_model_configs_load():
    import json
    from pathlib import Path

    root = Path(__file__).parent.parent / "configs" / "model"
    real = ModelConfig.from_hf_dict(json.loads((root / "urm-llama-3.1-8b.json").read_text()))
    assert real.param_count()["total"] == 7_538_552_837
    assert (real.torch_dtype, real.gate_dtype, real.rope.original_max_position_embeddings) == (
        "bfloat16", "float16", 8192)
    tiny = ModelConfig.from_hf_dict(json.loads((root / "urm-tiny.json").read_text()))
    assert tiny.vocab_size == real.vocab_size and tiny.rope == real.rope
