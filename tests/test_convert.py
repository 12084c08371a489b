"""`python -m convert from_hf | to_hf`: bit-exact round trips, loadable exports, dtype options and
clear refusals of bad input that leave no output behind.

The CLI runs in-process through `convert.__main__.main` (one subprocess run proves the real entry
point); every checkpoint is a tiny random URM (hidden 64, 2 layers, vocab 512) built here.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForSequenceClassification

from urm_jax import io_utils
from convert.__main__ import main
from hf_fixtures import load_reference, make_tiny_urm, reference_outputs

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = "LlamaForSequenceClassificationWithNormal_Weights"
AUTO_MAP = {"AutoModelForSequenceClassification": f"modeling_custom.{ARCHITECTURE}"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
GATE_PREFIX = "weights.fc."
VOCAB, PAD = 512, 511


# ---------------------------------------------------------------------------------------------
# helpers


def run_ok(*argv: str) -> None:
    assert main([*argv]) == 0, f"convert {' '.join(argv)} failed"


def temp_siblings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def run_err(capsys, argv: list[str], out: Path, *needles: str, out_existed: bool = False) -> str:
    """Run the CLI expecting a refusal: exit 2, exactly one `error:` line naming `needles`, no
    traceback, and no OUT_DIR (unless it existed before) or temporary sibling left behind."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert out.exists() == out_existed, f"{out} {'vanished' if out_existed else 'left behind'}"
    assert temp_siblings(out) == [], temp_siblings(out)
    return lines[0]


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF dir (single file or sharded), keyed by name; fails on a duplicate."""
    index = directory / INDEX
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else [SINGLE])
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        with safe_open(str(directory / name), framework="numpy") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} twice"
                tensors[key] = f.get_tensor(key)
    return tensors


def raw(array: np.ndarray) -> np.ndarray:
    """The bits of a tensor, so NaN payloads and -0.0 compare exactly too."""
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize])


def assert_bit_exact(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, (key, a[key].dtype, b[key].dtype)
        assert a[key].shape == b[key].shape, (key, a[key].shape, b[key].shape)
        assert np.array_equal(raw(a[key]), raw(b[key])), f"{key} differs"


def dtypes_of(tensors: dict[str, np.ndarray]) -> tuple[set[str], set[str]]:
    backbone = {t.dtype.name for k, t in tensors.items() if not k.startswith(GATE_PREFIX)}
    gate = {t.dtype.name for k, t in tensors.items() if k.startswith(GATE_PREFIX)}
    return backbone, gate


def round_trip(src: Path, work: Path, *to_hf_args: str) -> Path:
    ckpt, out = work / "ckpt", work / "hf"
    run_ok("from_hf", str(src), str(ckpt))
    run_ok("to_hf", str(ckpt), str(out), *to_hf_args)
    return out


def inputs():
    """Left-padded batch with rows longer than the RoPE original_max_position_embeddings (32)."""
    gen = np.random.default_rng(7)
    lengths = [45, 20, 33]
    ids = np.full((len(lengths), max(lengths)), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = gen.integers(4, VOCAB - 1, n)
        mask[row, -n:] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


# ---------------------------------------------------------------------------------------------
# shared checkpoints (built once per module)


@pytest.fixture(scope="module")
def bf16_src(tmp_path_factory):
    return make_tiny_urm(tmp_path_factory.mktemp("bf16_src"), backbone_dtype="bfloat16",
                         gate_dtype="float16", seed=1)


@pytest.fixture(scope="module")
def bf16_ckpt(bf16_src, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("bf16") / "ckpt"
    run_ok("from_hf", str(bf16_src), str(ckpt))
    return ckpt


@pytest.fixture(scope="module")
def bf16_export(bf16_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_export") / "hf"
    run_ok("to_hf", str(bf16_ckpt), str(out))
    return out


@pytest.fixture(scope="module")
def fp32_src(tmp_path_factory):
    return make_tiny_urm(tmp_path_factory.mktemp("fp32_src"), seed=2)


@pytest.fixture(scope="module")
def fp32_ckpt(fp32_src, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("fp32") / "ckpt"
    run_ok("from_hf", str(fp32_src), str(ckpt))
    return ckpt


@pytest.fixture(scope="module")
def sharded_src(tmp_path_factory):
    src = make_tiny_urm(tmp_path_factory.mktemp("sharded_src"), seed=2, max_shard_size="20KB")
    assert (src / INDEX).is_file() and not (src / SINGLE).exists()
    assert len(set(json.loads((src / INDEX).read_text())["weight_map"].values())) > 2
    return src


# ---------------------------------------------------------------------------------------------
# 1. bit-exact round trips


def test_round_trip_bf16_backbone_fp16_gate_is_bit_exact(bf16_src, bf16_export):
    src, out = read_tensors(bf16_src), read_tensors(bf16_export)
    assert dtypes_of(src) == ({"bfloat16"}, {"float16"})
    assert_bit_exact(src, out)
    assert (bf16_export / SINGLE).is_file() and not (bf16_export / INDEX).exists()


def test_round_trip_fp32_is_bit_exact(fp32_src, fp32_ckpt, tmp_path):
    out = tmp_path / "hf"
    run_ok("to_hf", str(fp32_ckpt), str(out))
    src = read_tensors(fp32_src)
    assert dtypes_of(src) == ({"float32"}, {"float16"})
    assert_bit_exact(src, read_tensors(out))
    # The JAX checkpoint records what it stores.
    marker = json.loads((fp32_ckpt / "urm_jax.json").read_text())
    assert marker["format"] == "urm-jax" and marker["layout_version"] == 1
    assert json.loads((fp32_ckpt / "config.json").read_text())["dtype"] == "float32"


def test_round_trip_from_sharded_source(sharded_src, fp32_src, tmp_path):
    out = round_trip(sharded_src, tmp_path)
    tensors = read_tensors(out)
    assert_bit_exact(read_tensors(sharded_src), tensors)
    assert_bit_exact(read_tensors(fp32_src), tensors)  # same seed: sharding changes nothing


def test_sharded_export_index_is_consistent(bf16_src, bf16_ckpt, tmp_path):
    out = tmp_path / "hf"
    run_ok("to_hf", str(bf16_ckpt), str(out), "--max-shard-size", "20KB")
    assert not (out / SINGLE).exists()
    index = json.loads((out / INDEX).read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    total = 0
    for shard in shards:
        assert (out / shard).is_file()
        with safe_open(str(out / shard), framework="numpy") as f:
            held = set(f.keys())
            assert held == {k for k, v in weight_map.items() if v == shard}
            sizes = [f.get_tensor(k).nbytes for k in held]
        # greedy packing: a shard over the limit holds exactly one (oversized) tensor
        assert sum(sizes) <= 20_000 or len(sizes) == 1, (shard, sizes)
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    tensors = read_tensors(out)
    assert total == sum(t.nbytes for t in tensors.values())
    assert_bit_exact(read_tensors(bf16_src), tensors)

    # and the sharded export is itself a valid source
    back = tmp_path / "back"
    run_ok("from_hf", str(out), str(tmp_path / "ckpt2"))
    run_ok("to_hf", str(tmp_path / "ckpt2"), str(back))
    assert_bit_exact(tensors, read_tensors(back))


# ---------------------------------------------------------------------------------------------
# 2. the export loads with trust_remote_code and gives the reference's numbers


def test_export_loads_with_remote_code_and_matches_reference(bf16_src, bf16_export):
    cfg = json.loads((bf16_export / "config.json").read_text())
    src_cfg = json.loads((bf16_src / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE]
    assert cfg["auto_map"] == AUTO_MAP
    assert cfg["gate_dtype"] == "float16" and cfg["dtype"] == "bfloat16"
    assert cfg["rope_parameters"] == src_cfg["rope_parameters"]
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["rope_theta"] == src_cfg["rope_parameters"]["rope_theta"]
    assert cfg["rope_scaling"] == {k: v for k, v in src_cfg["rope_parameters"].items()
                                   if k != "rope_theta"}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "pad_token_id", "bos_token_id", "eos_token_id",
                "max_position_embeddings", "rms_norm_eps"):
        assert cfg[key] == src_cfg[key], key
    assert (bf16_export / "modeling_custom.py").read_bytes() == (
        bf16_src / "modeling_custom.py").read_bytes()

    ref = load_reference(bf16_src)
    auto = AutoModelForSequenceClassification.from_pretrained(bf16_export, trust_remote_code=True).eval()
    assert type(auto).__name__ == ARCHITECTURE
    assert type(auto).__module__.startswith("transformers_modules.")  # the shipped file
    assert auto.model.embed_tokens.weight.dtype == torch.bfloat16
    assert auto.score.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float16 for p in auto.weights.parameters())
    ids, mask = inputs()
    want, got = reference_outputs(ref, ids, mask), reference_outputs(auto, ids, mask)
    assert sorted(got) == ["gate", "log_stds", "means", "reward"]
    for key in want:
        assert np.isfinite(want[key]).all()
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# 3. dtype options of to_hf


def test_to_hf_dtype_bfloat16_casts_backbone_keeps_gate(fp32_src, fp32_ckpt, tmp_path):
    out = tmp_path / "hf"
    run_ok("to_hf", str(fp32_ckpt), str(out), "--dtype", "bfloat16")
    src, got = read_tensors(fp32_src), read_tensors(out)
    assert sorted(got) == sorted(src)
    assert dtypes_of(got) == ({"bfloat16"}, {"float16"})
    for key, tensor in got.items():
        want = src[key] if key.startswith(GATE_PREFIX) else src[key].astype(tensor.dtype)
        assert np.array_equal(raw(tensor), raw(want)), key  # round-to-nearest-even, like torch
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["gate_dtype"] == "float16"


def test_to_hf_gate_dtype_float32_changes_only_the_gate(bf16_src, bf16_ckpt, tmp_path):
    out = tmp_path / "hf"
    run_ok("to_hf", str(bf16_ckpt), str(out), "--gate-dtype", "float32")
    src, got = read_tensors(bf16_src), read_tensors(out)
    assert sorted(got) == sorted(src)
    assert dtypes_of(got) == ({"bfloat16"}, {"float32"})
    for key, tensor in got.items():
        if key.startswith(GATE_PREFIX):
            np.testing.assert_array_equal(tensor, src[key].astype(np.float32), err_msg=key)
        else:
            assert np.array_equal(raw(tensor), raw(src[key])), key
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gate_dtype"] == "float32" and cfg["dtype"] == "bfloat16"

    auto = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert all(p.dtype == torch.float32 for p in auto.weights.parameters())
    assert auto.model.embed_tokens.weight.dtype == torch.bfloat16
    # Same numbers as the reference with its fp16 gate weights upcast to fp32 (an exact cast).
    ref = load_reference(bf16_src)
    ref.weights.to(torch.float32)
    ids, mask = inputs()
    want, got = reference_outputs(ref, ids, mask), reference_outputs(auto, ids, mask)
    for key in want:
        assert np.isfinite(got[key]).all()
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ---------------------------------------------------------------------------------------------
# 4. a transformers-4 style config, through the real entry point


def test_v4_config_round_trip_via_subprocess(tmp_path):
    src = make_tiny_urm(tmp_path / "v4", config_style="v4", backbone_dtype="bfloat16", seed=4)
    src_cfg = json.loads((src / "config.json").read_text())
    assert "rope_parameters" not in src_cfg and src_cfg["rope_scaling"]["rope_type"] == "llama3"
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "convert", "from_hf", str(src), str(ckpt)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {ckpt}" in proc.stdout
    run_ok("to_hf", str(ckpt), str(out))
    assert_bit_exact(read_tensors(src), read_tensors(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == src_cfg["rope_theta"]
    assert cfg["rope_parameters"] == {"rope_theta": src_cfg["rope_theta"],
                                      **{k: v for k, v in src_cfg["rope_scaling"].items() if k != "type"}}
    assert cfg["gate_dtype"] == "float16" and cfg["dtype"] == "bfloat16"

    # errors through the real entry point: exit 2, one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "convert", "to_hf", str(src), str(tmp_path / "x")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_conversions_load_neither_jax_nor_torch(bf16_src, tmp_path):
    """from_hf and to_hf are numpy work: the process never imports JAX, Flax, Orbax, torch or
    transformers (their imports took 4 of a conversion's 7 seconds). Run in a fresh interpreter,
    as `python -m convert` runs; a checkpoint without tokenizer files, so no tokenizer is loaded."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    script = ("import sys\n"
              "from convert.__main__ import main\n"
              f"assert main(['from_hf', {str(bf16_src)!r}, {str(ckpt)!r}]) == 0\n"
              f"assert main(['to_hf', {str(ckpt)!r}, {str(out)!r}]) == 0\n"
              "heavy = ('jax', 'flax', 'orbax', 'torch', 'transformers')\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert_bit_exact(read_tensors(bf16_src), read_tensors(out))


@pytest.mark.parametrize("hf", [
    dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
         num_key_value_heads=2, vocab_size=96),
    dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
         num_key_value_heads=2, head_dim=32, vocab_size=40, num_labels=4,
         urm_attributes=["a", "b"]),
])
def test_planned_shapes_are_the_models(hf):
    """`jax_shapes` (config arithmetic, so the converters plan without Flax) gives every table
    entry the shape the model itself declares, GQA and a head_dim apart from hidden/heads included."""
    from flax import nnx

    from urm_jax.config import ModelConfig
    from urm_jax.hf.mapping import TABLE, get_path
    from urm_jax.hf.plan import jax_shapes
    from urm_jax.model.urm import abstract_model

    cfg = ModelConfig.from_hf_dict({"model_type": "llama", "rms_norm_eps": 1e-5,
                                    "rope_theta": 10000.0, "pad_token_id": 0, **hf})
    tree = nnx.state(abstract_model(cfg)).to_pure_dict()
    assert list(jax_shapes(cfg)) == [e.path for e in TABLE]
    assert jax_shapes(cfg) == {e.path: tuple(get_path(tree, e.path).shape) for e in TABLE}


# ---------------------------------------------------------------------------------------------
# 5. bad input: exit 2, one `error:` line naming the culprit, no output left behind


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(file: Path, edit) -> None:
    """Load a safetensors file, let `edit(dict)` change it, write it back."""
    with safe_open(str(file), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _shard_of(src: Path, key: str) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"][key]


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_missing_shard(sharded_src, tmp_path, capsys):
    src = _copy(sharded_src, tmp_path / "src")
    shard = _shard_of(src, "model.norm.weight")
    shard.unlink()
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out", shard.name)


def test_truncated_shard(sharded_src, tmp_path, capsys):
    src = _copy(sharded_src, tmp_path / "src")
    shard = _shard_of(src, "model.layers.1.mlp.up_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out", shard.name)


def test_truncated_single_file(fp32_src, tmp_path, capsys):
    src = _copy(fp32_src, tmp_path / "src")
    data = (src / SINGLE).read_bytes()
    (src / SINGLE).write_bytes(data[: len(data) // 2])
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out", SINGLE)


@pytest.mark.parametrize("how", ["json", "length"])
def test_corrupt_header(fp32_src, tmp_path, capsys, how):
    src = _copy(fp32_src, tmp_path / "src")
    data = bytearray((src / SINGLE).read_bytes())
    if how == "json":
        data[8:20] = b"\xff" * 12  # garbage where the JSON header starts
    else:
        data[:8] = (2**40).to_bytes(8, "little")  # header length past the end of the file
    (src / SINGLE).write_bytes(bytes(data))
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out", SINGLE)


def _edit_header(file: Path, edit) -> None:
    """Let `edit(header dict)` change a safetensors file's JSON header; the data stays as it was."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])


NORM = "model.norm.weight"


@pytest.mark.parametrize("edit, needles", [
    (lambda h: h[NORM].update(data_offsets=[str(x) for x in h[NORM]["data_offsets"]]),
     [NORM, "data_offsets", "two non-negative integers"]),
    (lambda h: h[NORM].update(data_offsets=[*h[NORM]["data_offsets"], 0]), [NORM, "data_offsets"]),
    (lambda h: h[NORM].update(data_offsets=[float(x) for x in h[NORM]["data_offsets"]]),
     [NORM, "data_offsets"]),
    (lambda h: h[NORM].update(data_offsets=h[NORM]["data_offsets"][::-1]), [NORM, "begin <= end"]),
    (lambda h: h[NORM].update(shape=[str(d) for d in h[NORM]["shape"]]),
     [NORM, "shape", "non-negative integers"]),
    (lambda h: h[NORM].update(shape=[True] * len(h[NORM]["shape"])), [NORM, "shape"]),
    (lambda h: h[NORM].update(shape=h[NORM]["shape"][0]), [NORM, "shape", "list"]),
    (lambda h: h[NORM].update(dtype=["F32"]), [NORM, "dtype", "F32"]),
    (lambda h: h[NORM].pop("dtype"), [NORM, "dtype", "missing"]),
    (lambda h: h.update({NORM: [h[NORM]["dtype"]]}), [NORM, "must be an object"]),
    (lambda h: h.update(__metadata__={"format": 1}), ["__metadata__", "object of strings"]),
], ids=["offsets-strings", "offsets-three", "offsets-floats", "offsets-reversed", "shape-strings",
        "shape-bools", "shape-int", "dtype-list", "dtype-missing", "entry-list", "metadata-int"])
def test_header_field_types(fp32_src, tmp_path, capsys, edit, needles):
    """Every header field's JSON type is checked (as the safetensors library's strict parser does):
    "8" for 8 or true for 1 is refused naming the tensor and the field, not coerced into a wrong
    layout error later."""
    src = _copy(fp32_src, tmp_path / "src")
    _edit_header(src / SINGLE, edit)
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out", SINGLE,
            *needles)


def test_index_names_missing_shard(sharded_src, tmp_path, capsys):
    src = _copy(sharded_src, tmp_path / "src")
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (src / INDEX).write_text(json.dumps(index))
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out",
            "model-00099-of-00099.safetensors", INDEX)


def test_missing_key(fp32_src, tmp_path, capsys):
    src = _copy(fp32_src, tmp_path / "src")
    _rewrite(src / SINGLE, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out",
            "model.layers.1.self_attn.v_proj.weight", "missing")


def test_unexpected_key(fp32_src, tmp_path, capsys):
    src = _copy(fp32_src, tmp_path / "src")
    _rewrite(src / SINGLE, lambda t: t.update({"lm_head.weight": np.zeros((VOCAB, 64), np.float32)}))
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out",
            "lm_head.weight", "unexpected")


def test_duplicated_key_across_shards(sharded_src, tmp_path, capsys):
    src = _copy(sharded_src, tmp_path / "src")
    key = "model.norm.weight"
    home = _shard_of(src, key)
    other = next(p for p in sorted(src.glob("*.safetensors")) if p != home)
    with safe_open(str(home), framework="numpy") as f:
        value = f.get_tensor(key)
    _rewrite(other, lambda t: t.update({key: value}))
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out",
            key, home.name, other.name)


def test_wrong_shape(fp32_src, tmp_path, capsys):
    src = _copy(fp32_src, tmp_path / "src")
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite(src / SINGLE, lambda t: t.update({key: t[key][:, :32].copy()}))
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out",
            key, "[128, 32]", "[128, 64]")


def test_config_layers_disagree_with_weights(fp32_src, tmp_path, capsys):
    src = _copy(fp32_src, tmp_path / "src")
    _edit_config(src, num_hidden_layers=3)
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out",
            "num_hidden_layers=3", "2 layers")


def test_config_hidden_size_disagrees_with_weights(fp32_src, tmp_path, capsys):
    src = _copy(fp32_src, tmp_path / "src")
    _edit_config(src, hidden_size=128)
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out",
            "model.embed_tokens.weight", "[512, 64]", "[512, 128]")


def test_nan_refused_unless_allowed(fp32_src, tmp_path, capsys):
    src = _copy(fp32_src, tmp_path / "src")
    key = "model.layers.1.self_attn.o_proj.weight"

    def poison(t):
        t[key] = t[key].copy()
        t[key][3, 5] = np.nan

    _rewrite(src / SINGLE, poison)
    out = tmp_path / "out"
    run_err(capsys, ["from_hf", str(src), str(out)], out, key, "NaN", "--allow-nonfinite")

    run_ok("from_hf", str(src), str(out), "--allow-nonfinite")
    # The NaN checkpoint is refused on the way out too (naming the chunk, layer 1), unless allowed.
    run_err(capsys, ["to_hf", str(out), str(tmp_path / "hf")], tmp_path / "hf",
            "backbone.layers.o_proj", "1.0.0.0", "[1, 0, 5, 3]", "NaN", "--allow-nonfinite")
    run_err(capsys, ["verify", str(src), str(out)], tmp_path / "none", "backbone.layers.o_proj", "NaN")
    run_ok("to_hf", str(out), str(tmp_path / "hf"), "--allow-nonfinite")
    assert_bit_exact(read_tensors(src), read_tensors(tmp_path / "hf"))  # NaN bits preserved


def test_integer_tensor(fp32_src, tmp_path, capsys):
    src = _copy(fp32_src, tmp_path / "src")
    key = "model.layers.1.post_attention_layernorm.weight"
    _rewrite(src / SINGLE, lambda t: t.update({key: np.ones(64, np.int32)}))
    run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out", key, "int32")


def test_only_pickle_weights(fp32_src, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(fp32_src / "config.json", src / "config.json")
    (src / "pytorch_model.bin").write_bytes(b"not unpickled")
    line = run_err(capsys, ["from_hf", str(src), str(tmp_path / "out")], tmp_path / "out",
                   "pytorch_model.bin")
    assert "pickle" in line


def test_from_hf_out_dir_exists(fp32_src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    run_err(capsys, ["from_hf", str(fp32_src), str(out)], out, str(out), "--overwrite",
            out_existed=True)
    assert (out / "keep.txt").read_text() == "precious"

    run_ok("from_hf", str(fp32_src), str(out), "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "urm_jax.json").is_file()
    assert temp_siblings(out) == []


def test_to_hf_out_dir_exists(bf16_src, bf16_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    run_err(capsys, ["to_hf", str(bf16_ckpt), str(out)], out, str(out), "--overwrite",
            out_existed=True)
    assert (out / "keep.txt").read_text() == "precious"

    run_ok("to_hf", str(bf16_ckpt), str(out), "--overwrite")
    assert not (out / "keep.txt").exists()
    assert_bit_exact(read_tensors(bf16_src), read_tensors(out))
    assert temp_siblings(out) == []


def test_to_hf_on_hf_dir_is_refused(bf16_src, tmp_path, capsys):
    line = run_err(capsys, ["to_hf", str(bf16_src), str(tmp_path / "out")], tmp_path / "out",
                   str(bf16_src), "urm_jax.json")
    assert "not a urm-jax checkpoint" in line


def test_to_hf_other_layout_version(bf16_ckpt, tmp_path, capsys):
    ckpt = _copy(bf16_ckpt, tmp_path / "ckpt")
    marker = json.loads((ckpt / "urm_jax.json").read_text())
    marker["layout_version"] = 2
    (ckpt / "urm_jax.json").write_text(json.dumps(marker))
    line = run_err(capsys, ["to_hf", str(ckpt), str(tmp_path / "out")], tmp_path / "out",
                   "urm_jax.json", "layout version 2")
    assert "version 1" in line


def test_to_hf_bad_max_shard_size(bf16_ckpt, tmp_path, capsys):
    run_err(capsys, ["to_hf", str(bf16_ckpt), str(tmp_path / "out"), "--max-shard-size", "lots"],
            tmp_path / "out", "'lots'")


# ---------------------------------------------------------------------------------------------
# 6. a write failure mid-export leaves nothing behind


def test_write_failure_mid_export_leaves_nothing(bf16_ckpt, tmp_path, capsys, monkeypatch):
    real_create, calls = io_utils.create_output, []

    def failing_create(path, nbytes, head=b""):
        calls.append(path)
        if len(calls) == 2:  # the second shard: a partial file, as a full disk leaves, then ENOSPC
            Path(path).write_bytes(head[:5])
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_create(path, nbytes, head)

    monkeypatch.setattr(io_utils, "create_output", failing_create)
    out = tmp_path / "out"
    run_err(capsys, ["to_hf", str(bf16_ckpt), str(out), "--max-shard-size", "20KB"], out,
            "No space left on device", "model-00002-of-")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
