"""Paths in the URM parameter tree, the one place that names parts of it.

A parameter's path is its key sequence in the pure-dict tree (`("backbone", "layers", "q_proj")`,
`("gate", "fc0", "bias")`), written with slashes in patterns and messages
(`backbone/layers/q_proj`). Three top-level groups: `backbone`, `value_head` and `gate`; a
LoRA run's tree has a fourth, `lora`, holding the adapters of the kernels it adapts under their
paths (`lora/backbone/layers/q_proj/lora_a`, see urm_jax.model.lora). Saved models never hold it:
adapters are merged into their kernels.

Patterns choose parameters (what a training stage trains, where LoRA adapters go): a pattern is
a glob (`fnmatch`: `*` matches anything, slashes included; `?`, `[...]`) that selects a parameter
when it matches the whole path or a leading part of it ending at a slash, so `gate` selects the
whole gate and `backbone/layers/*_proj` every projection.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Sequence

GROUPS = ("backbone", "value_head", "gate")
HEAD_GROUPS = ("value_head", "gate")  # what a URM adds to a Llama backbone
LORA = "lora"  # the adapters' group (training only)
Path = tuple[str, ...]


def path_name(path: Sequence[Any]) -> str:
    """`backbone/layers/q_proj` for a key sequence (strings, or jax tree path entries)."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def is_gate(path: Sequence[Any]) -> bool:
    """Whether a parameter belongs to the gating MLP (its own dtype: float16 in the real model);
    a LoRA adapter of a gate kernel does (it takes the gate's dtype)."""
    keys = [str(getattr(k, "key", k)) for k in path[:2]]
    return bool(keys) and (keys[0] == "gate" or keys == [LORA, "gate"])


def check_patterns(patterns: Any) -> tuple[str, ...]:
    """A non-empty sequence of non-empty pattern strings, as a tuple (ValueError otherwise)."""
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)) or not patterns:
        raise ValueError(f"expected a non-empty list of path patterns, got {patterns!r}")
    for p in patterns:
        if not isinstance(p, str) or not p.strip("/"):
            raise ValueError(f"path pattern {p!r} is not a non-empty string")
    return tuple(patterns)


def matches(path: Sequence[Any], pattern: str) -> bool:
    """Whether `pattern` selects the parameter at `path` (whole path or a leading part)."""
    parts = path_name(path).split("/")
    pattern = pattern.strip("/")
    return any(fnmatch.fnmatchcase("/".join(parts[:n]), pattern) for n in range(1, len(parts) + 1))


def leaf_paths(tree: dict) -> list[Path]:
    """Every leaf's path in a pure-dict tree, in tree order."""
    import jax  # here, not at the top: the converters name parameters without loading JAX

    return [tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def select(tree: dict, patterns: Iterable[str]) -> tuple[dict, dict]:
    """(selected, rest): two pure-dict trees holding the leaves that some pattern selects and the
    others, each keeping only the branches it needs. ValueError names a pattern that selects
    nothing (a typo must not silently freeze or train the wrong parameters)."""
    import jax

    patterns = check_patterns(list(patterns))
    paths = leaf_paths(tree)
    for pattern in patterns:
        if not any(matches(p, pattern) for p in paths):
            groups = sorted({p[0] for p in paths})
            raise ValueError(f"path pattern {pattern!r} selects no parameter (the tree has "
                             f"{', '.join(groups)}; e.g. {path_name(paths[0])})")
    selected: dict = {}
    rest: dict = {}
    for path, leaf in zip(paths, jax.tree.leaves(tree)):
        target = selected if any(matches(path, p) for p in patterns) else rest
        node = target
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return selected, rest


def merge(*trees: dict) -> dict:
    """One pure-dict tree from disjoint ones (e.g. trainable and frozen parameters)."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            elif key in out:
                raise ValueError(f"parameter {key!r} is in two trees being merged")
            else:
                out[key] = value
    return out
