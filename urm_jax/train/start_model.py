"""What a run keeps of its start model (`model:` in config.yaml), so `urm-jax export` still works
when that path is gone (a run copied off its pod):

    RUN/start_model/config.json, tokenizer files   copies, written once when the run starts
    RUN/start_model/start_model.json               where it was, and a fingerprint of its weights
                                                   (a urm-jax checkpoint's marker with its chunk
                                                   checksums; an HF dir's weight files and sizes)

A training step stores only the trained parameters; the frozen ones (stage 2: the whole
backbone) are rebuilt from the start model's weights, so export still needs those weights: at
the recorded path, or at `--model PATH`, checked against the fingerprint so a different model is
never silently mixed in."""

from __future__ import annotations

import json
from pathlib import Path

from urm_jax.checkpoint import MARKER, copy_tokenizer_files, is_jax_checkpoint
from urm_jax.io_utils import atomic_dir
from urm_jax.validate import read_json

RECORD_DIR = "start_model"
RECORD_FILE = "start_model.json"


class StartModelError(ValueError):
    """The start model of a run is missing, or `--model` is not the model the run started from."""


def fingerprint(model: str | Path) -> dict:
    """What identifies a model's weights without reading them: a urm-jax checkpoint's marker
    (per-chunk checksums included), or an HF dir's weight file names and sizes."""
    model = Path(model)
    if is_jax_checkpoint(model):
        return {"kind": "urm-jax", "marker": read_json(model / MARKER)}
    files = sorted(p for p in model.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"kind": "hf", "weights": {p.name: p.stat().st_size for p in files}}


def record_start_model(run_root: str | Path, model: str | Path) -> None:
    """Copy `model`'s config.json and tokenizer files into RUN/start_model with its fingerprint
    (once: a resumed run keeps the first record)."""
    target = Path(run_root) / RECORD_DIR
    if (target / RECORD_FILE).is_file():
        return
    model = Path(model).absolute()
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "config.json").write_bytes((model / "config.json").read_bytes())
        copy_tokenizer_files(model, tmp)
        (tmp / RECORD_FILE).write_text(json.dumps({"path": str(model), **fingerprint(model)}, indent=1))


def start_model_for_export(run_root: str | Path, recorded_path: str, override: str | Path | None) -> Path:
    """The directory export rebuilds the frozen parameters from: `override` (`--model`) or the
    run's recorded `model`; checked against RUN/start_model when the run recorded it (runs from
    before the record: unchecked). StartModelError says what is missing and what to do."""
    record_file = Path(run_root) / RECORD_DIR / RECORD_FILE
    record = read_json(record_file, StartModelError) if record_file.is_file() else None
    model = Path(override if override is not None else recorded_path)
    if not (model / "config.json").is_file():
        flag = "--model" if override is not None else f"the run's start model (config.yaml `model: {recorded_path}`)"
        raise StartModelError(
            f"{flag} {model}: no config.json there. A training step stores only the trained "
            "parameters; export rebuilds the frozen ones from the model the run started from: "
            + ("pass a copy of it as --model PATH" if override is None else "point --model at a copy of it")
            + (f" (checked against {record_file.parent})" if record else ""))
    if record is not None:
        same_config = json.loads((model / "config.json").read_text()) == json.loads(
            (record_file.parent / "config.json").read_text())
        if not same_config or fingerprint(model) != {k: v for k, v in record.items() if k != "path"}:
            raise StartModelError(f"{model} is not the model {run_root} started from "
                                  f"({record.get('path')}): its config.json or weights differ from "
                                  f"the record in {record_file.parent}")
    return model
