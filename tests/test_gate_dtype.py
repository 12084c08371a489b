"""Converting never changes a score: the gate's compute dtype follows ONE rule (config.json's
`gate_dtype`, else float16 as the released class builds it; never the stored tensors' dtype) in
the HF-directory loader, `from_hf`, `to_hf` and the exported PyTorch class.

Every combination of backbone dtype, stored gate dtype and config `gate_dtype` (absent or named)
is scored straight from the HF directory and from `from_hf` of it: equal bit for bit. The
PyTorch class on the source and on `to_hf(from_hf(source))` is equal bit for bit too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from urm_jax.config import DEFAULT_GATE_DTYPE, ModelConfig
from urm_jax.hf.export import to_hf
from urm_jax.hf.load import from_hf
from urm_jax.scoring import Scorer
from hf_fixtures import load_reference, make_tiny_urm, reference_outputs

SEQUENCES = [[1, 5, 9, 200, 17, 2], [1, 300, 301, 302, 303, 304, 305, 306, 3], [1, 44, 2]]
GATE_TENSORS = ("float32", "float16", "bfloat16")
CONFIG_GATE = (None, "float32", "float16", "bfloat16")  # None: config.json names no gate_dtype


def make_source(out: Path, backbone: str, gate_tensors: str, config_gate: str | None) -> Path:
    make_tiny_urm(out, hidden=32, intermediate=64, backbone_dtype=backbone, gate_dtype=gate_tensors,
                  seed=3)
    config = json.loads((out / "config.json").read_text())
    config.pop("gate_dtype", None)
    if config_gate is not None:
        config["gate_dtype"] = config_gate
    (out / "config.json").write_text(json.dumps(config))
    return out


def jax_scores(path: Path) -> dict[str, np.ndarray]:
    scores = Scorer(path, batch_size=4).score_ids(SEQUENCES)
    return {"reward": scores.reward, "means": scores.means, "log_stds": scores.log_stds,
            "gate": scores.gate}


def aligned(model):
    """The model with every parameter copied out of the safetensors mapping: torch's CPU matmuls
    round differently (1 ulp) depending on where a weight sits in the file, so bitwise
    comparisons of two files' models need the same (fresh, aligned) memory on both sides."""
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return model


@pytest.mark.parametrize("backbone", ["float32", "bfloat16"])
@pytest.mark.parametrize("gate_tensors", GATE_TENSORS)
def test_score_of_hf_dir_equals_score_of_its_conversion(tmp_path, backbone, gate_tensors):
    for config_gate in CONFIG_GATE:
        src = make_source(tmp_path / f"src-{config_gate}", backbone, gate_tensors, config_gate)
        rule = config_gate or DEFAULT_GATE_DTYPE
        assert ModelConfig.from_hf_dir(src).gate_dtype == rule
        ckpt = from_hf(src, tmp_path / f"ckpt-{config_gate}", progress=False)
        converted = json.loads((ckpt / "config.json").read_text())
        assert converted["gate_dtype"] == rule, "the converted checkpoint records the rule's dtype"
        direct, via = jax_scores(src), jax_scores(ckpt)
        for name in direct:
            assert np.array_equal(direct[name], via[name]), (
                f"{name}: HF dir and from_hf differ (gate tensors {gate_tensors}, config "
                f"gate_dtype {config_gate}): max |diff| {np.abs(direct[name] - via[name]).max()}")

        # ... and back: the PyTorch class scores the source and to_hf(from_hf(source)) the same.
        export = to_hf(ckpt, tmp_path / f"export-{config_gate}", progress=False)
        assert json.loads((export / "config.json").read_text())["gate_dtype"] == rule
        ids = torch.tensor([SEQUENCES[1]])
        ref_src, ref_export = aligned(load_reference(src)), aligned(load_reference(export))
        assert ref_src.weights.fc[0].weight.dtype == getattr(torch, rule)
        a, b = reference_outputs(ref_src, ids), reference_outputs(ref_export, ids)
        for name in a:
            assert np.array_equal(a[name], b[name]), (name, gate_tensors, config_gate)


def test_explicit_gate_dtype_is_recorded_and_used(tmp_path):
    """`--gate-dtype` is the one way to change the gate's compute dtype on conversion: the tensors
    are cast and the config says so; scoring the output runs the gate in it."""
    src = make_source(tmp_path / "src", "float32", "float32", None)
    ckpt = from_hf(src, tmp_path / "ckpt", gate_dtype="float32", progress=False)
    assert json.loads((ckpt / "config.json").read_text())["gate_dtype"] == "float32"
    scorer = Scorer(ckpt)
    assert scorer.model.options.dtypes.gate_dtype(scorer.cfg) == "float32"
    export = to_hf(ckpt, tmp_path / "export", gate_dtype="bfloat16", progress=False)
    assert json.loads((export / "config.json").read_text())["gate_dtype"] == "bfloat16"
