"""Load a URM from either checkpoint format: an HF directory (safetensors + config.json) or a
urm-jax checkpoint. Both give the same model; HF tensors are converted in memory through the one
mapping table in `convert.mapping`."""

from __future__ import annotations

from pathlib import Path

from urm_jax.checkpoint import is_jax_checkpoint, load_config, load_params
from urm_jax.config import DTypePolicy, ModelConfig
from urm_jax.model.urm import URM, ModelOptions, model_from_params


def load_config_any(path: str | Path) -> ModelConfig:
    return load_config(path) if is_jax_checkpoint(path) else ModelConfig.from_hf_dir(path)


def load_params_any(path: str | Path, cfg: ModelConfig, progress: bool = False) -> dict:
    if is_jax_checkpoint(path):
        return load_params(path)
    from convert.core import hf_to_params  # library, not the CLI
    from convert.hf_io import HFWeights

    return hf_to_params(HFWeights(path), cfg, progress=progress)


def load_model(path: str | Path, *, compute_dtype: str | None = None, param_dtype: str | None = None,
               gate_dtype: str | None = None, remat: str = "none",
               progress: bool = False) -> tuple[URM, ModelConfig]:
    """The model with the checkpoint's own dtypes unless overridden: compute in the backbone's
    stored dtype (what the HF reference does), gate in the checkpoint's gate dtype."""
    cfg = load_config_any(path)
    policy = DTypePolicy.for_checkpoint(cfg, compute_dtype)
    policy = DTypePolicy(param=param_dtype, compute=policy.compute, gate=gate_dtype or policy.gate)
    params = load_params_any(path, cfg, progress=progress)
    return model_from_params(cfg, params, ModelOptions(policy, remat=remat)), cfg
