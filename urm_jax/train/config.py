"""Typed training configuration: YAML file + `key=value` overrides, validated before anything
compiles. An unknown key (a typo) fails with the closest valid names; a wrong type fails with
the expected type; both name the key path, e.g. `optim.learning_rate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class TrainConfigError(ValueError):
    pass


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = ""  # jsonl/parquet path or hub dataset name
    split: str = "train"
    eval: str | None = None  # optional held-out source (same schema)
    eval_split: str = "validation"
    seq_len: int = 4096
    pack: bool = True  # stage 1 only; stage 2 rows are pairs
    max_segments: int = 8
    shuffle_seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 2e-6
    weight_decay: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    clip_norm: float | None = 1.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: Literal["reparam", "nll", "bt"] = "reparam"
    label_scale: float = 1.0
    label_shift: float = 0.0


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    param: Literal["float32", "bfloat16"] = "float32"  # master weights of backbone + value head
    compute: Literal["float32", "bfloat16"] = "bfloat16"
    gate_param: Literal["float32", "bfloat16", "float16"] = "float32"
    gate_compute: Literal["float32", "bfloat16", "float16"] | None = None  # None: the checkpoint's
    save: Literal["keep", "float32", "bfloat16"] = "keep"  # saved backbone + value head
    gate_save: Literal["source", "float32", "bfloat16", "float16"] = "source"  # source: as loaded


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: Literal[1, 2] = 1
    model: str = ""  # HF dir, urm-jax checkpoint, or a stage-1 training output dir
    output_dir: str = ""
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    precision: PrecisionConfig = PrecisionConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the rest
    global_batch_size: int = 64  # examples (stage 1 rows/segments budget) or pairs (stage 2)
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # cap on optimiser steps (None: epochs decide)
    remat: Literal["none", "full", "dots"] = "none"
    attention: Literal["auto", "reference", "xla", "cudnn", "splash"] = "auto"  # auto: per backend
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    stage2_cached_features: bool = True  # stage 2: pool once with the frozen backbone
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self):
        if not self.model:
            raise TrainConfigError("`model` is required (HF dir or urm-jax checkpoint)")
        if not self.output_dir:
            raise TrainConfigError("`output_dir` is required")
        if not self.data.train:
            raise TrainConfigError("`data.train` is required (jsonl/parquet path or hub name)")
        want = "bt" if self.stage == 2 else ("reparam", "nll")
        if (self.stage == 2) != (self.loss.kind == "bt"):
            raise TrainConfigError(f"stage {self.stage} needs loss.kind in {want}, got {self.loss.kind!r}")
        for name in ("global_batch_size", "grad_accum", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"`{name}` must be >= 1")
        if self.global_batch_size % self.grad_accum:
            raise TrainConfigError(f"global_batch_size {self.global_batch_size} is not divisible "
                                   f"by grad_accum {self.grad_accum}")
        if self.data.seq_len < 8:
            raise TrainConfigError("`data.seq_len` must be >= 8")

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // self.grad_accum


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Validate (and lightly coerce: int -> float, list -> tuple) one value against a hint."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_type(value, option, key)
            except TrainConfigError:
                pass
        raise TrainConfigError(f"`{key}`: {value!r} is not {' or '.join(_name(a) for a in args)}")
    if hint is type(None):
        if value is None:
            return None
        raise TrainConfigError(f"`{key}`: expected null, got {value!r}")
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        raise TrainConfigError(f"`{key}`: {value!r} is not one of {list(args)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TrainConfigError(f"`{key}`: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-5` (no dot) as a string
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise TrainConfigError(f"`{key}`: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    raise TrainConfigError(f"`{key}`: unsupported type {hint}")


def _name(hint) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _build(cls, raw: dict, prefix: str = ""):
    if not isinstance(raw, dict):
        raise TrainConfigError(f"`{prefix or 'config'}` must be a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise TrainConfigError(f"unknown config key `{path}`{hint}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{path}.")
        else:
            kwargs[key] = _check_type(value, hint, path)
    try:
        return cls(**kwargs)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise TrainConfigError(f"{prefix or 'config'}: {err}") from None


def apply_override(raw: dict, override: str) -> None:
    """`optim.learning_rate=1e-5`: the value is parsed as YAML (numbers, lists, null, true)."""
    if "=" not in override:
        raise TrainConfigError(f"override {override!r} is not key=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TrainConfigError(f"override {override!r}: cannot parse value ({err})") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainConfigError(f"override {override!r}: `{part}` is not a section")
    node[parts[-1]] = value


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw = load_raw(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    return _build(TrainConfig, raw)


def load_raw(path: Path) -> dict:
    """A YAML recipe; `base: other.yaml` (relative to it) is merged underneath."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: not found") from None
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    return _deep_merge(load_raw(path.parent / base), raw) if base else raw


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
