"""Training metrics: a JSONL log (the record of truth), TensorBoard mirror, a PNG plot, throughput.

`metrics.jsonl` holds one object per logged step, `{"step": int, "time": unix seconds, name: float}`.
Non-finite values are written as Python's json writes them (`NaN`, `Infinity`): a diverged loss
must stay visible in the log, and `json.loads` reads them back.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from urm_jax.attributes import HELPSTEER2
from urm_jax.flops import mfu
from urm_jax.io_utils import atomic_file
from urm_jax.jsonl import dumps

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
MAX_ARRAY_SIZE = 64  # larger arrays are not "metrics"; they are skipped with a warning


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same directory + rename, so readers never see a half file."""
    with atomic_file(path, "wb") as handle:
        write(handle)


def flatten_metrics(metrics: Mapping[str, Any],
                    attributes: tuple[str, ...] = HELPSTEER2) -> dict[str, float]:
    """Python floats from numpy/jax scalars and small arrays.

    A vector with one value per attribute is named by attribute (`mse_per_attribute/helpfulness`,
    ...; `attributes`: the model's); other small arrays
    are indexed (`name/0`, `name/1`, ...). Non-numeric values are skipped with a warning rather
    than raised: a logging glitch must not kill a long training run.
    """
    out: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            arr = np.asarray(value)  # jax.Array → host numpy (blocks until computed)
            if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
                raise TypeError(f"dtype {arr.dtype}")
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as err:
            log.warning("metric %r is not numeric (%s); skipped", name, err)
            continue
        if arr.ndim == 0:
            out[name] = float(arr)
        elif arr.size > MAX_ARRAY_SIZE:
            log.warning("metric %r has %d elements (> %d); skipped", name, arr.size, MAX_ARRAY_SIZE)
        else:
            flat = arr.reshape(-1)
            labels = attributes if flat.size == len(attributes) else range(flat.size)
            out.update({f"{name}/{label}": float(x) for label, x in zip(labels, flat)})
    return out


def read_metrics(jsonl_path: str | Path) -> Iterator[dict]:
    """The logged records; a torn last line (a crash mid-write) is ignored."""
    path = Path(jsonl_path)
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                yield record


class MetricsWriter:
    """Appends `metrics.jsonl` under output_dir and mirrors scalars to TensorBoard.

    With enabled=False (every process but 0 of a multi-host job) every method does nothing, so
    callers need no `if process_index == 0` around each call.
    """

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True,
                 attributes: tuple[str, ...] = HELPSTEER2):
        self.enabled = enabled
        self.attributes = attributes
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.tensorboard = tensorboard
        self._file = None
        self._tb = None
        self._purge_step: int | None = None
        self._tb_count = 0
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)

    def _open(self):
        if self._file is None:
            self._file = self.path.open("a")
        return self._file

    def _tb_writer(self):
        # Created lazily so that truncate_after() can pass purge_step before the first event:
        # TensorBoard then hides the events of the abandoned run past that step.
        if self._tb is None:
            from tensorboardX import SummaryWriter

            # The default file name has one-second resolution: a writer reopened within the
            # same second would overwrite the previous file, hence a unique suffix.
            self._tb_count += 1
            self._tb = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR), purge_step=self._purge_step,
                                     filename_suffix=f".{os.getpid()}.{self._tb_count}")
        return self._tb

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Log one step; returns the flattened floats that were written."""
        if not self.enabled:
            return {}
        values = flatten_metrics(metrics, self.attributes)
        record = {"step": int(step), "time": time.time(), **values}
        try:
            f = self._open()
            f.write(dumps(record) + "\n")
            f.flush()  # one line per step reaches the OS now: a crash loses at most the current step
        except OSError as err:  # a full disk: name the file (Python's write error does not)
            raise OSError(err.errno, err.strerror or str(err), str(self.path)) from None
        if self.tensorboard:
            tb = self._tb_writer()
            for name, value in values.items():
                tb.add_scalar(name, value, int(step))
            tb.flush()
        return values

    def truncate_after(self, step: int) -> None:
        """On resume from `step`: drop logged steps > step, so none is duplicated or orphaned."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if int(r["step"]) <= step]
            _atomic_write(self.path, lambda f: f.write("".join(dumps(r) + "\n" for r in kept).encode()))
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._purge_step = int(step) + 1

    def close(self) -> None:
        """Close `metrics.jsonl` and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot_metrics(jsonl_path: str | Path, png_path: str | Path) -> None:
    """PNG of the loss curves (train `loss`, `eval/loss`) and learning rate or accuracy."""
    # Figure + Agg canvas directly instead of pyplot: no global backend switch, no GUI, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(read_metrics(jsonl_path))

    def series(key):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return ([s for s, _ in pts], [v for _, v in pts]) if pts else None

    second = [(k, series(k)) for k in ("learning_rate", "accuracy", "eval/accuracy")]
    second = [(k, s) for k, s in second if s is not None]
    # Learning rate and accuracy differ in scale by orders of magnitude: one of them per panel.
    if any(k == "learning_rate" for k, _ in second):
        second = [(k, s) for k, s in second if k == "learning_rate"]

    fig = Figure(figsize=(8, 6 if second else 3.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if second else 1, 1, sharex=True, squeeze=False)[:, 0]
    for key, style in (("loss", "-"), ("eval/loss", "o-")):
        s = series(key)
        if s is not None:
            axes[0].plot(*s, style, label=key, markersize=3)
    axes[0].set_ylabel("loss")
    axes[0].grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend()
    else:
        axes[0].text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=axes[0].transAxes)
    if second:
        for key, s in second:
            axes[1].plot(*s, label=key)
        axes[1].set_ylabel(second[0][0] if len(second) == 1 else "accuracy")
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    _atomic_write(Path(png_path), lambda f: fig.savefig(f, format="png"))


class Throughput:
    """Tokens/s (and FLOP/s) over the last `window` steps, ignoring the first step (compilation).

    `seconds` is one step's wall time, measured after the step's results are ready (e.g. after
    `jax.block_until_ready` or fetching the loss): dispatch is asynchronous otherwise.
    """

    def __init__(self, window: int = 20, skip_first: int = 1):
        self._steps: collections.deque = collections.deque(maxlen=window)
        self._to_skip = skip_first

    def record(self, seconds: float, tokens: int, flops: float = 0.0) -> None:
        """Add one step: wall time `seconds`, real `tokens` processed and model `flops` (the first
        `skip_first` steps, compilation included, are not counted)."""
        if self._to_skip > 0:
            self._to_skip -= 1
            return
        self._steps.append((float(seconds), int(tokens), float(flops)))

    @property
    def seconds(self) -> float:
        """Wall seconds of the recorded steps in the window (0.0 before any)."""
        return sum(s for s, _, _ in self._steps)

    def tokens_per_second(self) -> float | None:
        """None until a post-compile step has been recorded."""
        secs = self.seconds
        return sum(t for _, t, _ in self._steps) / secs if secs > 0 else None

    def flops_per_second(self) -> float | None:
        """Model FLOP/s over the window; None until a post-compile step is recorded."""
        secs = self.seconds
        return sum(f for _, _, f in self._steps) / secs if secs > 0 else None

    def mfu(self, num_devices: int, peak_per_device: float | None) -> float | None:
        """Model FLOPs utilisation over the window: achieved FLOP/s / (num_devices x peak_per_device FLOP/s),
        a fraction; None without a known peak or before FLOPs were recorded (see `urm_jax.flops.mfu`)."""

        flops = sum(f for _, _, f in self._steps)
        return mfu(flops, self.seconds, num_devices, peak_per_device) if flops else None
