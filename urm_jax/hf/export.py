"""urm-jax checkpoint -> HF directory (`to_hf`): sharded safetensors laid out and reserved first,
then every stored chunk read and written, transposed, into its tensors' regions; config.json,
the PyTorch reference class (`modeling_custom.py`) and the tokenizer files beside them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from urm_jax.checkpoint import ParamsReader, copy_tokenizer_files, load_config
from urm_jax.config import np_dtype
from urm_jax.finite import check_cast
from urm_jax.hf.card import model_card, provenance, read_eval_metrics
from urm_jax.hf.mapping import Alloc, wider_dtype_flag
from urm_jax.hf.plan import (ckpt_chunk_rows, output_dtypes, plan_from_ckpt, row_units,
                             unit_progress, warn_if_pad_is_eos)
from urm_jax.hf.safetensors_io import SafetensorsWriter, parse_size
from urm_jax.hf.tokenizer_files import card_tokenizer
from urm_jax.hf.streams import BufferPool, Progress, ordered_map, pooled, readahead
from urm_jax.io_utils import atomic_dir, check_outputs
from urm_jax.provenance import publishable

MODELING_FILE = Path(__file__).with_name("modeling_custom.py")


def _into_shaped(out: np.ndarray) -> Alloc:
    """An Alloc handing out `out` under another shape of the same size (HF and JAX shapes of an
    untransposed tensor differ only by reshape)."""
    return lambda shape, dtype: out.reshape(shape)



def to_hf(ckpt_dir, out_dir, *, dtype="keep", gate_dtype=None, max_shard_size="5GB",
          overwrite=False, allow_nonfinite=False, progress=True, base_model: str | None = None,
          license: str | None = None, eval_metrics: str | Path | None = None) -> Path:
    """urm-jax checkpoint -> HF dir. Shard files are laid out and reserved first; then each
    stored chunk is read (one per thread at a time), transposed into a buffer and written into
    its tensors' places in the shards, in any order. A chunk holding NaN/Inf is refused (unless
    `allow_nonfinite`), and so is a down-cast (`dtype`, `gate_dtype`) that would turn a finite
    value into Inf; either names the tensor, and no OUT_DIR is left. A model card (README.md,
    `urm_jax.hf.card`) goes beside the weights: `base_model`/`license` override what `convert
    init` recorded; `eval_metrics` is an `urm-jax eval` metrics.json of this checkpoint whose
    numbers the card reports (refused, naming the field, when it evaluated another model or
    attribute set). config.json and the card carry no local paths
    (`urm_jax.provenance.publishable`)."""
    ckpt_dir = Path(ckpt_dir)
    check_outputs([("CKPT_DIR", ckpt_dir)], [("OUT_DIR", out_dir, "dir")], overwrite=overwrite)
    limit = parse_size(max_shard_size)
    cfg = load_config(ckpt_dir)
    provenance(cfg.hf_config, str(ckpt_dir / "config.json"))  # the card's fields, before any work
    evaluated = (read_eval_metrics(eval_metrics, ckpt_dir, cfg) if eval_metrics is not None
                 else None)  # refused before anything is written when it is another model's
    tokenizer = card_tokenizer(ckpt_dir)  # JSON facts for the card: no transformers import
    reader = ParamsReader(ckpt_dir, allow_nonfinite=allow_nonfinite)
    plans = plan_from_ckpt(reader, cfg, dtype, gate_dtype)
    warn_if_pad_is_eos(cfg, str(ckpt_dir))
    specs = [spec for plan in plans for spec in plan.hf_specs()]

    def export(unit, alloc):
        plan, start, stop = unit
        entry = plan.entry
        if not entry.stacked and entry.n_in is None:  # rows of one tensor, untransposed
            with writer.region(entry.hf_key, start, stop - start, alloc) as out:
                same = out.dtype == reader.dtype(plan.path)
                rows = reader.read(plan.path, start, stop, _into_shaped(out) if same else alloc)
                if not same:
                    with np.errstate(over="ignore"):  # refused just below, naming the tensor
                        np.copyto(out, rows, casting="unsafe")
                    check_cast(rows, out, f"{ckpt_dir}: parameter {entry.jax_name} -> tensor "
                               f"{entry.hf_key} ({out.dtype.name})", wider=wider_dtype_flag(entry))
        else:
            block = reader.read(plan.path, start, stop, alloc)
            for key, value in plan.unit_tensors(start, stop, block):
                with writer.region(key, alloc=alloc) as out:
                    entry.to_hf_into(value, out, alloc)
                    check_cast(value, out, f"{ckpt_dir}: parameter {entry.jax_name} -> tensor "
                               f"{key} ({out.dtype.name})", wider=wider_dtype_flag(entry))
        return unit_progress(plan, start, stop, np_dtype(plan.out).itemsize)

    units = row_units(plans, ckpt_chunk_rows(reader))
    total = sum(math.prod(shape) * np_dtype(d).itemsize for _, d, shape in specs)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = SafetensorsWriter(tmp, specs, limit)
        writer.create()
        with Progress("to_hf", total, len(specs), progress) as bar:
            work = readahead(units, lambda unit: reader.prefetch(unit[0].path, *unit[1:]))
            for done in ordered_map(pooled(BufferPool(), export), work):
                bar.update(*done)
        writer.finish()
        hf = publishable(cfg.to_hf_dict(**output_dtypes(plans, cfg, gate_dtype)),
                         base_model=base_model)  # no local paths in what gets uploaded
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        shutil.copy2(MODELING_FILE, tmp / "modeling_custom.py")
        copy_tokenizer_files(ckpt_dir, tmp)
        (tmp / "README.md").write_text(model_card(
            cfg, hf, tokenizer, base_model=base_model, license=license,
            eval_metrics=evaluated, source=str(ckpt_dir / "config.json")))
    return Path(out_dir)

