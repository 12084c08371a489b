"""The JAX checkpoint: one directory holding

    urm_jax.json   format marker + layout version (checked on load) + each tensor's dtype
    config.json    the HF-style model config (source of truth for shapes and RoPE)
    params/        Orbax (OCDBT) tree of parameters in the stacked-layer layout
    tokenizer files, when the source had them

A layout change bumps LAYOUT_VERSION, and loading an older or newer layout fails loudly instead
of loading wrong numbers (MaxText's scanned/unscanned and Linen/NNX drift)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from urm_jax.config import ModelConfig
from urm_jax.io_utils import atomic_dir

FORMAT = "urm-jax"
LAYOUT_VERSION = 1
MARKER = "urm_jax.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json", "generation_config.json")


class CheckpointError(ValueError):
    pass


def is_jax_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def copy_tokenizer_files(src: str | Path | None, dst: Path) -> list[str]:
    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    return copied


def dtype_summary(params: dict) -> dict[str, str]:
    return {jax.tree_util.keystr(path): str(leaf.dtype)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def save_checkpoint(out_dir: str | Path, params: dict, cfg: ModelConfig, *,
                    tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                    hf_config: dict | None = None) -> Path:
    """Write params + config + tokenizer atomically (temporary sibling, then rename)."""
    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(hf_config or cfg.hf_config, indent=2, sort_keys=True))
        copy_tokenizer_files(tokenizer_dir, tmp)
        marker = {"format": FORMAT, "layout_version": LAYOUT_VERSION, "layers": "stacked",
                  "rope": "rotate_half", "kernels": "[in, out]", "dtypes": dtype_summary(params)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    return out_dir


def read_marker(path: str | Path) -> dict:
    file = Path(path) / MARKER
    if not file.is_file():
        raise CheckpointError(f"{path}: not a urm-jax checkpoint ({MARKER} missing)")
    try:
        marker = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {marker.get('format')!r}, expected {FORMAT!r}")
    if marker.get("layout_version") != LAYOUT_VERSION:
        raise CheckpointError(
            f"{file}: layout version {marker.get('layout_version')}, this urm-jax reads "
            f"version {LAYOUT_VERSION}; convert it with the urm-jax release that wrote it")
    return marker


def load_config(path: str | Path) -> ModelConfig:
    read_marker(path)
    return ModelConfig.from_hf_dir(path)


def stored_param_metadata(path: str | Path) -> dict:
    """Tree of jax.ShapeDtypeStruct with each tensor's stored shape and dtype."""
    read_marker(path)
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing")
    meta = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
    tree = getattr(meta, "tree", meta)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_params(path: str | Path, shardings=None) -> dict:
    """Restore params with their stored dtypes: numpy arrays on the host, or jax arrays placed
    directly on their shards when `shardings` (a matching tree of NamedSharding) is given."""
    target = stored_param_metadata(path)
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              target, shardings)
    return ocp.StandardCheckpointer().restore(Path(path).absolute() / PARAMS_DIR, target)
