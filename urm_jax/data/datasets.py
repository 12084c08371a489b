"""Training data: load rows, turn them into token ids, and account for every row.

Stage 1 regresses the five HelpSteer2 attributes; stage 2 fits the gate on preference pairs
(Skywork-Reward-Preference-80K schema).  Every row goes through the one tokenisation policy
(:func:`urm_jax.data.tokenization.render_ids`, left truncation) and is either used or dropped
with a named reason counted in a :class:`DatasetReport`; nothing disappears silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from urm_jax.attributes import DEFAULT_PRESET, HELPSTEER2, PRESETS
from urm_jax.data.tokenization import chat_format, helpsteer_prompt_to_messages, render_ids
from urm_jax.jsonl import iter_jsonl

TEXT_COLUMNS = ("prompt", "response")
PAIR_COLUMNS = ("chosen", "rejected")
MISSING_LABELS = ("", "n/a", "na", "none", "null")  # a string label meaning "not rated" (UltraFeedback: "N/A")

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DatasetSchemaError(ValueError):
    """The source is not the dataset we expected (a required column is missing)."""


@dataclasses.dataclass(frozen=True)
class RegressionExample:
    """One HelpSteer2-schema row: rendered ids (ending in the final end-of-turn token) and one label
    per attribute of the model."""

    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # float32 [K], in the order of the model's attributes


@dataclasses.dataclass(frozen=True)
class PairExample:
    """One preference pair, both sides rendered with the same policy."""

    chosen_ids: np.ndarray  # int32 [n]
    rejected_ids: np.ndarray  # int32 [m]


@dataclasses.dataclass
class DatasetReport:
    """What happened to each row of a source: used (possibly left-truncated) or dropped."""

    source: str
    # How `dropped_rows` count: "line" (1-based line numbers of a .jsonl file, as in its
    # `file:line` errors) or "row" (1-based rows of a parquet file, hub split or list).
    unit: str = "row"
    total: int = 0
    used: int = 0
    truncated: int = 0  # used rows that lost tokens from the start
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    # The first few row (or line) numbers per reason, 1-based, so a surprising count can be looked at.
    dropped_rows: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def drop(self, reason: str, row: int) -> None:
        """Count row `row` as dropped for `reason` (the first three row numbers per reason are kept)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        rows = self.dropped_rows.setdefault(reason, [])
        if len(rows) < 3:
            rows.append(row)

    @property
    def num_dropped(self) -> int:
        """Rows dropped, over every reason."""
        return sum(self.dropped.values())

    def format(self) -> str:
        """One line for logs, e.g.
        ``src: 100 rows, 97 used (4 truncated), 3 dropped (empty_response=3 [lines 5, 9, 17])``."""
        line = (f"{self.source}: {self.total} rows, {self.used} used ({self.truncated} truncated), "
                f"{self.num_dropped} dropped")
        if self.dropped:
            parts = [
                f"{reason}={n} [{self.unit}{'s' if n > 1 else ''} "
                f"{', '.join(map(str, self.dropped_rows[reason]))}{', ...' if n > 3 else ''}]"
                for reason, n in sorted(self.dropped.items())
            ]
            line += f" ({'; '.join(parts)})"
        return line


# --- sources ------------------------------------------------------------------------------


def load_rows(source: str, split: str = "train", *, cache_dir: str | None = None):
    """The rows of a local ``.jsonl``/``.json``/``.parquet`` file or a hub dataset.

    A ``.jsonl`` file is read here, line by line with a strict JSON parser, into a list of dicts
    (the ``split`` name is not used): a malformed line, a line that is not a JSON object, or a
    file without rows fails naming ``file:line`` (`urm_jax.jsonl.InputError`), where ``datasets``
    would report neither line nor file, and a column whose type changes from row to row is left
    to the row checks (each such row is dropped and counted) instead of failing the whole load.
    Other local files load as the given ``split`` (any name) through ``datasets``; anything else
    (``nvidia/HelpSteer2``, a local dataset directory) goes to
    ``datasets.load_dataset(source, split=split)``. Errors name the source.
    """
    path = Path(source).expanduser()
    fmt = _LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is not None and not path.is_file():
        raise FileNotFoundError(f"dataset file {source!r} does not exist"
                                + (" (a dangling symlink)" if path.is_symlink() else ""))
    if fmt is None and path.is_file():
        raise ValueError(f"dataset file {source!r}: unsupported format; use one of {sorted(_LOCAL_FORMATS)}")
    if path.suffix.lower() == ".jsonl":
        return JsonlRows(iter_jsonl(path, _json_object))
    import datasets  # heavy; only needed when actually loading

    try:
        if fmt is not None:
            with _no_logged_read_errors(fmt):
                return datasets.load_dataset(fmt, data_files={split: str(path)}, split=split,
                                             cache_dir=cache_dir)
        return datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except Exception as e:  # hub, network and parse errors come in many types; keep the cause
        raise ValueError(f"could not load dataset {source!r} (split {split!r}): {type(e).__name__}: {e}") from e


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _no_logged_read_errors(fmt: str):
    """While `datasets` reads a local file: its `fmt` loader logs a file it cannot read at ERROR
    (`Failed to read schema ...`, shown twice when the root logger has a handler) and then
    raises; the raised error is reported in one line naming the file, so drop the logged echo.
    Only that loader's logger, only for this load; its warnings still show."""
    logger = logging.getLogger(f"datasets.packaged_modules.{fmt}.{fmt}")
    drop = _DropErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class JsonlRows(list):
    """The rows (dicts) of a .jsonl file, and `line_numbers`: each row's 1-based line in the
    file (blank lines are skipped, so a row's index is not its line)."""

    def __init__(self, numbered: Iterable[tuple[int, dict]]):
        pairs = list(numbered)
        super().__init__(row for _, row in pairs)
        self.line_numbers = [number for number, _ in pairs]


def _numbering(rows: Any, source: str) -> tuple[DatasetReport, Callable[[int], int]]:
    """A report for `rows` and the number a row index is reported as: its file line for a
    .jsonl file (`JsonlRows`), else its 1-based row."""
    lines = getattr(rows, "line_numbers", None)
    if lines is not None:
        return DatasetReport(source, unit="line"), lines.__getitem__
    return DatasetReport(source), lambda index: index + 1


def _json_object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object (one row), got {type(value).__name__}")
    return value


def _require_columns(rows: Any, required: Iterable[str], source: str, what: str) -> None:
    columns = getattr(rows, "column_names", None)
    if columns is None:  # a plain list of dicts: every key any row has, as datasets would
        columns = list(dict.fromkeys(k for row in rows for k in row)) if len(rows) else list(required)
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetSchemaError(
            f"{source}: missing column(s) {missing} for {what} (found {sorted(columns)}); is this the right dataset?"
        )


# --- HelpSteer2 (stage 1) -------------------------------------------------------------------


def helpsteer2_examples(
    rows: Any, tokenizer: Any, *, max_length: int, source: str = "<rows>", progress: bool = False,
    attributes: tuple[str, ...] = HELPSTEER2,
    label_range: tuple[float, float] | None = PRESETS[DEFAULT_PRESET].label_range,
) -> tuple[list[RegressionExample], DatasetReport]:
    """Render HelpSteer2-schema rows (a ``Dataset`` or list of dicts: ``prompt``, ``response``
    and one score column per attribute, mapped by name) into examples plus a report.
    Labels are numbers (or numeric strings, as UltraFeedback's ratings; "N/A" is a missing
    label) within `label_range` [low, high] (None: any finite number); rows outside it are
    dropped as ``label_out_of_range``. DatasetSchemaError names the missing columns."""
    _require_columns(rows, (*TEXT_COLUMNS, *attributes), source, "attribute regression")
    report, number = _numbering(rows, source)
    examples: list[RegressionExample] = []
    for index, row in enumerate(_progress(rows, progress, "HelpSteer2")):
        report.total += 1
        i = number(index)
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            report.drop("not_text", i)
            continue
        if not response.strip():
            report.drop("empty_response", i)
            continue
        labels, reason = _labels(row, attributes, label_range)
        if reason:
            report.drop(reason, i)
            continue
        try:
            messages = helpsteer_prompt_to_messages(prompt, response)
        except ValueError:
            report.drop("bad_turn_markers", i)
            continue
        ids, reason = _render(tokenizer, messages, max_length)
        if reason:
            report.drop(reason, i)
            continue
        report.used += 1
        report.truncated += ids.truncated
        examples.append(RegressionExample(ids.array, labels))
    return examples, report


def _labels(row: dict, attributes: tuple[str, ...],
            label_range: tuple[float, float] | None) -> tuple[np.ndarray | None, str | None]:
    out = np.zeros(len(attributes), np.float32)
    for k, name in enumerate(attributes):
        v = row.get(name)
        if isinstance(v, str):
            if v.strip().lower() in MISSING_LABELS:
                return None, "missing_label"
            try:
                v = float(v)
            except ValueError:
                return None, "bad_label"
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return None, "missing_label"
        # bool is an int subclass; true/false in a score column is a data bug.
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            return None, "bad_label"
        if not math.isfinite(v):
            return None, "bad_label"
        if label_range is not None and not label_range[0] <= v <= label_range[1]:
            return None, "label_out_of_range"
        out[k] = v
    return out, None


def load_helpsteer2(
    source: str,
    tokenizer: Any,
    *,
    split: str = "train",
    max_length: int = 4096,
    cache_dir: str | None = None,
    progress: bool = False,
    attributes: tuple[str, ...] = HELPSTEER2,
    label_range: tuple[float, float] | None = PRESETS[DEFAULT_PRESET].label_range,
) -> tuple[list[RegressionExample], DatasetReport]:
    """Load and render HelpSteer2 (``nvidia/HelpSteer2`` or a local file with its columns), the
    label columns named by `attributes`, labels within `label_range`."""
    rows = load_rows(source, split, cache_dir=cache_dir)
    return _nonempty(*helpsteer2_examples(rows, tokenizer, max_length=max_length,
                                          source=f"{source}[{split}]", progress=progress,
                                          attributes=attributes, label_range=label_range))


# --- preference pairs (stage 2) -------------------------------------------------------------


def preference_pair_examples(
    rows: Any, tokenizer: Any, *, max_length: int, source: str = "<rows>", progress: bool = False
) -> tuple[list[PairExample], DatasetReport]:
    """Render Skywork-style pairs (``chosen``/``rejected`` message lists) plus a report."""
    _require_columns(rows, PAIR_COLUMNS, source, "preference pairs")
    report, number = _numbering(rows, source)
    examples: list[PairExample] = []
    for index, row in enumerate(_progress(rows, progress, "pairs")):
        report.total += 1
        i = number(index)
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not isinstance(chosen, list) or not isinstance(rejected, list) or not chosen or not rejected:
            report.drop("not_messages", i)
            continue
        if chosen == rejected:  # contributes a constant log 2 to the loss and no gradient
            report.drop("identical_pair", i)
            continue
        if any(_empty_final_turn(side) for side in (chosen, rejected)):
            report.drop("empty_response", i)
            continue
        (c, c_reason), (r, r_reason) = (_render(tokenizer, side, max_length) for side in (chosen, rejected))
        if c_reason or r_reason:
            report.drop(c_reason or r_reason, i)
            continue
        report.used += 1
        report.truncated += c.truncated or r.truncated
        examples.append(PairExample(c.array, r.array))
    return examples, report


def _empty_final_turn(messages: list) -> bool:
    last = messages[-1]
    return isinstance(last, dict) and isinstance(last.get("content"), str) and not last["content"].strip()


def load_preference_pairs(
    source: str,
    tokenizer: Any,
    *,
    split: str = "train",
    max_length: int = 4096,
    cache_dir: str | None = None,
    progress: bool = False,
) -> tuple[list[PairExample], DatasetReport]:
    """Load and render pairs (``Skywork/Skywork-Reward-Preference-80K-v0.1`` or a local file)."""
    rows = load_rows(source, split, cache_dir=cache_dir)
    return _nonempty(*preference_pair_examples(rows, tokenizer, max_length=max_length,
                                               source=f"{source}[{split}]", progress=progress))


def _nonempty(examples: list, report: DatasetReport) -> tuple[list, DatasetReport]:
    """(examples, report), or DatasetSchemaError naming the source when no row is usable (a
    training run would otherwise stop at its first batch with nothing to say why)."""
    if not examples:
        raise DatasetSchemaError(f"{report.format()}: no usable examples"
                                 + ("" if report.total else " (the source has no rows)"))
    return examples, report


# --- shared rendering -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rendered:
    array: np.ndarray
    truncated: bool


def _render(tokenizer: Any, messages: list, max_length: int) -> tuple[_Rendered | None, str | None]:
    """Render with left truncation, refusing a cut into the final assistant turn.

    Left truncation drops earlier turns, which is what we want; but if the final turn alone
    is longer than ``max_length`` the cut removes its header and the start of the response,
    and the model would be trained on a fragment it never sees when scoring.  Such rows are
    dropped as ``final_turn_too_long``.
    """
    try:
        full = render_ids(tokenizer, {"messages": messages}, max_length=None)
    except ValueError:
        return None, "bad_messages"
    if len(full) <= max_length:
        return _Rendered(np.asarray(full, np.int32), False), None
    fmt = chat_format(tokenizer)  # the final turn starts at its template's last turn marker
    header = None if fmt is None else tokenizer.convert_tokens_to_ids(fmt.turn_start)
    last_header = max((k for k, t in enumerate(full) if t == header), default=None)
    keep = max_length - 1 if full[0] == tokenizer.bos_token_id else max_length  # the BOS stays
    if last_header is None or len(full) - last_header > keep:
        return None, "final_turn_too_long"
    # Same policy function, applied to the ids we already have (no second tokenisation).
    cut = render_ids(tokenizer, {"input_ids": full}, max_length=max_length, truncation="left")
    return _Rendered(np.asarray(cut, np.int32), True), None


def _progress(rows: Any, enabled: bool, desc: str):
    if not enabled:
        return rows
    from tqdm import tqdm

    return tqdm(rows, desc=desc, unit="row")


# --- synthetic lengths for benchmarks -------------------------------------------------------


def synthetic_helpsteer_lengths(n: int, seed: int, *, max_length: int = 4096) -> np.ndarray:
    """``n`` token lengths resembling rendered HelpSteer2 conversations, int32.

    ASSUMPTION (not measured here; the hub is unreachable): rendered HelpSteer2 rows are
    long-tailed with a median near 600 tokens and a maximum near 4000 (prompts include long
    multi-turn contexts and pasted documents; responses run from one line to a few pages).
    We model this as a log-normal with median 600 and sigma 0.75 (about 1% of rows above
    3,400 tokens), clipped to [24, min(4000, max_length)].  Use it for padding/throughput
    benchmarks, and re-measure with the real dataset where the hub is reachable.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=math.log(600), sigma=0.75, size=n)
    return np.clip(np.rint(lengths), 24, min(4000, max_length)).astype(np.int32)
