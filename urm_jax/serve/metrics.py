"""Counters and latency windows of a running reward server, read by `GET /metrics`.

Updated from two threads (the HTTP event loop and the device worker), so every update and the
snapshot take one lock. Quantiles are over a sliding window of the most recent observations
(`WINDOW`), so they describe current behaviour, not the whole uptime.

One source of truth for outcomes: every answered request is recorded once, by endpoint and
status (`response`); the outcome counters (``rejected_<status>``, ``internal_errors``,
``client_disconnects``, ``unauthorized``) are derived from that table when read, so the two
views always agree. A client that left before its answer is recorded under status 499 (nginx's
"client closed request"; nothing is sent).
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

WINDOW = 4096  # observations kept per latency series
QUANTILES = (0.5, 0.9, 0.99)
CLIENT_GONE = 499  # the status a request is recorded under when its client disconnected


class Metrics:
    """Server counters (ints), ratios and latency quantiles (seconds, float64)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._counts: collections.Counter = collections.Counter()
        self._responses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._series = {name: collections.deque(maxlen=WINDOW)
                        for name in ("latency_s", "queue_s", "device_s", "items_per_dispatch")}
        self._gauges: dict[str, float | int] = {"in_flight_requests": 0, "queued_items": 0,
                                                 "compiled_shapes": 0, "shapes_compiled_after_ready": 0}

    # -- updates --

    def count(self, name: str, n: int = 1) -> None:
        """Add n to the counter `name` (created at 0)."""
        with self._lock:
            self._counts[name] += n

    def response(self, endpoint: str, status: int, latency_s: float | None = None) -> None:
        """One finished request: its status code (`CLIENT_GONE` when its client left), and its
        latency (arrival to response ready). Every request is recorded here exactly once."""
        with self._lock:
            self._responses[endpoint][str(status)] += 1
            if latency_s is not None:
                self._series["latency_s"].append(latency_s)

    def observe(self, series: str, value: float) -> None:
        """Append one observation (seconds, or items) to a windowed series."""
        with self._lock:
            self._series[series].append(value)

    def gauge(self, name: str, value: float | int) -> None:
        """Set the current value of `name` (queue depth, in-flight requests, shapes)."""
        with self._lock:
            self._gauges[name] = value

    def add_gauge(self, name: str, delta: int) -> None:
        """Move the gauge `name` by delta."""
        with self._lock:
            self._gauges[name] += delta

    def dispatch(self, *, items: int, tokens: int, rows: int, padded_rows: int,
                 padded_tokens: int, batches: int, queue_s: list[float]) -> None:
        """One worker dispatch: `items` sequences in `batches` device batches of `padded_rows`
        rows in all (`rows` real), `padded_tokens` = sum of rows x bucket length."""
        with self._lock:
            self._counts["dispatches"] += 1
            self._counts["device_batches"] += batches
            self._counts["items_scored"] += items
            self._counts["tokens_scored"] += tokens
            self._counts["rows"] += rows
            self._counts["padded_rows"] += padded_rows
            self._counts["padded_tokens"] += padded_tokens
            self._series["items_per_dispatch"].append(items)
            self._series["queue_s"].extend(queue_s)

    # -- reading --

    def snapshot(self) -> dict:
        """A JSON-ready view (finite numbers only): counters, fills, gauges and quantiles."""
        with self._lock:
            counts = dict(self._counts)
            responses = {k: dict(v) for k, v in self._responses.items()}
            series = {k: np.asarray(v, np.float64) for k, v in self._series.items()}
            gauges = dict(self._gauges)
        by_status: collections.Counter = collections.Counter()
        for statuses in responses.values():
            by_status.update({int(k): v for k, v in statuses.items()})
        for status, n in sorted(by_status.items()):
            if status == CLIENT_GONE:
                counts["client_disconnects"] = n
            elif status >= 400:
                counts[f"rejected_{status}"] = n
        counts["internal_errors"] = by_status.get(500, 0)
        counts["unauthorized"] = by_status.get(401, 0)
        rows, tokens = counts.get("rows", 0), counts.get("tokens_scored", 0)
        return {
            "uptime_s": round(time.monotonic() - self._started, 3),
            "requests": {"total": sum(sum(v.values()) for v in responses.values()),
                         "by_endpoint_and_status": responses},
            "counters": counts,
            "batch_fill": {
                # real rows / rows run (filler rows pad a partial batch to a compiled shape)
                "rows": rows / counts["padded_rows"] if counts.get("padded_rows") else None,
                # real tokens / (rows run x bucket length): padding inside the length buckets too
                "tokens": tokens / counts["padded_tokens"] if counts.get("padded_tokens") else None,
            },
            "gauges": gauges,
            "quantiles_window": WINDOW,
            **{name: _summary(values) for name, values in series.items()},
        }


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"count": 0}
    out = {"count": int(len(values)), "mean": float(values.mean())}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = float(np.quantile(values, q))
    out["max"] = float(values.max())
    return out
