"""Stage-2 fast path: the backbone is frozen, so each pair's pooled hidden states are computed
once (sharded over the mesh, cached on disk) and the gate trains on those features alone.

A cache is reused only if its key (model, data, sequence length, compute dtype, example count)
matches; it is written atomically, so a killed run never leaves a cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np
from tqdm.auto import tqdm

from urm_jax.data.batching import epoch_order, pair_batch
from urm_jax.data.datasets import PairExample
from urm_jax.io_utils import atomic_file
from urm_jax.validate import Fields, MetadataError, read_json

STATE_VERSION = 1


def cache_key(model_path: str, examples: Sequence[PairExample], seq_len: int, compute_dtype: str) -> str:
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
    host. Pairs are grouped by length into power-of-two buckets (one compile each) instead of all
    padded to seq_len: a pair's features do not depend on its padding, and typical pairs are far
    shorter than the limit (3x less work in bench/stage2_fast_path.py). `pooled_fn(batch)` is the
    jitted frozen-backbone forward; each host feeds its slice of every batch and the pooled rows
    are gathered back to all hosts."""

    per_host = batch_pairs // jax.process_count()
    lo = jax.process_index() * per_host
    longest = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: longest[i])
    features = None
    bar = tqdm(total=len(examples), desc="stage-2 features", unit="pair", disable=not progress)
    for start in range(0, len(order), batch_pairs):
        chunk = order[start:start + batch_pairs]
        length = bucket_length(max(longest[i] for i in chunk), seq_len)
        rows = [[i] for i in chunk] + [[] for _ in range(batch_pairs - len(chunk))]
        local = pair_batch(rows[lo:lo + per_host], examples, seq_len=length)
        local.pop("pair_mask")
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
        pooled = np.asarray(multihost_utils.process_allgather(pooled_fn(batch), tiled=True))
        pooled = pooled.reshape(batch_pairs, 2, -1)[:len(chunk)]  # rows 2r / 2r+1
        if features is None:
            features = np.zeros((len(examples), 2, pooled.shape[-1]), pooled.dtype)
        features[chunk] = pooled
        bar.update(len(chunk))
    bar.close()
    return features


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
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step, "seed": self.seed,
                "num_examples": len(self.features), "batch_size": self.batch_size, "features": True}

    def restore(self, state: dict) -> None:
        want = {"version": STATE_VERSION, "seed": self.seed, "num_examples": len(self.features),
                "batch_size": self.batch_size, "features": True}
        got = {k: state.get(k) for k in want}
        if got != want:
            raise ValueError(f"cannot resume: checkpoint data state {got} does not match {want}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def pooled_forward(binder):
    """The frozen forward that pools features: f(params, batch) -> [2b, D] (params passed in,
    never closed over, so they are not baked into the compiled program as constants)."""
    def pooled(params, batch):
        model = binder(params)
        return model.pooled_segments(batch["input_ids"], batch["segment_ids"], batch["pool_index"])[:, 0]

    return jax.jit(pooled)
