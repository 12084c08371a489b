"""FLOP calculator against the anchor numbers, and the metrics writer / plot / throughput helpers."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from urm_jax import flops
from urm_jax.attributes import HELPSTEER2 as ATTRIBUTES
from urm_jax.config import ModelConfig
from urm_jax.train.metrics import MetricsWriter, Throughput, plot_metrics, read_metrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "model"


@pytest.fixture(scope="module")
def cfg_8b():
    return ModelConfig.from_hf_dict(json.loads((CONFIGS / "urm-llama-3.1-8b.json").read_text()))


# --- FLOPs -----------------------------------------------------------------------------------

def test_8b_flops_match_anchors(cfg_8b):
    n = flops.matmul_params(cfg_8b)
    # Per layer: q 4096², k,v 4096·1024 each (GQA), o 4096², MLP 3·4096·14336.
    assert n == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    # The backbone minus embedding and norms: N_matmul is the per-token part of the 8B count.
    pc = cfg_8b.param_count()
    assert n < pc["backbone"] - cfg_8b.vocab_size * cfg_8b.hidden_size
    assert 6 * n / 1e9 == pytest.approx(41.9, rel=0.02)

    per_token = flops.train_flops_per_token(cfg_8b, 4096)
    assert per_token == pytest.approx(6 * n + 6 * 32 * 4096 * 32 * 128)
    assert 989e12 / per_token == pytest.approx(21.9e3, rel=0.02)  # H100, 100% MFU
    assert 459e12 / per_token == pytest.approx(10.2e3, rel=0.02)  # v5p chip
    assert flops.PEAK_TFLOPS["H100"] * 1e12 / per_token == pytest.approx(21.9e3, rel=0.02)
    assert flops.PEAK_TFLOPS["TPU v5p"] * 1e12 / per_token == pytest.approx(10.2e3, rel=0.02)

    assert flops.forward_flops(cfg_8b, [4096, 17]) == pytest.approx(flops.train_flops(cfg_8b, [4096, 17]) / 3)


def test_attention_term_scales_with_sum_of_squared_lengths(cfg_8b):
    dense = 6 * flops.matmul_params(cfg_8b) * 200
    packed = flops.train_flops(cfg_8b, [100, 100]) - dense
    single = flops.train_flops(cfg_8b, [200]) - dense
    # Same tokens, same matmul work; two packed segments of 100 attend over half the pairs.
    assert packed == pytest.approx(single / 2)
    assert packed == pytest.approx(6 * 32 * 32 * 128 * (100**2 + 100**2))
    assert flops.train_flops(cfg_8b, []) == 0


class _FakeDevice:
    def __init__(self, kind, platform="gpu"):
        self.device_kind, self.platform = kind, platform


@pytest.mark.parametrize("kind, tflops", [
    ("TPU v5p", 459), ("TPU v5 lite", 197), ("TPU v6 lite", 918), ("TPU v5e", 197),
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("Some future chip", None),
])
def test_peak_flops_lookup(kind, tflops, monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV_VAR, raising=False)
    peak = flops.peak_flops_per_device(_FakeDevice(kind, "tpu" if "TPU" in kind else "gpu"))
    assert peak == (None if tflops is None else tflops * 1e12)


def test_peak_flops_cpu_and_override(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV_VAR, raising=False)
    assert flops.peak_flops_per_device(_FakeDevice("cpu", "cpu")) is None
    monkeypatch.setenv(flops.PEAK_ENV_VAR, "100")
    assert flops.peak_flops_per_device(_FakeDevice("cpu", "cpu")) == 100e12


def test_mfu():
    assert flops.mfu(989e12, 1.0, 1, 989e12) == pytest.approx(1.0)
    assert flops.mfu(4 * 459e12, 2.0, 4, 459e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, 1.0, 1, None) is None
    assert flops.mfu(1e12, 0.0, 1, 1e12) is None


# --- metrics writer --------------------------------------------------------------------------

def test_jsonl_round_trip_and_key_names(tmp_path):
    import jax.numpy as jnp

    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"loss": jnp.float32(0.5), "learning_rate": np.float64(1e-6), "count": 8,
                    "mse_per_attribute": jnp.arange(5, dtype=jnp.float32), "pair": np.array([1.0, 2.0])})
        w.write(2, {"loss": 0.25})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    first = records[0]
    assert first["loss"] == 0.5 and first["learning_rate"] == 1e-6 and first["count"] == 8.0
    for i, attr in enumerate(ATTRIBUTES):
        assert first[f"mse_per_attribute/{attr}"] == float(i)
    assert first["pair/0"] == 1.0 and first["pair/1"] == 2.0
    assert "mse_per_attribute" not in first and isinstance(first["time"], float)


def test_truncate_after_drops_later_steps(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        w.write(step, {"loss": float(step)})
    # A crash mid-write leaves a torn line; it must not break the resume.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    w.truncate_after(3)
    w.write(4, {"loss": 40.0})
    w.close()
    records = list(read_metrics(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert not list(tmp_path.glob(".*tmp"))  # the atomic rewrite left no temp file


def test_disabled_writer_is_a_no_op(tmp_path):
    out = tmp_path / "run"
    w = MetricsWriter(out, enabled=False)
    assert w.write(1, {"loss": 1.0}) == {}
    w.truncate_after(0)
    w.close()
    assert not out.exists()


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read scalars from TFRecord event files: [len u64][crc u32][data][crc u32] per record."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_event_file_has_scalars(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(3, {"loss": 0.75, "mse_per_attribute": np.full(5, 2.0)})
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0
    scalars = _tb_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(3, 0.75)]
    assert scalars["mse_per_attribute/verbosity"] == [(3, 2.0)]


def test_plot_is_a_png(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 11):
            w.write(step, {"loss": 1.0 / step, "learning_rate": 1e-6 * step, "accuracy": 0.5 + step / 40})
            if step % 5 == 0:
                w.write(step, {"eval/loss": 1.2 / step})
    png = tmp_path / "plots" / "metrics.png"
    plot_metrics(tmp_path / "metrics.jsonl", png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # An empty log still produces a (placeholder) plot rather than failing.
    plot_metrics(tmp_path / "missing.jsonl", tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_skips_compile_step_and_windows():
    t = Throughput(window=2)
    assert t.tokens_per_second() is None
    t.record(30.0, 1000, flops=1e15)  # compile step: ignored
    assert t.tokens_per_second() is None
    t.record(1.0, 1000, flops=2e12)
    t.record(1.0, 3000, flops=2e12)
    assert t.tokens_per_second() == pytest.approx(2000)
    t.record(2.0, 2000, flops=2e12)  # window of 2: the first timed step drops out
    assert t.tokens_per_second() == pytest.approx(5000 / 3)
    assert t.flops_per_second() == pytest.approx(4e12 / 3)
    assert t.mfu(num_devices=2, peak_per_device=1e12) == pytest.approx(4e12 / 3 / 2e12)
