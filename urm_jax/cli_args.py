"""Command-line values that start with '-': `--label-range -3,3`, `--std-penalty -0.5`.

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
