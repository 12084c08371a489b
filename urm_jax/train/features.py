"""Stage-2 fast path: the backbone is frozen, so each pair's pooled hidden states are computed
once (sharded over the mesh, cached on disk) and the gate trains on those features alone.

A cache is reused only if its key (model, data, sequence length, compute dtype, example count)
matches; it is written atomically, so a killed run never leaves a cache that looks complete.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm.auto import tqdm

from urm_jax.data.batching import epoch_order
from urm_jax.data.datasets import PairExample
from urm_jax.io_utils import atomic_file
from urm_jax.validate import Fields, MetadataError, read_json

STATE_VERSION = 1
MAX_FEATURE_SEGMENTS = 64  # sides per packed row of the feature pass (pool_index width)
MIN_SIDE_TOKENS = 8  # a row of length n holds at most n // 8 sides (and MAX_FEATURE_SEGMENTS)


def cache_key(model_path: str, examples: Sequence[PairExample], seq_len: int, compute_dtype: str) -> str:
    """JSON identity of a stage-2 feature cache: the resolved model path, `seq_len` (tokens), compute
    dtype name, example count and a sha256 over every pair's chosen and rejected int32 token ids; a
    cache is reused only when its recorded key is equal."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example.chosen_ids, np.int32).tobytes())
        digest.update(b"|")
        digest.update(np.asarray(example.rejected_ids, np.int32).tobytes())
        digest.update(b"#")
    payload = {"model": str(Path(model_path).resolve()), "seq_len": seq_len, "compute": compute_dtype,
               "examples": len(examples), "tokens": digest.hexdigest()}
    return json.dumps(payload, sort_keys=True)


def bucket_length(n: int, seq_len: int, minimum: int = 128) -> int:
    """Next power of two >= n (at least `minimum`, a multiple of 128 for TPU kernels), <= seq_len."""
    return min(seq_len, max(minimum, 1 << (max(n, 1) - 1).bit_length()))


def compute_features(pooled_fn, examples: Sequence[PairExample], *, seq_len: int, batch_pairs: int,
                     batch_sharding, progress: bool = True) -> np.ndarray:
    """[N, 2, D] pooled hidden states (chosen, rejected) in example order, identical on every
    host.

    Every side is pooled on its own, so sides need not travel with their pair: they are grouped
    by length into power-of-two row lengths (`bucket_length`, one compile each) and packed
    first-fit into rows of that length as separate segments (attention never crosses a segment
    and positions restart at each, so a side's features do not depend on its neighbours), with
    `2 * batch_pairs` rows per batch (the memory of the unpacked layout at the same length).
    Packing turns the ~40% real tokens of one side per padded row into ~90%+ (see
    `FeaturePlan.real_token_fraction`). `pooled_fn(batch)` is the jitted frozen-backbone
    forward returning [rows, S, D]; each host feeds its slice of every batch and the pooled rows
    are gathered back to all hosts."""
    plan = FeaturePlan.build(examples, seq_len=seq_len, rows_per_batch=2 * batch_pairs,
                             row_multiple=len(batch_sharding.device_set))
    features = None
    bar = tqdm(total=2 * len(examples), desc="stage-2 features", unit="side", disable=not progress)
    bar.set_postfix_str(f"{plan.real_token_fraction:.0%} real tokens", refresh=False)
    for length, segments, rows in plan.batches():
        per_host = len(rows) // jax.process_count()
        lo = jax.process_index() * per_host
        local = side_batch(rows[lo:lo + per_host], examples, row_len=length, max_segments=segments)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
        pooled = np.asarray(multihost_utils.process_allgather(pooled_fn(batch), tiled=True))
        if features is None:
            features = np.zeros((len(examples), 2, pooled.shape[-1]), pooled.dtype)
        for r, row in enumerate(rows):
            for s, (pair, side) in enumerate(row):
                features[pair, side] = pooled[r, s]
        bar.update(sum(len(row) for row in rows))
    bar.close()
    return features


@dataclasses.dataclass(frozen=True)
class FeaturePlan:
    """Which sides go in which packed row: per row length, rows of (pair, side) slots."""

    rows_per_batch: int
    buckets: dict  # row length -> (segments per row, rows: list of [(pair, side), ...])
    real_tokens: int
    row_multiple: int = 1  # every batch's row count is a multiple of this (the device count)

    @staticmethod
    def build(examples: Sequence[PairExample], *, seq_len: int, rows_per_batch: int,
              row_multiple: int = 1) -> "FeaturePlan":
        """Best-fit decreasing of every side into rows whose lengths come from `row_lengths`:
        each side, longest first, goes into the open row with the least free room that holds it;
        a side that fits none opens a row of the shortest length holding twice its tokens (room
        for a partner of its size: the attention work of one such row is that of the two rows
        it replaces). O(n log n) with the open rows sorted by free room."""
        sides = sorted(((len(ids), i, s) for i, e in enumerate(examples)
                        for s, ids in enumerate((e.chosen_ids, e.rejected_ids))),
                       key=lambda x: (-x[0], x[1], x[2]))  # deterministic
        lengths = row_lengths(seq_len)
        rows: list[list] = []  # [row length, free tokens, [(pair, side), ...]]
        by_free: list[tuple[int, int]] = []  # (free tokens, row) of rows that can take a side
        for n, i, s in sides:
            at = bisect.bisect_left(by_free, (n, -1))
            if at < len(by_free):
                k = by_free.pop(at)[1]
            else:
                length = next(x for x in lengths if x >= min(2 * n, seq_len))
                rows.append([length, length, []])
                k = len(rows) - 1
            rows[k][1] -= n
            rows[k][2].append((i, s))
            if rows[k][1] > 0 and len(rows[k][2]) < segments_per_row(rows[k][0]):
                bisect.insort(by_free, (rows[k][1], k))
        buckets: dict = {}
        for length, _, slots in rows:
            buckets.setdefault(length, (segments_per_row(length), []))[1].append(slots)
        buckets = dict(sorted(buckets.items()))
        if rows_per_batch % row_multiple:
            raise ValueError(f"{rows_per_batch} rows per batch do not split over {row_multiple} devices")
        return FeaturePlan(rows_per_batch, buckets, sum(n for n, _, _ in sides), row_multiple)

    def batch_rows(self, n: int) -> int:
        """Rows of a batch holding n rows of sides: the full count, or for a row length's last,
        partial batch the next multiple of the device count (at most two shapes, so two
        compiles, per row length; the pass runs once per training run)."""
        return min(self.rows_per_batch, -(-n // self.row_multiple) * self.row_multiple)

    def batches(self):
        """(row length, segments per row, rows of (pair, side)) per batch, empty rows filling
        a partial batch up to `batch_rows`."""
        for length, (segments, rows) in self.buckets.items():
            for start in range(0, len(rows), self.rows_per_batch):
                chunk = rows[start:start + self.rows_per_batch]
                yield length, segments, chunk + [[] for _ in range(self.batch_rows(len(chunk)) - len(chunk))]

    @property
    def real_token_fraction(self) -> float:
        """Real tokens over the token slots of every batch (padding rows included)."""
        slots = sum(length * len(rows) for length, _, rows in self.batches())
        return self.real_tokens / slots if slots else 0.0


def row_lengths(seq_len: int) -> list[int]:
    """The packed row lengths of the feature pass: multiples of 128 (TPU kernel blocks) in
    half-octave steps (128, 256, 384, 512, 768, 1024, 1536, ...) below seq_len, then seq_len:
    a handful of compiled shapes, and a long side wastes at most a third of its row."""
    out, length = [], 128
    while length < seq_len:
        out.append(length)
        if length >= 256 and length * 3 // 2 < seq_len:
            out.append(length * 3 // 2)
        length *= 2
    return sorted(set(out)) + [seq_len]


def segments_per_row(length: int) -> int:
    """Sides a packed row of `length` tokens may hold (the width of its pool_index)."""
    return max(2, min(MAX_FEATURE_SEGMENTS, length // MIN_SIDE_TOKENS))


def side_batch(rows: list[list[tuple[int, int]]], examples: Sequence[PairExample], *, row_len: int,
               max_segments: int) -> dict[str, np.ndarray]:
    """Token batch of packed sides: row r holds the (pair, side) sides of `rows[r]` as segments
    (input_ids, segment_ids [R, row_len]; pool_index [R, max_segments])."""
    b = len(rows)
    batch = {"input_ids": np.zeros((b, row_len), np.int32), "segment_ids": np.zeros((b, row_len), np.int32),
             "pool_index": np.zeros((b, max_segments), np.int32)}
    for r, row in enumerate(rows):
        start = 0
        for s, (pair, side) in enumerate(row):
            ids = examples[pair].rejected_ids if side else examples[pair].chosen_ids
            end = start + len(ids)
            batch["input_ids"][r, start:end] = ids
            batch["segment_ids"][r, start:end] = s + 1
            batch["pool_index"][r, s] = end - 1
            start = end
    return batch


def cached_features(data: Path, meta: Path, key: str) -> np.ndarray | None:
    """The cached [N, 2, D] features if the key file `meta` records `key` and `data` holds a
    whole array of N pairs; None for no cache, another key, or a cache that is corrupt (a key
    file that is not a JSON object of the key's fields, an array that does not load or has the
    wrong shape): a cache is recomputed, never trusted, and its fault is said on stderr."""
    if not (data.exists() or meta.exists()):
        return None
    want = json.loads(key)
    try:
        fields = Fields(read_json(meta), str(meta))
        recorded = {"model": fields.str("model"), "seq_len": fields.int("seq_len", minimum=1),
                    "compute": fields.str("compute"), "examples": fields.int("examples", minimum=0),
                    "tokens": fields.str("tokens")}
        if recorded != want:
            return None
        try:
            features = np.load(data, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise MetadataError(f"{data}: unreadable ({err})") from None
        if features.ndim != 3 or features.shape[:2] != (want["examples"], 2):
            raise MetadataError(f"{data}: shape {list(features.shape)}, the key says "
                                f"[{want['examples']}, 2, D]")
    except MetadataError as err:
        print(f"warning: stage-2 feature cache ignored and recomputed: {err}", file=sys.stderr)
        return None
    return features


def load_or_compute(cache_dir: Path, key: str, compute) -> np.ndarray:
    """The features for `key` (a `cache_key`) from the cache in `cache_dir`, or `compute()`d and
    cached (array first, key file last, each atomically: a killed run leaves no key that
    vouches for a partial array)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    data, meta = cache_dir / "features.npy", cache_dir / "features.json"
    features = cached_features(data, meta, key)
    if features is not None:
        return features
    features = compute()
    meta.unlink(missing_ok=True)  # an old key must not vouch for the new array if killed below
    with atomic_file(data, "wb") as handle:
        np.save(handle, features)
    with atomic_file(meta) as handle:
        handle.write(key)
    return features


class FeatureIterator:
    """Shuffled batches of cached pair features: {'features': [2B, D], 'pair_mask': [B]}, rows
    2r / 2r+1 the chosen / rejected side of pair r, like the token path. Resumable like
    BatchIterator."""

    def __init__(self, features: np.ndarray, batch_size: int, seed: int, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1):
        self.features, self.batch_size, self.seed = features, batch_size, int(seed)
        self.num_epochs = num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.step = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, shuffled indices)

    def steps_in_epoch(self, epoch: int = 0) -> int:
        """Batches per epoch: ceil(pairs / batch_size) (the last one padded with masked pairs)."""
        return -(-len(self.features) // self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.step >= self.steps_in_epoch():
            self.epoch, self.step = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        if self._order is None or self._order[0] != self.epoch:  # one shuffle per epoch
            self._order = (self.epoch, epoch_order(len(self.features), self.seed, self.epoch))
        picked = self._order[1][self.step * self.batch_size:(self.step + 1) * self.batch_size]
        self.step += 1
        # This process's slice of the global batch (a short last batch is padded with masked pairs).
        per_host = self.batch_size // self.process_count
        mine = picked[self.process_index * per_host:(self.process_index + 1) * per_host]
        dim = self.features.shape[-1]
        feats = np.zeros((per_host, 2, dim), self.features.dtype)
        mask = np.zeros((per_host,), np.float32)
        feats[:len(mine)] = self.features[mine]
        mask[:len(mine)] = 1.0
        return {"features": feats.reshape(2 * per_host, dim), "pair_mask": mask}

    def state(self) -> dict:
        """Resumable position as a JSON-able dict: version, epoch, step within it, seed, pair count, batch
        size (saved with checkpoints)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step, "seed": self.seed,
                "num_examples": len(self.features), "batch_size": self.batch_size, "features": True}

    def restore(self, state: dict) -> None:
        """Continue from a `state()` dict. ValueError when its version, seed, pair count or batch size
        differ from this iterator's (resuming would replay other batches)."""
        want = {"version": STATE_VERSION, "seed": self.seed, "num_examples": len(self.features),
                "batch_size": self.batch_size, "features": True}
        got = {k: state.get(k) for k in want}
        if got != want:
            raise ValueError(f"cannot resume: checkpoint data state {got} does not match {want}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def pooled_forward(binder):
    """The frozen forward that pools features: f(params, batch) -> [rows, S, D] at each row's
    segment ends `pool_index` (params passed in, never closed over, so they are not baked into
    the compiled program as constants)."""
    def pooled(params, batch):
        model = binder(params)
        return model.pooled_segments(batch["input_ids"], batch["segment_ids"], batch["pool_index"])

    return jax.jit(pooled)
