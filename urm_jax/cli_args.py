"""The command line's argparse plumbing, shared by `urm-jax` and `python -m convert`:

* `OneLineParser`: a usage error is one `error: ... (see --help)` line, exit 2; `IntermixedParser`
  takes positionals (key=value overrides) anywhere among the options.
* Numeric types (`number`, `at_least`, `positive_int`, `port`, `seed`):
  one rule, so no command accepts `inf`, `nan`, `1e400` or a 30-digit integer that a later
  conversion (int(), a C long, an int32 array dimension) turns into a traceback; a refused value
  is the parser's one `error:` line, exit 2.
* Values that start with '-': `--label-range -3,3`, `--std-penalty -0.5`.

argparse takes a token that starts with '-' for an option unless it is a plain negative number
(`-3`, `-0.5`), so `--label-range -3,3` fails with "expected one argument" and users must know to
write `--label-range=-3,3`. `join_negative_values` rewrites the natural spelling into that one
before parsing: after any option that takes exactly one value (in the parser or any of its
subcommands), a next token that reads as a negative number or a comma-separated list starting
with one (`-3,3`, `-1e-3`, `-.5,2`) becomes the option's value. Nothing else changes: a token
that could be an option (`-h`, `--overwrite`) is never taken.
"""

from __future__ import annotations

import argparse
import math
import re

# A negative number, optionally followed by more comma-separated numbers: -3 -3,3 -0.5,2.5 -1e-3
NEGATIVE_VALUE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,.*)?")


def value_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings that take exactly one value, in `parser` and all its subcommands."""
    options: set[str] = set()
    for action in parser._actions:  # argparse has no public view of a parser's actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= value_options(sub)
        elif action.option_strings and action.nargs is None:
            options.update(action.option_strings)
    return options


def join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with each `OPTION NEGATIVE` pair (OPTION taking one value) joined as
    `OPTION=NEGATIVE`, which argparse reads as the value."""
    options = value_options(parser)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":  # everything after is positional
            out.extend(argv[i:])
            break
        if token in options and i + 1 < len(argv) and NEGATIVE_VALUE.fullmatch(argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


# --- parsers ---------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """The argument parser of every command line (`urm-jax`, `python -m convert`; subcommands
    inherit it): a bad flag value or a missing argument prints exactly one line,
    `error: <message> (see --help)`, and exits 2 (SystemExit), like every other bad input;
    --help still prints the full usage."""

    def error(self, message: str):
        """Print `error: <message> (see --help)` as one line and exit 2 (SystemExit)."""
        self.exit(2, f"error: {message} (see --help)\n")


class IntermixedParser(OneLineParser):
    """A command's parser that takes its positionals anywhere among its options, so `key=value`
    overrides may follow them (`urm-jax memory CONFIG --chip v5p data.seq_len=8192`), as
    `config [overrides ...]` in the usage suggests."""

    _plain = False  # inside parse_known_intermixed_args, which calls parse_known_args itself

    def parse_known_args(self, args=None, namespace=None):
        """Parse with the positionals anywhere among the options (argparse's intermixed parsing)."""
        if self._plain:
            return super().parse_known_args(args, namespace)
        self._plain = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._plain = False


# --- numeric types ---------------------------------------------------------------------

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
