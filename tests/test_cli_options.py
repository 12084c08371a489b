"""Command-line hardening across commands (review of issues 13 and 14):

* every numeric option of every command (`urm-jax` and `python -m convert`) refuses inf, nan,
  1e400 and 30-digit integers in argparse's one line, exit 2 (was: `score --memory-budget inf`
  -> OverflowError traceback);
* `key=value` overrides are taken anywhere among the options (train, memory, plan);
* `plan --json` goes through `check_outputs` before anything compiles: never the recipe, never an
  existing file without --overwrite, never into a read-only directory;
* the training shape rules (`data.seq_len` against the model's context and against splash's
  blocks) are one rule for `memory`, `plan` and training, naming `data.seq_len`;
* the compilation cache is optional: an unusable directory is one `warning:` line;
* SIGTERM removes the command's temporary and exits 143 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from convert.__main__ import build_parser as convert_parser
from faults import CEILING_S, cli_env, unwritable, wait_for
from hf_fixtures import make_tiny_urm
from urm_jax.cli import build_parser, main as cli_main
from urm_jax.errors import warning_lines

ROOT = Path(__file__).resolve().parent.parent
TINY = ["configs/train/tiny_stage1.yaml", "--model-config", "configs/model/urm-tiny.json"]
BAD_NUMBERS = ["inf", "-inf", "nan", "1e400", "9" * 30]


def numeric_options(parser: argparse.ArgumentParser):
    """(command, option, type) of every option whose type parses the string '1'."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, sub in subs.items():
        for action in sub._actions:
            if action.option_strings and callable(action.type):
                try:
                    action.type("1")
                except (argparse.ArgumentTypeError, ValueError):
                    continue
                yield command, action.option_strings[0], action.type


ALL_NUMERIC = [*numeric_options(build_parser()), *numeric_options(convert_parser())]


@pytest.mark.parametrize("command, option, kind", ALL_NUMERIC, ids=[f"{c}{o}" for c, o, _ in ALL_NUMERIC])
def test_every_numeric_option_refuses_non_finite_and_huge_values(command, option, kind):
    for text in BAD_NUMBERS:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


def test_the_audit_covers_every_command():
    commands = {command for command, _, _ in ALL_NUMERIC}
    assert {"score", "eval", "parity", "serve", "train", "memory", "demo", "export", "init"} <= commands
    assert len(ALL_NUMERIC) >= 25, ALL_NUMERIC


@pytest.mark.parametrize("option, text", [("--shard", "0/1e400"), ("--shard", f"0/{'9' * 30}"),
                                          ("--mesh", "inf,1,1"), ("--mesh", f"{'9' * 30},1,1"),
                                          ("--mesh", "0,1,1")])
def test_structured_numeric_options_refuse_huge_values(option, text):
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    action = next(a for sub in subs.values() for a in sub._actions if option in a.option_strings)
    with pytest.raises(argparse.ArgumentTypeError):
        action.type(text)


@pytest.mark.parametrize("budget", ["inf", "1e400", "nan"])
def test_score_memory_budget_inf_is_one_line(capsys, tmp_path, budget):
    with pytest.raises(SystemExit) as exc:
        cli_main(["score", "--model", "m", "--input", "i.jsonl", "--output", str(tmp_path / "o.jsonl"),
                  "--memory-budget", budget])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"error: argument --memory-budget: must be a finite number, got {budget} (see --help)")
    assert "Traceback" not in err


def test_overrides_after_options(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli_main(["memory", "configs/hardware/v5p-8.yaml", "--chip", "v5p", "data.seq_len=abc"]) == 2
    assert capsys.readouterr().err.strip() == "error: `data.seq_len`: expected int, got str 'abc'"
    assert cli_main(["memory", *TINY, "--platform", "cpu", "data.seq_len=512", "--devices", "2",
                     "global_batch_size=4"]) == 0
    assert "2 row(s) x 512 tokens" in capsys.readouterr().out
    args = build_parser().parse_args(["train", "r.yaml", "a=1", "--allow-config-change", "all", "b=2"])
    assert (args.config, args.overrides, args.allow_config_change) == ("r.yaml", ["a=1", "b=2"], ["all"])


# --- plan --json: the outputs rule, before compiling ----------------------------------------


def plan(capsys, *args) -> tuple[int, str]:
    code = cli_main(["plan", *TINY, "data.seq_len=512", "--topology", "v5p:2x2x1", *args])
    return code, capsys.readouterr().err


def test_plan_json_never_replaces_the_recipe_or_an_existing_file(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    recipe = ROOT / TINY[0]
    before = recipe.read_bytes()
    code, err = plan(capsys, "--json", TINY[0])
    assert code == 2 and recipe.read_bytes() == before
    assert err.strip() == (f"error: --json {TINY[0]} is the input config {TINY[0]}: an output never "
                           "replaces an input (not even with --overwrite); choose another path")
    code, err = plan(capsys, "--json", TINY[2], "--overwrite")  # the model config: an input too
    assert code == 2 and "the input --model-config" in err

    existing = tmp_path / "plan.json"
    existing.write_text("keep me")
    code, err = plan(capsys, "--json", str(existing))
    assert code == 2 and existing.read_text() == "keep me"
    assert err.strip() == f"error: --json {existing} already exists (pass --overwrite to replace it)"
    assert "compiling" not in err


def test_plan_json_into_a_read_only_directory_fails_before_compiling(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    locked = tmp_path / "locked"
    locked.mkdir()
    with unwritable(locked):
        code, err = plan(capsys, "--json", str(locked / "sub" / "p.json"))
    [line] = err.strip().splitlines()
    assert code == 2 and line.startswith(f"error: --json: cannot create {locked / 'sub' / 'p.json'}: "
                                         f"{locked} is not writable"), line
    assert "compiling" not in err and not (locked / "sub").exists()


# --- data.seq_len: one rule for memory, plan and training ------------------------------------


SPLASH_640 = ("error: `data.seq_len`: 640 with `attention: auto` (splash on tpu): splash attention needs "
              "the sequence length (640) to be a multiple of 128 and of its block size (512); set "
              "data.seq_len=1024 (or another length that works), or attention=blockwise")


def test_memory_and_plan_name_data_seq_len_for_splash(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli_main(["memory", *TINY, "--chip", "v5p"]) == 2
    assert capsys.readouterr().err.strip() == SPLASH_640
    code, err = cli_main(["plan", *TINY, "--topology", "v5p:2x2x1"]), capsys.readouterr().err
    assert code == 2 and err.strip() == SPLASH_640  # before libtpu is even looked for
    assert cli_main(["memory", *TINY, "--chip", "v5p", "attention=blockwise", "--devices", "4"]) == 0
    assert cli_main(["memory", *TINY, "--chip", "h100", "--devices", "4"]) == 0  # cudnn: any length
    capsys.readouterr()
    packed = ["configs/train/tiny_stage2.yaml", "--model-config", "configs/model/urm-tiny.json",
              "data.pack=true", "data.seq_len=384", "--chip", "v5p"]
    assert cli_main(["memory", *packed]) == 2
    assert "`data.seq_len`: 384 (rows of 768 tokens: 2 x data.seq_len, packed pairs)" in capsys.readouterr().err


def test_memory_refuses_a_seq_len_beyond_the_models_context(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli_main(["memory", *TINY, "--chip", "v5p", "data.seq_len=1000000", "attention=blockwise"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: `data.seq_len`: 1000000 is longer than the model's context (max_position_embeddings "
        "131072 in configs/model/urm-tiny.json)")


def test_kernel_refusals_suggest_blockwise():
    from urm_jax.model.attention import check_available

    with pytest.raises(ValueError, match=r"attention 'cudnn' needs a GPU; this run's JAX backend is 'cpu': "
                       r"use blockwise \(any backend, memory linear in the length\) or auto"):
        check_available("cudnn")


# --- the compilation cache is optional --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_urm(tmp_path_factory.mktemp("opts") / "hf", vocab=512, gate_dtype="float32")


def score_process(model, inp, out, env, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "urm_jax.cli", "score", "--model", str(model),
                             "--input", str(inp), "--output", str(out), "--no-progress", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("where", ["a file", "under a read-only directory", "a read-only directory",
                                   "read-only HOME"])
def test_an_unusable_cache_directory_is_one_warning(tiny_model, tmp_path, where):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"input_ids": [1, 5, 6, 7]}) + "\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    cache = {"a file": inp, "under a read-only directory": locked / "cache",
             "a read-only directory": locked, "read-only HOME": None}[where]
    env = cli_env()
    if cache is None:
        env.pop("URM_JAX_COMPILATION_CACHE", None)
        env.pop("XDG_CACHE_HOME", None)
        env["HOME"] = str(locked)
        shown = locked / ".cache" / "urm-jax" / "jax-compilation-cache"
    else:
        env["URM_JAX_COMPILATION_CACHE"] = str(cache)
        shown = cache
    with unwritable(locked):
        done = score_process(tiny_model, inp, tmp_path / "out.jsonl", env)
        out, err = done.communicate(timeout=CEILING_S)
    assert done.returncode == 0, err
    warning = [line for line in err.splitlines() if "warning" in line.lower() or "Traceback" in line]
    assert len(warning) == 1, err
    assert warning[0].startswith(f"warning: compilation cache off: cannot use {shown}"), warning
    assert warning[0].endswith("set URM_JAX_COMPILATION_CACHE to a writable directory (or off)")
    assert "scored 1 examples" in out and (tmp_path / "out.jsonl").exists()


def test_jax_cache_entry_warnings_become_one_line(capsys):
    with pytest.warns(UserWarning, match="something else entirely") as shown, warning_lines():
        for name in ("jit_a", "jit_b"):  # JAX's words (jax/_src/compiler.py), once per program
            warnings.warn(f"Error writing persistent compilation cache entry for '{name}': "
                          "PermissionError: [Errno 13] Permission denied: '/c/x.lockfile'")
        warnings.warn("something else entirely")  # other warnings: shown as Python shows them
    assert [str(w.message) for w in shown] == ["something else entirely"]
    err = capsys.readouterr().err.strip().splitlines()
    cache = [line for line in err if "compilation cache" in line]
    assert len(cache) == 1 and cache[0].startswith("warning: the compilation cache ")
    assert "PermissionError: [Errno 13] Permission denied: '/c/x.lockfile'" in cache[0]
    assert "URM_JAX_COMPILATION_CACHE" in cache[0]


def test_an_infinite_cache_size_is_refused():
    done = subprocess.run([sys.executable, "-m", "urm_jax.cli", "memory", "configs/hardware/v5p-8.yaml"],
                          cwd=ROOT, env=cli_env(URM_JAX_COMPILATION_CACHE_GB="inf"),
                          capture_output=True, text=True, timeout=CEILING_S)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: URM_JAX_COMPILATION_CACHE_GB='inf': expected a positive number of GB"


# --- SIGTERM: temporaries removed, one line, exit 143 -----------------------------------------


def test_sigterm_removes_the_temporary_and_says_so(tiny_model, tmp_path):
    """The input is a FIFO this test holds open: the run provably sits in `score`, its output's
    temporary created, reading the next line, when SIGTERM arrives (no race with a fast run)."""
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    stale = tmp_path / f".out.jsonl.tmp-{os.uname().nodename}-999999999"  # a killed run's (no such pid)
    stale.write_text("")
    writer = os.open(fifo, os.O_RDWR)  # never blocks; keeps the FIFO open for writing
    try:
        os.write(writer, (json.dumps({"input_ids": [1, 5, 6]}) + "\n").encode())
        proc = score_process(tiny_model, fifo, out, cli_env(), "--chunk-size", "1")
        temps = lambda: [p for p in tmp_path.glob(".out.jsonl.tmp-*") if p != stale]  # noqa: E731
        wait_for(lambda: temps() and not stale.exists(), "score to create its output's temporary", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=CEILING_S)
    finally:
        os.close(writer)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"error: stopped by SIGTERM; nothing written to {out}"
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))


# A command whose SIGTERM lands inside a finalizer, where Python cannot propagate an exception
# ("Exception ignored in ..."), then blocks in a read that never returns on its own.
SIGTERM_IN_FINALIZER = """
import argparse, os, signal, sys
from urm_jax.cli import run_until_sigterm

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100000):  # Python runs the handler here, inside the finalizer
            pass

def command(args):
    Finalized()  # collected at once: the SIGTERM is raised in its __del__
    read_end, _ = os.pipe()  # this process holds the write end: the read never returns by itself
    print("reading", flush=True)
    os.read(read_end, 1)
    return 0

sys.exit(run_until_sigterm(command, argparse.Namespace(command="score", output="out.jsonl", bad_lines=None)))
"""


def test_a_sigterm_raised_in_a_finalizer_still_stops_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SIGTERM_IN_FINALIZER], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=CEILING_S)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: stopped by SIGTERM; nothing written to out.jsonl"]
