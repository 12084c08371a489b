"""Dynamic batching for the reward server: one device worker thread owns the model.

Requests arrive as lists of token-id sequences (already tokenised by the HTTP side, which never
calls JAX). Each request is cut into pieces of at most ``max_batch_items`` sequences and queued
first in, first out. The worker takes pieces until it holds ``max_batch_items`` sequences, or no
other request is on its way (being received or tokenised: see `Batcher.arriving`; so a lone
request, or a closed loop of clients that all wait for their answers, is never held), or the
oldest piece has waited ``max_wait_s``, and hands them to
the scoring engine in one `Ensemble.submit`, which packs them into the engine's fixed length
buckets and row counts over all local devices, exactly as `urm-jax score` does. While the
devices run that dispatch, the worker already takes and dispatches the next one (JAX dispatch is
asynchronous), then gathers the first with `Ensemble.collect` and completes its requests; a
request split into several pieces is reassembled in order.

Shapes: the engine pads every batch to one of a fixed set of (rows, bucket length) shapes. The
worker compiles all of them up to ``warmup_length`` tokens (default: the server's max length)
before it reports ready (`warmup=True`; see `warmup_shapes`), so nothing of that length compiles
under load; a longer bucket compiles on first use, and `Metrics` reports every shape compiled
after ready (``shapes_compiled_after_ready``: 0 when warm-up covered the max length).

Shutdown (`drain`, then `stop`): new requests are refused (`NotReady`), queued and in-flight
ones finish; a caller whose drain deadline passes fails what is still queued (`fail_queued`),
so nothing is computed for requests already answered; `stop` ends the worker after its
current dispatch and joins it (a process must not exit while a thread is inside XLA).

Within one shape a row's outputs do not depend on the other rows or its position (measured in
tests/test_serve.py); across shapes XLA may round differently (tests/test_scoring_scale.py). So a
served score equals `urm-jax score`'s bit for bit whenever both put the sequence in a batch of
the same shape: always when every bucket has one row count (``batch_size`` = one row per device).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import sys
import threading
import time
from collections import deque
from typing import Callable, Sequence

from tqdm.auto import tqdm

from urm_jax.scoring import Ensemble, EnsembleScores, Scorer, Scores
from urm_jax.serve.metrics import Metrics

STATES = ("loading", "compiling", "ready", "failed", "stopped")


class NotReady(RuntimeError):
    """The model is still loading or compiling, failed to load, or the server is stopping."""


class ServerBusy(RuntimeError):
    """The queue holds more sequences than ``max_queued_items``; the client should retry."""


def warmup_shapes(scorer: Scorer, max_length: int) -> list[tuple[int, int]]:
    """Every (rows, bucket length) batch shape `scorer.submit` can produce for sequences of up to
    ``max_length`` tokens: each bucket a sequence can land in, times each row count a batch of
    1..rows_for(bucket) sequences is padded to. Sorted by bucket length, then rows. Buckets that
    do not fit in memory are left out (their sequences are refused when encoded)."""
    buckets = [b for b in scorer.buckets if b < max_length]
    buckets.append(scorer.buckets[bisect.bisect_left(scorer.buckets, max_length)])
    buckets = [b for b in buckets if scorer.bucket_plan(b).fits]
    return sorted({(scorer.padded_rows(n, b), b) for b in buckets for n in range(1, scorer.rows_for(b) + 1)},
                  key=lambda shape: (shape[1], shape[0]))


@dataclasses.dataclass(eq=False)
class _Job:
    sequences: Sequence[Sequence[int]]
    truncated: Sequence[bool]
    future: concurrent.futures.Future
    parts: list
    remaining: int


@dataclasses.dataclass(eq=False)
class _Piece:
    job: _Job
    index: int
    start: int
    stop: int
    enqueued: float  # time.monotonic() seconds

    def __len__(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(eq=False)
class _Dispatch:
    pieces: list[_Piece]
    pending: list
    started: float


class Batcher:
    """The device worker: loads the model, compiles, then scores queued requests in batches.

    ``load``: called once on the worker thread, returns the `Ensemble` (one member: a plain URM).
    ``max_batch_items``: sequences per dispatch (one `Ensemble.submit`; the engine cuts it into
    device batches); a longer request is split into pieces of this size. ``max_wait_s``: how long
    the oldest queued piece may wait for requests still arriving (`arriving`) to join its
    dispatch. ``max_queued_items``:
    beyond this many queued sequences `submit` raises `ServerBusy`. ``max_length``: the longest
    sequence (tokens) warm-up prepares for (default, and at most: the ensemble's). ``warmup``: compile every
    shape before turning ready. ``warmup_length``: compile the shapes of sequences up to this
    many tokens before turning ready (default: ``max_length``; longer ones compile on first use).
    ``log``: receives one-line progress messages. ``on_failure``: called with the error when
    loading or warm-up fails (instead of logging it: the caller reports it once).
    """

    def __init__(self, load: Callable[[], Ensemble], *, max_batch_items: int = 64,
                 max_wait_s: float = 0.005, max_queued_items: int = 16384, warmup: bool = True,
                 max_length: int | None = None, warmup_length: int | None = None,
                 metrics: Metrics | None = None,
                 log: Callable[[str], None] | None = None, progress: bool = True,
                 on_failure: Callable[[BaseException], None] | None = None):
        if max_batch_items < 1:
            raise ValueError(f"max_batch_items must be at least 1, got {max_batch_items}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        if max_queued_items < 1:
            raise ValueError(f"max_queued_items must be at least 1, got {max_queued_items}")
        self._load = load
        self.max_batch_items = max_batch_items
        self.max_wait_s = max_wait_s
        self.max_queued_items = max_queued_items
        self.warmup = warmup
        self._max_length = max_length
        self._warmup_length = warmup_length
        self.metrics = metrics or Metrics()
        self._log = log or (lambda message: None)
        self._progress = progress
        self.on_failure = on_failure
        self.state = "loading"
        self.error: BaseException | None = None
        self.warmup_progress = (0, 0)  # (shapes compiled, shapes to compile)
        self.ensemble: Ensemble | None = None
        self._cond = threading.Condition()
        self._queue: deque[_Piece] = deque()
        self._queued_items = 0
        self._arriving = 0  # requests being received or tokenised (will call submit soon)
        self._stopping = False
        self._draining = False
        self._shapes_at_ready = 0
        self._settled = threading.Event()  # set when loading and compiling are over, either way
        self._thread = threading.Thread(target=self._run, name="urm-device-worker", daemon=True)

    # -- lifecycle (any thread) --

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and warmed up (state 'ready'; before: 'loading', 'compiling';
        after: 'stopped' or 'failed')."""
        return self.state == "ready"

    @property
    def max_length(self) -> int:
        """The longest sequence (tokens) warm-up prepares for; only known once loaded."""
        return min(self._max_length or self.ensemble.max_length, self.ensemble.max_length)

    @property
    def warmup_length(self) -> int:
        """The longest sequence (tokens) whose shapes warm-up compiles; only known once loaded."""
        return min(self._warmup_length or self.max_length, self.max_length)

    @property
    def draining(self) -> bool:
        """True once a drain (SIGTERM/SIGINT) has begun: new work is refused with 503."""
        return self._draining

    def start(self) -> None:
        """Start the device worker thread: it loads the model, compiles every bucket shape (with warm-up),
        then serves the queue. Returns at once; watch `state` or `ready`."""
        self._thread.start()

    def drain(self) -> None:
        """Refuse new requests (`submit` raises `NotReady`); queued ones still run."""
        with self._cond:
            self._draining = True

    def fail_queued(self, err: BaseException) -> int:
        """Fail every queued request with `err` (the dispatch on the devices still completes);
        returns the number of sequences dropped."""
        with self._cond:
            dropped = self._queued_items
        self._fail_queued(err)
        return dropped

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the worker (a load or warm-up in progress stops at
        the next shape) and join it: by default with no time limit, since a process that exits
        while the worker is inside an XLA computation aborts. Requests submitted after this
        raise `NotReady`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_ready(self, timeout: float) -> bool:
        """Block until ready (True) or failed/stopped/timed out (False)."""
        self._settled.wait(timeout)
        return self.ready

    def describe(self) -> dict:
        """What is served (JSON-ready): model paths, max length, devices, buckets, shapes."""
        if self.ensemble is None:
            return {}
        first = self.ensemble.scorers[0]
        return {"models": [s.path for s in self.ensemble.scorers], "ensemble": len(self.ensemble) > 1,
                "max_length": self.max_length, "devices": first.num_devices,
                "buckets": sorted({b for _, b in warmup_shapes(first, self.max_length)}),
                "warmup_length": self.warmup_length if self.warmup else 0,
                "compiled_shapes": self._shape_count()}

    # -- requests (HTTP side) --

    @contextlib.contextmanager
    def arriving(self):
        """Announce a request from its first byte until its `submit` (or its rejection): while
        any request is announced, the worker waits (up to max_wait_s) for it to join the next
        dispatch; when none is, it dispatches at once."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def submit(self, sequences: Sequence[Sequence[int]], truncated: Sequence[bool]) -> concurrent.futures.Future:
        """Queue one request's sequences; the future gets its `Scores` / `EnsembleScores` in the
        given order, or the engine's exception. Cancel the future to drop its unscored pieces.
        Raises NotReady or ServerBusy."""
        if not len(sequences):
            raise ValueError("no sequences to score")
        future: concurrent.futures.Future = concurrent.futures.Future()
        starts = range(0, len(sequences), self.max_batch_items)
        job = _Job(sequences, truncated, future, [None] * len(starts), len(starts))
        now = time.monotonic()
        pieces = [_Piece(job, k, s, min(s + self.max_batch_items, len(sequences)), now)
                  for k, s in enumerate(starts)]
        with self._cond:
            if self._stopping or self._draining or self.state != "ready":
                raise NotReady("the server is shutting down" if self._stopping or self._draining
                               else f"the model is {self.state}")
            if self._queued_items and self._queued_items + len(sequences) > self.max_queued_items:
                raise ServerBusy(f"{self._queued_items} sequences are queued (limit {self.max_queued_items}); "
                                 "retry later")
            self._queue.extend(pieces)
            self._queued_items += len(sequences)
            self.metrics.gauge("queued_items", self._queued_items)
            self._cond.notify()
        return future

    # -- the worker thread --

    def _run(self) -> None:
        try:
            started = time.monotonic()
            self._log("loading the model")
            self.ensemble = self._load()
            self.state = "compiling"
            if self.warmup:
                self._compile_all()
            self._shapes_at_ready = self._shape_count()
            self.metrics.gauge("compiled_shapes", self._shapes_at_ready)
            if self._stopping:
                self.state = "stopped"
                self._settled.set()
                return
            self.state = "ready"
            self._settled.set()
            self._log(f"ready: {self._shapes_at_ready} batch shapes compiled, "
                      f"{time.monotonic() - started:.1f} s after start")
        except BaseException as err:  # noqa: BLE001 - reported through /health and the exit code
            self.error = err
            self.state = "failed"
            self._settled.set()
            if self.on_failure is not None:
                self.on_failure(err)
            else:
                self._log(f"failed to start: {type(err).__name__}: {err}")
            return
        try:
            self._serve()
        finally:
            self.state = "stopped"
            self._fail_queued(NotReady("the server stopped"))

    def _shape_count(self) -> int:
        return len(set().union(*(s.compiled_shapes for s in self.ensemble.scorers)))

    def _compile_all(self) -> None:
        plans = [(s, warmup_shapes(s, self.warmup_length)) for s in self.ensemble.scorers]
        total = sum(len(shapes) for _, shapes in plans)
        later = "" if self.warmup_length >= self.max_length else \
            f"; longer sequences (up to {self.max_length}) compile their shapes on first use"
        self._log(f"compiling {total} batch shapes (rows x length, up to {self.warmup_length} tokens) "
                  f"before turning ready{later}")
        done = 0
        with tqdm(total=total, desc="warm-up", unit="shape", file=sys.stderr,
                  disable=not self._progress, dynamic_ncols=True) as bar:
            for scorer, shapes in plans:
                for rows, length in shapes:
                    if self._stopping:
                        return
                    scorer.collect(scorer.submit([[0] * length] * rows))
                    done += 1
                    self.warmup_progress = (done, total)
                    bar.update(1)

    def _serve(self) -> None:
        previous: _Dispatch | None = None
        while True:
            pieces = self._take(wait=previous is None)
            if pieces is None and previous is None:
                if self._stopping:
                    return  # nothing queued or in flight
                continue  # every piece taken belonged to a client that left
            current = self._dispatch(pieces) if pieces else None
            if previous is not None:
                self._finish(previous)
            previous = current

    def _take(self, wait: bool) -> list[_Piece] | None:
        """Pieces for one dispatch. wait=True (devices idle): block for the first piece, then
        wait for more while requests are arriving, up to max_wait_s after the first was queued.
        wait=False (a dispatch in flight): only what is queued now. None when nothing is taken."""
        with self._cond:
            while wait and not self._queue and not self._stopping:
                self._cond.wait()
            taken: list[_Piece] = []
            count = 0
            deadline = None
            while count < self.max_batch_items:
                if self._queue:
                    piece = self._queue[0]
                    if taken and count + len(piece) > self.max_batch_items:
                        break
                    self._queue.popleft()
                    self._queued_items -= len(piece)
                    if piece.job.future.done():
                        continue  # its client went away, or an earlier piece failed
                    taken.append(piece)
                    count += len(piece)
                    deadline = deadline or piece.enqueued + self.max_wait_s
                    continue
                if not wait or not taken or self._stopping or not self._arriving:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self.metrics.gauge("queued_items", self._queued_items)
        return taken or None

    def _dispatch(self, pieces: list[_Piece]) -> _Dispatch | None:
        sequences, truncated = [], []
        for p in pieces:
            sequences += p.job.sequences[p.start:p.stop]
            truncated += p.job.truncated[p.start:p.stop]
        now = time.monotonic()
        try:
            pending = self.ensemble.submit(sequences, truncated)
        except Exception as err:  # noqa: BLE001 - the requests fail, the server keeps serving
            self._fail(pieces, err)
            return None
        self._record(sequences, [now - p.enqueued for p in pieces])
        return _Dispatch(pieces, pending, now)

    def _record(self, sequences, queue_s: list[float]) -> None:
        scorer = self.ensemble.scorers[0]
        lengths = [len(s) for s in sequences]
        rows = padded_rows = padded_tokens = batches = 0
        for bucket, idx in scorer.plan(lengths):
            padded = scorer.padded_rows(len(idx), bucket)
            rows, padded_rows = rows + len(idx), padded_rows + padded
            padded_tokens += padded * bucket
            batches += 1
        self.metrics.dispatch(items=len(sequences), tokens=sum(lengths), rows=rows,
                              padded_rows=padded_rows, padded_tokens=padded_tokens,
                              batches=batches, queue_s=queue_s)

    def _finish(self, dispatch: _Dispatch) -> None:
        try:
            scores = self.ensemble.collect(dispatch.pending)
        except Exception as err:  # noqa: BLE001
            self._fail(dispatch.pieces, err)
            return
        self.metrics.observe("device_s", time.monotonic() - dispatch.started)
        shapes = self._shape_count()
        self.metrics.gauge("compiled_shapes", shapes)
        self.metrics.gauge("shapes_compiled_after_ready", shapes - self._shapes_at_ready)
        offset = 0
        for p in dispatch.pieces:
            job = p.job
            job.parts[p.index] = scores.take(slice(offset, offset + len(p)))
            offset += len(p)
            job.remaining -= 1
            if job.remaining == 0:
                parts: list[Scores | EnsembleScores] = job.parts
                _resolve(job.future, result=parts[0] if len(parts) == 1 else type(parts[0]).concat(parts))

    def _fail(self, pieces: list[_Piece], err: BaseException) -> None:
        self._log(f"scoring failed: {type(err).__name__}: {err}")
        for p in pieces:
            _resolve(p.job.future, error=err)

    def _fail_queued(self, err: BaseException) -> None:
        with self._cond:
            pieces, self._queue = list(self._queue), deque()
            self._queued_items = 0
        for p in pieces:
            _resolve(p.job.future, error=err)


def _resolve(future: concurrent.futures.Future, *, result=None, error: BaseException | None = None) -> None:
    """Complete a request's future unless it is already done (cancelled by a client that left,
    or failed by an earlier piece)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
