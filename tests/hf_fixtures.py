"""Tiny random URM checkpoints in the real checkpoint's HF format, for the whole test suite.

The real weights cannot be downloaded here, so parity tests build their own checkpoints with the
same key names, dtype mix (bf16/fp32 backbone, fp16 gate) and config fields, from the PyTorch
reference in `urm_jax/hf/modeling_custom.py`.

Token ids of the tiny vocab: bos 1, eos [2, 3] (a list, like Llama-3.1's), pad vocab-1 (like
Skywork's added `[PAD]`). Ids 4 .. vocab-2 are ordinary tokens.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig

import urm_jax.hf.modeling_custom as modeling_custom
from urm_jax.hf.modeling_custom import LlamaForSequenceClassificationWithNormal_Weights

MODELING_FILE = Path(modeling_custom.__file__)
ARCHITECTURE = "LlamaForSequenceClassificationWithNormal_Weights"
AUTO_MAP = {"AutoModelForSequenceClassification": f"modeling_custom.{ARCHITECTURE}"}
BOS_ID = 1
EOS_IDS = [2, 3]
NUM_LABELS = 10

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rope_parameters(rope_type, rope_theta, factor, original_max_position_embeddings):
    if rope_type == "default":
        return {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_type != "llama3":
        raise ValueError(f"rope_type must be 'llama3' or 'default', got {rope_type!r}")
    return {
        "rope_type": "llama3",
        "rope_theta": float(rope_theta),
        "factor": float(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": int(original_max_position_embeddings),
    }


@torch.no_grad()
def _init_random(model: torch.nn.Module, seed: int) -> None:
    """Seeded init that keeps activations O(1) everywhere, so relative parity checks bite.

    HF's default init (std 0.02, unit norms, zero biases) makes rewards ~1e-3 and hides bugs such
    as a missing norm weight or a dropped bias.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # deterministic order
        shape = param.shape
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            value = torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            value = 0.1 * torch.randn(shape, generator=gen)
        elif param.ndim == 2:  # Linear [out, in]
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        else:
            raise AssertionError(f"unexpected parameter {name} {tuple(shape)}")
        param.copy_(value)  # copy_ casts to the parameter's dtype (fp16 for the gate)


def _rewrite_config_v4(out_dir: Path, rope_parameters: dict) -> None:
    """Rewrite config.json in the style transformers 4.4x wrote (the real checkpoint's)."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope["rope_type"] == "default":
        cfg["rope_scaling"] = None
    else:
        cfg["rope_scaling"] = {"type": rope["rope_type"], **rope}  # v4 kept the legacy "type" too
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    if cfg.get("gate_dtype") == "float16":
        del cfg["gate_dtype"]  # the released config has no such field; fp16 is the model's default
    cfg["transformers_version"] = "4.44.0"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # transformers 5 must still read it with the same RoPE, or v4-vs-v5 comparisons are vacuous.
    loaded = LlamaConfig.from_pretrained(out_dir).rope_parameters
    got = {k: loaded[k] for k in rope_parameters}
    assert got == rope_parameters, (got, rope_parameters)


def make_tiny_urm(
    out_dir,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int = 128,
    vocab: int = 512,
    pad_token_id: int | None = None,
    backbone_dtype: str = "float32",
    gate_dtype: str = "float16",
    rope_type: str = "llama3",
    rope_theta: float = 10000.0,
    original_max_position_embeddings: int = 32,
    factor: float = 8.0,
    max_position_embeddings: int = 4096,
    rms_norm_eps: float = 1e-5,
    config_style: str = "v5",
    seed: int = 0,
    max_shard_size=None,
    with_modeling_file: bool = True,
) -> Path:
    """Write a random tiny URM checkpoint (config.json, safetensors, modeling_custom.py) to out_dir.

    The same arguments and seed always give the same weights, whatever the config_style or
    sharding, so checkpoints that differ only in format can be compared exactly.
    """
    if config_style not in ("v4", "v5"):
        raise ValueError(f"config_style must be 'v4' or 'v5', got {config_style!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rope_parameters = _rope_parameters(rope_type, rope_theta, factor, original_max_position_embeddings)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_parameters=rope_parameters,
        pad_token_id=vocab - 1 if pad_token_id is None else pad_token_id,
        bos_token_id=BOS_ID,
        eos_token_id=list(EOS_IDS),
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        num_labels=NUM_LABELS,
        architectures=[ARCHITECTURE],
        auto_map=dict(AUTO_MAP),
        gate_dtype=gate_dtype,
    )
    model = LlamaForSequenceClassificationWithNormal_Weights(config)  # fp32 backbone, gate_dtype gate
    _init_random(model, seed)
    model.model.to(_DTYPES[backbone_dtype])
    model.score.to(_DTYPES[backbone_dtype])
    model.weights.to(_DTYPES[gate_dtype])
    # `dtype="auto"` loading reads config.dtype for the backbone; the gate's dtype comes from gate_dtype.
    model.config.dtype = _DTYPES[backbone_dtype]

    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    if with_modeling_file:
        shutil.copyfile(MODELING_FILE, out_dir / "modeling_custom.py")
    if config_style == "v4":
        _rewrite_config_v4(out_dir, rope_parameters)
    return out_dir


def make_tiny_chat_urm(out_dir, cache_dir) -> Path:
    """Tiny URM with Llama-3.1's vocabulary (128257, [PAD] 128256) and the real tokenizer files
    (built offline into `cache_dir`), so chat inputs run through the real tokenizer."""
    import pytest

    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

    out = make_tiny_urm(out_dir, vocab=128257, pad_token_id=128256, hidden=32, intermediate=64,
                        gate_dtype="float32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("URM_JAX_CACHE", str(cache_dir))
        tok_dir = cached_llama3_tokenizer_dir()
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def load_reference(path, dtype=None, attn_implementation: str = "eager"):
    """Load a checkpoint into the reference class directly (no trust_remote_code), in eval mode.

    dtype None keeps each tensor's checkpoint dtype (transformers 5 `dtype="auto"`); the gate keeps
    its own dtype whatever dtype is given. Eager attention keeps fp32 runs exact.
    """
    model = LlamaForSequenceClassificationWithNormal_Weights.from_pretrained(
        path, dtype="auto" if dtype is None else dtype, attn_implementation=attn_implementation
    )
    return model.eval()


def _as_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


@torch.no_grad()
def reference_outputs(model, input_ids, attention_mask=None) -> dict[str, np.ndarray]:
    """Pooled outputs as float64 numpy: reward [B], means [B,5], log_stds [B,5], gate [B,5]."""
    if model.config._attn_implementation != "eager":
        model.set_attn_implementation("eager")
    input_ids = _as_tensor(input_ids).long()
    if attention_mask is not None:
        attention_mask = _as_tensor(attention_mask).long()
    out = model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)

    def f64(t):
        return t.detach().to(torch.float64).cpu().numpy()

    return {
        "reward": f64(out.logits[:, 0]),
        "means": f64(out.means),
        "log_stds": f64(out.log_stds),
        "gate": f64(out.gate_weights),
    }
