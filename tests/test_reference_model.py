"""The PyTorch reference (urm_jax/hf/modeling_custom.py) and the tiny-checkpoint factory."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, LlamaConfig

from urm_jax.hf.modeling_custom import LlamaForSequenceClassificationWithNormal_Weights as URM
from hf_fixtures import load_reference, make_tiny_urm, reference_outputs

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 64, 2, 4, 2, 128, 512
PAD = VOCAB - 1
# Longer than the tiny config's original_max_position_embeddings (32) so llama3 RoPE scaling matters.
LENGTHS = [45, 70, 23]


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    return make_tiny_urm(tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def fp32_model(fp32_dir):
    return load_reference(fp32_dir)


def _rows(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB - 1, (n,), generator=gen) for n in LENGTHS]


def _pad(rows, side):
    """Batch rows with PAD on the given side; returns ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def _expected_shapes(hidden, layers, heads, kv_heads, inter, vocab, head_dim=None):
    head_dim = head_dim or hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {
        "score.weight": (10, hidden),
        "weights.fc.0.weight": (hidden, hidden),
        "weights.fc.0.bias": (hidden,),
        "weights.fc.2.weight": (hidden, hidden),
        "weights.fc.2.bias": (hidden,),
        "weights.fc.4.weight": (5, hidden),
        "weights.fc.4.bias": (5,),
    }
    return shapes


def _saved_tensors(path):
    """name -> (shape, dtype) over all safetensors files of a checkpoint dir."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                out[k] = (tuple(t.get_shape()), t.get_dtype())
    return out


def test_parameter_names_and_shapes(fp32_dir, fp32_model):
    expected = _expected_shapes(HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB)
    assert {k: tuple(v.shape) for k, v in fp32_model.state_dict().items()} == expected
    saved = _saved_tensors(fp32_dir)
    assert {k: s for k, (s, _) in saved.items()} == expected  # no lm_head, no rotary buffers
    assert {d for k, (_, d) in saved.items() if k.startswith("weights.")} == {"F16"}
    assert {d for k, (_, d) in saved.items() if not k.startswith("weights.")} == {"F32"}
    cfg = json.loads((fp32_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassificationWithNormal_Weights"]
    assert len(cfg["id2label"]) == 10  # transformers 5 stores num_labels as id2label
    assert cfg["pad_token_id"] == PAD and "rope_parameters" in cfg
    assert (fp32_dir / "modeling_custom.py").read_text().startswith('"""PyTorch reference')


def test_reward_is_gated_sum_of_means(fp32_model):
    ids, mask = _pad(_rows(), "right")
    with torch.no_grad():
        out = fp32_model(ids, attention_mask=mask)
        z, w = fp32_model(ids, attention_mask=mask, return_dict=False)
    assert z.shape == (3, 10) and w.shape == (3, 5) and w.dtype == torch.float16
    means, log_stds = z[:, 0::2], z[:, 1::2]  # interleaved (mean, log_std) pairs
    reward = (means.double() * w.double()).sum(-1)
    torch.testing.assert_close(out.logits[:, 0].double(), reward, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.value_logits, z) and torch.equal(out.gate_weights, w)
    assert torch.equal(out.means, means) and torch.equal(out.log_stds, log_stds)
    assert out.logits.shape == (3, 1) and out.logits.dtype == torch.float32
    assert out.loss is None
    # Random init must give O(1) numbers, otherwise relative parity checks downstream are vacuous.
    assert 0.05 < out.logits.abs().mean() < 50 and 0.05 < w.float().abs().mean() < 50


def test_pool_then_head_equals_head_then_pool(fp32_model):
    ids, mask = _pad(_rows(), "right")
    with torch.no_grad():
        out = fp32_model(ids, attention_mask=mask, output_hidden_states=True)
        h = fp32_model.model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        h = h.last_hidden_state
    last = torch.tensor(LENGTHS) - 1
    z_all, w_all = fp32_model.score(h), fp32_model.weights(h)
    torch.testing.assert_close(out.value_logits, z_all[torch.arange(3), last], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.gate_weights, w_all[torch.arange(3), last], rtol=1e-3, atol=1e-3)
    assert len(out.hidden_states) == LAYERS + 1


def test_padding_invariance(fp32_model):
    rows = _rows()
    single = [reference_outputs(fp32_model, r[None]) for r in rows]
    for side in ("left", "right"):
        batch = reference_outputs(fp32_model, *_pad(rows, side))
        for i, ref in enumerate(single):
            for key in ("reward", "means", "log_stds"):
                np.testing.assert_allclose(batch[key][i], ref[key][0], rtol=0, atol=1e-5, err_msg=f"{side} {key}")
            # gate runs in fp16: allow one fp16 ulp-ish of its O(1) outputs
            np.testing.assert_allclose(batch["gate"][i], ref["gate"][0], rtol=0, atol=2e-3, err_msg=side)


def test_left_padding_bf16_matches_unpadded(tmp_path):
    # RoPE is relative, so arange positions on a left-padded row differ from ours only by rounding:
    # ~1e-6 in fp32 but ~1e-2 in bf16. Mask-derived positions make the row bitwise the unpadded one.
    model = load_reference(make_tiny_urm(tmp_path / "bf16", backbone_dtype="bfloat16"))
    rows = _rows()
    single = np.array([reference_outputs(model, r[None])["reward"][0] for r in rows])
    np.testing.assert_allclose(reference_outputs(model, *_pad(rows, "left"))["reward"], single, rtol=0, atol=1e-3)


def test_pooling_skips_only_trailing_pads(fp32_model):
    # A pad id inside the text (pad == eos in some tokenizers) must not end the row, unlike the
    # transformers 4.4x "first pad - 1" rule.
    ids, mask = _pad(_rows(), "right")
    ids[0, 10] = PAD
    with torch.no_grad():
        out = fp32_model(ids, attention_mask=mask)
        h = fp32_model.model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    z_last = fp32_model.score(h.last_hidden_state[0, LENGTHS[0] - 1])
    torch.testing.assert_close(out.value_logits[0], z_last, rtol=1e-6, atol=1e-6)


def test_inputs_embeds_pool_by_attention_mask(fp32_model):
    ids, mask = _pad(_rows(), "right")
    with torch.no_grad():
        by_ids = fp32_model(ids, attention_mask=mask)
        by_embeds = fp32_model(inputs_embeds=fp32_model.model.embed_tokens(ids), attention_mask=mask)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, rtol=0, atol=1e-6)


def test_auto_class_remote_code_keeps_dtypes(tmp_path):
    path = make_tiny_urm(tmp_path / "bf16", backbone_dtype="bfloat16", gate_dtype="float16", seed=3)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["auto_map"] == {
        "AutoModelForSequenceClassification": "modeling_custom.LlamaForSequenceClassificationWithNormal_Weights"
    }
    ref = load_reference(path)
    auto = AutoModelForSequenceClassification.from_pretrained(
        path, trust_remote_code=True, attn_implementation="eager"
    ).eval()
    assert type(auto).__name__ == "LlamaForSequenceClassificationWithNormal_Weights"
    assert type(auto).__module__.startswith("transformers_modules.")  # really the shipped file
    for m in (ref, auto):
        assert m.model.embed_tokens.weight.dtype == torch.bfloat16
        assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert m.score.weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float16 for p in m.weights.parameters())
    ids, mask = _pad(_rows(), "left")
    a, b = reference_outputs(ref, ids, mask), reference_outputs(auto, ids, mask)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    with torch.no_grad():
        assert auto(ids, attention_mask=mask).logits.dtype == torch.float32  # bf16 * fp16 promotes

    # An explicit fp32 load (what the model card got in transformers 4) upcasts only the backbone.
    f32 = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    assert f32.model.embed_tokens.weight.dtype == torch.float32 and f32.score.weight.dtype == torch.float32
    assert all(p.dtype == torch.float16 for p in f32.weights.parameters())


def test_gate_dtype_from_config(tmp_path):
    path = make_tiny_urm(tmp_path / "g32", gate_dtype="float32")
    model = load_reference(path)
    assert all(p.dtype == torch.float32 for p in model.weights.parameters())
    assert model.model.norm.weight.dtype == torch.float32


def test_v4_and_v5_configs_agree(tmp_path, fp32_dir, fp32_model):
    v4 = make_tiny_urm(tmp_path / "v4", config_style="v4")
    cfg = json.loads((v4 / "config.json").read_text())
    assert "rope_parameters" not in cfg and "gate_dtype" not in cfg and cfg["rope_theta"] == 10000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    # transformers 5 folds the v4 fields into rope_parameters but keeps the legacy "type" key.
    rope_v4 = dict(LlamaConfig.from_pretrained(v4).rope_parameters)
    assert rope_v4.pop("type") == "llama3"
    assert rope_v4 == LlamaConfig.from_pretrained(fp32_dir).rope_parameters
    ids, mask = _pad(_rows(), "right")
    a, b = reference_outputs(fp32_model, ids, mask), reference_outputs(load_reference(v4), ids, mask)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_default_rope_differs_from_llama3(tmp_path, fp32_model):
    plain = load_reference(make_tiny_urm(tmp_path / "plain", rope_type="default"))
    assert plain.config.rope_parameters["rope_type"] == "default"
    ids, mask = _pad(_rows(), "right")
    a, b = reference_outputs(fp32_model, ids, mask), reference_outputs(plain, ids, mask)
    assert np.abs(a["reward"] - b["reward"]).max() > 1e-3  # same weights, only RoPE differs


def test_sharded_save(tmp_path, fp32_model):
    path = make_tiny_urm(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (path / "model.safetensors").exists()
    ids, mask = _pad(_rows(), "left")
    a, b = reference_outputs(fp32_model, ids, mask), reference_outputs(load_reference(path), ids, mask)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_real_8b_parameter_counts():
    config = LlamaConfig(
        vocab_size=128257,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        pad_token_id=128256,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        num_labels=10,
    )
    with torch.device("meta"):
        model = URM(config)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.model) == 7_504_928_768
    assert count(model.score) == 40_960
    assert count(model.weights) == 33_583_109
    assert count(model) == 7_538_552_837
    assert model.weights.fc[0].weight.dtype == torch.float16
    assert set(_expected_shapes(4096, 32, 32, 8, 14336, 128257)) == set(model.state_dict())
