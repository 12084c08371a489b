"""The scoring engine: token ids in, per-sequence reward, attribute means, log-stds,
gate weights and uncertainty out, in input order, for one model or an ensemble (URME).

How a batch is formed, and why:
* Sequences are sorted by length and padded to the smallest of a fixed set of bucket lengths
  (`bucket_lengths`: 16, 24, 32, 48, 64, ... half-octave steps, then max_length). Padding waste
  is at most 1/3 and a run compiles at most one program per (bucket, rows) pair, whatever the
  input mix.
* Rows per batch are fixed per bucket (`batch_size`, or fewer for long buckets under a
  `batch_tokens` budget) and rounded up to a multiple of the device count. A partial batch is
  padded to the next (device count x power of two) rows with copies of its first row, whose
  outputs are dropped: few filler rows, and still at most 1 + log2(rows / devices) shapes per
  bucket.
* Memory is checked per bucket before anything is compiled (`urm_jax.scoring.fit`): the device
  memory of one forward at the bucket's shape is estimated against what the device has free
  (`memory_budget`); long buckets get fewer rows; a bucket whose dense attention cannot fit one
  row per device runs `blockwise` attention instead (linear memory; noted once on the
  `urm_jax.scoring` logger); a sequence that fits neither is refused when it is encoded (or
  planned), with a `SequenceTooLong` (ValueError) that says how long a sequence fits.
* The batch is sharded over all local devices on a 1-D `data` mesh with replicated parameters
  (plain data parallelism: scoring needs no gradient, so nothing else is worth sharding for
  models that fit one device).
* Pooling comes from the attention mask, so padding never changes a score; batch shape can move
  a score only by float rounding (XLA picks kernels per shape), measured in tests/test_scoring_scale.py.

`Scorer.submit` dispatches a list of sequences without waiting for the device, so a caller can
prepare the next chunk (read, tokenise) while this one runs; `Scorer.collect` gathers it.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from urm_jax.compile_cache import stored_jit
from urm_jax.data.tokenization import pad_batch, render_ids
from urm_jax.errors import DeviceMemoryError
from urm_jax.loading import load_config_any, load_model, load_tokenizer
from urm_jax.model.attention import resolve as resolve_attention
from urm_jax.scoring.fit import (BucketPlan, SequenceTooLong, available_bytes, format_bytes,
                                 longest_fitting, mlp_chunk, plan_bucket, too_long_message)
from urm_jax.scoring.results import EnsembleScores, Scores
from urm_jax.sharding import AxisRules, make_mesh, mesh_key, use_mesh

MIN_BUCKET = 16
logger = logging.getLogger("urm_jax.scoring")
_UNMEASURED = object()


def bucket_lengths(max_length: int, min_bucket: int = MIN_BUCKET) -> tuple[int, ...]:
    """The padded lengths a run may use: min_bucket * {1, 1.5, 2, 3, 4, 6, ...} below
    max_length, then max_length itself (so nothing is ever padded past the limit)."""
    out: list[int] = []
    length = min_bucket
    while length < max_length:
        out.append(length)
        if length * 3 // 2 < max_length:
            out.append(length * 3 // 2)
        length *= 2
    out.append(max_length)
    return tuple(out)


def encode_example(tokenizer, example: dict, *, max_length: int, truncation: str,
                   vocab_size: int) -> tuple[list[int], bool]:
    """(token ids, whether they were left-truncated) by the tokenisation policy training uses;
    ValueError (about the example only) when it is unusable or too long under 'error'."""
    if truncation == "error":  # refused texts are refused before they are tokenised in full
        return render_ids(tokenizer, example, max_length=max_length, truncation="error",
                          vocab_size=vocab_size), False
    full = render_ids(tokenizer, example, max_length=None, vocab_size=vocab_size)
    if len(full) <= max_length:
        return full, False
    # The same policy function on the ids we have: 'error' raises, 'left' keeps BOS + tail.
    return render_ids(tokenizer, {"input_ids": full}, max_length=max_length,
                      truncation=truncation, vocab_size=vocab_size), True


# --- one model --------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def forward_batch(graphdef, state, input_ids, attention_mask):
    """The model on one batch. Module-level with the graph definition static, so every scorer of
    the same architecture shares compiled programs (per shape and device placement): loading a
    second ensemble member, or a second Scorer of the same model, compiles nothing new.
    Shardings come from the inputs (replicated state, batch on `data`)."""
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


@dataclasses.dataclass
class Pending:
    """Batches dispatched to the devices and not yet gathered."""

    num_tokens: np.ndarray
    truncated: np.ndarray
    batches: list  # (row indices, URMOutputs of device arrays)
    shapes: list = dataclasses.field(default_factory=list)  # (rows, length, attention) per batch


class Scorer:
    """Load once, score many. `model` may be an HF directory or a urm-jax checkpoint.

    ``devices``: where to run (default: all local devices, data parallel). ``batch_size``: rows
    per batch; ``batch_tokens``: optional token budget per batch, giving short buckets up to
    batch_size rows and long ones fewer (never under one row per device). ``max_length``
    (default: the model's max_position_embeddings) and ``truncation`` ('error' | 'left') follow
    the tokenisation policy training uses (`urm_jax.data.tokenization.render_ids`).
    ``attention``: 'reference' (default; HF's eager attention op by op), 'blockwise' (linear
    memory, any backend), or a fused path ('auto' = splash on TPU, cuDNN on GPU, on CPU reference
    for short rows and blockwise for long ones; 'xla', 'cudnn', 'splash').
    ``memory_budget``: bytes per device one forward may use (default: what the device reports
    free, measured when first needed, minus a margin; see `urm_jax.scoring.fit`).
    ``switch_attention``: run a bucket whose dense attention does not fit with `blockwise`
    (default) instead of refusing its sequences.
    """

    def __init__(self, model: str | Path, *, compute_dtype: str | None = None,
                 param_dtype: str | None = None, gate_dtype: str | None = None,
                 batch_size: int = 8, batch_tokens: int | None = None,
                 max_length: int | None = None, truncation: str = "error", devices=None,
                 attention: str = "reference", memory_budget: int | None = None,
                 switch_attention: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
        if memory_budget is not None and memory_budget < 1:
            raise ValueError(f"memory_budget must be at least 1 byte, got {memory_budget}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if truncation not in ("error", "left"):
            raise ValueError(f"truncation must be 'error' or 'left', got {truncation!r}")
        self.path = str(model)
        # Long rows run the MLP a chunk of tokens at a time (fit.MLP_CHUNK): its [rows, L,
        # intermediate] buffers were most of a long row's memory.
        self.mlp_chunk = mlp_chunk()
        self.model, self.cfg = load_model(model, compute_dtype=compute_dtype,
                                          param_dtype=param_dtype, gate_dtype=gate_dtype,
                                          attention=attention, mlp_chunk=self.mlp_chunk)
        self.tokenizer = load_tokenizer(model)
        self.max_length = max_length or self.cfg.max_position_embeddings
        self.truncation = truncation
        self.buckets = bucket_lengths(self.max_length)

        self.mesh = make_mesh((-1, 1, 1), devices=devices if devices is not None else jax.local_devices())
        self.num_devices = self.mesh.devices.size
        self.batch_size = self._round_rows(batch_size)
        self.batch_tokens = batch_tokens
        self.attention = attention
        self.switch_attention = switch_attention
        self._memory_budget = _UNMEASURED if memory_budget is None else int(memory_budget)
        self._bucket_plans: dict[int, BucketPlan] = {}
        self._rows = NamedSharding(self.mesh, P("data"))
        self._graphdef, state = nnx.split(self.model)
        # Replicate in place: the model object keeps pointing at the one copy of the weights.
        self._state = jax.device_put(state, NamedSharding(self.mesh, P()))
        nnx.update(self.model, self._state)
        self._graphdefs = {}  # attention implementation -> graph definition, for switched buckets
        # Stored whole in the compilation cache: a warm start loads each shape's program without
        # tracing or lowering the model (the graph definition, a static argument, is in the key).
        self._forward = stored_jit(forward_batch, name="forward_batch", static_argnums=(0,),
                                   key=("urm_jax.scoring.engine.forward_batch", mesh_key(self.mesh),
                                        AxisRules()))
        self.compiled_shapes: set[tuple[int, int]] = set()

    @property
    def pad_id(self) -> int:
        """Token id written into padding positions: config.json's pad_token_id, else 0 (masked out anyway)."""
        return self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0

    def _round_rows(self, rows: int) -> int:
        return math.ceil(rows / self.num_devices) * self.num_devices

    @property
    def memory_budget(self) -> int | None:
        """Bytes per device one forward may use: as given, else measured once when first needed
        (after every ensemble member is loaded), None where nothing can be measured."""
        if self._memory_budget is _UNMEASURED:
            self._memory_budget = available_bytes(list(self.mesh.devices.flat))
        return self._memory_budget

    def bucket_plan(self, length: int) -> BucketPlan:
        """Rows, attention and estimated memory of the bucket `length` (see `urm_jax.scoring.fit`);
        decided once per bucket, so a run keeps a fixed set of shapes."""
        plan = self._bucket_plans.get(length)
        if plan is None:
            rows = self.batch_size
            if self.batch_tokens is not None:
                rows = min(rows, max(1, self.batch_tokens // length))
            plan = plan_bucket(self.cfg, length, max_rows=self._round_rows(rows),
                               num_devices=self.num_devices, attention=self.attention,
                               budget=self.memory_budget, switch_attention=self.switch_attention,
                               mlp_chunk=self.mlp_chunk)
            asked = resolve_attention(self.attention, length=length)
            if plan.fits and plan.attention != asked:
                logger.warning(f"{self.path}: {length}-token batches run with {plan.attention} attention: "
                               f"{asked} attention would not fit one row in the "
                               f"{format_bytes(plan.budget)} per device this run may use")
            self._bucket_plans[length] = plan
        return plan

    def attention_used(self) -> list[str]:
        """The attention implementations of the buckets planned so far (sorted names)."""
        return sorted({plan.attention for plan in self._bucket_plans.values() if plan.fits})

    def bucket_for(self, num_tokens: int) -> int:
        """The bucket length a sequence of num_tokens (<= max_length) is padded to."""
        return self.buckets[bisect.bisect_left(self.buckets, num_tokens)]

    def check_fits(self, num_tokens: int) -> None:
        """SequenceTooLong (a ValueError) when a sequence of num_tokens cannot run one row per
        device in the memory budget with any attention this scorer may use; says what fits."""
        plan = self.bucket_plan(self.bucket_for(num_tokens))
        if not plan.fits:
            longest = longest_fitting(self.cfg, self.buckets, attention=self.attention,
                                      budget=plan.budget, switch_attention=self.switch_attention,
                                      mlp_chunk=self.mlp_chunk)
            raise SequenceTooLong(too_long_message(plan, num_tokens, longest=longest,
                                                   switch_attention=self.switch_attention))

    def rows_for(self, length: int) -> int:
        """Rows per batch at a bucket length (a multiple of the device count); SequenceTooLong
        for a bucket that does not fit."""
        plan = self.bucket_plan(length)
        if not plan.fits:
            self.check_fits(length)
        return plan.rows

    def _graphdef_for(self, attention: str, length: int):
        """The graph definition that runs `attention` on rows of `length` tokens: the model's own,
        or (a switched bucket) the same weights with another implementation."""
        if attention == resolve_attention(self.attention, length=length):
            return self._graphdef
        if attention not in self._graphdefs:
            model = nnx.merge(self._graphdef, self._state)
            model.options = dataclasses.replace(model.options, attention=attention)
            self._graphdefs[attention] = nnx.split(model)[0]
        return self._graphdefs[attention]

    def padded_rows(self, n: int, length: int) -> int:
        """Rows a batch of n sequences is padded to: the bucket's full row count, or for a partial
        batch the next device count x power of two (fewer filler rows; still a fixed, small set of
        shapes: at most 1 + log2(rows / devices) per bucket)."""
        full = self.rows_for(length)
        per_device = math.ceil(n / self.num_devices)
        return min(full, self.num_devices * (1 << (per_device - 1).bit_length()))

    # -- tokenisation --

    def encode_with_info(self, example: dict) -> tuple[list[int], bool]:
        """(token ids, whether they were left-truncated); ValueError on a bad example, and
        SequenceTooLong when its length bucket cannot fit in memory."""
        ids, truncated = encode_example(self.tokenizer, example, max_length=self.max_length,
                                        truncation=self.truncation, vocab_size=self.cfg.vocab_size)
        self.check_fits(len(ids))
        return ids, truncated

    def encode(self, example: dict) -> list[int]:
        """Token ids of one example (any score input schema, see `render_ids`); ValueError on a bad
        example, SequenceTooLong when its bucket cannot fit in memory (see `encode_with_info`)."""
        return self.encode_with_info(example)[0]

    # -- batching and dispatch --

    def plan(self, lengths: Sequence[int]) -> list[tuple[int, list[int]]]:
        """(bucket length, row indices) per batch: shortest first, each batch one bucket."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[tuple[int, list[int]]] = []
        current, rows = None, []
        for i in order:
            n = lengths[i]
            if n < 1:
                raise ValueError(f"sequence {i} is empty")
            if n > self.max_length:
                raise ValueError(f"sequence {i} has {n} tokens, more than max_length={self.max_length}")
            try:
                self.check_fits(n)
            except SequenceTooLong as err:
                raise SequenceTooLong(f"sequence {i}: {err}") from None
            bucket = self.bucket_for(n)
            if bucket != current or len(rows) == self.rows_for(bucket):
                if rows:
                    batches.append((current, rows))
                current, rows = bucket, []
            rows.append(i)
        if rows:
            batches.append((current, rows))
        return batches

    def submit(self, sequences: Sequence[Sequence[int]], truncated: Sequence[bool] | None = None) -> Pending:
        """Dispatch every batch of `sequences` to the devices; returns without waiting."""
        lengths = [len(s) for s in sequences]
        pending = Pending(np.asarray(lengths, np.int64),
                          np.zeros(len(lengths), bool) if truncated is None else np.asarray(truncated, bool),
                          [])
        for length, idx in self.plan(lengths):
            rows = [sequences[i] for i in idx]
            rows += [rows[0]] * (self.padded_rows(len(rows), length) - len(rows))
            ids, mask = pad_batch([list(r) for r in rows], pad_id=self.pad_id, length=length)
            self.compiled_shapes.add(ids.shape)
            attention = self.bucket_plan(length).attention
            with use_mesh(self.mesh), self._memory_errors(ids.shape, attention):
                # activation constraints (batch -> data) at trace time
                out = self._forward(self._graphdef_for(attention, length), self._state,
                                    jax.device_put(ids, self._rows), jax.device_put(mask, self._rows))
            pending.batches.append((np.asarray(idx), out))
            pending.shapes.append((*ids.shape, attention))
        return pending

    @contextlib.contextmanager
    def _memory_errors(self, shape, attention: str):
        """An allocation failure of XLA (the estimate was wrong, or memory went to someone else)
        as one DeviceMemoryError line naming the batch, instead of a runtime traceback."""
        try:
            yield
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
                raise
            rows, length = shape
            budget = self.memory_budget
            raise DeviceMemoryError(
                f"{self.path}: out of device memory on a batch of {rows} x {length} tokens with "
                f"{attention} attention (estimated {format_bytes(self.bucket_plan(length).bytes_per_device)} "
                f"per device{f' of {format_bytes(budget)}' if budget else ''}); lower --memory-budget, "
                f"--batch-size or --batch-tokens, or --max-length with --truncation left") from None

    def collect(self, pending: Pending) -> Scores:
        """Gather dispatched batches into `Scores` in the submitted order."""
        n = len(pending.num_tokens)
        k = self.cfg.num_attributes
        reward, unc = np.zeros(n, np.float32), np.zeros(n, np.float32)
        means, log_stds, gate = (np.zeros((n, k), np.float32) for _ in range(3))
        for (idx, out), shape in zip(pending.batches, pending.shapes or [None] * len(pending.batches)):
            if shape is None:
                out = jax.device_get(out)
            else:
                with self._memory_errors(shape[:2], shape[2]):  # execution is asynchronous
                    out = jax.device_get(out)
            m = len(idx)
            reward[idx] = np.asarray(out.reward[:m], np.float32)
            means[idx] = np.asarray(out.means[:m], np.float32)
            log_stds[idx] = np.asarray(out.log_stds[:m], np.float32)
            gate[idx] = np.asarray(out.gate[:m], np.float32)
            unc[idx] = np.asarray(out.uncertainty[:m], np.float32)
        return Scores(reward, means, log_stds, gate, unc, pending.num_tokens, pending.truncated,
                      attributes=self.cfg.attributes)

    def score_arrays(self, sequences: Sequence[Sequence[int]], truncated=None) -> Scores:
        """`Scores` for token id lists (each 1..max_length tokens), in the given order: dispatch every batch,
        then wait and gather. `truncated` [N] bool is carried into the result (default all False)."""
        return self.collect(self.submit(sequences, truncated))

    def score_ids(self, sequences: Sequence[Sequence[int]], progress: bool = False) -> Scores:
        """`Scores` for token id lists (any order, any lengths up to max_length), in order; a
        chunk of 64 batches is dispatched at a time."""
        parts: list[Scores] = []
        step = max(64 * self.batch_size, 1)
        with tqdm(total=len(sequences), desc="score", unit="seq", disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(sequences), step):
                chunk = sequences[start:start + step]
                parts.append(self.score_arrays(chunk))
                bar.update(len(chunk))
        if not parts:
            raise ValueError("no sequences to score")
        return Scores.concat(parts)

    def score(self, examples: Iterable[dict], progress: bool = False) -> Scores:
        """`Scores` for examples in any score input schema (see `render_ids`); a bad example
        raises ValueError naming its index."""
        sequences = []
        for i, example in enumerate(examples):
            try:
                sequences.append(self.encode(example))
            except ValueError as err:
                raise ValueError(f"example {i}: {err}") from None
        return self.score_ids(sequences, progress=progress)


# --- several models (URME) --------------------------------------------------------------------


def check_members(members: Sequence[tuple[str, Any]]) -> None:
    """Refuse an ensemble whose members (path, ModelConfig) predict different attribute sets
    (names or order): their means, variances and uncertainty cannot be combined. ValueError
    naming both models and their attribute lists."""
    first_path, first = members[0]
    for path, cfg in members[1:]:
        if tuple(cfg.attributes) != tuple(first.attributes):
            raise ValueError(f"ensemble members predict different attributes: {first_path} has "
                             f"[{', '.join(first.attributes)}], {path} has [{', '.join(cfg.attributes)}]; "
                             "every --model of an ensemble needs the same attribute list, in the same order")


class Ensemble:
    """One or more scorers that score the same token ids: each member is loaded once; a chunk is
    dispatched to every member, then gathered and merged. Members must share a vocabulary
    (URME members differ only in their training seed); sequences are tokenised once, with the
    first member's tokenizer, and limited by the smallest max_length."""

    def __init__(self, scorers: Sequence[Scorer]):
        if not scorers:
            raise ValueError("an ensemble needs at least one model")
        first = scorers[0]
        check_members([(s.path, s.cfg) for s in scorers])
        for s in scorers[1:]:
            if s.cfg.vocab_size != first.cfg.vocab_size:
                raise ValueError(f"ensemble members disagree on the vocabulary: {first.path} has "
                                 f"{first.cfg.vocab_size} tokens, {s.path} has {s.cfg.vocab_size}")
        self.scorers = list(scorers)
        self._tokenizer, self._max_length = self.tokenizer, self.max_length  # per example: once

    @classmethod
    def load(cls, paths: Sequence[str | Path], **scorer_kwargs) -> "Ensemble":
        """An ensemble of `Scorer(path, **scorer_kwargs)` for each path (each loaded once); ValueError for
        no paths or members with different vocabulary sizes. Their configs are compared first
        (`check_members`), before any weights are read."""
        if len(paths) > 1:
            check_members([(str(p), load_config_any(p)) for p in paths])
        return cls([Scorer(p, **scorer_kwargs) for p in paths])

    def __len__(self) -> int:
        return len(self.scorers)

    @property
    def max_length(self) -> int:
        """Longest sequence (tokens) every member accepts: the smallest member max_length."""
        return min(s.max_length for s in self.scorers)

    @property
    def tokenizer(self):
        """The first member's tokenizer that exists (members share a vocabulary)."""
        return next((s.tokenizer for s in self.scorers if s.tokenizer is not None), None)

    def encode_with_info(self, example: dict) -> tuple[list[int], bool]:
        """(token ids, left-truncated?) by the first member's policy; ValueError for a bad
        example or one that some member cannot fit in memory (SequenceTooLong)."""
        first = self.scorers[0]
        ids, truncated = encode_example(self._tokenizer, example, max_length=self._max_length,
                                        truncation=first.truncation, vocab_size=first.cfg.vocab_size)
        for scorer in self.scorers:
            scorer.check_fits(len(ids))
        return ids, truncated

    def submit(self, sequences, truncated=None) -> list[Pending]:
        """Dispatch `sequences` (token id lists) to every member without waiting; one `Pending` per member."""
        return [s.submit(sequences, truncated) for s in self.scorers]

    def collect(self, pending: list[Pending]) -> Scores | EnsembleScores:
        """Gather `submit`'s pending batches: one member's `Scores`, or `EnsembleScores` for two or more."""
        members = tuple(s.collect(p) for s, p in zip(self.scorers, pending))
        return members[0] if len(members) == 1 else EnsembleScores(members)

    def score_arrays(self, sequences, truncated=None) -> Scores | EnsembleScores:
        """`Scores` (one member) or `EnsembleScores` for token id lists, in order (submit, then collect)."""
        return self.collect(self.submit(sequences, truncated))

    def score_chunks(self, chunks: Iterable, rows: Callable) -> Iterator[tuple[Any, Scores | EnsembleScores]]:
        """(chunk, its scores) for each chunk, in order, with the devices kept busy: chunk i+1 is
        read, encoded and dispatched (`rows(chunk)` -> (sequences, truncated)) before chunk i's
        results are gathered, since JAX dispatch is asynchronous."""
        previous = None
        for chunk in chunks:
            pending = self.submit(*rows(chunk))
            if previous is not None:
                yield previous[0], self.collect(previous[1])
            previous = (chunk, pending)
        if previous is not None:
            yield previous[0], self.collect(previous[1])
