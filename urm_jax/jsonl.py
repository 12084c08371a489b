"""Line-numbered JSONL reading and standard-JSON writing, shared by every command.

Files are read one line at a time, so memory stays bounded whatever the file size. A bad line
either stops the run (the default: an `InputError` naming file and line) or, with
``on_bad_line="skip"``, is recorded in a `BadLines` report and left out.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from urm_jax.io_utils import atomic_file
from urm_jax.validate import strict_loads

T = TypeVar("T")
ON_BAD_LINE = ("error", "skip")


class InputError(ValueError):
    """A bad input line or file; the message names the file (and the line)."""


@dataclasses.dataclass
class BadLines:
    """Lines left out under ``on_bad_line="skip"``: every one is kept (line, id, error) so the
    report can be written in full; the list holds only short strings."""

    path: str
    entries: list[dict] = dataclasses.field(default_factory=list)

    def add(self, line: int, error: str, example_id: Any = None) -> None:
        """Record bad line `line` (1-based) with its error message (and the example's id, if any)."""
        entry = {"line": line, "error": error}
        if example_id is not None:
            entry["id"] = example_id
        self.entries.append(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self, show: int = 5) -> str:
        """One line: '<path>: skipped N bad line(s) (line 3: ...; ...)', the first `show` listed."""
        head = "; ".join(f"line {e['line']}: {e['error']}" for e in self.entries[:show])
        more = f"; ... {len(self) - show} more" if len(self) > show else ""
        return f"{self.path}: skipped {len(self)} bad line(s) ({head}{more})"

    def write(self, path: str | Path) -> None:
        """Write every entry as a JSONL line {"line", "error"[, "id"]} to `path`, atomically."""
        with atomic_file(path) as out:
            for entry in self.entries:
                out.write(dumps(entry) + "\n")


def json_safe(value: Any) -> tuple[Any, int]:
    """(value with every non-finite float, in any nesting of dicts and lists, replaced by None;
    how many were replaced): what a JSON record may hold."""
    if isinstance(value, float):
        return (value, 0) if math.isfinite(value) else (None, 1)
    if isinstance(value, dict):
        out, bad = {}, 0
        for k, v in value.items():
            out[k], n = json_safe(v)
            bad += n
        return out, bad
    if isinstance(value, (list, tuple)):
        pairs = [json_safe(v) for v in value]
        return [v for v, _ in pairs], sum(n for _, n in pairs)
    return value, 0


def dumps(value: Any, **kwargs) -> str:
    """Standard JSON text of `value`, non-finite floats written as null (`json_safe`): never the
    NaN/Infinity tokens strict parsers reject."""
    return json.dumps(json_safe(value)[0], allow_nan=False, **kwargs)


def count_lines(path: str | Path) -> int:
    """Non-blank lines, for a progress bar with a total (one fast pass over the bytes)."""
    n = 0
    with open(path, "rb") as handle:
        for raw in handle:
            n += bool(raw.strip())
    return n


def iter_jsonl(path: str | Path, parse: Callable[[Any], T], *, on_bad_line: str = "error",
               bad: BadLines | None = None, lines: range | None = None) -> Iterator[tuple[int, T]]:
    """Yield ``(line_number, parse(json_object))`` for each non-blank line.

    ``parse`` raises ValueError for an object it cannot use. Invalid UTF-8, invalid JSON and a
    parse error all name ``path:line``; with ``on_bad_line="skip"`` they go to ``bad`` instead.
    Raises InputError when the file yields nothing usable (empty, or every line skipped).
    ``lines``: only the non-blank lines with these 0-based ordinals (a shard of the file; an
    empty shard is not an error).
    """
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
    if on_bad_line == "skip" and bad is None:
        raise ValueError("on_bad_line='skip' needs a BadLines report")
    good, ordinal = 0, -1
    # Binary lines, decoded one by one, so an encoding error still names its line.
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            ordinal += 1
            if lines is not None and ordinal not in lines:
                if ordinal >= lines.stop:
                    break
                continue
            obj = None
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
                try:
                    obj = strict_loads(text)
                except json.JSONDecodeError as err:
                    raise ValueError(f"invalid JSON ({err.msg})") from None
                item = parse(obj)
            except ValueError as err:
                if on_bad_line == "error":
                    raise InputError(f"{path}:{lineno}: {err}") from None
                bad.add(lineno, str(err), obj.get("id") if isinstance(obj, dict) else None)
                continue
            good += 1
            yield lineno, item
    if not good and not (lines is not None and (bad is None or not len(bad))):
        what = "no examples" if bad is None or not len(bad) else f"no usable examples ({bad.summary()})"
        raise InputError(f"{path}: {what}")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most ``size`` items (the bounded unit of work)."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
