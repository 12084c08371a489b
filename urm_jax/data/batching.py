"""Fixed-shape batches, sequence packing and a resumable, multi-host-aware iterator.

Every batch has the same shapes, so the jitted train step compiles once.  An epoch is planned
up front from the example lengths alone: shuffle with a generator seeded by ``(seed, epoch)``,
then (when packing) first-fit the conversations into rows of ``seq_len`` tokens.  The plan is a
pure function of ``(lengths, seed, epoch, settings)``, which is what makes resumption exact and
lets every host of a multi-host job compute the same global batches and keep only its slice.

Stage-1 batch (``B`` rows on this host, ``L`` = seq_len, ``S`` = max segments per row):
  input_ids   int32   [B, L]     pad_id on padding
  segment_ids int32   [B, L]     0 on padding, 1..S = which packed conversation the token is in
  pool_index  int32   [B, S]     position of each segment's last token (its final <|eot_id|>)
  pool_mask   float32 [B, S]     1 for a real segment, 0 for an empty slot
  labels      float32 [B, S, 5]  HelpSteer2 attributes, 0 for empty slots
Stage-2 batch, unpacked (``B`` pairs on this host): rows 2r and 2r+1 are pair r's chosen and
rejected sides:
  input_ids, segment_ids [2B, L]; pool_index int32 [2B, 1]; pool_mask float32 [2B, 1];
  pair_mask float32 [B] (0 for padding pairs of a final partial batch).
Stage-2 batch, packed (``B`` rows on this host, each holding whole pairs side by side in
``2 L`` tokens, so any pair of two ``L``-limited sides fits; ``S`` = max segments per row, even):
  input_ids, segment_ids [B, 2L]; pool_index, pool_mask [B, S] (segments 2j, 2j+1 = the chosen
  and rejected side of the row's j-th pair); pair_mask float32 [B, S/2].
Either way the pooled rewards, flattened in row-major order, alternate chosen / rejected, and
pair_mask flattened marks the real pairs: the loss reads both layouts the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from urm_jax.data.datasets import PairExample, RegressionExample

STATE_VERSION = 1


# --- planning (lengths only) --------------------------------------------------------------


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffle: a permutation that depends on ``(seed, epoch)`` and nothing else."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def first_fit_rows(order: Sequence[int], lengths: Sequence[int], seq_len: int, max_segments: int,
                   window: int = 128) -> list[list[int]]:
    """Greedy first-fit of examples (in ``order``) into rows of ``seq_len`` tokens.

    Each example goes into the oldest open row with room for it, else a new row.  Only the
    ``window`` most recent rows stay open (so the cost is O(n * window), not O(n * rows));
    a row also closes once it holds ``max_segments`` examples or nothing could fit any more.
    Rows are returned in the order they were opened, which keeps the shuffle's randomness.
    """
    smallest = int(min(lengths)) if len(lengths) else 1
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []  # indices into rows, oldest first
    for i in order:
        n = int(lengths[i])
        k = next((r for r in open_rows if free[r] >= n), None)
        if k is None:
            rows.append([])
            free.append(seq_len)
            k = len(rows) - 1
            open_rows.append(k)
            if len(open_rows) > window:
                open_rows.pop(0)
        rows[k].append(int(i))
        free[k] -= n
        if (len(rows[k]) == max_segments or free[k] < smallest) and k in open_rows:
            open_rows.remove(k)
    return rows


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """The global rows of one epoch, in batch order, and how full they are."""

    rows: list[list[int]]  # example indices per row (per pair for stage 2)
    batch_size: int  # global rows (pairs) per batch
    real_tokens: int
    tokens_per_row: int  # seq_len, or 2 * seq_len for a pair

    @property
    def num_batches(self) -> int:
        """Global batches in the epoch: ceil(rows / batch_size), a final partial batch included."""
        return math.ceil(len(self.rows) / self.batch_size)

    @property
    def padding_efficiency(self) -> float:
        """Fraction of the epoch's token slots (final partial batch included) holding real tokens."""
        capacity = self.num_batches * self.batch_size * self.tokens_per_row
        return self.real_tokens / capacity if capacity else 0.0

    def batch_rows(self, step: int) -> list[list[int]]:
        """Global rows of batch ``step``; a final partial batch is filled with empty rows."""
        rows = self.rows[step * self.batch_size : (step + 1) * self.batch_size]
        return rows + [[] for _ in range(self.batch_size - len(rows))]


def plan_epoch(
    lengths: Sequence[int],
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    epoch: int,
    pack: bool,
    max_segments: int,
    pack_window: int = 128,
    tokens_per_row: int | None = None,
) -> EpochPlan:
    """Plan one epoch from example lengths (for pairs: chosen + rejected lengths, unpacked)."""
    order = epoch_order(len(lengths), seed, epoch)
    if pack:
        rows = first_fit_rows(order, lengths, seq_len, max_segments, pack_window)
    else:
        rows = [[int(i)] for i in order]
    return EpochPlan(rows, batch_size, int(np.sum(lengths, dtype=np.int64)), tokens_per_row or seq_len)


def padding_efficiency(lengths: Sequence[int], *, batch_size: int, seq_len: int, pack: bool,
                       max_segments: int = 8, seed: int = 0, epoch: int = 0) -> float:
    """Fraction of non-pad tokens over one epoch (handy with ``synthetic_helpsteer_lengths``)."""
    return plan_epoch(lengths, batch_size=batch_size, seq_len=seq_len, seed=seed, epoch=epoch,
                      pack=pack, max_segments=max_segments).padding_efficiency


# --- assembly (token arrays) ----------------------------------------------------------------


def place_segment(batch: dict, r: int, s: int, ids, start: int, width: str) -> int:
    """Write `ids` as segment `s` (0-based) of row `r` of a packed batch from token `start`:
    input_ids, segment_ids (numbered from 1 so that 0 can mean padding), its pooled position
    (last token) and pool mask. Returns where the next segment starts; ValueError naming the
    row's `width` (e.g. "seq_len=512") when the segment runs past the row's end."""
    end = start + len(ids)
    if end > batch["input_ids"].shape[1]:
        raise ValueError(f"row {r} overflows {width}")
    batch["input_ids"][r, start:end] = ids
    batch["segment_ids"][r, start:end] = s + 1
    batch["pool_index"][r, s] = end - 1
    batch["pool_mask"][r, s] = 1.0
    return end


def regression_batch(rows: list[list[int]], examples: Sequence[RegressionExample], *, seq_len: int,
                     max_segments: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Stage-1 batch from rows of example indices (an empty row is padding)."""
    b = len(rows)
    num_attributes = len(examples[0].labels) if len(examples) else 0
    batch = {
        "input_ids": np.full((b, seq_len), pad_id, np.int32),
        "segment_ids": np.zeros((b, seq_len), np.int32),
        "pool_index": np.zeros((b, max_segments), np.int32),
        "pool_mask": np.zeros((b, max_segments), np.float32),
        "labels": np.zeros((b, max_segments, num_attributes), np.float32),
    }
    width = f"seq_len={seq_len}"  # named in the overflow error
    for r, row in enumerate(rows):
        if len(row) > max_segments:
            raise ValueError(f"row {r} has {len(row)} segments, more than max_segments={max_segments}")
        start = 0
        for s, i in enumerate(row):
            start = place_segment(batch, r, s, examples[i].input_ids, start, width)
            batch["labels"][r, s] = examples[i].labels
    return batch


def pair_batch(rows: list[list[int]], examples: Sequence[PairExample], *, seq_len: int,
               pad_id: int = 0) -> dict[str, np.ndarray]:
    """Unpacked stage-2 batch from rows of one pair index each (an empty row is a padding pair):
    token rows 2r and 2r+1 are pair r's chosen and rejected sides."""
    b = len(rows)
    batch = {
        "input_ids": np.full((2 * b, seq_len), pad_id, np.int32),
        "segment_ids": np.zeros((2 * b, seq_len), np.int32),
        "pool_index": np.zeros((2 * b, 1), np.int32),
        "pool_mask": np.zeros((2 * b, 1), np.float32),
        "pair_mask": np.zeros((b,), np.float32),
    }
    for r, row in enumerate(rows):
        if not row:
            continue
        (i,) = row
        # Interleaved (chosen 2r, rejected 2r+1): any contiguous split of the rows -- across
        # hosts, devices or accumulation micro-batches -- keeps every pair together.
        for out_row, ids in ((2 * r, examples[i].chosen_ids), (2 * r + 1, examples[i].rejected_ids)):
            batch["input_ids"][out_row, : len(ids)] = ids
            batch["segment_ids"][out_row, : len(ids)] = 1
            batch["pool_index"][out_row, 0] = len(ids) - 1
            batch["pool_mask"][out_row, 0] = 1.0
        batch["pair_mask"][r] = 1.0
    return batch


def packed_pair_batch(rows: list[list[int]], examples: Sequence[PairExample], *, seq_len: int,
                      max_segments: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packed stage-2 batch from rows of pair indices: each row holds whole pairs, chosen then
    rejected as consecutive segments, in ``2 * seq_len`` tokens (see the module doc). Attention
    never crosses a segment and positions restart at each one, so a packed side scores as it
    would alone."""
    b, width = len(rows), 2 * seq_len
    limit = f"{width} tokens"  # named in the overflow error
    if max_segments < 2 or max_segments % 2:
        raise ValueError(f"packed pairs need an even max_segments >= 2, got {max_segments}")
    batch = {
        "input_ids": np.full((b, width), pad_id, np.int32),
        "segment_ids": np.zeros((b, width), np.int32),
        "pool_index": np.zeros((b, max_segments), np.int32),
        "pool_mask": np.zeros((b, max_segments), np.float32),
        "pair_mask": np.zeros((b, max_segments // 2), np.float32),
    }
    for r, row in enumerate(rows):
        if 2 * len(row) > max_segments:
            raise ValueError(f"row {r} has {len(row)} pairs, more than max_segments={max_segments} allow")
        start = 0
        for j, i in enumerate(row):
            for side, ids in enumerate((examples[i].chosen_ids, examples[i].rejected_ids)):
                start = place_segment(batch, r, 2 * j + side, ids, start, limit)
            batch["pair_mask"][r, j] = 1.0
    return batch


# --- the iterator ---------------------------------------------------------------------------


class BatchIterator:
    """Deterministic, resumable batches over regression examples or preference pairs.

    ``batch_size`` is GLOBAL: rows (packed, or one conversation each) for stage 1; for stage 2
    pairs when unpacked, packed rows of whole pairs (``2 * seq_len`` tokens, ``max_segments``
    sides each) when packed.  Each host computes the same global plan and yields only rows
    ``[k*B/P, (k+1)*B/P)`` of every batch, where ``k = process_index`` and ``P =
    process_count``.  Without packing each row holds one conversation (or pair) and
    ``max_segments`` is 1.  ``num_epochs=None`` iterates forever.
    """

    def __init__(
        self,
        examples: Sequence[RegressionExample] | Sequence[PairExample],
        batch_size: int,
        seq_len: int,
        seed: int,
        pack: bool = True,
        max_segments: int = 8,
        *,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        pad_id: int = 0,  # any id works (padding is masked by segment_ids); 0 exists in every vocab
        pack_window: int = 128,
    ):
        if not examples:
            raise ValueError("BatchIterator needs at least one example")
        self.pairs = isinstance(examples[0], PairExample)
        if self.pairs and pack and (max_segments < 2 or max_segments % 2):
            raise ValueError(f"packed pairs need an even max_segments >= 2 (two sides per pair), "
                             f"got {max_segments}")
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
        if pack and max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, got {max_segments}")
        self.examples = examples
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, int(seed)
        self.pack = pack
        self.max_segments = max_segments if pack else 1
        self.process_index, self.process_count = process_index, process_count
        self.num_epochs, self.pad_id, self.pack_window = num_epochs, pad_id, pack_window
        self.lengths = self._lengths()
        self.epoch, self.step = 0, 0
        self._plan: tuple[int, EpochPlan] | None = None

    def _lengths(self) -> np.ndarray:
        if self.pairs:
            per_side = [(len(e.chosen_ids), len(e.rejected_ids)) for e in self.examples]
            longest = np.array([max(p) for p in per_side])
            lengths = np.array([sum(p) for p in per_side], np.int64)
        else:
            lengths = longest = np.array([len(e.input_ids) for e in self.examples], np.int64)
        bad = np.flatnonzero((longest > self.seq_len) | (longest < 1))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"example {i} has {int(longest[i])} tokens; each must have 1..seq_len={self.seq_len} "
                             "(render with max_length=seq_len)")
        return lengths

    # -- planning --

    def plan(self, epoch: int) -> EpochPlan:
        """The global plan of ``epoch`` (cached for the current epoch)."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self._plan_with(epoch, self.max_segments))
        return self._plan[1]

    def _plan_with(self, epoch: int, max_segments: int) -> EpochPlan:
        """``epoch``'s plan with at most ``max_segments`` segments a row (a pair takes two)."""
        row_len = (2 if self.pairs else 1) * self.seq_len  # a pair row holds both sides
        units = max_segments // 2 if self.pairs and self.pack else max_segments
        return plan_epoch(self.lengths, batch_size=self.batch_size, seq_len=row_len, seed=self.seed,
                          epoch=epoch, pack=self.pack, max_segments=units,
                          pack_window=self.pack_window, tokens_per_row=row_len)

    def steps_in_epoch(self, epoch: int) -> int:
        """Global batches in ``epoch`` (packing makes it vary slightly between epochs)."""
        return self.plan(epoch).num_batches

    def epoch_stats(self, epoch: int) -> dict:
        """Rows, batches and padding efficiency (fraction of non-pad tokens) of ``epoch``."""
        plan = self.plan(epoch)
        return {"epoch": epoch, "examples": len(self.examples), "rows": len(plan.rows), "batches": plan.num_batches,
                "real_tokens": plan.real_tokens, "padding_efficiency": plan.padding_efficiency, "packed": self.pack}

    def segment_cap_hint(self, epoch: int = 0, min_gain: float = 0.05) -> str | None:
        """A one-line hint when ``max_segments`` rather than the row length limits packing:
        epoch ``epoch`` planned with twice the cap would have at least ``min_gain`` more of its
        token slots real (e.g. 4 pairs in a 2 x 591 row of 51-token sides: 57% real, 8 pairs:
        94%). None when not packing or when the cap does not bind."""
        if not self.pack:
            return None
        now = self.plan(epoch).padding_efficiency
        doubled = self._plan_with(epoch, 2 * self.max_segments).padding_efficiency
        if doubled - now < min_gain:
            return None
        return (f"data.max_segments={self.max_segments} limits packing: {2 * self.max_segments} would make "
                f"{doubled:.1%} of the token slots real tokens (now {now:.1%})")

    # -- iteration --

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while self.step >= self.steps_in_epoch(self.epoch):
            self.epoch, self.step = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        global_rows = self.plan(self.epoch).batch_rows(self.step)
        per_host = self.batch_size // self.process_count
        rows = global_rows[self.process_index * per_host : (self.process_index + 1) * per_host]
        self.step += 1
        if self.pairs and self.pack:
            return packed_pair_batch(rows, self.examples, seq_len=self.seq_len,
                                     max_segments=self.max_segments, pad_id=self.pad_id)
        if self.pairs:
            return pair_batch(rows, self.examples, seq_len=self.seq_len, pad_id=self.pad_id)
        return regression_batch(rows, self.examples, seq_len=self.seq_len, max_segments=self.max_segments,
                                pad_id=self.pad_id)

    # -- checkpointing --

    def _settings(self) -> dict:
        # Everything the global plan depends on; process_index/count are not, so a job may
        # resume on a different number of hosts.
        return {"num_examples": len(self.examples), "batch_size": self.batch_size, "seq_len": self.seq_len,
                "pack": self.pack, "max_segments": self.max_segments, "pack_window": self.pack_window,
                "pairs": self.pairs}

    def state(self) -> dict:
        """JSON-serialisable position: the next batch is ``step`` of ``epoch``."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "step": self.step, "seed": self.seed, **self._settings()}

    def restore(self, state: dict) -> None:
        """Continue from ``state``; refuses a state from a different dataset or settings."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"iterator state version {state.get('version')!r}, expected {STATE_VERSION}")
        expected = {"seed": self.seed, **self._settings()}
        diff = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"iterator state does not match this data/settings (saved, current): {diff}")
        epoch, step = state["epoch"], state["step"]
        if not (isinstance(epoch, int) and isinstance(step, int) and epoch >= 0 and step >= 0):
            raise ValueError(f"bad iterator position epoch={epoch!r} step={step!r}")
        self.epoch, self.step = epoch, step
