"""Typed reads of metadata: every field a file gives is checked for type and range before use,
and a bad one fails with a message naming the file and the field, e.g.

    /ckpt/config.json: field num_hidden_layers: expected a positive integer, got null

One layer for every metadata file urm-jax reads: an HF `config.json` (`ModelConfig.from_hf_dict`),
a checkpoint's `urm_jax.json` marker and Orbax `_METADATA`, a safetensors index, a run
directory's `config.yaml` and the stage-2 feature cache key. JSON's own types are the vocabulary:
an integer is a JSON number without a fraction and never `true`/`false` (Python's bool is an
int, a config's is not), a number is finite (the standard has no NaN or Infinity).

Usage: `fields = Fields(value, source)` (raises unless `value` is a JSON object), then
`fields.int("num_hidden_layers", minimum=1)`, `fields.float("rope_theta", gt=0)`,
`fields.str("model_type", default="llama", choices=(...))`, `fields.object("rope_parameters")`
(nested: its errors name `rope_parameters.rope_theta`). A field that is absent takes `default`
(required when no default is given); `null` counts as absent only with `null_ok=True`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

REQUIRED = object()


class MetadataError(ValueError):
    """A metadata file (or one of its fields) that is missing, unreadable or of the wrong type or
    range; the message names the file and the field."""


def shown(value: Any, limit: int = 60) -> str:
    """A value as its JSON text (`null`, `"abc"`, `true`, `[1, 2]`), shortened for messages."""
    try:
        text = json.dumps(value, allow_nan=True, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_int(value: Any) -> bool:
    """A JSON integer: an int that is not a bool, or a float with no fraction (8192.0)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def is_number(value: Any) -> bool:
    """A finite JSON number (not a bool)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(float(value)))


def expect_object(value: Any, source: str, error: type[Exception] = MetadataError, *,
                  what: str = "a JSON object") -> dict:
    """`value` if it is a JSON object (a dict; `what` names it, e.g. "a YAML mapping"), else
    `error` naming `source`."""
    if not isinstance(value, dict):
        raise error(f"{source}: expected {what}, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    names = {list: "a list", str: "a string", bool: "a bool", type(None): "null", int: "a number",
             float: "a number", dict: "an object"}
    return f"{names.get(type(value), type(value).__name__)} ({shown(value, 40)})"


def read_json(file: str | Path, error: type[Exception] = MetadataError, *,
              what: str = "") -> dict:
    """A JSON object from `file`; `error` names the file when it is missing, a dangling symlink,
    unreadable, not UTF-8, not JSON (NaN/Infinity included) or not an object."""
    file = Path(file)
    label = f"{file}{f' ({what})' if what else ''}"
    if file.is_symlink() and not file.exists():
        raise error(f"{label}: dangling symlink (points to {file.readlink()})")
    if not file.is_file():
        raise error(f"{label}: not found")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{label}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise error(f"{label}: unreadable ({err.strerror or err})") from None
    try:
        value = strict_loads(text)
    except ValueError as err:  # JSONDecodeError, or a NaN/Infinity constant
        raise error(f"{label}: not valid JSON ({err})") from None
    return expect_object(value, label, error)


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name} (use null or a number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range (it overflows to infinity)")
    return value


def strict_loads(text: str) -> Any:
    """`json.loads` of standard JSON only: NaN/Infinity constants and numbers that overflow to
    infinity (`1e999`, however spelled) raise ValueError, as does invalid JSON
    (JSONDecodeError, a ValueError)."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


class Fields:
    """Typed, range-checked reads of one JSON object's fields (see the module doc). `source`
    names the file (and `prefix` the enclosing field, for nested objects) in every error."""

    def __init__(self, value: Any, source: str, *, prefix: str = "",
                 error: type[Exception] = MetadataError):
        self.source, self.prefix, self.error = source, prefix, error
        where = f"{source}: field {prefix[:-1]}" if prefix else source
        self.data = expect_object(value, where, error)

    def fail(self, key: str, expected: str, value: Any = REQUIRED) -> Exception:
        """The error for field `key` (raise it): `expected ...`, `got ...` when a value was given."""
        if value is REQUIRED:
            return self.error(f"{self.source}: field {self.prefix}{key}: missing (expected {expected})")
        return self.error(f"{self.source}: field {self.prefix}{key}: expected {expected}, "
                          f"got {shown(value)}")

    def has(self, key: str) -> bool:
        """Whether the object has the field `key` (null counts as present)."""
        return key in self.data

    def _get(self, key: str, default: Any, null_ok: bool, expected: str) -> tuple[bool, Any]:
        """(present, value): absent (or null with null_ok) gives the default, or fails if none."""
        if key not in self.data or (null_ok and self.data[key] is None):
            if default is REQUIRED:
                raise self.fail(key, expected, self.data.get(key, REQUIRED))
            return False, default
        return True, self.data[key]

    def raw(self, key: str, default: Any = REQUIRED) -> Any:
        """The field as given (any type); required unless `default`."""
        return self._get(key, default, False, "a value")[1]

    def int(self, key: str, default: Any = REQUIRED, *, minimum: int | None = None,
            maximum: int | None = None, null_ok: bool = False) -> Any:
        """An integer (not a bool) within [minimum, maximum]."""
        expected = ("a positive integer" if minimum == 1 and maximum is None else
                    "a non-negative integer" if minimum == 0 and maximum is None else
                    "an integer" + (f" >= {minimum}" if minimum is not None else "")
                    + (f" <= {maximum}" if maximum is not None else ""))
        present, value = self._get(key, default, null_ok, expected)
        if not present:
            return value
        if not is_int(value) or (minimum is not None and value < minimum) or (
                maximum is not None and value > maximum):
            raise self.fail(key, expected, value)
        return int(value)

    def float(self, key: str, default: Any = REQUIRED, *, gt: float | None = None,
              ge: float | None = None, null_ok: bool = False) -> Any:
        """A finite number (an int is accepted) above `gt` / at least `ge`."""
        expected = ("a positive number" if gt == 0 and ge is None else
                    "a finite number" + (f" > {gt:g}" if gt is not None else "")
                    + (f" >= {ge:g}" if ge is not None else ""))
        present, value = self._get(key, default, null_ok, expected)
        if not present:
            return value
        if not is_number(value) or (gt is not None and not value > gt) or (
                ge is not None and not value >= ge):
            raise self.fail(key, expected, value)
        return float(value)

    def bool(self, key: str, default: Any = REQUIRED, *, null_ok: bool = False) -> Any:
        """`true` or `false`."""
        present, value = self._get(key, default, null_ok, "true or false")
        if present and not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def str(self, key: str, default: Any = REQUIRED, *, choices: Iterable[str] | None = None,
            null_ok: bool = False, nonempty: bool = False) -> Any:
        """A string (one of `choices` when given)."""
        choices = tuple(choices) if choices is not None else None
        expected = (f"one of {', '.join(map(repr, choices))}" if choices else
                    "a non-empty string" if nonempty else "a string")
        present, value = self._get(key, default, null_ok, expected)
        if not present:
            return value
        if not isinstance(value, str) or (choices and value not in choices) or (
                nonempty and not value):
            raise self.fail(key, expected, value)
        return value

    def int_list(self, key: str, default: Any = REQUIRED, *, minimum: int | None = None,
                 scalar_ok: bool = False, null_ok: bool = False) -> Any:
        """A list of integers >= minimum (a single integer too, as a one-item list, with
        `scalar_ok`: HF's eos_token_id is either)."""
        expected = ("an integer or a list of integers" if scalar_ok else "a list of integers") + (
            f" >= {minimum}" if minimum is not None else "")
        present, value = self._get(key, default, null_ok, expected)
        if not present:
            return value
        items = [value] if scalar_ok and is_int(value) else value
        if not isinstance(items, list) or not all(
                is_int(v) and (minimum is None or v >= minimum) for v in items):
            raise self.fail(key, expected, value)
        return [int(v) for v in items]

    def str_list(self, key: str, default: Any = REQUIRED, *, null_ok: bool = False) -> Any:
        """A list of strings."""
        present, value = self._get(key, default, null_ok, "a list of strings")
        if present and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise self.fail(key, "a list of strings", value)
        return value

    def object(self, key: str, default: Any = REQUIRED, *, null_ok: bool = False) -> Any:
        """A nested JSON object, as `Fields` whose errors name `key.<field>` (or the default)."""
        present, value = self._get(key, default, null_ok, "an object")
        if not present:
            return value
        if not isinstance(value, dict):
            raise self.fail(key, "an object", value)
        return Fields(value, self.source, prefix=f"{self.prefix}{key}.", error=self.error)

    def str_map(self, key: str, default: Any = REQUIRED, *, null_ok: bool = False) -> Any:
        """An object whose values are all strings (e.g. a safetensors index's weight_map)."""
        present, value = self._get(key, default, null_ok, "an object of strings")
        if present and (not isinstance(value, dict) or not all(
                isinstance(v, str) for v in value.values())):
            bad = next((k for k, v in value.items() if not isinstance(v, str)), None) if isinstance(
                value, dict) else None
            if bad is not None:
                raise self.fail(f"{key}.{bad}", "a string", value[bad])
            raise self.fail(key, "an object of strings", value)
        return value
