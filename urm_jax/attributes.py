"""The attribute set: the named quantities whose Gaussian (mean, log-std) the value head predicts
and whose means the gate weighs into one reward. It is data, carried by the model config
(`ModelConfig.attributes`) and saved in config.json; every size derives from it: the value head
has 2 x K outputs (interleaved mean_k, log_std_k), the gate K.

URM-LLaMa-3.1-8B uses HelpSteer2's five, in this order (HelpSteer2's column order, which the
released value head follows).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any

HELPSTEER2 = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# UltraFeedback's fine-grained aspects (openbmb/UltraFeedback: each completion's
# `annotations[aspect]["Rating"]`, "1".."5", honesty also "N/A"), in its annotation order.
ULTRAFEEDBACK = ("instruction_following", "honesty", "truthfulness", "helpfulness")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named attribute set: the label columns a dataset has, and the range of its labels."""

    attributes: tuple[str, ...]
    label_range: tuple[float, float]  # [low, high] of every label column, inclusive
    source: str  # where the columns come from


# Named sets a user can pick by name (`convert init --attributes NAME`). HelpSteer3 has no
# preset: its public subsets (preference, feedback, edit, edit_quality) judge overall
# helpfulness only (a -3..3 preference between two responses, annotators' written feedback), with
# no per-attribute score columns, so no attribute set can be read from it.
PRESETS: dict[str, Preset] = {
    "helpsteer2": Preset(HELPSTEER2, (0.0, 4.0),
                         "nvidia/HelpSteer2: one column per attribute, Likert 0-4"),
    "ultrafeedback": Preset(ULTRAFEEDBACK, (1.0, 5.0),
                            "openbmb/UltraFeedback fine-grained ratings, 1-5 per aspect; one row "
                            "per completion with a column per aspect (\"N/A\": missing)"),
}
DEFAULT_PRESET = "helpsteer2"

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
                             "(ASCII letters A-Z a-z, digits 0-9 and underscore; starting with a "
                             "letter)")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: repeated attribute names in {list(names)}")
    return tuple(names)


def parse_attributes(text: str) -> tuple[str, ...]:
    """`--attributes`: a preset name (`helpsteer2`, `ultrafeedback`; any case) or a list of names
    with at least one comma (`a,b,c`; one custom attribute is written `quality,`: the trailing
    comma marks a list). A single name that is not a preset is refused, with the closest preset
    suggested, so a misspelt preset never becomes a 1-attribute model. ValueError otherwise."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key].attributes
    if "," not in text:
        close = difflib.get_close_matches(key, list(PRESETS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"--attributes: {text.strip()!r} is not a preset ({', '.join(PRESETS)}); "
                         f"{hint}a custom attribute set is a comma-separated list of label "
                         f"columns, and a single custom attribute takes a trailing comma: "
                         f"--attributes {text.strip() or 'NAME'},")
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]  # the trailing comma that marks a list
    return check_attributes(parts, where="--attributes")


def check_label_range(value: Any, *, where: str = "label range") -> tuple[float, float]:
    """[low, high], finite, low < high; ValueError naming `where` otherwise."""
    if (isinstance(value, str) or not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{where}: expected [low, high] (two numbers), got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{where}: needs finite low < high, got {list(value)}")
    return low, high


def parse_label_range(text: str) -> tuple[float, float]:
    """`LOW,HIGH` (e.g. `1,5`) -> (1.0, 5.0)."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--label-range: expected LOW,HIGH numbers, got {text!r}") from None
    return check_label_range(values, where="--label-range")


def preset_label_range(attributes: tuple[str, ...]) -> tuple[float, float] | None:
    """The label range of the preset with exactly these attributes, else None."""
    return next((p.label_range for p in PRESETS.values() if p.attributes == tuple(attributes)),
                None)


def label_range_for(attributes: tuple[str, ...], hf_config: dict,
                    override: tuple[float, float] | None = None,
                    source: str = "config.json") -> tuple[float, float] | None:
    """The label range stage 1 checks a model's labels against: `override` (the recipe's
    `data.label_range`), else what `convert init` recorded (config.json `urm_label_range`), else
    the preset with these attributes, else None (any finite label)."""
    if override is not None:
        return check_label_range(override, where="data.label_range")
    recorded = hf_config.get("urm_label_range")
    if recorded is not None:
        return check_label_range(recorded, where=f"{source}: urm_label_range")
    return preset_label_range(attributes)


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
