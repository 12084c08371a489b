"""argparse types for the numeric options of every command line (`urm-jax`, `python -m convert`):
one rule, so no command accepts `inf`, `nan`, `1e400` or a 30-digit integer that a later
conversion (int(), a C long, an int32 array dimension) turns into a traceback. A refused value is
argparse's one `usage` + `error:` line, exit 2."""

from __future__ import annotations

import argparse
import math

# Counts that become array dimensions, token positions or loop bounds in JAX (int32 by default):
# the largest integer any option takes unless it says otherwise.
INT32_MAX = 2**31 - 1


def number(kind: type = int, minimum: float | None = None, maximum: float | None = None):
    """An argparse type parsing `kind` (int or float) within [minimum, maximum]; a float must be
    finite, an int at most INT32_MAX unless `maximum` says otherwise. ArgumentTypeError (one
    line naming the bound) otherwise."""
    if kind is int and maximum is None:
        maximum = INT32_MAX

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text}")
        return value
    return parse


def at_least(minimum: float, kind: type = int):
    """argparse type: a `kind` >= minimum (finite; ints up to INT32_MAX)."""
    return number(kind, minimum)


positive_int = number(int, 1)  # an integer in [1, INT32_MAX]
# TCP ports are 16-bit (0: any free port).
port = number(int, 0, 65535)
# A seed for jax.random.key: it keeps 32 bits of a Python int with 64-bit types off (the default).
seed = number(int, 0, 2**32 - 1)
