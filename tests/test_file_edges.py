"""File-handling edges found by review 10a: the demo's workdir never swallows what it reads,
corrupt training steps, checkpoint provenance fields, ensembles of mismatched attribute sets,
non-finite ids, outputs of the wrong kind, stale temporaries, and one-line usage errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from urm_jax import demo as demo_module
from urm_jax.cli import main as cli_main
from refusals import refused


# ---------------------------------------------------------------------------------------------
# the demo's workdir


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    """A checkout-shaped tree the demo is made to believe it reads (package, configs/, data/),
    with the current directory and $HOME inside it: a refusal that failed would empty only
    this copy."""
    root = tmp_path / "co"
    for sub in ("urm_jax", "configs/train", "data/samples"):
        (root / sub).mkdir(parents=True)
        (root / sub / "keep.txt").write_text(sub)
    monkeypatch.setattr(demo_module, "PACKAGE", root / "urm_jax")
    monkeypatch.setattr(demo_module, "CONFIGS", root / "configs" / "train")
    monkeypatch.setattr(demo_module, "SAMPLES", root / "data" / "samples")
    home = tmp_path / "home"
    (home / "cwd").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "cwd")
    return root


@pytest.mark.parametrize("workdir, needle", [
    ("co", "contains the input the urm_jax package"), ("", "contains the input"),
    ("co/data", "is the input the data directory"), ("co/data/samples", "is inside the input the data"),
    ("co/configs", "is the input the configs"), ("co/urm_jax/sub", "is inside the input the urm_jax"),
    ("home/cwd", "is the current directory"), ("home", "contains the current directory"),
])
def test_demo_workdir_never_holds_what_it_reads(capsys, fake_checkout, workdir, needle):
    tmp = fake_checkout.parent
    refused(capsys, cli_main, ["demo", "--workdir", tmp / workdir, "--overwrite"], "--workdir", needle,
            keep=[fake_checkout, tmp / "home"])


def test_demo_workdir_dot_and_root(capsys, fake_checkout):
    refused(capsys, cli_main, ["demo", "--workdir", ".", "--overwrite"], "is the current directory")
    refused(capsys, cli_main, ["demo", "--workdir", "/", "--overwrite"], "--workdir /")


def test_demo_mark_counts_only_where_it_was_made(fake_checkout, tmp_path):
    made = tmp_path / "made"
    demo_module.fresh_workdir(made, overwrite=False)
    mark = json.loads((made / demo_module.DEMO_MARK).read_text())
    assert mark["workdir"] == os.path.realpath(made)
    (made / "result.txt").write_text("x")
    demo_module.fresh_workdir(made, overwrite=False)  # its own mark: emptied without --overwrite
    assert not (made / "result.txt").exists()
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "thesis.tex").write_text("years of work")
    (forged / demo_module.DEMO_MARK).write_bytes((made / demo_module.DEMO_MARK).read_bytes())
    with pytest.raises(FileExistsError, match="already exists"):
        demo_module.fresh_workdir(forged, overwrite=False)
    assert (forged / "thesis.tex").read_text() == "years of work"
