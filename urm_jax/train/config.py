"""The one training configuration: YAML file + `key=value` overrides, validated before anything
compiles, then read as is by everything that trains (the step, the model options, the memory
estimate, the logs). An unknown key (a typo) fails with the closest valid names; a wrong type
fails with the expected type; a value out of range fails with the range; all name the key path,
e.g. `optim.learning_rate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from urm_jax.attributes import check_label_range
from urm_jax.config import DTypePolicy
from urm_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from urm_jax.model.paths import check_patterns
from urm_jax.model.urm import REMAT_POLICIES, ModelOptions


class TrainConfigError(ValueError):
    """A training configuration that cannot be run as written (names the key)."""


# What each stage trains, as path patterns over the parameter tree (see urm_jax.model.paths):
# stage 1 the backbone and the value head, stage 2 the gate alone.
STAGE_TRAINABLE = {1: ("backbone", "value_head"), 2: ("gate",)}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _at_least(cfg, prefix: str, **minimums) -> None:
    for name, low in minimums.items():
        value = getattr(cfg, name)
        if value < low:
            raise TrainConfigError(f"`{prefix}{name}`: must be >= {low}, got {value}")


def _finite(cfg, prefix: str, *names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise TrainConfigError(f"`{prefix}{name}`: must be a finite number, got {value}")


def _in_range(cfg, prefix: str, **ranges) -> None:
    for name, (low, high) in ranges.items():
        value = getattr(cfg, name)
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise TrainConfigError(f"`{prefix}{name}`: must be {bound}, got {value}")


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
    # Stage 1: [low, high] every label must lie in (rows outside are dropped and counted).
    # null: what `convert init` recorded for the model (`urm_label_range`), else its preset's.
    label_range: tuple[float, float] | None = None

    def __post_init__(self):
        _at_least(self, "data.", seq_len=8, max_segments=1)
        if self.label_range is not None:
            try:
                check_label_range(self.label_range, where="`data.label_range`")
            except ValueError as err:
                raise TrainConfigError(str(err)) from None


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
    # The heads' (value head, gate) learning rate as a multiple of learning_rate: fresh heads on a
    # pretrained backbone learn at a larger step than the backbone tolerates (small-base recipe).
    head_lr_scale: float = 1.0

    def __post_init__(self):
        _finite(self, "optim.", "learning_rate", "weight_decay", "b1", "b2", "eps", "warmup_ratio",
                "min_lr_ratio", "clip_norm", "head_lr_scale")
        if self.head_lr_scale <= 0:
            raise TrainConfigError(f"`optim.head_lr_scale`: must be > 0, got {self.head_lr_scale}")
        _in_range(self, "optim.", learning_rate=(0, None), weight_decay=(0, None), eps=(0, None),
                  warmup_ratio=(0, 1), min_lr_ratio=(0, 1))
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise TrainConfigError(f"`optim.{name}`: must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise TrainConfigError(f"`optim.eps`: must be > 0, got {self.eps}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise TrainConfigError(f"`optim.clip_norm`: must be > 0 (or null for no clipping), "
                                   f"got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: Literal["reparam", "nll", "bt"] = "reparam"
    label_scale: float = 1.0
    label_shift: float = 0.0

    def __post_init__(self):
        _finite(self, "loss.", "label_scale", "label_shift")
        if self.label_scale == 0:
            raise TrainConfigError("`loss.label_scale`: must not be 0")


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

    def __post_init__(self):
        _at_least(self, "checkpoint.", every_steps=1, keep=1)


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
    remat: Literal[tuple(REMAT_POLICIES)] = "none"  # none | full | dots
    attention: Literal[ATTENTION_IMPLEMENTATIONS] = "auto"  # auto: per backend
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    stage2_cached_features: bool = True  # stage 2: pool once with the frozen backbone
    trainable: tuple[str, ...] | None = None  # path patterns; None: the stage's (STAGE_TRAINABLE)
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self):
        want = "bt" if self.stage == 2 else ("reparam", "nll")
        if (self.stage == 2) != (self.loss.kind == "bt"):
            raise TrainConfigError(f"stage {self.stage} needs loss.kind in {want}, got {self.loss.kind!r}")
        _at_least(self, "", global_batch_size=1, grad_accum=1, epochs=1, log_every=1)
        if self.max_steps is not None:
            _at_least(self, "", max_steps=1)
        if self.eval_every is not None:
            _at_least(self, "", eval_every=1)
        if self.global_batch_size % self.grad_accum:
            raise TrainConfigError(f"global_batch_size {self.global_batch_size} is not divisible "
                                   f"by grad_accum {self.grad_accum}")
        if self.mesh.count(-1) > 1 or any(s == 0 or s < -1 for s in self.mesh):
            raise TrainConfigError(f"`mesh`: {list(self.mesh)} needs 3 positive sizes (data, fsdp, "
                                   "tensor), at most one of them -1 (the remaining devices)")
        if self.trainable is not None:
            try:
                check_patterns(self.trainable)
            except ValueError as err:
                raise TrainConfigError(f"`trainable`: {err}") from None

    def check_runnable(self) -> None:
        """The keys a training run needs and a plan does not: `model`, `output_dir`, `data.train`."""
        if not self.model:
            raise TrainConfigError("`model` is required (HF dir or urm-jax checkpoint)")
        if not self.output_dir:
            raise TrainConfigError("`output_dir` is required")
        if not self.data.train:
            raise TrainConfigError("`data.train` is required (jsonl/parquet path or hub name)")

    @property
    def micro_batch_size(self) -> int:
        """Examples (stage 1) or pairs (stage 2) per micro-batch."""
        return self.global_batch_size // self.grad_accum

    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        """Path patterns of the trained parameters (`trainable`, else the stage's)."""
        return self.trainable if self.trainable is not None else STAGE_TRAINABLE[self.stage]

    @property
    def use_features(self) -> bool:
        """Stage 2's fast path: train the gate on pooled features cached once."""
        return self.stage == 2 and self.stage2_cached_features

    @property
    def dtypes(self) -> DTypePolicy:
        """The named dtypes: parameter and compute (backbone, value head), gate compute and
        gate parameter (storage)."""
        p = self.precision
        return DTypePolicy(param=p.param, compute=p.compute, gate=p.gate_compute,
                           gate_param=p.gate_param)

    def model_options(self, attention_interpret: bool = False) -> ModelOptions:
        """How the model runs in training: the dtypes, remat and attention of this config."""
        return ModelOptions(self.dtypes, remat=self.remat, attention=self.attention,
                            attention_interpret=attention_interpret)


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
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"`{key}`: expected a list, got {value!r}")
        return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
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


def config_from_dict(raw: dict) -> TrainConfig:
    """A TrainConfig from plain data (a parsed YAML recipe), validated."""
    return _build(TrainConfig, raw)


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


def load_train_config(path: str | Path | None, overrides: list[str] = (), *,
                      runnable: bool = True) -> TrainConfig:
    """The validated TrainConfig of a YAML recipe (or none) plus `key=value` overrides.
    `runnable`: also require what a training run needs (model, output_dir, data.train); a
    memory plan does not. TrainConfigError names the file or key on any problem."""
    raw = load_raw(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    cfg = config_from_dict(raw)
    if runnable:
        cfg.check_runnable()
    return cfg


def load_raw(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML recipe as a dict; `base: other.yaml` (relative to it) is merged underneath. A
    missing, unreadable, non-UTF-8 or invalid file, a non-mapping top level, or a `base` chain
    that comes back to a file already in it fails naming the file."""
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise TrainConfigError(f"{path}: `base` chain comes back to a file already in it ({chain})")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: not found") from None
    except UnicodeDecodeError as err:
        raise TrainConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise TrainConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise TrainConfigError(f"{path}: `base` must be a file name, got {base!r}")
    return _deep_merge(load_raw(path.parent / base, (*_seen, resolved)), raw)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(cfg: TrainConfig) -> dict:
    """The config as plain YAML-able data (tuples as lists), e.g. for a run's config.yaml."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(cfg))
