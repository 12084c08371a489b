"""The attribute set: the named quantities whose Gaussian (mean, log-std) the value head predicts
and whose means the gate weighs into one reward. It is data, carried by the model config
(`ModelConfig.attributes`) and saved in config.json; every size derives from it: the value head
has 2 x K outputs (interleaved mean_k, log_std_k), the gate K.

URM-LLaMa-3.1-8B uses HelpSteer2's five, in this order (HelpSteer2's column order, which the
released value head follows).
"""

from __future__ import annotations

import re
from typing import Any

HELPSTEER2 = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

# Named sets a user can pick by name (`convert init --attributes NAME`).
PRESETS: dict[str, tuple[str, ...]] = {
    "helpsteer2": HELPSTEER2,
}

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
LABEL_SUFFIXES = ("_mean", "_log_std")  # config.json id2label: `<attribute>_mean`, `<attribute>_log_std`


def check_attributes(names: Any, *, where: str = "attributes") -> tuple[str, ...]:
    """Validate an attribute set: a non-empty list of distinct identifiers. Returns a tuple;
    ValueError naming `where` otherwise."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"{where}: expected a non-empty list of attribute names, got {names!r}")
    for name in names:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"{where}: attribute name {name!r} is not an identifier "
                             "(letters, digits, underscore; starting with a letter)")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: repeated attribute names in {list(names)}")
    return tuple(names)


def parse_attributes(text: str) -> tuple[str, ...]:
    """A preset name (`helpsteer2`, ...) or a comma-separated list of names."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    return check_attributes([part.strip() for part in text.split(",")], where="--attributes")


def id2label(attributes: tuple[str, ...]) -> dict[str, str]:
    """HF `id2label` for the value head's 2K outputs: `<a>_mean`, `<a>_log_std`, interleaved."""
    return {str(2 * k + j): f"{name}{suffix}" for k, name in enumerate(attributes)
            for j, suffix in enumerate(LABEL_SUFFIXES)}


def from_id2label(mapping: Any) -> tuple[str, ...] | None:
    """The attribute set an `id2label` written by `id2label` describes, or None for any other
    labelling (e.g. the released checkpoint's LABEL_0..LABEL_9)."""
    if not isinstance(mapping, dict) or not mapping or len(mapping) % 2:
        return None
    try:
        labels = [mapping[str(i)] if str(i) in mapping else mapping[i] for i in range(len(mapping))]
    except KeyError:
        return None
    names = []
    for k in range(0, len(labels), 2):
        mean, log_std = labels[k], labels[k + 1]
        if not (isinstance(mean, str) and isinstance(log_std, str)
                and mean.endswith(LABEL_SUFFIXES[0]) and log_std.endswith(LABEL_SUFFIXES[1])):
            return None
        name = mean[:-len(LABEL_SUFFIXES[0])]
        if log_std[:-len(LABEL_SUFFIXES[1])] != name:
            return None
        names.append(name)
    try:
        return check_attributes(names)
    except ValueError:
        return None
