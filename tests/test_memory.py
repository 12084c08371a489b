"""`urm_jax.memory`: the per-device estimate behind configs/hardware/*.yaml. Parameter bytes come
from the real model's shapes, the fp32 AdamW floor matches the anchors (~128 GB for an 8B), FSDP
divides the static state by N, and every hardware recipe fits its chip with its header's numbers."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from urm_jax.config import ModelConfig
from urm_jax.cli import main as cli_main
from urm_jax.memory import CHIPS, COMPONENTS, GB, MARGIN, PLATFORMS, estimate, xla_bytes
from urm_jax.model.attention import resolve as resolve_attention
from urm_jax.model.urm import abstract_model
from urm_jax.sharding import resolve_mesh_shape as resolve_mesh
from urm_jax.train.config import config_from_dict, load_train_config, load_raw

# The layout the estimates below assume unless a test says otherwise: 16 packed rows, remat full,
# FSDP over every device (the stage-1 recipe's).
PLAN_DEFAULTS = {"global_batch_size": 16, "remat": "full", "mesh": (1, -1, 1)}
KEYS = {"param_dtype": "precision.param", "compute_dtype": "precision.compute", "seq_len": "data.seq_len"}


def Setup(**kw):
    """A TrainConfig for planning from short keyword names (param_dtype=..., seq_len=...)."""
    values = {**PLAN_DEFAULTS, **({"loss.kind": "bt"} if kw.get("stage") == 2 else {}), **kw}
    overrides = [f"{KEYS.get(k, k)}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                 for k, v in values.items()]
    return load_train_config(None, overrides, runnable=False)

ROOT = Path(__file__).resolve().parent.parent
HARDWARE = sorted((ROOT / "configs/hardware").glob("*.yaml"))
BASE = ROOT / "configs/train/stage1_helpsteer2.yaml"
REAL_PARAMS = 7_538_552_837
RESULTS = ROOT / "bench/tpu_plan_results.jsonl"  # the compiler's figures, written by bench/tpu_plan.py


@pytest.fixture(scope="module")
def cfg8b():
    return ModelConfig.from_hf_dict(json.loads((ROOT / "configs/model/urm-llama-3.1-8b.json").read_text()))


def test_parameter_count_is_the_real_models(cfg8b):
    counts = cfg8b.param_count()
    shapes = nnx.state(abstract_model(cfg8b)).to_pure_dict()
    from_shapes = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    est = estimate(cfg8b, Setup(mesh=(1, 1, 1)), num_devices=1)
    assert counts["total"] == from_shapes == est["param_count"] == REAL_PARAMS
    trainable = counts["backbone"] + counts["score"]  # stage 1: backbone + value head
    assert est["trainable_param_count"] == trainable
    assert est["params"] == 4 * trainable  # float32 master weights
    assert est["frozen_params"] == 4 * counts["gate"]  # gate_param float32, frozen in stage 1


def test_fp32_adamw_floor_matches_the_anchor(cfg8b):
    """anchors.md: ~128 GB for a full 8B AdamW fine-tune with fp32 weights and moments, before
    activations (16 bytes/param); bf16 weights (and so moments, optax follows the param dtype) halve it."""
    est = estimate(cfg8b, Setup(mesh=(1, 1, 1)), num_devices=1)
    floor = est["params"] + est["gradients"] + est["optimizer"]
    assert floor == 16 * est["trainable_param_count"]
    assert abs(floor - 128e9) / 128e9 < 0.10  # 120.1 GB: 7.5e9 parameters, not 8e9
    assert est["grad_accumulator"] == 0  # grad_accum 1
    bf16 = estimate(cfg8b, Setup(mesh=(1, 1, 1), param_dtype="bfloat16"), num_devices=1)
    assert bf16["params"] + bf16["gradients"] + bf16["optimizer"] == floor // 2


@pytest.mark.parametrize("n", [2, 4, 8, 16, 64, 256])
def test_static_state_scales_one_over_n_with_fsdp(cfg8b, n):
    one = estimate(cfg8b, Setup(mesh=(1, 1, 1)), num_devices=1)
    many = estimate(cfg8b, Setup(mesh=(1, -1, 1)), num_devices=n)
    assert many["mesh"] == (1, n, 1)
    # Exactly 1/N, except what the rules leave replicated: the RMSNorm weights (266,240 of the
    # 7.5e9 trainable parameters) and the gate's fc0/fc4 biases (4,101, frozen in stage 1).
    norms, gate_biases = 2 * 32 * 4096 + 4096, 4096 + 5
    replicated = {"params": 4 * norms, "gradients": 4 * norms, "optimizer": 8 * norms,
                  "frozen_params": 4 * gate_biases}
    for key, extra in replicated.items():
        assert many[key] * n - one[key] == (n - 1) * extra, key
    for key in ("params", "gradients", "optimizer"):
        assert many[key] * n == pytest.approx(one[key], rel=0.01), key


def test_activations_follow_rows_heads_and_remat(cfg8b):
    def est(**kw):
        return estimate(cfg8b, Setup(**{"mesh": (1, 8, 1), "attention": "reference", **kw}), num_devices=8)

    base = est(global_batch_size=16)  # 2 rows per device
    assert base["rows_per_device"] == 2
    half = est(global_batch_size=16, grad_accum=2)  # 1 row per device per micro-batch
    assert half["rows_per_device"] == 1
    assert half["activations_layer"] * 2 == base["activations_layer"]
    assert half["grad_accumulator"] == 2 * half["gradients"] > 0  # the running sum + its loop copy
    # The [B, H, L, L] scores dominate at L=4096: 7 bytes/element on TPU (as compiled), 17 on CPU.
    assert half["activations_layer"] >= 7 * 1 * 32 * 4096 ** 2
    cpu = estimate(cfg8b, Setup(mesh=(1, 8, 1), attention="reference", global_batch_size=16, grad_accum=2),
                   num_devices=8, platform="cpu")
    assert cpu["activations_layer"] - half["activations_layer"] == (17 - 7) * 32 * 4096 ** 2
    # Tensor parallelism splits heads and MLP, not the residual stream.
    tp = estimate(cfg8b, Setup(mesh=(1, 4, 2), global_batch_size=16, grad_accum=4, attention="reference"),
                  num_devices=8)
    assert tp["rows_per_device"] == 1
    assert tp["activations_layer"] < half["activations_layer"]
    assert tp["activations_residuals"] == half["activations_residuals"]
    # Saved per layer: full < dots < none; full keeps only the residual stream B·L·D per layer.
    full, dots, none = (est(global_batch_size=8, remat=r) for r in ("full", "dots", "none"))
    assert full["activations_residuals"] == 32 * 4096 * 4096 * 2
    assert full["activations_residuals"] < dots["activations_residuals"] < none["activations_residuals"]
    # Quadratic in the sequence length once the scores dominate.
    short = est(global_batch_size=8, seq_len=1024)
    assert 10 < full["activations_layer"] / short["activations_layer"] <= 16


def test_flash_attention_drops_the_scores(cfg8b):
    """splash (TPU) and cudnn (GPU) never hold the L x L scores; `auto` picks them per platform."""
    assert [resolve_attention("auto", p) for p in ("tpu", "gpu", "cpu")] == ["splash", "cudnn", "reference"]
    assert resolve_attention("xla", None) == "xla"
    with pytest.raises(ValueError, match="depends on the platform"):
        resolve_attention("auto", "quantum")
    setup = Setup(mesh=(1, 8, 1), global_batch_size=8)
    by_impl = {a: estimate(cfg8b, Setup(mesh=(1, 8, 1), global_batch_size=8, attention=a), num_devices=8)
               for a in ("reference", "xla", "splash", "cudnn")}
    assert estimate(cfg8b, setup, num_devices=8, platform="tpu")["attention"] == "splash"
    assert estimate(cfg8b, setup, num_devices=8, platform="gpu")["attention"] == "cudnn"
    scores = 32 * 4096 ** 2  # one row, 32 heads
    assert by_impl["reference"]["activations_layer"] == by_impl["xla"]["activations_layer"]
    assert by_impl["reference"]["activations_layer"] - by_impl["splash"]["activations_layer"] > 6 * scores
    assert by_impl["splash"]["activations_layer"] < 1.5e9  # per-token tensors only, 1 row of 4096
    assert by_impl["cudnn"]["activations_layer"] - by_impl["splash"]["activations_layer"] == 3 * 4096 ** 2  # mask
    for impl in by_impl.values():  # attention changes nothing else
        assert impl["activations_residuals"] == by_impl["splash"]["activations_residuals"]
        assert impl["static"] == by_impl["splash"]["static"]


def test_blockwise_attention_is_linear_in_the_length(cfg8b):
    """blockwise (any backend, `auto` on CPU for long rows) holds no L x L tensor: its attention
    working set grows with L, not L^2, and stays within a block pair of the flash kernels'."""
    assert resolve_attention("auto", "cpu", length=4096) == "blockwise"
    assert estimate(cfg8b, Setup(mesh=(1, 8, 1), global_batch_size=8), num_devices=8,
                    platform="cpu")["attention"] == "blockwise"
    layer = {n: estimate(cfg8b, Setup(mesh=(1, 8, 1), global_batch_size=8, seq_len=n, attention="blockwise"),
                         num_devices=8, platform="cpu")["activations_layer"] for n in (1024, 4096)}
    assert 3.5 < layer[4096] / layer[1024] < 4.5
    splash = estimate(cfg8b, Setup(mesh=(1, 8, 1), global_batch_size=8, attention="splash"), num_devices=8)
    assert 0 < layer[4096] - splash["activations_layer"] < 0.2 * splash["activations_layer"]


def test_stage2_trains_only_the_gate(cfg8b):
    counts = cfg8b.param_count()
    est = estimate(cfg8b, Setup(stage=2, param_dtype="bfloat16", global_batch_size=256, mesh=(-1, 1, 1)),
                   num_devices=8)
    assert est["trainable_param_count"] == counts["gate"]
    assert est["params"] == 4 * counts["gate"]  # replicated over data, float32 master weights
    assert est["optimizer"] == 2 * est["params"]
    assert est["frozen_params"] == 2 * (counts["backbone"] + counts["score"])  # bf16, replicated
    assert est["activations_residuals"] == 0  # no backward through the frozen backbone


def test_estimate_takes_a_train_config_and_a_mesh(cfg8b):
    train = load_train_config(BASE, runnable=False)
    from_cfg = estimate(cfg8b, train, num_devices=16)
    assert from_cfg["mesh"] == (1, 16, 1) and from_cfg["remat"] == "full"
    changed = load_train_config(BASE, ["remat=dots", "grad_accum=2"], runnable=False)
    explicit = estimate(cfg8b, changed, mesh_shape=(1, 8, 2), num_devices=16)
    assert explicit["mesh"] == (1, 8, 2) and explicit["remat"] == "dots"
    assert explicit["grad_accumulator"] > 0
    lora_like = load_train_config(BASE, ["trainable=[backbone/layers/q_proj, value_head]"], runnable=False)
    partial = estimate(cfg8b, lora_like, num_devices=16)
    assert partial["trainable_param_count"] == 32 * 4096 * 4096 + 10 * 4096  # q_proj + value head


def test_mesh_errors_are_clear():
    assert resolve_mesh((1, -1, 2), 16) == (1, 8, 2)
    with pytest.raises(ValueError, match="give the number of devices"):
        resolve_mesh((1, -1, 1), None)
    with pytest.raises(ValueError, match="needs 8 devices, 4 available"):
        resolve_mesh((1, 8, 1), 4)
    with pytest.raises(ValueError, match="does not divide"):
        resolve_mesh((1, -1, 3), 8)


def parse_header(text: str) -> tuple[str, int, dict[str, float]]:
    """(chip, devices, {component: GB}) from the comment block `urm-jax memory --header` wrote
    at the top of a hardware recipe."""
    command = re.search(r"estimated by `urm-jax memory \S+ --chip (\S+) --devices (\d+)", text)
    assert command, "no memory header (regenerate it with urm-jax memory CONFIG --chip C --header)"
    keys = {key for key, _ in COMPONENTS} | {"total"}
    numbers = {m[1]: float(m[2]) for m in re.finditer(r"^#\s+(\w+)\s+([0-9.]+) GB", text, re.M) if m[1] in keys}
    return command[1], int(command[2]), numbers


COMPILED = re.compile(r"^#\s+(train step|feature pass)\s+arguments ([0-9.]+)\s+outputs ([0-9.]+)\s+"
                      r"aliases ([0-9.]+)\s+temporaries ([0-9.]+)\s+total ([0-9.]+) GB$", re.M)


def parse_compiled(text: str) -> tuple[str, dict[str, dict[str, float]]]:
    """(topology, {program: {arguments, outputs, aliases, temporaries, total}}) from the block
    `urm-jax plan --header` (or bench/tpu_plan.py --header) wrote."""
    topology = re.search(r"^# Compiled for (\S+) \(", text, re.M)
    assert topology, "no compiled header (urm-jax plan CONFIG --header)"
    names = ("arguments", "outputs", "aliases", "temporaries", "total")
    return topology[1], {m[1]: dict(zip(names, map(float, m.groups()[1:]))) for m in COMPILED.finditer(text)}


def test_every_hardware_config_is_listed():
    names = {p.stem for p in HARDWARE}
    assert {"v5p-8", "v5p-32", "v6e-8", "v6e-64", "v5e-16", "h100x8"} <= names


@pytest.mark.parametrize("path", HARDWARE, ids=lambda p: p.stem)
def test_hardware_config_fits_its_chip_as_its_header_says(path, cfg8b):
    train = load_train_config(path, runnable=False)
    chip, devices, header = parse_header(path.read_text())
    assert chip in CHIPS
    # The recipe is the base recipe's optimisation, only laid out differently.
    base = load_train_config(BASE, runnable=False)
    for key in ("stage", "data", "optim", "loss", "global_batch_size", "epochs"):
        assert getattr(train, key) == getattr(base, key), key
    assert train.precision.param == "float32" and train.precision.compute == "bfloat16"
    # An explicit mesh for exactly this many devices; micro-batches split evenly over batch shards.
    assert -1 not in train.mesh and math.prod(train.mesh) == devices
    data, fsdp, _ = train.mesh
    assert train.micro_batch_size % (data * fsdp) == 0, "micro-batch does not split over data x fsdp"
    if path.stem.startswith("v5p"):
        assert devices == int(path.stem.split("-")[1]) // 2  # v5p-N counts TensorCores: N/2 chips
    elif path.stem.startswith(("v6e", "v5e")):
        assert devices == int(path.stem.split("-")[1])

    est = estimate(cfg8b, train, num_devices=devices, platform=PLATFORMS[chip])
    assert est["param_count"] == REAL_PARAMS
    assert est["attention"] in ("splash", "cudnn")  # attention: auto on a TPU / GPU
    for key, _ in COMPONENTS:
        assert header[key] == pytest.approx(est[key] / GB, abs=0.006), f"{key}: header is stale"
    assert header["total"] == pytest.approx(est["total"] / GB, abs=0.006), "total: header is stale"
    assert est["total"] <= (1 - MARGIN) * CHIPS[chip], f"{est['total'] / GB:.1f} GB leaves < 10% of {chip}"


def plan_records() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", HARDWARE, ids=lambda p: p.stem)
def test_hardware_config_header_holds_the_compiled_figures(path, cfg8b):
    """Each recipe's header carries what the compiler assigned per chip for its topology (the
    latest full-depth record in bench/tpu_plan_results.jsonl of a case that resolves to exactly
    this recipe's config), that leaves >= 10% of HBM free, and the calibrated estimate is within
    10% of it."""
    text = path.read_text()
    train = load_train_config(path, runnable=False)
    topology, compiled = parse_compiled(text)
    assert topology == train.plan.topology
    same = [r for r in plan_records() if r["layers"] == 32 and r["topology"] == topology
            and config_from_dict(r["config"]) == train]
    assert same, f"no compiled record of this recipe's layout: bench/tpu_plan.py --case configs/hardware/{path.name}"
    record = same[-1]
    for program in record["programs"]:
        for key, value in compiled[program["name"]].items():
            assert value == pytest.approx(program[key] / GB, abs=0.006), f"{program['name']} {key}: header differs from the record"
    peak = max(p["total"] for p in record["programs"])
    chip = record["chip"]
    assert peak <= (1 - MARGIN) * CHIPS[chip], f"compiled {peak / GB:.1f} GB leaves < 10% of {chip}"
    est = estimate(cfg8b, train, num_devices=record["chips"], platform=PLATFORMS[chip])["total"]
    assert abs(est - peak) <= 0.10 * peak, f"estimate {est / GB:.2f} GB vs compiled {peak / GB:.2f} GB"


def test_estimate_is_within_10_percent_of_every_compiled_layout(cfg8b):
    """Calibration: every full-depth 8B compile recorded by bench/tpu_plan.py (recipes and their
    variants: remat none/dots/full, 1/2/4 rows per chip, splash and reference attention, TPU and
    GPU) is matched by the estimate within 10%."""
    checked = 0
    for r in plan_records():
        if r["layers"] != cfg8b.num_layers or r["stage"] != 1:
            continue
        train = config_from_dict(r["config"])  # as compiled, whatever the recipe file says now
        est = estimate(cfg8b, train, mesh_shape=tuple(r["mesh"]), num_devices=r["chips"],
                       platform=PLATFORMS[r["chip"]])
        assert est["attention"] == r["attention"]
        if any("refused" in p for p in r["programs"]):  # the compiler said it cannot fit: so must the estimate
            assert est["total"] > (1 - MARGIN) * CHIPS[r["chip"]], r["case"]
            continue
        peak = max(p["total"] for p in r["programs"])
        assert abs(est["total"] - peak) <= 0.10 * peak, (r["case"], est["total"] / GB, peak / GB)
        checked += 1
    assert checked >= 8, checked


def test_cli_prints_the_table_and_fails_clearly(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)

    def cli(*args):  # `urm-jax memory ARGS`, in process
        code = cli_main(["memory", *args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    module = subprocess.run([sys.executable, "-m", "urm_jax.cli", "memory", "configs/hardware/v5p-8.yaml",
                             "--chip", "v5p"], cwd=ROOT, capture_output=True, text=True)
    assert module.returncode == 0 and "of 95.00 GB (v5p)" in module.stdout, module.stderr

    done = cli("configs/hardware/v6e-8.yaml", "--chip", "v6e")
    assert done.returncode == 0, done.stderr
    assert "mesh data=1 fsdp=8 tensor=1, remat full, splash attention" in done.stdout
    assert re.search(r"total\s+[0-9.]+ GB\s+of 32\.00 GB \(v6e\), \d+% free", done.stdout)
    for key, _ in COMPONENTS:
        assert re.search(rf"^\s+{key}\s+[0-9.]+ GB", done.stdout, re.M), key
    header = cli("configs/train/stage1_helpsteer2.yaml", "grad_accum=2", "--devices", "8", "--header")
    assert header.returncode == 0, header.stderr
    assert all(line.startswith("#") for line in header.stdout.splitlines())
    assert "grad_accum=2 --devices 8`" in header.stdout
    needs_devices = cli("configs/train/stage1_helpsteer2.yaml")
    assert needs_devices.returncode == 2 and "give the number of devices" in needs_devices.stderr
    typo = cli("configs/hardware/v5p-8.yaml", "optim.learning_rat=1")
    assert typo.returncode == 2 and "optim.learning_rate" in typo.stderr
    too_big = cli("configs/train/stage1_helpsteer2.yaml", "--devices", "1", "--chip", "h100")
    assert too_big.returncode == 1 and "exceeds" in too_big.stderr
    unfused = cli("configs/hardware/v6e-8.yaml", "attention=reference", "--chip", "v6e")  # overrides anywhere
    assert unfused.returncode == 1 and "reference attention" in unfused.stdout
    gpu = cli("configs/hardware/v6e-8.yaml", "--platform", "gpu")
    assert gpu.returncode == 0 and "cudnn attention" in gpu.stdout


def test_estimate_tracks_xla_buffer_assignment():
    """The real stage-1 step compiled for 8 CPU devices (conftest) on a small model whose attention
    scores dominate: XLA's peak stays within the estimate's reach (it is meant as an upper bound)."""
    hf = json.loads((ROOT / "configs/model/urm-llama-3.1-8b.json").read_text())
    hf.update(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=2,
              head_dim=64, num_hidden_layers=2, vocab_size=1000, pad_token_id=999)
    cfg = ModelConfig.from_hf_dict(hf)
    setup = Setup(global_batch_size=8, seq_len=1024, remat="full", mesh=(1, len(jax.devices()), 1),
                  attention="reference")
    measured = xla_bytes(cfg, setup, setup.mesh)  # reference attention: what runs on CPU
    est = estimate(cfg, setup, num_devices=len(jax.devices()), platform="cpu")["total"]
    assert 0.6 * est <= measured <= 1.2 * est, (measured / GB, est / GB)


def test_raw_hardware_configs_extend_the_base_recipe():
    for path in HARDWARE:
        text = path.read_text()
        assert re.search(r"^base: \.\./train/stage1_helpsteer2\.yaml$", text, re.M), path.name
        raw = load_raw(path)
        assert raw["data"]["seq_len"] == 4096
