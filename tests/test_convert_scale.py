"""Conversion at scale (issue #4), on tiny models: bounded memory, Orbax compatibility of the
streamed checkpoint, HF weights placed straight onto device shards, `convert verify`, and honest
output when a run is killed or the disk fills up.

Memory is measured in subprocesses (each reports its own peak RSS, `ru_maxrss`) against a
baseline run of the same code on a tiny model, never as a wall-clock assertion.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from convert.__main__ import main
from urm_jax.hf.load import hf_to_params
from urm_jax.hf.plan import jax_shapes
from urm_jax.hf.safetensors_io import HFWeights
from urm_jax.hf.mapping import TABLE, get_path
from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf
from hf_fixtures import make_tiny_urm
from urm_jax import io_utils
from urm_jax.checkpoint import (CheckpointError, ParamsReader, load_config, load_params,
                                save_checkpoint)
from urm_jax.config import ModelConfig
from urm_jax.loading import load_model, load_params_any
from urm_jax.model.urm import param_shardings
from urm_jax.sharding import make_mesh, use_mesh

REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"


def run_ok(*argv: str) -> None:
    assert main([*map(str, argv)]) == 0, f"convert {' '.join(map(str, argv))} failed"


def siblings(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])


def assert_trees_bit_equal(a: dict, b: dict) -> None:
    for entry in TABLE:
        x, y = np.asarray(get_path(a, entry.path)), np.asarray(get_path(b, entry.path))
        assert x.dtype == y.dtype and x.shape == y.shape, (entry.jax_name, x.dtype, y.dtype)
        assert np.array_equal(bits(x), bits(y)), entry.jax_name


def hf_params(hf_dir: Path) -> dict:
    with HFWeights(hf_dir) as weights:
        return hf_to_params(weights, ModelConfig.from_hf_dir(hf_dir), progress=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """8 heads / 4 KV heads so tensor parallelism cuts heads; bf16 backbone, fp16 gate."""
    return make_tiny_urm(tmp_path_factory.mktemp("scale_src"), heads=8, kv_heads=4,
                         backbone_dtype="bfloat16", gate_dtype="float16", seed=5)


@pytest.fixture(scope="module")
def ckpt(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale_ckpt") / "ckpt"
    run_ok("from_hf", src, out)
    return out


# ---------------------------------------------------------------------------------------------
# 1. the streamed checkpoint is an ordinary Orbax checkpoint


def test_orbax_reads_streamed_checkpoint(src, ckpt):
    want = hf_params(src)
    params_dir = ckpt / "params"
    meta = ocp.StandardCheckpointer().metadata(params_dir).item_metadata
    tree = getattr(meta, "tree", meta)
    for entry in TABLE:
        m, w = get_path(tree, entry.path), get_path(want, entry.path)
        assert (tuple(m.shape), np.dtype(m.dtype)) == (w.shape, w.dtype), entry.jax_name
    assert_trees_bit_equal(ocp.StandardCheckpointer().restore(params_dir), want)
    assert_trees_bit_equal(load_params(ckpt), want)


def test_stacked_arrays_are_chunked_one_layer_per_chunk(ckpt):
    reader = ParamsReader(ckpt)
    for entry in TABLE:
        if entry.stacked:
            assert reader.chunk_rows(entry.path) == 1, entry.jax_name
            files = [p for p in (ckpt / "params" / ".".join(entry.path)).iterdir()
                     if not p.name.startswith(".")]
            assert len(files) == reader.shape(entry.path)[0], entry.jax_name


def test_orbax_metadata_matches_what_orbax_writes(src, ckpt, tmp_path):
    """Our `_METADATA` and `.zarray` files say what Orbax's own non-OCDBT save says."""
    theirs = tmp_path / "orbax"
    handler = ocp.StandardCheckpointHandler(use_ocdbt=False)
    ocp.Checkpointer(handler).save(theirs, ocp.args.StandardSave(hf_params(src)))
    ours_meta = json.loads((ckpt / "params" / "_METADATA").read_text())
    theirs_meta = json.loads((theirs / "_METADATA").read_text())
    assert ours_meta["tree_metadata"] == theirs_meta["tree_metadata"]
    for key in ("use_ocdbt", "use_zarr3", "store_array_data_equal_to_fill_value"):
        assert ours_meta[key] == theirs_meta[key], key
    for entry in TABLE:
        name = ".".join(entry.path)
        ours = json.loads((ckpt / "params" / name / ".zarray").read_text())
        orbax = json.loads((theirs / name / ".zarray").read_text())
        assert sorted(ours) == sorted(orbax), name
        for key in ("dtype", "shape", "order", "zarr_format", "fill_value", "dimension_separator"):
            assert ours[key] == orbax[key], (name, key)
    ours_ckpt = json.loads((ckpt / "params" / "_CHECKPOINT_METADATA").read_text())
    theirs_ckpt = json.loads((theirs / "_CHECKPOINT_METADATA").read_text())
    assert sorted(ours_ckpt) == sorted(theirs_ckpt)
    assert ours_ckpt["item_handlers"] == theirs_ckpt["item_handlers"]
    assert 0 < ours_ckpt["init_timestamp_nsecs"] <= ours_ckpt["commit_timestamp_nsecs"]


def test_restoring_our_checkpoint_logs_no_orbax_warning(ckpt, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        load_params(ckpt)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_sharded_orbax_restore(src, ckpt, mesh_shape):
    cfg = load_config(ckpt)
    shardings = param_shardings(cfg, make_mesh(mesh_shape))
    params = load_params(ckpt, shardings)
    for entry in TABLE:
        assert get_path(params, entry.path).sharding == get_path(shardings, entry.path)
    assert_trees_bit_equal(params, hf_params(src))


def test_embedding_split_into_row_chunks_with_padded_edge(src, tmp_path, monkeypatch):
    """A non-stacked array bigger than CHUNK_BYTES is stored in row chunks (the last padded, as
    zarr wants); Orbax and the streaming readers agree with the source."""
    import urm_jax.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 7 * 64 * 2)  # 7 rows of the bf16 embedding
    ckpt = tmp_path / "ckpt"
    run_ok("from_hf", src, ckpt)
    embed = ckpt / "params" / "backbone.embed_tokens"
    zarray = json.loads((embed / ".zarray").read_text())
    assert zarray["chunks"] == [7, 64] and zarray["shape"] == [512, 64]
    assert len([p for p in embed.iterdir() if not p.name.startswith(".")]) == math.ceil(512 / 7)
    assert_trees_bit_equal(load_params(ckpt), hf_params(src))
    run_ok("to_hf", ckpt, tmp_path / "hf")
    run_ok("verify", src, ckpt)
    run_ok("verify", tmp_path / "hf", ckpt)
    assert ParamsReader(ckpt).read(("backbone", "embed_tokens"), 5, 20).shape == (15, 64)


def test_to_hf_reads_orbax_written_checkpoints(src, ckpt, tmp_path):
    """A checkpoint whose params Orbax saved itself (OCDBT, one chunk per array, as urm-jax
    wrote before streaming; training jobs may too) still exports and verifies bit-exact."""
    legacy = tmp_path / "legacy"
    shutil.copytree(ckpt, legacy)
    shutil.rmtree(legacy / "params")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(legacy / "params", hf_params(src))
    checkpointer.wait_until_finished()
    assert (legacy / "params" / "manifest.ocdbt").exists()
    out = tmp_path / "hf"
    run_ok("to_hf", legacy, out)
    run_ok("verify", src, legacy)
    run_ok("verify", out, ckpt)


def test_save_checkpoint_of_sharded_jax_arrays(src, tmp_path):
    cfg = ModelConfig.from_hf_dir(src)
    shardings = param_shardings(cfg, make_mesh((2, 2, 2)))
    with HFWeights(src) as weights:
        params = hf_to_params(weights, cfg, progress=False, shardings=shardings)
    save_checkpoint(tmp_path / "ckpt", params, cfg)
    assert_trees_bit_equal(load_params(tmp_path / "ckpt"), hf_params(src))
    run_ok("verify", src, tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------
# 2. HF weights straight onto device shards


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2), (1, 1, 8)])
def test_hf_dir_loads_onto_shards(src, mesh_shape, monkeypatch):
    cfg = ModelConfig.from_hf_dir(src)
    mesh = make_mesh(mesh_shape)
    shardings = param_shardings(cfg, mesh)
    reads: list[tuple[str, tuple[int, int] | None]] = []
    real_read = HFWeights.read

    def spy(self, key, rows=None, *args, **kwargs):
        reads.append((key, rows))
        return real_read(self, key, rows, *args, **kwargs)

    monkeypatch.setattr(HFWeights, "read", spy)
    params = load_params_any(src, cfg, shardings=shardings)
    monkeypatch.undo()
    for entry in TABLE:
        leaf = get_path(params, entry.path)
        assert isinstance(leaf, jax.Array) and leaf.sharding == get_path(shardings, entry.path)
    assert_trees_bit_equal(params, hf_params(src))
    if mesh.shape["tensor"] > 1:  # q heads are cut: each device reads only its rows of q_proj
        q_rows = {rows for key, rows in reads if key == "model.layers.0.self_attn.q_proj.weight"}
        assert q_rows and all(rows[1] - rows[0] == 64 // mesh.shape["tensor"] for rows in q_rows)


def test_sharded_hf_model_scores_like_unsharded(src):
    from flax import nnx

    from urm_jax.data.tokenization import pad_batch

    rng = np.random.default_rng(0)
    rows = [[int(t) for t in rng.integers(4, 511, n)] for n in (70, 9, 33, 128, 5, 64, 17, 40)]
    ids, mask = (jnp.asarray(a) for a in pad_batch(rows, pad_id=511))
    plain, _ = load_model(src, compute_dtype="float32", gate_dtype="float32")
    want = plain(ids, mask)
    mesh = make_mesh((2, 2, 2))
    sharded, _ = load_model(src, compute_dtype="float32", gate_dtype="float32", mesh=mesh)
    leaves = jax.tree.leaves(nnx.state(sharded))
    assert any(len(leaf.sharding.device_set) > 1 for leaf in leaves)
    graphdef, state = nnx.split(sharded)
    with use_mesh(mesh):
        got = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))(state, ids, mask)
    for name in ("reward", "means", "log_stds", "gate", "uncertainty"):
        np.testing.assert_allclose(np.asarray(getattr(got, name), np.float64),
                                   np.asarray(getattr(want, name), np.float64),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# 3. verify


def test_verify_reports_every_tensor(src, ckpt, capsys):
    capsys.readouterr()
    assert main(["verify", str(src), str(ckpt), "--all"]) == 0
    out = capsys.readouterr().out.splitlines()
    n = len(HFWeights(src).keys())
    assert sum("identical" in line for line in out[:-1]) == n
    assert out[-1].startswith(f"{n}/{n} tensors identical")


def test_verify_finds_a_changed_value_and_a_dtype_change(src, ckpt, tmp_path, capsys):
    params = jax.tree.map(np.array, load_params(ckpt))  # writable copies
    params["backbone"]["layers"]["up_proj"][1, 3, 5] += 1
    params["gate"]["fc4"]["bias"] = params["gate"]["fc4"]["bias"].astype(np.float32)
    save_checkpoint(tmp_path / "bad", params, load_config(ckpt))
    capsys.readouterr()
    assert main(["verify", str(src), str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3, out
    up = next(line for line in out if "model.layers.1.mlp.up_proj.weight" in line)
    assert "DIFFERS" in up and "bfloat16 vs bfloat16" in up
    bias = next(line for line in out if "weights.fc.4.bias" in line)
    assert "float16 vs float32" in bias and "0.000e+00" in bias  # exact upcast: same values
    assert out[-1].startswith(f"{len(HFWeights(src).keys()) - 2}/")


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header, data, needle", [
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 12, "needs 16 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, b"\0" * 24, "gap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "the file has"),
    ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "tensor a: dtype must be one of"),
    # bytes after the last tensor: the safetensors library refuses it ("not fully covered")
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 108, "the file has"),
])
def test_bad_safetensors_headers(tmp_path, header, data, needle):
    _safetensors(tmp_path / "model.safetensors", header, data)
    with pytest.raises(ValueError, match=needle) as err:
        HFWeights(tmp_path)
    assert "model.safetensors" in str(err.value)


def test_a_tensor_listed_twice_is_refused(tmp_path):
    """JSON keeps the last of two equal keys; two entries for one tensor are a corrupt header."""
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    text = f'{{"a": {entry}, "a": {entry}}}'.encode()
    (tmp_path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 8)
    with pytest.raises(ValueError, match="tensor a is listed twice in the header"):
        HFWeights(tmp_path)


def test_fast_fill_is_deterministic_and_converts(tmp_path):
    hf = tiny_hf_config(num_layers=3)
    a = write_random_hf(tmp_path / "a", hf, dtype="bfloat16", fill="fast", progress=False)
    b = write_random_hf(tmp_path / "b", hf, dtype="bfloat16", fill="fast", progress=False,
                        max_shard_size="30KB")
    with HFWeights(a) as wa, HFWeights(b) as wb:
        assert sorted(wa.keys()) == sorted(wb.keys())
        for key in wa.keys():
            x, y = wa.get(key), wb.get(key)
            assert np.array_equal(bits(x), bits(y)), key  # seeded by key: sharding changes nothing
            assert x.dtype.name == ("float16" if key.startswith("weights.fc.") else "bfloat16")
            assert np.isfinite(x.astype(np.float32)).all()
            assert x.ndim == 1 or not np.array_equal(x[0], x[1])  # rows differ
        lin = wa.get("model.layers.2.mlp.down_proj.weight").astype(np.float32)
        assert abs(float(lin.std()) * math.sqrt(128) - 1) < 0.1  # N(0, 1/fan_in)
    run_ok("from_hf", b, tmp_path / "ckpt")
    run_ok("verify", a, tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------
# 4. honest output: kills, full disks, progress


KILL_AFTER = textwrap.dedent("""
    import os, signal, sys
    from urm_jax import io_utils
    real, fills = getattr(io_utils, sys.argv[2]), []
    def fill_then_die(*args, **kwargs):
        fills.append(args)  # an output's data about to be written
        if len(fills) > int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-write, no cleanup possible
        return real(*args, **kwargs)
    setattr(io_utils, sys.argv[2], fill_then_die)
    from convert.__main__ import main
    sys.exit(main(sys.argv[3:]))
""")

# What writes a conversion's data: from_hf creates each checkpoint chunk file with its bytes,
# to_hf writes each tensor into the shards it laid out first.
WRITES = {"from_hf": "create_output", "to_hf": "write_at"}


def run_killed(after: int, command: str, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_AFTER, str(after), WRITES[command], command,
                           *map(str, argv)], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_sigkill_mid_from_hf_leaves_nothing_that_looks_complete(src, tmp_path):
    out = tmp_path / "ckpt"
    proc = run_killed(5, "from_hf", src, out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    [temp] = siblings(out)  # the killed run's temporary: hidden name, no marker
    assert temp.name.startswith(".ckpt.tmp-") and not (temp / "urm_jax.json").exists()
    assert len(list((temp / "params").rglob("[0-9]*"))) >= 5  # chunks written or being written
    with pytest.raises(CheckpointError, match="not a urm-jax checkpoint"):
        load_config(temp)
    run_ok("from_hf", src, out)  # a rerun succeeds and sweeps the dead run's temporary
    assert siblings(out) == []
    run_ok("verify", src, out)


def test_sigkill_mid_to_hf_leaves_nothing_that_looks_complete(ckpt, src, tmp_path):
    out = tmp_path / "hf"
    proc = run_killed(5, "to_hf", ckpt, out, "--max-shard-size", "20KB")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    [temp] = siblings(out)  # shards laid out, partly filled; no index, no config
    assert len(list(temp.glob("*.safetensors"))) > 2
    assert not (temp / "config.json").exists() and not (temp / INDEX).exists()
    run_ok("to_hf", ckpt, out, "--max-shard-size", "20KB")
    assert siblings(out) == []
    run_ok("verify", out, ckpt)


SIGNAL_AFTER = KILL_AFTER.replace("signal.SIGKILL)  # mid-write, no cleanup possible",
                                  "int(sys.argv[4]))  # mid-write: the run unwinds")
assert SIGNAL_AFTER != KILL_AFTER


@pytest.mark.parametrize("command", ["from_hf", "to_hf"])
@pytest.mark.parametrize("signum, code, line", [
    (signal.SIGTERM, 143, "error: stopped by SIGTERM; nothing written to {out}"),
    (signal.SIGINT, 130, "error: interrupted (Ctrl-C): python -m convert {command} stopped; nothing written to {out}")])
def test_sigterm_and_ctrl_c_mid_conversion_leave_the_old_output_and_no_temporary(
        src, ckpt, tmp_path, command, signum, code, line):
    """SIGTERM (a scheduler, `kill`) or Ctrl-C in the middle of writing: one `error:` line, exit
    143 / 130, no traceback, the temporary removed, the output replaced by --overwrite intact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("previous output")
    source = src if command == "from_hf" else ckpt
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AFTER.replace("sys.argv[3:]", "sys.argv[5:]"),
                           "3", WRITES[command], "unused", str(int(signum)), command, str(source), str(out),
                           "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == line.format(out=out, command=command), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert siblings(out) == [] and (out / "keep").read_text() == "previous output"


# A signal that arrives while `python -m convert` imports its modules: sent (held) before the
# command's module even starts, so it is pending throughout the imports, deterministically.
SIGNAL_DURING_IMPORTS = """
import os, runpy, signal, sys
signum = int(sys.argv[1])
signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
os.kill(os.getpid(), signum)
sys.argv = ["convert", *sys.argv[2:]]
runpy.run_module("convert", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("signum, code, line", [
    (signal.SIGTERM, 143, "error: stopped by SIGTERM; nothing written to {out}"),
    (signal.SIGINT, 130, "error: interrupted (Ctrl-C): python -m convert from_hf stopped; nothing written to {out}")])
def test_a_signal_during_the_imports_is_answered_once_the_command_can(src, tmp_path, signum, code, line):
    """Ctrl-C or SIGTERM while `python -m convert` still imports its modules: held until the
    command can answer, then one `error:` line and 130 / 143, no traceback (found by the stop-20
    review: a Ctrl-C in the first 0.2 s printed a KeyboardInterrupt traceback from inside an
    import, once an ImportError and exit 1)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING_IMPORTS, str(int(signum)), "from_hf", str(src),
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == line.format(out=out), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists() and siblings(out) == []


class _InterruptedFinalizer:
    def __del__(self):
        raise KeyboardInterrupt  # a Ctrl-C landing in a finalizer (tqdm's bar has one)


@pytest.mark.parametrize("command", ["from_hf", "to_hf", "init"])
@pytest.mark.parametrize("where", ["bar close", "finalizer"])
def test_ctrl_c_as_the_progress_bar_closes_is_never_swallowed(src, ckpt, tmp_path, capsys,
                                                              monkeypatch, command, where):
    """Ctrl-C as the progress bar closes (the conversion's last step before the rename): raised
    there, nothing is written; landing in a finalizer, where Python swallows it ("Exception
    ignored ... KeyboardInterrupt", then exit 0 before), it is raised again, so the command exits
    130 with one `error:` line either way, and says OUT_DIR was written whole when the rename
    came first (resends are held off here, so the swallowed one surfaces as the run ends)."""
    from urm_jax import signals
    from urm_jax.hf import streams

    real_exit = streams.Progress.__exit__

    def exit_interrupted(self, *exc):
        if where == "bar close":
            bar = self.bar

            def close_interrupted():  # once: tqdm's finalizer closes it again later
                del bar.close
                raise KeyboardInterrupt
            bar.close = close_interrupted
            return real_exit(self, *exc)
        real_exit(self, *exc)
        _InterruptedFinalizer()  # dropped at once: its __del__ runs here
    monkeypatch.setattr(streams.Progress, "__exit__", exit_interrupted)
    monkeypatch.setattr(signals.SigtermRaiser, "RESEND_S", 3600.0)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([command, str(ckpt if command == "to_hf" else src), str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    stopped = f"error: interrupted (Ctrl-C): python -m convert {command} stopped"
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"{stopped}; nothing written to {out}" if where == "bar close" else
        f"{stopped}; {out} was written in full before it stopped"], err
    assert siblings(out) == [] and out.exists() == (where == "finalizer")
    if where == "finalizer" and command != "init":  # init's fresh heads differ from src's
        monkeypatch.undo()
        run_ok("verify", *((out, ckpt) if command == "to_hf" else (src, out)))


def test_an_output_made_during_the_run_is_not_replaced_without_overwrite(src, tmp_path, capsys, monkeypatch):
    """The existence check runs first; a directory that appears at OUT while the conversion writes
    (a concurrent run, a user) is kept, and this run ends in one `error:` line, its temporary gone."""
    out = tmp_path / "ckpt"
    real = io_utils.fsync_tree

    def appear_then_fsync(path):
        if not out.exists():
            out.mkdir()
            (out / "precious").write_text("made meanwhile")
        return real(path)
    monkeypatch.setattr(io_utils, "fsync_tree", appear_then_fsync)
    assert main(["from_hf", str(src), str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out} appeared while this command ran; nothing replaced (pass --overwrite to replace it)"]
    assert (out / "precious").read_text() == "made meanwhile" and siblings(out) == []


def test_an_output_that_holds_an_inputs_symlink_target_is_refused(src, tmp_path, capsys):
    """A model directory whose weights are symlinks (a hub cache: snapshots/ -> blobs/): an output
    that is, or contains, a link's target would destroy the input; refused even with --overwrite."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(src, snap)
    blobs.mkdir()
    weights = sorted(snap.glob("*.safetensors"))[0]
    shutil.move(weights, blobs / "abc123")
    weights.symlink_to(blobs / "abc123")
    assert main(["from_hf", str(snap), str(blobs), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: OUT_DIR {blobs} contains the input") and str(weights) in err, err
    assert (blobs / "abc123").is_file() and len(err.strip().splitlines()) == 1


def test_live_runs_temporary_is_not_swept(src, tmp_path):
    """Only temporaries of dead processes on this host are removed."""
    out = tmp_path / "ckpt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100000)"])  # killed below
    try:
        import socket

        mine = tmp_path / f".ckpt.tmp-{socket.gethostname()}-{live.pid}"
        other_host = tmp_path / ".ckpt.tmp-elsewhere-1"
        mine.mkdir()
        other_host.mkdir()
        run_ok("from_hf", src, out)
        assert mine.exists() and other_host.exists()
    finally:
        live.kill()
        live.wait()


def test_enospc_mid_from_hf(src, tmp_path, capsys, monkeypatch):
    real_create, created = io_utils.create_output, []

    def fill_up(path, nbytes, head=b""):
        created.append(path)
        if len(created) == 7:  # the disk fills up at the 7th chunk, part of it written
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_create(path, nbytes, head)

    monkeypatch.setattr(io_utils, "create_output", fill_up)
    out = tmp_path / "ckpt"
    capsys.readouterr()
    assert main(["from_hf", str(src), str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "No space left on device" in err[0], err
    # named where it would have been written (OUT_DIR/...), not in the hidden temporary
    temp = next(p for p in Path(created[6]).parents if p.name.startswith(".ckpt.tmp-"))
    assert str(out / Path(created[6]).relative_to(temp)) in err[0], err[0]
    assert list(tmp_path.iterdir()) == []


LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(2) instead of dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
    from convert.__main__ import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("direction", ["from_hf", "to_hf"])
def test_os_level_write_failure(src, ckpt, tmp_path, direction):
    """A real failing write(2) (a file size limit: EFBIG) in a subprocess: one error line,
    exit 2, nothing left behind."""
    out = tmp_path / "out"
    argv = ["from_hf", src, out] if direction == "from_hf" else ["to_hf", ckpt, out]
    proc = subprocess.run([sys.executable, "-c", LIMITED, "40000", *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "File too large" in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_real_enospc_on_a_tiny_tmpfs(src, tmp_path):
    """A genuinely full filesystem: a 128 KiB tmpfs in a private mount namespace (skipped where
    unprivileged namespaces are not allowed)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=128k tmpfs {mnt} || exit 77; "
              f"{sys.executable} -m convert from_hf {src} {mnt}/ckpt; echo rc=$?; "
              f"ls -A {mnt}; echo end")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode == 77 or "rc=" not in proc.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[-200:]}")
    assert "rc=2" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.split("rc=2")[1].split() == ["end"], proc.stdout  # nothing left in the mount
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], proc.stderr


def test_progress_shows_tensors_and_bytes_per_second(src, tmp_path, capsys):
    capsys.readouterr()
    run_ok("from_hf", src, tmp_path / "ckpt")
    run_ok("to_hf", tmp_path / "ckpt", tmp_path / "hf")
    err = capsys.readouterr().err
    n = len(HFWeights(src).keys())
    for desc in ("from_hf", "to_hf"):
        assert f"{desc}: 100%" in err
    assert f"{n}/{n} tensors" in err and "B/s" in err


# ---------------------------------------------------------------------------------------------
# 5. memory: peak RSS follows the largest tensor, not the model


# The child reports its own peak RSS from /proc (VmHWM). Not ru_maxrss: across exec Linux keeps
# the forked parent's peak in it, so a child of a big pytest process would report pytest's size.
MEMORY_DRIVER = textwrap.dedent("""
    import json, resource, sys
    from convert.__main__ import main
    rc = main(sys.argv[1:])
    try:
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        peak = int(line.split()[1]) * 1024
    except OSError:  # no procfs: ru_maxrss (fine when the parent is small)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rc": rc, "peak": peak}))
""")
BIG = dict(vocab_size=2048, hidden_size=512, intermediate_size=2048, num_layers=24, num_heads=8,
           num_kv_heads=2)


def peak_rss(*argv) -> int:
    env = dict(os.environ, URM_CONVERT_THREADS="2")  # units in flight: same on any machine
    proc = subprocess.run([sys.executable, "-c", MEMORY_DRIVER, *map(str, argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, proc.stderr
    return result["peak"]


def test_peak_memory_follows_largest_tensor_not_model(tmp_path):
    sizes = {}
    for name, shape in (("tiny", {}), ("big", BIG)):
        hf = tiny_hf_config(**shape)
        write_random_hf(tmp_path / f"{name}_src", hf, dtype="float32", gate_dtype="float16",
                        fill="fast", max_shard_size="100MB", progress=False)
        shapes = jax_shapes(ModelConfig.from_hf_dict(hf))
        tensors = [math.prod(e.hf_shape(shapes[e.path])) * (2 if e.path[0] == "gate" else 4)
                   for e in TABLE for _ in e.hf_keys(hf["num_hidden_layers"])]
        sizes[name] = (sum(tensors), max(tensors))
    total, largest = sizes["big"]
    assert total > 50 * largest  # a model many times its largest tensor (~350 MB vs 4 MB)

    rows = {}
    for step, argv in {"from_hf": ("from_hf", "{n}_src", "{n}_ckpt"),
                       "to_hf": ("to_hf", "{n}_ckpt", "{n}_hf", "--max-shard-size", "100MB"),
                       "verify": ("verify", "{n}_hf", "{n}_ckpt")}.items():
        peaks = {n: peak_rss(*[tmp_path / a.format(n=n) if "{n}" in a else a for a in argv])
                 for n in ("tiny", "big")}
        rows[step] = peaks["big"] - peaks["tiny"]  # same code and imports; the rest is data
    report = {k: f"{v / 2**20:.1f} MiB" for k, v in rows.items()}
    print(f"model {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB, "
          f"peak RSS over baseline: {report}")
    for step, extra in rows.items():
        # 2 threads: a few units in flight (each a tensor read, transposed, cast), never the model
        assert extra < 16 * largest, (step, report)
        assert extra < total / 4, (step, report)
