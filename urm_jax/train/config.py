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
import warnings
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from urm_jax.attributes import check_label_range
from urm_jax.config import DTypePolicy, ModelConfig
from urm_jax.errors import NoticeWarning
from urm_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from urm_jax.model.attention import resolve as resolve_attention, splash_length_problem, target_platform
from urm_jax.model.lora import LoraConfig
from urm_jax.model.paths import LORA, check_patterns, is_gate, path_name
from urm_jax.model.urm import REMAT_POLICIES, ModelOptions, lora_target_paths, reaches_backbone


class TrainConfigError(ValueError):
    """A training configuration that cannot be run as written (names the key)."""


# What each stage trains, as path patterns over the parameter tree (see urm_jax.model.paths):
# stage 1 the backbone and the value head, stage 2 the gate alone.
STAGE_TRAINABLE = {1: ("backbone", "value_head"), 2: ("gate",)}
# With a `lora:` section: stage 1 trains the adapters and the fresh value head (the base
# backbone is frozen), stage 2 the gate's adapters.
LORA_TRAINABLE = {1: (LORA, "value_head"), 2: (LORA,)}


# Seeds seed numpy's generator (non-negative only) and jax.random.key (32-bit without x64):
# one range for both, so no two seeds silently alias.
MAX_SEED = 2**32 - 1

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


# Segments a packed row holds at most when `data.max_segments` is null, per stage. Stage 1: the
# recipe's 8 conversations per 4096-token row. Stage 2: 16 sides = 8 whole pairs per 2 x seq_len
# row (`bench/padding_waste.py`: 94% real tokens on the bundled pairs at seq_len 591 where 4 pairs
# a row give 57%; 97% on HelpSteer2-like pairs at 4096). A larger cap costs a few pooled slots.
DEFAULT_MAX_SEGMENTS = {1: 8, 2: 16}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data:` section: `train` (and optional `eval`) sources, a JSONL/parquet path or a hub dataset
    name with their splits; `seq_len` in tokens per conversation (>= 8; longer ones are left-truncated);
    `pack` (several conversations per row in stage 1, whole pairs in 2 x seq_len rows in stage 2) with
    at most `max_segments` per row (null: the stage's default, `DEFAULT_MAX_SEGMENTS`: 8
    conversations as the stage-1 recipe, 16 sides = 8 pairs in stage 2, where the bundled pairs
    (median 51 tokens a side) would leave half of each 2 x seq_len row empty at 8); `shuffle_seed` in [0, 2**32 - 1]; stage 1's `label_range`
    [low, high] (None: the model's recorded range, else its preset's). TrainConfigError names the key
    of a value out of range."""
    train: str = ""  # jsonl/parquet path or hub dataset name
    split: str = "train"
    eval: str | None = None  # optional held-out source (same schema)
    eval_split: str = "validation"
    seq_len: int = 4096
    pack: bool = True  # stage 1: conversations per row; stage 2 (uncached): whole pairs per 2*seq_len row
    max_segments: int | None = None  # None: DEFAULT_MAX_SEGMENTS[stage], set by TrainConfig
    shuffle_seed: int = 0
    # Stage 1: [low, high] every label must lie in (rows outside are dropped and counted).
    # null: what `convert init` recorded for the model (`urm_label_range`), else its preset's.
    label_range: tuple[float, float] | None = None

    def __post_init__(self):
        _at_least(self, "data.", seq_len=8)
        if self.max_segments is not None:
            _at_least(self, "data.", max_segments=1)
            if self.max_segments > 2 * self.seq_len:  # a segment holds a token at least
                raise TrainConfigError(f"`data.max_segments`: {self.max_segments} segments cannot fit in a "
                                       f"row of at most 2 x data.seq_len = {2 * self.seq_len} tokens")
        _in_range(self, "data.", shuffle_seed=(0, MAX_SEED))
        if self.label_range is not None:
            try:
                check_label_range(self.label_range, where="`data.label_range`")
            except ValueError as err:
                raise TrainConfigError(str(err)) from None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `optim:` section: AdamW (`learning_rate`, `weight_decay` on matrices only, `b1`, `b2` in
    [0, 1), `eps` > 0), linear warmup over `warmup_ratio` of the steps then cosine to
    `min_lr_ratio` x lr, global-norm clipping at `clip_norm` (None: none), and `head_lr_scale`, the
    heads' learning rate as a multiple of the backbone's. TrainConfigError for a non-finite or
    out-of-range value."""
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
    """The `loss:` section: `kind` (`reparam` or `nll` in stage 1, `bt` (Bradley-Terry) in stage 2; see
    `urm_jax.train.losses` for the formulas) and the affine label transform y = label_scale * label +
    label_shift (scale != 0) applied before the stage-1 loss."""
    kind: Literal["reparam", "nll", "bt"] = "reparam"
    label_scale: float = 1.0
    label_shift: float = 0.0

    def __post_init__(self):
        _finite(self, "loss.", "label_scale", "label_shift")
        if self.label_scale == 0:
            raise TrainConfigError("`loss.label_scale`: must not be 0")


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """The `precision:` section, dtype names: `param` (master weights of backbone and value head),
    `compute` (their activations), `gate_param` and `gate_compute` (None: the checkpoint's
    `gate_dtype`), and the saved dtypes `save` (`keep`: the param dtype) and `gate_save` (`source`: the
    dtype the gate was loaded in)."""
    param: Literal["float32", "bfloat16"] = "float32"  # master weights of backbone + value head
    compute: Literal["float32", "bfloat16"] = "bfloat16"
    gate_param: Literal["float32", "bfloat16", "float16"] = "float32"
    gate_compute: Literal["float32", "bfloat16", "float16"] | None = None  # None: the checkpoint's
    save: Literal["keep", "float32", "bfloat16"] = "keep"  # saved backbone + value head
    gate_save: Literal["source", "float32", "bfloat16", "float16"] = "source"  # source: as loaded


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint:` section: save every `every_steps` optimiser steps (>= 1), keep the newest
    `keep` (>= 1), and write asynchronously (`async_save`) while training continues."""
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        _at_least(self, "checkpoint.", every_steps=1, keep=1)


# Chips `plan.topology` may name, each with an example. TPUs (libtpu's names): the chips along
# each axis of the slice, one JAX device per chip (v5p's two TensorCores act as one megacore
# device). GPUs: hosts x GPUs per host.
TOPOLOGY_CHIPS = {"v5e": "v5e:2x4", "v5p": "v5p:2x2x1", "v6e": "v6e:2x4", "h100": "h100:1x8"}
_TOPOLOGY = re.compile(r"([a-z0-9]+):(\d+(?:x\d+){1,2})")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """('v5p', (2, 2, 1)) from 'v5p:2x2x1' (chip generation: the chips along each axis).
    ValueError names the format and the known generations."""
    match = _TOPOLOGY.fullmatch(name)
    known = ", ".join(f"{chip} (e.g. {example})" for chip, example in TOPOLOGY_CHIPS.items())
    if not match:
        raise ValueError(f"topology {name!r}: expected CHIP:AxB or CHIP:AxBxC; known chips: {known}")
    if match[1] not in TOPOLOGY_CHIPS:
        raise ValueError(f"topology {name!r}: unknown chip {match[1]!r}; known: {known}")
    return match[1], tuple(int(d) for d in match[2].split("x"))


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """Where a recipe is meant to run, for `urm-jax plan` (and tpu_scripts/launch.sh): the TPU
    topology, e.g. `v5p:2x2x1` (a v5p-8: 4 chips), or GPUs, e.g. `h100:1x8` (one host of 8).
    Training itself ignores it."""

    topology: str | None = None

    def __post_init__(self):
        if self.topology is not None:
            try:
                parse_topology(self.topology)
            except ValueError as err:
                raise TrainConfigError(f"`plan.topology`: {err}") from None

    @property
    def chips(self) -> int | None:
        """Chips (= JAX devices) in the topology, None without one."""
        return None if self.topology is None else math.prod(parse_topology(self.topology)[1])


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """THE training configuration (a YAML file plus `key=value` overrides, see `load_train_config`): which
    stage (1: attribute regression of backbone + value head; 2: Bradley-Terry on the gate), model and
    output paths, the sections above, `mesh` (data, fsdp, tensor; one -1 takes the remaining
    devices), `global_batch_size` (stage 1 examples, stage 2 pairs, per optimiser step) split into
    `grad_accum` micro-batches, `epochs` / `max_steps`, remat and attention, `seed` in
    [0, 2**32 - 1], logging and eval intervals in steps, what trains (`trainable` path patterns,
    `lora`), and the `plan.topology` it is laid out for.

    Every value is checked on construction: TrainConfigError (a ValueError) names the key, e.g. a
    stage/loss mismatch, a batch not divisible by grad_accum, a mesh that does not fit the topology,
    a pattern that selects nothing."""
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
    lora: LoraConfig | None = None  # LoRA adapters (urm_jax.model.lora); None: no adapters
    tensorboard: bool = True
    plot: bool = True
    plan: PlanConfig = PlanConfig()  # the TPU topology the recipe is laid out for (urm-jax plan)

    def __post_init__(self):
        want = "bt" if self.stage == 2 else ("reparam", "nll")
        if (self.stage == 2) != (self.loss.kind == "bt"):
            raise TrainConfigError(f"stage {self.stage} needs loss.kind in {want}, got {self.loss.kind!r}")
        _at_least(self, "", global_batch_size=1, grad_accum=1, epochs=1, log_every=1)
        _in_range(self, "", seed=(0, MAX_SEED))
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
        if self.data.max_segments is None:  # frozen: the resolved value replaces the section
            object.__setattr__(self, "data", dataclasses.replace(
                self.data, max_segments=DEFAULT_MAX_SEGMENTS[self.stage]))
        if self.stage == 2 and self.data.pack and self.data.max_segments % 2:
            raise TrainConfigError(f"`data.max_segments`: packed pairs take two segments each (chosen, "
                                   f"rejected); give an even number, got {self.data.max_segments}")
        chips = self.plan.chips
        known = math.prod(s for s in self.mesh if s != -1)
        if chips is not None and (chips % known if -1 in self.mesh else chips != known):
            raise TrainConfigError(f"`mesh`: {list(self.mesh)} does not fit `plan.topology` "
                                   f"{self.plan.topology} ({chips} chips)")
        if self.trainable is not None:
            try:
                check_patterns(self.trainable)
            except ValueError as err:
                raise TrainConfigError(f"`trainable`: {err}") from None
        if self.lora is not None:
            self._check_lora()

    def _check_lora(self) -> None:
        """The targets select projection kernels of the URM (checked on its structure, which
        no model size changes); stage 2 adapts the gate only (its backbone is frozen, often
        not even run: cached features)."""
        try:
            targets = lora_target_paths(self.lora)
        except ValueError as err:
            raise TrainConfigError(str(err)) from None
        if self.stage == 2:
            outside = [path_name(p) for p in targets if not is_gate(p)]
            if outside:
                raise TrainConfigError(f"`lora.targets`: stage 2 trains the gate; its adapters can "
                                       f"only be on gate kernels (gate/fc0/kernel, gate/fc2/kernel, "
                                       f"gate/fc4/kernel), not {', '.join(outside)}")

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
    def packed_pairs(self) -> bool:
        """Stage 2 token rows hold whole pairs in 2 x seq_len tokens (`data.pack`)."""
        return self.stage == 2 and self.data.pack

    @property
    def micro_batch_rows(self) -> int:
        """Token rows per micro-batch: unpacked stage-2 rows are the chosen and the rejected
        side of each pair; packed rows (stage 1, packed pairs) are one row per example slot."""
        return self.micro_batch_size * (2 if self.stage == 2 and not self.packed_pairs else 1)

    @property
    def row_length(self) -> int:
        """Tokens per row: seq_len, or 2 x seq_len for packed pairs."""
        return self.data.seq_len * (2 if self.packed_pairs else 1)

    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        """Path patterns of the trained parameters (`trainable`, else the stage's: with LoRA,
        the adapters (+ the value head in stage 1))."""
        if self.trainable is not None:
            return self.trainable
        return (LORA_TRAINABLE if self.lora is not None else STAGE_TRAINABLE)[self.stage]

    @property
    def use_features(self) -> bool:
        """Stage 2's fast path: train the gate on pooled features cached once; not when the
        trainable patterns reach the backbone: the features would not follow its parameters, so
        such a run goes through the backbone (as `stage2_cached_features: false`)."""
        return (self.stage == 2 and self.stage2_cached_features
                and not reaches_backbone(tuple(self.trainable_patterns)))

    @property
    def dtypes(self) -> DTypePolicy:
        """The named dtypes: parameter and compute (backbone, value head), gate compute and
        gate parameter (storage)."""
        p = self.precision
        return DTypePolicy(param=p.param, compute=p.compute, gate=p.gate_compute,
                           gate_param=p.gate_param)

    def model_options(self, attention_interpret: bool = False) -> ModelOptions:
        """How the model runs in training: the dtypes, remat and attention of this config; the
        layers unrolled where that trains faster (`layer_loop` auto: XLA:CPU, see
        `urm_jax.model.urm.LAYER_LOOP_AUTO`) unless remat is on: unrolled, XLA keeps several
        layers' recomputed activations live at once, and the step's peak memory outgrows what
        remat is for (test_memory's stage-1 step, remat full: 0.31 GB unrolled, 0.20 GB estimated
        and met with the scan)."""
        return ModelOptions(self.dtypes, remat=self.remat, attention=self.attention,
                            attention_interpret=attention_interpret, lora=self.lora,
                            layer_loop="auto" if self.remat == "none" else "scan")


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
        raise TrainConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a mapping, got {raw!r}")
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
        section = _section(hint)
        if section is not None and not (value is None and section is not hint):
            kwargs[key] = _build(section, value, f"{path}.")
        else:
            kwargs[key] = _check_type(value, hint, path)
    try:
        return cls(**kwargs)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as err:
        if str(err).startswith(f"`{prefix}"):  # already names its key
            raise TrainConfigError(str(err)) from None
        raise TrainConfigError(f"{prefix or 'config'}: {err}") from None


def _section(hint):
    """The dataclass of a config section (`DataConfig`, or `LoraConfig` of an optional
    `LoraConfig | None` section, null meaning off), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    options = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1 \
            and dataclasses.is_dataclass(options[0]):
        return options[0]
    return None


def config_from_dict(raw: dict) -> TrainConfig:
    """A TrainConfig from plain data (a parsed YAML recipe), validated."""
    return _build(TrainConfig, raw)


def yaml_error(err: yaml.YAMLError, column_offset: int = 0) -> str:
    """A YAML parser error in one line: 'line L, column C: <the parser's reason>' (1-based,
    from the error's mark, columns of line 1 shifted by `column_offset`: where the parsed text
    starts in what the user typed); PyYAML's own text spans several lines and names
    `<unicode string>`."""
    reason = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    if context:
        reason = f"{reason} ({context})"
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    if mark is None:
        return reason
    column = mark.column + 1 + (column_offset if mark.line == 0 else 0)
    return f"line {mark.line + 1}, column {column}: {reason}"


def apply_override(raw: dict, override: str) -> None:
    """`optim.learning_rate=1e-5`: the value is parsed as YAML (numbers, lists, null, true). A
    mapping value merges into the section as a recipe's `base:` does (`merge_sections`):
    `optim={}` changes nothing, `optim={learning_rate: 1e-5}` changes that key alone."""
    if "=" not in override:
        raise TrainConfigError(f"override {override!r} is not key=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TrainConfigError(f"override {override!r}: invalid YAML value: "
                               f"{yaml_error(err, column_offset=len(key) + 1)}") from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainConfigError(f"override {override!r}: `{part}` is not a section")
    node.update(merge_sections(node, {parts[-1]: value}))


def load_train_config(path: str | Path | None, overrides: list[str] = (), *,
                      runnable: bool = True, notices: bool = False) -> TrainConfig:
    """The validated TrainConfig of a YAML recipe (or none) plus `key=value` overrides.
    `runnable`: also require what a training run needs (model, output_dir, data.train); a
    memory plan does not. `notices`: warn (one NoticeWarning, which commands show as one
    `warning:` line) about settings the user gave that this run ignores
    (`ignored_by_cached_features`); for a run's start, not for a saved config.yaml read back,
    which holds every key. TrainConfigError names the file or key on any problem."""
    raw = load_raw(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    cfg = config_from_dict(raw)
    if runnable:
        cfg.check_runnable()
    ignored = ignored_by_cached_features(raw, cfg) if notices else []
    if ignored:
        warnings.warn(NoticeWarning(
            f"{', '.join(ignored)} {'change' if len(ignored) > 1 else 'changes'} nothing in this run: stage 2 on cached features (the "
            "default, stage2_cached_features) trains the gate on one pooled feature per response, "
            "computed once without gradients by a pass that packs every side as its own segment "
            "and never runs a backward pass (nothing to rematerialize); set "
            "stage2_cached_features=false to train on token rows, where they apply"), stacklevel=2)
    return cfg


# Settings of token-row training that stage 2 on cached features does not use, and the values
# that ask for something it then does not do: packing (data.pack: true) with a cap on segments a
# row (data.max_segments: any), and rematerialization (remat other than none: every backbone pass
# is forward only). `data.pack: false` asks for nothing the cached path does otherwise (the
# bundled stage-2 recipe sets it). The held-out pairs (`data.eval`) are batched as token rows,
# packed by the data keys, so those count as used when a run has them.
CACHED_FEATURES_IGNORE = {("data", "pack"): lambda v: v is True,
                          ("data", "max_segments"): lambda v: v is not None,
                          ("remat",): lambda v: v != "none"}


def ignored_by_cached_features(raw: dict, cfg: TrainConfig) -> list[str]:
    """`key=value` of each setting in `raw` (what the user gave: the recipe, its `base:` chain and
    the overrides; defaults are not in it) that `cfg`'s run ignores because it trains stage 2 on
    cached features (`CACHED_FEATURES_IGNORE`; the data keys only without `data.eval`); [] for
    any other run."""
    if not cfg.use_features:
        return []
    found = []
    for path, asks in CACHED_FEATURES_IGNORE.items():
        if path[0] == "data" and cfg.data.eval:  # the held-out pairs' token rows use them
            continue
        node, given = raw, True
        for part in path:
            if not isinstance(node, dict) or part not in node:
                given = False
                break
            node = node[part]
        value = cfg
        for part in path:
            value = getattr(value, part)
        if given and asks(value):
            found.append(f"{'.'.join(path)}={str(value).lower() if isinstance(value, bool) else value}")
    return found


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
        raise TrainConfigError(f"{path}: invalid YAML: {yaml_error(err)}") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise TrainConfigError(f"{path}: `base` must be a file name, got {base!r}")
    return merge_sections(load_raw(path.parent / base, (*_seen, resolved)), raw)


def merge_sections(a: dict, b: dict) -> dict:
    """`b` over `a`, section by section: a mapping in `b` merges into the mapping `a` holds
    under the same key (recursively), any other value replaces it. The one rule for a recipe
    over its `base:` and for a `key=value` override."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_sections(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
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


def check_model_context(cfg: TrainConfig, model_cfg: ModelConfig, source: str | Path) -> None:
    """`data.seq_len` must fit the model's context (max_position_embeddings of `source`, the
    model or its config.json): the one rule for training's preflight, `urm-jax memory` and
    `urm-jax plan`. TrainConfigError naming both."""
    if cfg.data.seq_len > model_cfg.max_position_embeddings:
        raise TrainConfigError(f"`data.seq_len`: {cfg.data.seq_len} is longer than the model's context "
                               f"(max_position_embeddings {model_cfg.max_position_embeddings} in {source})")


def check_attention_length(cfg: TrainConfig, platform: str | None = None) -> None:
    """Training rows (`TrainConfig.row_length`) must suit the attention `cfg.attention` resolves
    to on `platform` (tpu | gpu | cpu; None: the compile target, else this process's backend): splash needs multiples of 128 and of its block. The one
    rule for training's preflight, `urm-jax memory` and `urm-jax plan`; TrainConfigError naming
    `data.seq_len`, the attention setting and the nearest lengths that work."""
    length = cfg.row_length
    implementation = resolve_attention(cfg.attention, platform, length=length)
    problem = splash_length_problem(length) if implementation == "splash" else None
    if problem is None:
        return
    per_row = length // cfg.data.seq_len
    fits = next(n for n in range(cfg.data.seq_len + 1, cfg.data.seq_len + 1024)
                if splash_length_problem(n * per_row) is None)
    rows = f" (rows of {length} tokens: 2 x data.seq_len, packed pairs)" if per_row > 1 else ""
    setting = (f"`attention: {cfg.attention}` ({implementation} on {platform or target_platform()})"
               if cfg.attention != implementation else f"`attention: {cfg.attention}`")
    raise TrainConfigError(f"`data.seq_len`: {cfg.data.seq_len}{rows} with {setting}: {problem}; "
                           f"set data.seq_len={fits} (or another length that works), or attention=blockwise")
