"""Load a URM from either checkpoint format, an HF directory (safetensors + config.json) or a
urm-jax checkpoint, and its tokenizer. Both formats give the same model; HF tensors go through
the one mapping table of `urm_jax.hf.mapping`. With a mesh, every parameter goes straight onto
its shards: from a urm-jax checkpoint through Orbax's sharded restore, from an HF directory by
reading each device's box from the safetensors files (host memory holds one shard at a time,
not the model)."""

from __future__ import annotations

from pathlib import Path

from urm_jax.checkpoint import is_jax_checkpoint, load_config, load_params
from urm_jax.config import DTypePolicy, ModelConfig
from urm_jax.data.tokenization import load_tokenizer  # noqa: F401  (this module's API too)
from urm_jax.hf.load import hf_to_params
from urm_jax.hf.safetensors_io import HFWeights
from urm_jax.model.urm import URM, ModelOptions, model_from_params, param_shardings


def load_config_any(path: str | Path) -> ModelConfig:
    """The model config of an HF directory or a urm-jax checkpoint (ConfigError/CheckpointError
    naming the file when it is missing or invalid)."""
    return load_config(path) if is_jax_checkpoint(path) else ModelConfig.from_hf_dir(path)


def load_params_any(path: str | Path, cfg: ModelConfig, progress: bool = False,
                    shardings: dict | None = None) -> dict:
    """Params in their stored dtypes, as the pure-dict tree of the model (stacked layers, kernels
    [in, out]): numpy on the host, or jax arrays placed by `shardings` (a matching tree of
    `jax.sharding.Sharding`, e.g. from `param_shardings`)."""
    if is_jax_checkpoint(path):
        return load_params(path, shardings)
    with HFWeights(path) as weights:
        return hf_to_params(weights, cfg, progress=progress, shardings=shardings)


def load_model(path: str | Path, *, compute_dtype: str | None = None, param_dtype: str | None = None,
               gate_dtype: str | None = None, remat: str = "none", attention: str = "reference",
               mesh=None, rules=None, progress: bool = False,
               mlp_chunk: int | None = None) -> tuple[URM, ModelConfig]:
    """(model, config) with the checkpoint's own dtypes unless overridden: compute in the
    backbone's stored dtype (what the HF reference does), gate in the checkpoint's gate dtype.
    With `mesh` (and optional `rules`, see `urm_jax.sharding`), parameters are sharded as they
    are read. `attention`: see `urm_jax.model.attention` (reference: HF's eager op by op, the
    parity path). `mlp_chunk`: tokens per row the MLP runs on at a time (inference; see
    `urm_jax.model.urm.token_chunks`)."""
    cfg = load_config_any(path)
    policy = DTypePolicy.for_checkpoint(cfg, compute_dtype)
    policy = DTypePolicy(param=param_dtype, compute=policy.compute, gate=gate_dtype or policy.gate)
    options = ModelOptions(policy, remat=remat, attention=attention, mlp_chunk=mlp_chunk)
    shardings = None if mesh is None else param_shardings(cfg, mesh, rules, options)
    params = load_params_any(path, cfg, progress=progress, shardings=shardings)
    return model_from_params(cfg, params, options), cfg
