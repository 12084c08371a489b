"""Typed model configuration, read from (and written back to) a Hugging Face `config.json`.

The HF dict is the source of truth on disk; `ModelConfig` is the validated view the JAX code uses.
Both RoPE spellings are read: transformers-4 style (top-level `rope_theta` + `rope_scaling`, as in
the real URM checkpoint) and transformers-5 style (`rope_parameters`). Anything the JAX model cannot
reproduce exactly (biases, other activations, unknown RoPE types) fails here, at load, with a
message that names the field, rather than producing silently different numbers later.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from urm_jax.attributes import HELPSTEER2, check_attributes, from_id2label, id2label
from urm_jax.validate import Fields, MetadataError, read_json, shown

ARCHITECTURE = "LlamaForSequenceClassificationWithNormal_Weights"
AUTO_MAP = {"AutoModelForSequenceClassification": f"modeling_custom.{ARCHITECTURE}"}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# `hidden_act` names transformers maps to SiLU (transformers.activations.ACT2CLS: silu, swish).
SILU_NAMES = ("silu", "swish")
DTYPES = ("float32", "bfloat16", "float16")
# The gate's compute dtype when config.json names none: the released class builds its gate
# Linears in float16 whatever dtype the stored tensors have (from_pretrained casts them into it).
# THE rule, everywhere (HF-directory loader, from_hf, to_hf, the exported PyTorch class):
# the gate runs in config.json's `gate_dtype`, else in DEFAULT_GATE_DTYPE; never in the tensors'.
# Conversions write the field explicitly, so a converted checkpoint scores like its source.
DEFAULT_GATE_DTYPE = "float16"


class ConfigError(MetadataError):
    """A config that the model cannot honour exactly."""


def canonical_dtype(name: Any, *, what: str = "dtype") -> str:
    """Normalise 'bf16', 'torch.bfloat16', np.dtype(...) etc. to one of DTYPES."""
    text = str(getattr(name, "name", name)).replace("torch.", "").lower()
    aliases = {"fp32": "float32", "f32": "float32", "float": "float32", "bf16": "bfloat16",
               "fp16": "float16", "f16": "float16", "half": "float16"}
    text = aliases.get(text, text)
    if text not in DTYPES:
        raise ConfigError(f"{what} {name!r} is not one of {', '.join(DTYPES)}")
    return text


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings, as HF's `rope_parameters`: base `theta`, `rope_type`
    (default | linear | llama3), and the scaling `factor`, `low_freq_factor`, `high_freq_factor`,
    `original_max_position_embeddings` that linear (factor only) and llama3 scaling use
    (Llama 3.1's frequency-dependent scaling; transformers' `_compute_llama3_parameters`)."""
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "RopeConfig":
        """RoPE settings of an HF config: transformers-5 `rope_parameters`, else v4 top-level
        `rope_theta` + `rope_scaling`. A config with both spellings is read both ways and refused
        unless they agree (transformers lets `rope_scaling`/`rope_theta` override
        `rope_parameters`, so a mixed config would run another RoPE there). ConfigError names
        `source` and the field(s)."""
        fields = Fields(hf, source, error=ConfigError)
        params = fields.object("rope_parameters", None, null_ok=True)
        if params is None:  # transformers-4 style
            if not fields.has("rope_theta"):
                raise ConfigError(f"{source}: config.json has neither `rope_parameters` nor `rope_theta`")
            return cls._from_fields(fields.float("rope_theta", gt=0),
                                    fields.object("rope_scaling", None, null_ok=True)
                                    or Fields({}, source, prefix="rope_scaling.", error=ConfigError),
                                    source)
        if not params.has("rope_theta"):
            raise ConfigError(f"{source}: RoPE parameters lack `rope_theta`")
        rope = cls._from_fields(params.float("rope_theta", gt=0), params, source)
        legacy = [k for k in ("rope_scaling", "rope_theta") if hf.get(k) is not None]
        if legacy:  # both spellings: they must describe the same RoPE
            scaling = fields.object("rope_scaling", None, null_ok=True)
            theta = fields.float("rope_theta", rope.theta, gt=0, null_ok=True)
            try:
                other = cls._from_fields(theta, scaling or Fields({}, source, prefix="rope_scaling.",
                                                                  error=ConfigError), source)
            except ConfigError as err:
                other = str(err).removeprefix(f"{source}: ")
            if other != rope:
                given = "; ".join(f"{k} {shown(hf[k])}" for k in legacy)
                raise ConfigError(
                    f"{source}: fields rope_parameters and {' / '.join(legacy)} disagree "
                    f"(rope_parameters {shown(hf['rope_parameters'])}; {given}): transformers "
                    "reads rope_scaling/rope_theta over rope_parameters, so the model would run "
                    "another RoPE there; keep one spelling")
        return rope

    @classmethod
    def _from_fields(cls, theta: float, params: Fields, source: str) -> "RopeConfig":
        """The RoPE a scaling object (`rope_parameters` or v4 `rope_scaling`) describes."""
        rope_type = params.str("rope_type", None, null_ok=True)
        legacy_type = params.str("type", None, null_ok=True)
        if rope_type and legacy_type and rope_type != legacy_type:
            raise ConfigError(f"{source}: fields {params.prefix}rope_type {rope_type!r} and "
                              f"{params.prefix}type {legacy_type!r} disagree; keep one")
        rope_type = rope_type or legacy_type or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: unsupported RoPE type {rope_type!r} (supported: "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)})")
        kwargs: dict[str, Any] = {"theta": theta, "rope_type": rope_type}
        if rope_type in ("linear", "llama3"):
            if not params.has("factor"):
                raise ConfigError(f"{source}: RoPE type {rope_type!r} needs `factor`")
            kwargs["factor"] = params.float("factor", gt=0)
        if rope_type == "llama3":
            missing = [k for k in ("low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings") if not params.has(k)]
            if missing:
                raise ConfigError(f"{source}: llama3 RoPE scaling lacks {', '.join(missing)}")
            kwargs.update(low_freq_factor=params.float("low_freq_factor", gt=0),
                          high_freq_factor=params.float("high_freq_factor", gt=0),
                          original_max_position_embeddings=params.int(
                              "original_max_position_embeddings", minimum=1))
            if kwargs["high_freq_factor"] <= kwargs["low_freq_factor"]:
                raise ConfigError(f"{source}: llama3 RoPE needs high_freq_factor > low_freq_factor")
        return cls(**kwargs)

    def hf_parameters(self) -> dict:
        """The transformers-5 `rope_parameters` dict: rope_type and rope_theta, plus the scaling fields the
        type uses."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                       original_max_position_embeddings=self.original_max_position_embeddings)
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of a URM, read from an HF config.json (`from_hf_dict`, `from_hf_dir`): Llama sizes
    (vocab, hidden, MLP intermediate, layers, query and key/value heads, head_dim), RMSNorm eps, the
    context length and RoPE, special token ids, the attribute set (`attributes`, K names; value head
    2K outputs, gate K), and the dtype names of the stored backbone (`torch_dtype`) and of the gate's
    compute (`gate_dtype`, float16 unless config.json says otherwise). `hf_config` keeps the source
    dict so exports carry its other fields."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    attributes: tuple[str, ...] = HELPSTEER2  # value head: 2 outputs each; gate: 1 each
    torch_dtype: str = "float32"  # the checkpoint's backbone dtype, as config.json declares it
    gate_dtype: str = DEFAULT_GATE_DTYPE  # the gate's compute dtype (see DEFAULT_GATE_DTYPE)
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_attributes(self) -> int:
        """K, the number of attributes (5 for URM-LLaMa-3.1-8B)."""
        return len(self.attributes)

    @property
    def num_labels(self) -> int:
        """Outputs of the value head: (mean, log-std) per attribute, interleaved."""
        return 2 * len(self.attributes)

    @property
    def gate_hidden_size(self) -> int:
        """Width of the gate MLP's hidden layers: the backbone's hidden size, D."""
        return self.hidden_size

    @classmethod
    def from_hf_dict(cls, hf: dict, *, source: str = "config.json") -> "ModelConfig":
        """The validated view of an HF config dict: every field read is checked for type and
        range (`urm_jax.validate`), and ConfigError names `source` and the field."""
        fields = Fields(hf, source, error=ConfigError)
        model_type = fields.str("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"{source}: model_type {model_type!r} is not 'llama'")
        act = fields.str("hidden_act", "silu")
        if act not in SILU_NAMES:
            raise ConfigError(f"{source}: hidden_act {act!r} unsupported (Llama uses 'silu'; "
                              f"accepted: {', '.join(SILU_NAMES)})")
        # tie_word_embeddings is not refused: a URM has no lm_head to tie (written false); its
        # type is checked like every flag's.
        fields.bool("tie_word_embeddings", False, null_ok=True)
        for flag in ("attention_bias", "mlp_bias"):
            if fields.bool(flag, False, null_ok=True):
                raise ConfigError(f"{source}: `{flag}: true` is not part of the URM architecture")
        rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
        partial = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ConfigError(f"{source}: partial_rotary_factor {partial!r} unsupported (Llama "
                              "rotates the whole head)")
        hidden = fields.int("hidden_size", minimum=1)
        heads = fields.int("num_attention_heads", minimum=1)
        kv_heads = fields.int("num_key_value_heads", heads, minimum=1, null_ok=True)
        if not fields.has("head_dim") or hf["head_dim"] is None:
            if hidden % heads:
                raise ConfigError(f"{source}: hidden_size {hidden} is not a multiple of "
                                  f"num_attention_heads {heads} (and no head_dim is given)")
        head_dim = fields.int("head_dim", hidden // heads, minimum=1, null_ok=True)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim {head_dim} must be even for RoPE")
        attributes = attributes_from_hf(hf, source)
        vocab = fields.int("vocab_size", minimum=1)
        pad = fields.int("pad_token_id", None, minimum=0, null_ok=True)
        if pad is not None and not pad < vocab:
            raise ConfigError(f"{source}: pad_token_id {pad} outside the vocabulary (size {vocab})")
        dtype = fields.str("dtype", None, null_ok=True)
        legacy_dtype = fields.str("torch_dtype", None, null_ok=True)
        if dtype and legacy_dtype and canonical_dtype(dtype, what=f"{source}: field dtype") != \
                canonical_dtype(legacy_dtype, what=f"{source}: field torch_dtype"):
            raise ConfigError(f"{source}: fields dtype {dtype!r} and torch_dtype {legacy_dtype!r} "
                              "disagree (transformers reads dtype); keep one")
        dtype = dtype or legacy_dtype or "float32"
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=fields.int("intermediate_size", minimum=1),
            num_layers=fields.int("num_hidden_layers", minimum=1),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=fields.float("rms_norm_eps", 1e-6, gt=0),
            max_position_embeddings=fields.int("max_position_embeddings", 2048, minimum=1),
            rope=RopeConfig.from_hf(hf, source),
            pad_token_id=pad,
            bos_token_id=fields.int("bos_token_id", None, minimum=0, null_ok=True),
            eos_token_ids=tuple(fields.int_list("eos_token_id", [], minimum=0, scalar_ok=True,
                                                null_ok=True)),
            attributes=attributes,
            torch_dtype=canonical_dtype(dtype, what=f"{source}: field dtype"),
            gate_dtype=canonical_dtype(fields.str("gate_dtype", DEFAULT_GATE_DTYPE, null_ok=True) or DEFAULT_GATE_DTYPE,
                                       what=f"{source}: field gate_dtype"),
            hf_config=dict(hf),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelConfig":
        """The config of an HF (or urm-jax) directory's config.json; ConfigError names the file and the field
        (missing file, not JSON, a wrong type or range, an unsupported architecture feature)."""
        return cls.from_hf_dict(read_hf_config(path), source=str(Path(path) / "config.json"))

    def to_hf_dict(self, *, torch_dtype: str | None = None, gate_dtype: str | None = None) -> dict:
        """The config.json an exported checkpoint carries.

        Keeps every field of the source config, writes RoPE both as transformers-5
        `rope_parameters` and as v4 `rope_theta`/`rope_scaling` (older loaders, sglang), and points
        `auto_map` at the shipped `modeling_custom.py`.
        """
        hf = dict(self.hf_config)
        hf.pop("torch_dtype", None)
        rope = self.rope.hf_parameters()
        hf["rope_parameters"] = rope
        hf["rope_theta"] = self.rope.theta
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        hf["rope_scaling"] = None if self.rope.rope_type == "default" else scaling
        hf.update(
            model_type="llama",
            architectures=[ARCHITECTURE],
            auto_map=dict(AUTO_MAP),
            num_labels=self.num_labels,
            urm_attributes=list(self.attributes),
            id2label=id2label(self.attributes),
            label2id={name: int(i) for i, name in id2label(self.attributes).items()},
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            tie_word_embeddings=False,  # no lm_head: nothing is tied
            dtype=torch_dtype or self.torch_dtype,
            gate_dtype=gate_dtype or self.gate_dtype,
        )
        return hf

    def param_count(self) -> dict[str, int]:
        """Parameter counts {'backbone', 'score', 'gate', 'total'}: backbone = embedding V*D + per layer
        (q, o: 2*D*Hq*hd; k, v: 2*D*Hkv*hd; MLP 3*D*F; two norms 2*D) + final norm D; score D*2K;
        gate 2*(D*D + D) + D*K + K."""
        d, f, v, layers = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = d * q * 2 + d * kv * 2 + 3 * d * f + 2 * d
        backbone = v * d + layers * per_layer + d
        score = d * self.num_labels
        gate = 2 * (d * d + d) + d * self.num_attributes + self.num_attributes
        return {"backbone": backbone, "score": score, "gate": gate, "total": backbone + score + gate}


def attributes_from_hf(hf: dict, source: str) -> tuple[str, ...]:
    """The attribute set a config.json declares: `urm_attributes` (what urm-jax writes; an
    `id2label` of attribute names beside it must name the same), else
    an `id2label` of `<a>_mean`/`<a>_log_std` pairs, else HelpSteer2's five when the value head
    has 10 outputs (the released URM checkpoint labels them LABEL_0..LABEL_9)."""
    fields = Fields(hf, source, error=ConfigError)
    fields.object("id2label", None, null_ok=True)  # an object (or absent) before it is read
    labelled = from_id2label(hf.get("id2label"))
    if fields.has("urm_attributes"):
        try:
            attributes = check_attributes(hf["urm_attributes"], where=f"{source}: field urm_attributes")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if labelled is not None and labelled != attributes:  # both spellings must agree
            raise ConfigError(f"{source}: fields urm_attributes {shown(list(attributes), 300)} "
                              f"and id2label (names {shown(list(labelled), 300)}) disagree; keep one")
    else:
        attributes = labelled
    num_labels = (fields.int("num_labels", None, minimum=1, null_ok=True)
                  or len(hf.get("id2label") or {}) or None)
    if attributes is None:
        if num_labels in (None, 2 * len(HELPSTEER2)):
            return HELPSTEER2
        raise ConfigError(f"{source}: num_labels is {num_labels} and no attribute names are given "
                          "(`urm_attributes`); a URM value head has 2 outputs per attribute. For a "
                          "base model such as Skywork-Reward, make a stage-1 start with fresh URM "
                          "heads: python -m convert init BASE_DIR OUT_DIR")
    if num_labels is not None and num_labels != 2 * len(attributes):
        raise ConfigError(f"{source}: num_labels is {num_labels} but {len(attributes)} attributes "
                          f"{list(attributes)} need {2 * len(attributes)} (mean and log-std each)")
    return attributes


def read_json_file(file: str | Path) -> dict:
    """A JSON object from a file; ConfigError names the file when it is missing, not UTF-8, not
    JSON, or not an object (`urm_jax.validate.read_json`)."""
    return read_json(file, ConfigError)


def read_hf_config(path: str | Path) -> dict:
    """The config.json of an HF directory as a dict; a missing or broken file names itself."""
    return read_json_file(Path(path) / "config.json")


@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    """The dtypes of one model instance, each named.

    param: storage dtype of backbone and value head (None keeps each tensor's checkpoint dtype);
    compute: activations and matmuls of backbone and value head;
    gate: compute dtype of the gating MLP (None follows the checkpoint's gate_dtype, float16 in
    the real model, as the HF reference runs it);
    gate_param: storage dtype of the gate (None: same as its compute dtype; training keeps float32
    master weights and may still compute in float16).
    """

    param: str | None = None
    compute: str = "float32"
    gate: str | None = None
    gate_param: str | None = None  # gate storage; None = the gate compute dtype (fp32 to train it)

    def __post_init__(self):
        for name in ("param", "gate", "gate_param"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, canonical_dtype(getattr(self, name), what=f"{name} dtype"))
        object.__setattr__(self, "compute", canonical_dtype(self.compute, what="compute dtype"))

    @classmethod
    def for_checkpoint(cls, cfg: ModelConfig, compute: str | None = None) -> "DTypePolicy":
        """What the HF reference does with this checkpoint: compute in its dtype, gate in its gate dtype."""
        return cls(param=None, compute=compute or cfg.torch_dtype, gate=cfg.gate_dtype)

    def gate_dtype(self, cfg: ModelConfig) -> str:
        """The gate's compute dtype name: `gate`, else the checkpoint's `cfg.gate_dtype`."""
        return self.gate or cfg.gate_dtype

    def gate_param_dtype(self, cfg: ModelConfig) -> str:
        """The gate's storage dtype name: `gate_param`, else its compute dtype."""
        return self.gate_param or self.gate_dtype(cfg)


def np_dtype(name: str) -> np.dtype:
    """numpy dtype of a dtype name or alias ('bf16' -> ml_dtypes.bfloat16, 'fp32' -> float32);
    ConfigError for a name outside float32/bfloat16/float16."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if canonical_dtype(name) == "bfloat16" else np.dtype(name)
