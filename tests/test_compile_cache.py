"""Compile once: a second process with the same compilation cache loads the scoring forward and
the training step whole (`stored_jit`) - no tracing, no lowering, no XLA compile, no lookup that
misses - and computes bit for bit what the first did; `CompileMeter`'s per-phase accounting.
Cold and warm runs are separate processes (JAX's in-memory caches would hide a miss), and
programs are counted through jax.monitoring events, never timed."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from faults import cli_env, write_tiny_base
from urm_jax import compile_cache
from urm_jax.compile_cache import CompileMeter, stable_repr
from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf

ROOT = Path(__file__).resolve().parent.parent
STAGE1 = str(ROOT / "configs/train/tiny_stage1.yaml")

# Runs in a fresh process: counts every compile event per function, then prints them as JSON.
PROBE = textwrap.dedent("""
    import collections, json, sys
    import jax
    from urm_jax import compile_cache
    counts = collections.Counter()
    def duration(name, secs, fun_name="", **_):
        counts[name.rsplit("/", 1)[-1] + ":" + str(fun_name)] += 1
    def event(name, **_):
        counts[name.rsplit("/", 1)[-1]] += 1
    jax.monitoring.register_event_duration_secs_listener(duration)
    jax.monitoring.register_event_listener(event)
    compile_cache.enable()
    meter = compile_cache.CompileMeter().start()
    result = {}
    exec(sys.argv[1])
    totals = meter.stop()
    print("PROBE " + json.dumps({"counts": counts, "result": result, "compiles": totals.compiles,
                                 "hits": totals.cache_hits, "misses": totals.cache_misses}))
""")

SCORE = textwrap.dedent("""
    from urm_jax.scoring.engine import Scorer
    scorer = Scorer(sys.argv[2], batch_size=2, max_length=64)
    scores = scorer.score_ids([[5] * 10, [6] * 30, [7] * 50, [8] * 12])
    result["reward"] = [float(x).hex() for x in scores.reward]
    result["shapes"] = len(scorer.compiled_shapes)
""")


def probe(code: str, *args, cache: Path, devices: int = 1, cwd: Path = ROOT) -> dict:
    """Run `code` in a fresh process on `devices` CPU devices with the compilation cache at
    `cache`; its compile events counted, and what it put in `result`."""
    env = dict(os.environ, URM_JAX_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu",
               URM_JAX_COMPILATION_CACHE_MIN_SECONDS="0",  # every program cached: no timing in the counts
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE, code, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE "):]) | {"stderr": done.stderr}


def count(run: dict, prefix: str) -> int:
    return sum(n for k, n in run["counts"].items() if k.startswith(prefix))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_hf(tmp_path_factory.mktemp("m") / "hf", tiny_hf_config(pad_token_id=0),
                           dtype="float32", progress=False)


@pytest.fixture(scope="module")
def cold_scoring(model, tmp_path_factory):
    """One cold scoring run's result and its compilation cache (tests work on copies of it)."""
    cache = tmp_path_factory.mktemp("cold") / "cache"
    return probe(SCORE, model, cache=cache), cache


def cold_copy(cold_scoring, tmp_path) -> tuple[dict, Path]:
    cold, cache = cold_scoring
    shutil.copytree(cache, tmp_path / "cache")
    return cold, tmp_path / "cache"


def test_warm_scoring_loads_every_forward_without_tracing(model, cold_scoring, tmp_path):
    cold, cache = cold_copy(cold_scoring, tmp_path)
    warm = probe(SCORE, model, cache=cache)
    shapes = cold["result"]["shapes"]
    assert shapes == 3  # buckets 16, 32 and 64
    assert count(cold, "jaxpr_trace_duration:forward_batch") == shapes
    assert count(cold, "save_duration") == shapes
    assert len(list((cache / compile_cache.PROGRAMS).glob("forward_batch-*.program"))) == shapes
    # Warm: every forward program is loaded whole; nothing about it is traced, lowered or compiled.
    assert count(warm, "load_duration") == shapes
    assert count(warm, "jaxpr_trace_duration:forward_batch") == 0
    assert count(warm, "jaxpr_to_mlir_module_duration:jit(forward_batch)") == 0
    assert count(warm, "backend_compile_duration:jit(forward_batch)") == 0
    assert count(warm, "save_duration") == 0
    assert warm["misses"] == 0, warm["counts"]  # no other program missed JAX's cache either
    assert warm["hits"] >= shapes
    assert warm["result"]["reward"] == cold["result"]["reward"]  # bit for bit


def test_an_unreadable_stored_program_is_compiled_again(model, cold_scoring, tmp_path):
    cold, cache = cold_copy(cold_scoring, tmp_path)  # a copy at another path: JAX's entries must hit
    programs = sorted((cache / compile_cache.PROGRAMS).glob("*.program"))
    programs[0].write_bytes(b"urm-jax program 1\nnot a pickle")
    programs[1].write_bytes(b"something else")
    again = probe(SCORE, model, cache=cache)
    assert "unreadable stored program" in again["stderr"]
    assert count(again, "load_duration") == 1 and count(again, "jaxpr_trace_duration:forward_batch") == 2
    assert again["result"]["reward"] == cold["result"]["reward"]
    # JAX's cache served the two again; an executable it deserialised is not stored (XLA:CPU
    # cannot serialise it whole), so the next run finds them there again, and scores the same.
    assert count(again, "save_duration") == 0
    third = probe(SCORE, model, cache=cache)
    assert count(third, "load_duration") == 1 and third["result"]["reward"] == cold["result"]["reward"]
    for entry in cache.glob("jit_forward_batch-*"):  # once JAX's entries are gone, XLA compiles
        entry.unlink()                               # them and they are stored whole again
    probe(SCORE, model, cache=cache)
    assert count(probe(SCORE, model, cache=cache), "load_duration") == 3


def test_another_architecture_or_mesh_never_loads_a_stored_program(model, cold_scoring, tmp_path):
    _, cache = cold_copy(cold_scoring, tmp_path)
    wider = write_random_hf(tmp_path / "wider", tiny_hf_config(hidden_size=96, pad_token_id=0),
                            dtype="float32", progress=False)
    other = probe(SCORE, wider, cache=cache)
    assert count(other, "load_duration") == 0 and count(other, "jaxpr_trace_duration:forward_batch") == 3
    # The same model on a 2-device mesh: other shardings, other programs.
    two = probe(SCORE, model, cache=cache, devices=2)
    assert count(two, "load_duration") == 0 and count(two, "save_duration") >= 1


def test_cache_off_stores_nothing(model, tmp_path):
    code = "compile_cache.enable('off')\n" + SCORE
    run = probe(code, model, cache=tmp_path / "cache")
    assert count(run, "save_duration") == 0 and count(run, "load_duration") == 0
    assert not (tmp_path / "cache" / compile_cache.PROGRAMS).exists()


def test_warm_resumed_training_loads_the_step_and_trains_the_same(tmp_path, monkeypatch):
    """A second run of the same recipe in another directory (a resume, a rerun) loads the
    training step whole and ends with the same weights, bit for bit."""
    from urm_jax.checkpoint import load_params

    if "URM_JAX_CACHE" not in os.environ:  # not set for the rest of this worker's tests
        monkeypatch.setenv("URM_JAX_CACHE", str(tmp_path / "tok"))
    base = write_tiny_base(tmp_path / "base")
    code = textwrap.dedent("""
        from urm_jax import cli
        argv = ["train", sys.argv[2], "model=" + sys.argv[3], "output_dir=" + sys.argv[4], "max_steps=2",
                "checkpoint.async_save=false", "plot=false", "tensorboard=false"]
        result["code"] = cli.main(argv)
    """)
    cache = tmp_path / "cache"
    cold = probe(code, STAGE1, base, tmp_path / "a", cache=cache)
    warm = probe(code, STAGE1, base, tmp_path / "b", cache=cache)
    assert cold["result"]["code"] == 0 and warm["result"]["code"] == 0
    assert count(cold, "jaxpr_trace_duration:step_in_mesh") == 1
    assert count(warm, "jaxpr_trace_duration:step_in_mesh") == 0
    assert count(warm, "backend_compile_duration:jit(step_in_mesh)") == 0
    assert count(warm, "load_duration") >= 1 and count(warm, "save_duration") == 0
    assert warm["misses"] == 0, warm["counts"]
    a, b = load_params(tmp_path / "a" / "final"), load_params(tmp_path / "b" / "final")
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


def test_meter_splits_compile_time_by_phase():
    """A program XLA compiles and one JAX's cache serves, as jax.monitoring reports them."""
    record = jax.monitoring.record_event_duration_secs
    with CompileMeter() as meter:
        record("/jax/core/compile/jaxpr_trace_duration", 1.0)
        record("/jax/core/compile/jaxpr_to_mlir_module_duration", 2.0)
        record("/jax/core/compile/backend_compile_duration", 8.0)  # compiled
        record("/jax/core/compile/jaxpr_trace_duration", 0.5)
        record("/jax/core/compile/jaxpr_to_mlir_module_duration", 0.25)
        jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
        record("/jax/compilation_cache/cache_retrieval_time_sec", 0.5)
        record("/jax/core/compile/backend_compile_duration", 0.75)  # key + the read above
        record(compile_cache.STORE_LOAD, 0.125)
        record(compile_cache.STORE_SAVE, 0.25)
        jax.monitoring.record_event("/jax/compilation_cache/cache_misses")
    record("/jax/core/compile/backend_compile_duration", 100.0)  # after stop: not counted
    t = meter.totals
    assert t.phases() == {"trace": 1.5, "lower": 2.25, "xla": 8.25, "load": 0.625, "save": 0.25}
    assert (t.compiles, t.cache_hits, t.cache_misses) == (1, 2, 1)
    assert t.seconds == pytest.approx(12.875)
    assert t.describe() == ("compile 12.9 s (3 programs, 2 from the cache; trace 1.5, lower 2.2, xla 8.2, "
                            "load 0.6, save 0.2)")


def test_keys_refuse_object_addresses():
    assert stable_repr(("forward", (1, 2), {"a": 1.5})) == "('forward', (1, 2), {'a': 1.5})"
    with pytest.raises(ValueError, match="object address"):
        stable_repr(("step", object()))


# --- a write cut short (kill, full disk, ulimit -f) leaves half an entry: enable() repairs it ---

# A fresh process: JAX's cache is set up once per process, on its first compile.
HALF_WRITTEN_COMPILE = textwrap.dedent("""
    import sys, warnings
    import jax, jax.numpy as jnp
    from urm_jax import compile_cache
    compile_cache.enable(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even a tiny program
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).block_until_ready()
    for w in caught:
        print("WARNING", w.message)
""")


def test_a_half_written_entry_is_removed_and_new_entries_are_cached(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "jit_step_in_mesh-deadbeef-cache").write_bytes(b"\0" * 204800)  # cut short, no -atime
    (cache / "jit_gone-cafe-atime").write_bytes(b"\1" * 8)  # the reverse half
    (cache / "jit_whole-f00d-cache").write_bytes(b"x")
    (cache / "jit_whole-f00d-atime").write_bytes(b"\2" * 8)
    done = subprocess.run([sys.executable, "-c", HALF_WRITTEN_COMPILE, str(cache)], cwd=ROOT, env=cli_env(1),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stdout and "Error writing" not in done.stderr, done.stdout + done.stderr[-3000:]
    names = sorted(p.name for p in cache.iterdir() if p.name != ".lockfile")
    assert "jit_step_in_mesh-deadbeef-cache" not in names and "jit_gone-cafe-atime" not in names, names
    assert {"jit_whole-f00d-cache", "jit_whole-f00d-atime"} <= set(names)  # a whole entry stays
    written = [n for n in names if n.startswith("jit__lambda") and n.endswith("-cache")]
    assert len(written) == 1 and written[0].replace("-cache", "-atime") in names, names


# Twelve programs of growing size, each through stored_jit (so each is in both stores).
MANY_PROGRAMS = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from urm_jax import compile_cache
    compile_cache.enable(sys.argv[1])
    for n in range(1, 13):
        f = compile_cache.stored_jit(jax.jit(lambda x, n=n: jnp.tanh(jnp.sin(x) @ x.T * n) @ x),
                                     name="t", key=("t", n))
        f(jnp.ones((n * 8, 64))).block_until_ready()
""")


def test_the_whole_cache_directory_stays_within_its_bound(tmp_path):
    """URM_JAX_COMPILATION_CACHE_GB bounds the directory, JAX's entries and stored programs
    together (each program is in both): twelve programs of ~5 KB (JAX, compressed) + ~13-24 KB
    (stored whole) under a 60 KB bound leave at most 60 KB, the newest programs kept."""
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", MANY_PROGRAMS, str(cache)], cwd=ROOT,
                          env=cli_env(1, URM_JAX_COMPILATION_CACHE_GB="0.00006",
                                      URM_JAX_COMPILATION_CACHE_MIN_SECONDS="0"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    files = [p for p in cache.rglob("*") if p.is_file() and p.name != ".lockfile"]
    programs = [p for p in files if p.suffix == ".program"]
    total = sum(p.stat().st_size for p in files)
    assert total <= 60_000, sorted((p.stat().st_size, p.name) for p in files)
    assert programs and any(p.name.endswith("-cache") for p in files)  # both stores still hold some


def test_a_bound_smaller_than_a_program_is_one_warning_line(model, tmp_path):
    """A bound that cannot hold one program: `urm-jax score` runs, scores, and says once (not
    JAX's raw UserWarning per program) that programs are not cached and what to raise."""
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(f'{{"input_ids": {list(range(1, n))}}}\n' for n in (5, 20, 40)))
    done = subprocess.run([sys.executable, "-m", "urm_jax.cli", "score", "--model", str(model), "--input",
                           str(rows), "--output", str(tmp_path / "out.jsonl"), "--no-progress"], cwd=ROOT,
                          env=cli_env(1, URM_JAX_COMPILATION_CACHE=str(tmp_path / "cache"),
                                      URM_JAX_COMPILATION_CACHE_GB="1e-9",
                                      URM_JAX_COMPILATION_CACHE_MIN_SECONDS="0"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "larger than the compilation cache's bound are not cached" in warned[0] \
        and warned[0].endswith("raise URM_JAX_COMPILATION_CACHE_GB"), done.stderr[-3000:]
    assert "UserWarning" not in done.stderr and len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


def test_repair_waits_for_a_writer_holding_the_lock(tmp_path, monkeypatch):
    """An entry being written by another process (it holds JAX's lock between writing `-cache`
    and `-atime`) is not half-written: while the lock is held elsewhere, repair removes nothing."""
    (tmp_path / "jit_f-1-cache").write_bytes(b"in progress")
    monkeypatch.setattr(compile_cache, "REPAIR_LOCK_TIMEOUT_S", 0.0)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import filelock, sys
        with filelock.FileLock({str(tmp_path / '.lockfile')!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # waits for the event, no clock
        assert compile_cache.repair(tmp_path) == []
        assert (tmp_path / "jit_f-1-cache").exists()
    finally:
        holder.stdin.close()
        holder.wait()
    assert compile_cache.repair(tmp_path) == ["jit_f-1-cache"]
