"""What published files may say about where a model came from: no local paths.

A checkpoint's config.json travels: `convert to_hf` copies it into the directory people upload,
and its model card quotes it. So the provenance urm-jax records there names a local input by
its base name plus a content hash (`local_source`), a base model by its Hub id when one is known
(else its directory's base name, marked local), and never an absolute path; full paths stay in
run-local files (a run directory's config.yaml). `publishable` applies the same rule to the
records an older urm-jax wrote with full paths, when `to_hf` exports them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

HASH_BLOCK = 1 << 20  # bytes read at a time when hashing a data file


def sha256_of(path: Path) -> str:
    """sha256 (hex) of a file's bytes, or of a directory's files (relative name and bytes, in
    sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def local_source(source: str) -> dict[str, Any]:
    """How a data source is published: a local file or directory as {"name": its base name,
    "sha256": its content hash, "local": true}; anything else (a Hub dataset id) as {"name": source}."""
    path = Path(source)
    if path.exists():
        return {"name": path.name, "sha256": sha256_of(path), "local": True}
    return {"name": source}


def base_name(path: str | Path) -> str:
    """The last component of a local path (`/tmp/x/bases/stied` -> `stied`)."""
    return Path(str(path)).name


def _is_local_path(value: Any) -> bool:
    # A Hub id has one slash (org/name); a local path is absolute, relative-marked or deeper.
    return isinstance(value, str) and (value.startswith(("/", "~", ".", "\\"))
                                       or value.count("/") >= 2
                                       or (len(value) > 2 and value[1:3] in (":\\", ":/")))


def publishable(hf: dict, *, base_model: str | None = None) -> dict:
    """config.json's provenance with no local paths: `urm_jax_init.base` becomes `base_model`
    (the Hub id, when given or recorded) or the directory's base name with `base_is_local`;
    each `urm_jax_training` record's `run_dir` is dropped and a `data` path becomes its base
    name. Returns a new dict; other fields are untouched."""
    out = dict(hf)
    init = dict(out.get("urm_jax_init") or {})
    if init:
        hub = base_model or init.get("base_model")
        if hub:
            init.update(base=hub, base_model=hub, base_is_local=False)
        elif _is_local_path(init.get("base")):
            init.update(base=base_name(init["base"]), base_is_local=True)
        out["urm_jax_init"] = init
    records = []
    for record in out.get("urm_jax_training") or []:
        record = {k: v for k, v in record.items() if k != "run_dir"}
        if _is_local_path(record.get("data")):
            record["data"] = base_name(record["data"])
        records.append(record)
    if "urm_jax_training" in out:
        out["urm_jax_training"] = records
    return out
