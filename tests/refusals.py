"""The shape every test of a bad input checks: one `error:` line naming the culprit, exit 2, no
traceback, nothing half-written left behind and nothing that was there before changed."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(path: Path):
    """The bytes of a file, or {relative path: bytes} of a directory (None if absent)."""
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return None


def leftovers(path: Path) -> list[Path]:
    """Temporary siblings (`.NAME.tmp-*`, `.NAME.old-*`) of an output."""
    return sorted(Path(path).parent.glob(f".{Path(path).name}.*"))


def refused(capsys, main, argv, *needles, keep=(), absent=(), code=2) -> str:
    """Run a command expecting a refusal: exit `code` (2: bad input; 130: Ctrl-C), exactly one `error:` line holding every needle
    and no traceback; every path in `keep` is byte for byte what it was, every path in `absent`
    does not exist, and no temporary sibling of either is left."""
    before = {Path(p): snapshot(p) for p in keep}
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, f"exit code {rc}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    for path, content in before.items():
        assert snapshot(path) == content, f"{path} changed"
    for path in [*keep, *absent]:
        assert leftovers(path) == [], leftovers(path)
    for path in absent:
        assert not os.path.lexists(path), f"{path} left behind"
    return lines[0]
