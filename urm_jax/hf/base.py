"""A stage-1 starting point: a base Llama checkpoint with fresh URM heads.

URM-LLaMa-3.1-8B was fine-tuned from Skywork-Reward-Llama-3.1-8B, a `LlamaForSequenceClassification`
whose `score` is [1, hidden]. The URM value head is [10, hidden] and the gate does not exist there,
so both heads start fresh; the backbone is copied bit for bit. Fresh heads follow what
transformers does when the URM class is loaded from such a base
(`from_pretrained(base, num_labels=10, ignore_mismatched_sizes=True)`): Linear weights
N(0, initializer_range) from the base's config (0.02 when absent), biases zero, the gate built in
float16 like the reference [I: the paper does not say how the heads were initialised].

Accepted bases: any Llama-architecture checkpoint the URM backbone can represent exactly: a
sequence-classification model (`score.weight` of any width, replaced), a causal LM
(`lm_head.weight`, dropped) or a bare `LlamaModel` (keys without the `model.` prefix), with tied
embeddings or not (Llama-3.2-1B/3B, SmolLM2: `tie_word_embeddings: true` ties the input
embedding to an lm_head the URM does not have, so it means nothing here: the embedding is kept,
the flag is written false and recorded as untied). A config field the model cannot honour
(attention or MLP biases, another activation, another RoPE type, partial rotary embeddings,
another model type) is refused naming the field, before anything is written.
The base streams through the same converter as `from_hf` (bounded memory at 8B); the heads, 34M
parameters at 8B, are drawn in memory.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from urm_jax.hf.load import write_checkpoint
from urm_jax.hf.mapping import TABLE, is_gate, is_head, wider_dtype_flag
from urm_jax.hf.plan import ConversionError, jax_shapes
from urm_jax.hf.safetensors_io import HFWeights
from urm_jax.attributes import HELPSTEER2, check_label_range, preset_label_range
from urm_jax.finite import checked_astype
from urm_jax.io_utils import check_outputs
from urm_jax.config import ConfigError, ModelConfig, canonical_dtype, np_dtype, read_hf_config
from urm_jax.data.tokenization import chat_format, load_tokenizer
from urm_jax.errors import NoticeWarning
from urm_jax.validate import Fields

# Base tensors that are not part of the URM backbone and are replaced by fresh heads (or, for a
# causal LM's output projection, dropped).
REPLACED_BASE_KEYS = re.compile(r"score\.weight|lm_head\.weight|weights\.fc\.\d+\.(weight|bias)")
BARE_BACKBONE_KEY = re.compile(r"(embed_tokens\.weight|norm\.weight|layers\.\d+\..*)")
DEFAULT_INIT_STD = 0.02  # transformers' default initializer_range


def urm_config_from_base(base: dict, *, source: str,
                         attributes: tuple[str, ...] = HELPSTEER2) -> ModelConfig:
    """The URM config for a base Llama config: same backbone, a value head and gate for
    `attributes` (2 x K and K outputs), the reference's gate, untied embeddings.
    Classification fields of the base (one label, its names, problem type) do not carry over;
    fields the backbone cannot represent are refused by `ModelConfig.from_hf_dict`."""
    hf = {k: v for k, v in base.items()
          if k not in ("num_labels", "id2label", "label2id", "problem_type", "architectures",
                       "auto_map", "gate_dtype", "quantization_config", "_name_or_path",
                       "urm_label_range", "urm_jax_init")}
    hf["num_labels"] = 2 * len(attributes)
    hf["urm_attributes"] = list(attributes)
    hf["tie_word_embeddings"] = False  # no lm_head in a URM: nothing to tie the embedding to
    if hf.get("pad_token_id") is None:
        raise ConversionError(
            f"{source}: no pad_token_id. URM batches are padded with the tokenizer's [PAD] "
            "(id 128256 in Skywork-Reward's 128257-token vocabulary); start from a base whose "
            "vocabulary has a pad token, or add one (resize the embeddings) before `init`")
    return ModelConfig.from_hf_dict(hf, source=source)


def fresh_heads(cfg: ModelConfig, *, seed: int, std: float, score_dtype: str,
                gate_dtype: str) -> dict[str, np.ndarray]:
    """HF-layout head tensors: weights N(0, std), biases zero. Each tensor draws from its own
    stream (seed, key), so a head does not change when another one's shape does."""
    shapes = jax_shapes(cfg)
    heads = {}
    for index, entry in enumerate(TABLE):
        if not is_head(entry):
            continue
        dtype = np_dtype(gate_dtype if is_gate(entry) else score_dtype)
        shape = entry.hf_shape(shapes[entry.path])
        if entry.hf_key.endswith(".bias"):
            heads[entry.hf_key] = np.zeros(shape, dtype)
        else:
            rng = np.random.default_rng([seed, index])
            heads[entry.hf_key] = checked_astype(rng.standard_normal(shape, np.float32) * np.float32(std),
                                                 dtype, f"fresh head {entry.hf_key} (--init-std {std:g})",
                                                 wider=wider_dtype_flag(entry))
    return heads


class BaseWithFreshHeads:
    """The base's backbone tensors (under their URM names) plus in-memory heads (`heads`, set
    once drawn), answering the questions `write_checkpoint` asks an `HFWeights`. The base's own
    heads are hidden."""

    def __init__(self, base: HFWeights, seed: int):
        self.base, self.seed, self.dir = base, seed, base.dir
        self.heads: dict[str, np.ndarray] = {}
        bare = "model.embed_tokens.weight" not in base and "embed_tokens.weight" in base
        self.names: dict[str, str] = {}  # URM name -> base name
        self.dropped: list[str] = []
        for key in sorted(base.keys()):
            if REPLACED_BASE_KEYS.fullmatch(key):
                self.dropped.append(key)
            else:
                self.names[f"model.{key}" if bare and BARE_BACKBONE_KEY.fullmatch(key) else key] = key

    def keys(self) -> list[str]:
        """URM-named keys: the base's kept tensors, then the fresh heads once drawn."""
        return [*self.names, *self.heads]

    def __contains__(self, key: str) -> bool:
        return key in self.names or key in self.heads

    def _base_key(self, key: str) -> str:
        return self.names.get(key, key)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key` (URM name): the fresh head's, else from the base's header."""
        return tuple(self.heads[key].shape) if key in self.heads else self.base.shape(self._base_key(key))

    def dtype(self, key: str) -> str:
        """numpy-style dtype name of tensor `key` (URM name), e.g. 'bfloat16'."""
        return self.heads[key].dtype.name if key in self.heads else self.base.dtype(self._base_key(key))

    def where(self, key: str) -> str:
        """Where `key` comes from, for error messages: 'fresh head (seed N)', or the base's shard name."""
        return f"fresh head (seed {self.seed})" if key in self.heads else self.base.where(
            self._base_key(key))

    def read(self, key: str, rows: tuple[int, int] | None = None, alloc=np.empty) -> np.ndarray:
        """Tensor `key` (URM name), or rows [start, stop) of its first dim, copied into
        `alloc(shape, dtype)`; base tensors are read from the base's files (WeightsError if truncated)."""
        if key not in self.heads:
            return self.base.read(self._base_key(key), rows, alloc)
        value = self.heads[key] if rows is None else self.heads[key][rows[0]:rows[1]]
        out = alloc(value.shape, value.dtype)
        out[...] = value
        return out

    @contextlib.contextmanager
    def view(self, key: str, rows: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        """A read-only array of tensor `key` (or rows of it), valid inside the block: mapped from the base's
        file, or a view of the in-memory head."""
        if key not in self.heads:
            with self.base.view(self._base_key(key), rows) as value:
                yield value
            return
        value = self.heads[key] if rows is None else self.heads[key][rows[0]:rows[1]]
        view = value.view()
        view.flags.writeable = False
        yield view

    def prefetch(self, key: str, rows: tuple[int, int] | None = None) -> None:
        """Ask the kernel to read a base tensor (or rows) into the page cache (a fresh head: nothing)."""
        if key not in self.heads:
            self.base.prefetch(self._base_key(key), rows)


def init_from_base(base_dir, out_dir, *, seed: int = 0, init_std: float | None = None,
                   dtype: str = "keep", gate_dtype: str = "float16", overwrite: bool = False,
                   allow_nonfinite: bool = False, progress: bool = True,
                   attributes: tuple[str, ...] = HELPSTEER2,
                   label_range: tuple[float, float] | None = None,
                   base_model: str | None = None, license: str | None = None) -> Path:
    """Base Llama HF dir -> urm-jax checkpoint with the base's backbone and fresh URM heads
    for `attributes` (HelpSteer2's five by default).
    The value head is stored in the backbone's dtype (or `dtype`), the gate in `gate_dtype`.
    `label_range` ([low, high] of the training labels; default: the preset's for a preset's
    attributes) is recorded as `urm_label_range`, where stage 1 reads it. config.json records
    the base (its Hub id when given, else its directory's name: config.json is published by
    `to_hf`, so no local path), license when given, seed, std, the base tensors dropped and
    whether embeddings were untied under `urm_jax_init`; the base's tokenizer files (and chat
    template) are copied as they are; a `warning:` when there are none, or no chat template."""
    base_dir = Path(base_dir)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConversionError(f"--seed: expected a non-negative integer, got {seed!r}")
    check_outputs([("BASE_DIR", base_dir)], [("OUT_DIR", out_dir, "dir")], overwrite=overwrite)
    base_config = read_hf_config(base_dir)
    cfg = urm_config_from_base(base_config, source=str(base_dir / "config.json"),
                               attributes=attributes)
    if init_std is None:
        init_std = Fields(base_config, str(base_dir / "config.json"), error=ConfigError).float(
            "initializer_range", None, gt=0, null_ok=True) or DEFAULT_INIT_STD
    std = float(init_std)
    if not (math.isfinite(std) and std > 0):
        raise ConversionError(f"init std must be a positive number, got {std}")
    label_range = (check_label_range(label_range) if label_range is not None
                   else preset_label_range(attributes))
    gate_dtype = canonical_dtype(gate_dtype)
    with HFWeights(base_dir) as base:
        weights = BaseWithFreshHeads(base, seed)
        score_dtype = (weights.dtype("model.embed_tokens.weight") if dtype == "keep"
                       else canonical_dtype(dtype))
        weights.heads = fresh_heads(cfg, seed=seed, std=std, score_dtype=score_dtype,
                                    gate_dtype=gate_dtype)
        tied = Fields(base_config, str(base_dir / "config.json"), error=ConfigError).bool(
            "tie_word_embeddings", False, null_ok=True)
        provenance = {
            "urm_label_range": None if label_range is None else list(label_range),
            "urm_jax_init": {
                # published with the model (to_hf): the Hub id, else the directory's name only
                "base": base_model or base_dir.absolute().name, "base_is_local": base_model is None,
                "base_model": base_model, "license": license,
                "base_architectures": base_config.get("architectures"),
                "seed": seed, "init_std": std, "base_heads_dropped": weights.dropped,
                "untied_embeddings": tied,  # base had tie_word_embeddings: true; written false
                "chat_format": _base_chat_format(base_dir, out_dir),
            }}
        return write_checkpoint(weights, cfg, out_dir, dtype=dtype, gate_dtype=gate_dtype,
                                tokenizer_dir=base_dir, overwrite=overwrite,
                                allow_nonfinite=allow_nonfinite, progress=progress,
                                extra_config=provenance, desc="init")


class TokenizerWarning(NoticeWarning):
    """A base whose tokenizer cannot render chats (no tokenizer files, or no chat template)."""


def _base_chat_format(base_dir: Path, out_dir) -> str | None:
    """The chat template family of the base's tokenizer (llama3, chatml), 'other', 'none' (a
    tokenizer without a chat template) or None without tokenizer files: where the reward will be
    read (urm_jax.data.tokenization). The last two warn: chats cannot be rendered then (training,
    scoring `messages`, the model card's snippet), only token ids scored."""
    tokenizer = load_tokenizer(base_dir)
    if tokenizer is None:
        warnings.warn(TokenizerWarning(
            f"{base_dir}: no tokenizer files; {out_dir} can score only `input_ids` and cannot be "
            "trained until the base's tokenizer files (tokenizer.json, tokenizer_config.json and "
            "a chat template) are copied into it"), stacklevel=3)
        return None
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        warnings.warn(TokenizerWarning(
            f"{base_dir}: its tokenizer has no chat template, so conversations (`messages`: "
            f"training, scoring, the model card's example) cannot be rendered for {out_dir}; add "
            "one (chat_template.jinja, or `chat_template` in tokenizer_config.json) or score "
            "`input_ids`"), stacklevel=3)
        return "none"
    fmt = chat_format(tokenizer)
    return fmt.name if fmt else "other"
