"""HF <-> JAX conversion, both directions driven by `mapping.TABLE`.

`hf_to_params` and `params_to_hf_tensors` are the library; `from_hf` / `to_hf` add the checkpoint
formats, dtype policy, atomic output and progress. Tensors are read lazily one at a time; the
stacked JAX arrays are preallocated and filled layer by layer, so the model is never held twice.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from convert.hf_io import HFWeights, WeightsError, parse_size, write_sharded
from convert.mapping import IGNORED_HF_KEYS, LAYER_KEY, TABLE, Entry, get_path, is_gate, set_path
from urm_jax.checkpoint import copy_tokenizer_files, load_config, load_params, save_checkpoint
from urm_jax.config import ModelConfig, canonical_dtype, np_dtype
from urm_jax.io_utils import atomic_dir

MODELING_FILE = Path(__file__).with_name("modeling_custom.py")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class ConversionError(ValueError):
    pass


def jax_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """JAX shape of every table entry, from the model's own parameter declarations."""
    from urm_jax.model.urm import abstract_model
    from flax import nnx

    tree = nnx.state(abstract_model(cfg)).to_pure_dict()
    return {e.path: tuple(get_path(tree, e.path).shape) for e in TABLE}


def target_dtype(entry: Entry, stored: str, dtype: str, gate_dtype: str | None) -> str:
    """`dtype` ('keep' or a name) applies to backbone and value head; the gate keeps its own
    dtype unless `gate_dtype` is given (the HF reference builds the gate in its own dtype)."""
    if is_gate(entry):
        return canonical_dtype(gate_dtype) if gate_dtype else stored
    return stored if dtype == "keep" else canonical_dtype(dtype)


def _check_keys(weights: HFWeights, cfg: ModelConfig) -> None:
    layers_in_file = sorted({int(m.group(1)) for k in weights.keys() if (m := LAYER_KEY.match(k))})
    if layers_in_file and layers_in_file != list(range(cfg.num_layers)):
        raise ConversionError(
            f"config.json says num_hidden_layers={cfg.num_layers} but the weights hold layers "
            f"{layers_in_file[0]}..{layers_in_file[-1]} ({len(layers_in_file)} layers)")
    expected = [k for e in TABLE for k in e.hf_keys(cfg.num_layers)]
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ConversionError(f"{weights.dir}: tensor {missing[0]} missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(weights.keys()) - set(expected))
    unexpected = [k for k in unexpected if not IGNORED_HF_KEYS.fullmatch(k)]
    if unexpected:
        raise ConversionError(f"{weights.where(unexpected[0])}: unexpected tensor {unexpected[0]}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + " - not part of the URM architecture")


def _checked(weights: HFWeights, key: str, want_shape, allow_nonfinite: bool) -> np.ndarray:
    tensor = weights.get(key)
    if tuple(tensor.shape) != tuple(want_shape):
        raise ConversionError(f"{weights.where(key)}: tensor {key} has shape {list(tensor.shape)}, "
                              f"config.json implies {list(want_shape)}")
    if tensor.dtype.name not in FLOAT_DTYPES:
        raise ConversionError(f"{weights.where(key)}: tensor {key} has dtype {tensor.dtype}; "
                              f"the model takes {', '.join(FLOAT_DTYPES)}")
    if not allow_nonfinite and not np.isfinite(tensor.astype(np.float32)).all():
        raise ConversionError(f"{weights.where(key)}: tensor {key} holds NaN or Inf "
                              "(pass --allow-nonfinite to convert it anyway)")
    return tensor


def hf_to_params(weights: HFWeights, cfg: ModelConfig, *, dtype: str = "keep",
                 gate_dtype: str | None = None, allow_nonfinite: bool = False,
                 progress: bool = True) -> dict:
    """HF tensors -> the JAX pure-dict params tree (numpy, stacked layers)."""
    _check_keys(weights, cfg)
    shapes = jax_shapes(cfg)
    params: dict = {}
    total = sum(len(e.hf_keys(cfg.num_layers)) for e in TABLE)
    with tqdm(total=total, desc="from_hf", unit="tensor", disable=not progress, file=sys.stderr) as bar:
        for entry in TABLE:
            shape = shapes[entry.path]
            keys = entry.hf_keys(cfg.num_layers)
            stored = weights.dtype(keys[0])
            if stored not in FLOAT_DTYPES:
                raise ConversionError(f"{weights.where(keys[0])}: tensor {keys[0]} has dtype "
                                      f"{stored}; the model takes {', '.join(FLOAT_DTYPES)}")
            out = np_dtype(target_dtype(entry, stored, dtype, gate_dtype))
            array = np.empty(shape, out)
            for i, key in enumerate(keys):
                tensor = _checked(weights, key, entry.hf_shape(shape), allow_nonfinite)
                if tensor.dtype.name != stored:
                    raise ConversionError(f"{weights.where(key)}: tensor {key} is {tensor.dtype}, "
                                          f"{keys[0]} is {stored}; a stacked tensor needs one dtype")
                value = entry.to_jax(tensor, shape).astype(out, copy=False)
                if entry.stacked:
                    array[i] = value
                else:
                    array = np.ascontiguousarray(value)
                bar.update()
            set_path(params, entry.path, array)
    return params


def output_dtypes(params: dict, dtype: str = "keep", gate_dtype: str | None = None) -> dict:
    """{'torch_dtype', 'gate_dtype'} an output config.json records: what is actually stored."""
    def pick(gate: bool) -> str:
        names = {target_dtype(e, get_path(params, e.path).dtype.name, dtype, gate_dtype)
                 for e in TABLE if is_gate(e) == gate}
        return "float32" if "float32" in names else sorted(names)[0]

    return {"torch_dtype": pick(False), "gate_dtype": pick(True)}


def from_hf(hf_dir, out_dir, *, dtype="keep", gate_dtype=None, overwrite=False,
            allow_nonfinite=False, progress=True) -> Path:
    hf_dir = Path(hf_dir)
    cfg = ModelConfig.from_hf_dir(hf_dir)
    params = hf_to_params(HFWeights(hf_dir), cfg, dtype=dtype, gate_dtype=gate_dtype,
                          allow_nonfinite=allow_nonfinite, progress=progress)
    return save_checkpoint(out_dir, params, cfg, tokenizer_dir=hf_dir, overwrite=overwrite,
                           hf_config=cfg.to_hf_dict(**output_dtypes(params)))


def params_to_hf_tensors(params: dict, cfg: ModelConfig, *, dtype="keep", gate_dtype=None):
    """(sizes in write order, produce(key)) for the HF tensors of a JAX params tree."""
    shapes = jax_shapes(cfg)
    owners: dict[str, tuple[Entry, int | None, str]] = {}
    sizes = []
    for entry in TABLE:
        array = get_path(params, entry.path)
        if tuple(array.shape) != shapes[entry.path]:
            raise ConversionError(f"parameter {entry.jax_name} has shape {list(array.shape)}, "
                                  f"config.json implies {list(shapes[entry.path])}")
        out = target_dtype(entry, canonical_dtype(array.dtype.name), dtype, gate_dtype)
        per_tensor = int(np.prod(entry.hf_shape(shapes[entry.path]))) * np_dtype(out).itemsize
        for i, key in enumerate(entry.hf_keys(cfg.num_layers)):
            owners[key] = (entry, i if entry.stacked else None, out)
            sizes.append((key, per_tensor))

    def produce(key: str) -> np.ndarray:
        entry, layer, out = owners[key]
        array = np.asarray(get_path(params, entry.path))
        value = array[layer] if layer is not None else array
        return entry.to_hf(value).astype(np_dtype(out), copy=False)

    return sizes, produce


def to_hf(ckpt_dir, out_dir, *, dtype="keep", gate_dtype=None, max_shard_size="5GB",
          overwrite=False, progress=True) -> Path:
    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    params = load_params(ckpt_dir)
    sizes, produce = params_to_hf_tensors(params, cfg, dtype=dtype, gate_dtype=gate_dtype)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with tqdm(total=len(sizes), desc="to_hf", unit="tensor", disable=not progress,
                  file=sys.stderr) as bar:
            write_sharded(tmp, sizes, produce, parse_size(max_shard_size), progress=bar.update)
        hf = cfg.to_hf_dict(**output_dtypes(params, dtype, gate_dtype))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        shutil.copy2(MODELING_FILE, tmp / "modeling_custom.py")
        copy_tokenizer_files(ckpt_dir, tmp)
    return Path(out_dir)


def verify(hf_dir, ckpt_dir, *, progress: bool = True) -> list[dict]:
    """Compare every tensor of an HF directory with a urm-jax checkpoint: names, shapes, dtypes
    and values bit for bit. Returns one row per HF tensor; raises nothing for a mismatch (the
    caller decides), but a missing/unexpected tensor or an unreadable file raises as usual."""
    weights = HFWeights(hf_dir)
    cfg = load_config(ckpt_dir)
    _check_keys(weights, cfg)
    params = load_params(ckpt_dir)
    sizes, produce = params_to_hf_tensors(params, cfg)
    rows = []
    for key, _ in tqdm(sizes, desc="verify", unit="tensor", disable=not progress, file=sys.stderr):
        ours, theirs = produce(key), weights.get(key)
        same_shape = ours.shape == theirs.shape
        same_dtype = ours.dtype == theirs.dtype
        same_bits = same_shape and same_dtype and ours.tobytes() == theirs.tobytes()
        diff = (float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64))))
                if same_shape else float("nan"))
        rows.append({"key": key, "shape": list(theirs.shape), "hf_dtype": theirs.dtype.name,
                     "ckpt_dtype": ours.dtype.name, "identical": bool(same_bits), "max_abs_diff": diff})
    return rows
