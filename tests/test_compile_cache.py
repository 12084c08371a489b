"""The persistent compilation cache survives a write that was cut short: JAX's bounded cache
leaves a `<key>-cache` without its `<key>-atime` (kill, full disk, `ulimit -f`), after which
every later write of every process warned `Error writing persistent compilation cache entry ...
FileNotFoundError ...-atime` and cached nothing. `compile_cache.enable` removes such halves."""

import subprocess
import sys
import textwrap

from faults import ROOT, cli_env
from urm_jax import compile_cache

# A fresh process: JAX's cache is set up once per process, on its first compile.
COMPILE = textwrap.dedent("""
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
    done = subprocess.run([sys.executable, "-c", COMPILE, str(cache)], cwd=ROOT, env=cli_env(1),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stdout and "Error writing" not in done.stderr, done.stdout + done.stderr[-3000:]
    names = sorted(p.name for p in cache.iterdir() if p.name != ".lockfile")
    assert "jit_step_in_mesh-deadbeef-cache" not in names and "jit_gone-cafe-atime" not in names, names
    assert {"jit_whole-f00d-cache", "jit_whole-f00d-atime"} <= set(names)  # a whole entry stays
    written = [n for n in names if n.startswith("jit__lambda") and n.endswith("-cache")]
    assert len(written) == 1 and written[0].replace("-cache", "-atime") in names, names


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
