"""urm-jax side by side with the tools a user would otherwise pick, in one process tree, one
ratio table per comparison (ratios urm-jax / peer: > 1 means urm-jax is better).

    .venv/bin/python bench/compare.py [--quick] [--only score stage1 bt easydel compile convert]
        [--rounds N] [--workdir build/compare] [--attention auto] [--json FILE]

Every tool runs in its own worker subprocess (bench/peers/): urm-jax in this environment, HF
transformers + TRL in build/peers/trl, EasyDeL in build/peers/easydel (venvs the bench creates
on first use from bench/peers/requirements-*.txt, pinned; nothing is installed here). Workers
answer requests; the driver alternates them request by request (A B A B ..., order rotated each
round) on identical inputs, so background load hits both alike; medians / totals over the
rounds, CPU seconds (all threads of the worker) next to wall seconds, peak RSS per worker and
workload, compile seconds apart. Whole-process figures (compile cold/warm, conversion) come
from the kernel's accounting of each finished child (wait4), the commands alternating too.

Comparisons (sizes: the full run; --quick shrinks everything to a smoke test):
  score    `urm-jax score` (Scorer + score_jsonl) vs HF transformers (SDPA) on the exported
           ~100M model: (a) identical padded batches, (b) a HelpSteer2-like length mix up to
           --mix-max (8k), each tool's natural batching, (c) rows of --long tokens; peak RSS.
  stage1   stage-1 training (packed rows) vs TRL RewardTrainer (1-label reward model, its own
           padding/collation) on the same sequence lengths: CPU seconds per real token.
  bt       Bradley-Terry on the bundled pairs' lengths vs TRL on the same pairs, each tool's
           natural batching: urm-jax stage 2 uncached, packed, every parameter trained (TRL
           trains the whole model: equal work); and urm-jax's default gate-only cached path.
  easydel  the forward pass vs EasyDeL 0.3.0 (same Llama shape; EasyDeL's default bf16
           attention and its float32 attention).
  compile  `urm-jax score` and a resumed `urm-jax train`, each run twice in fresh processes
           on one new compilation cache: compile seconds cold / warm per phase (trace, lower,
           XLA, cache load, save), whole-process wall.
  convert  `convert from_hf` and `to_hf` vs `cp -r` of the same bytes and vs transformers
           load + save_pretrained, warm and cold page cache, peak RSS; each command starts
           after a `sync` (untimed), so none pays the write-back another one left.

Float32 everywhere (TRL/HF train in float32 on CPU by default). The machine's load average is
printed with every table: on a shared machine quote ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import SHAPE, load_line, random_checkpoint  # noqa: E402
from bench.peers import envs  # noqa: E402
from bench.peers.worker import REPO, Worker, run_process  # noqa: E402

QUICK_SHAPE = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                   num_kv_heads=2)
RESULTS: dict = {}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n{load_line()}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in row) + " |")
    sys.stdout.flush()


def ratio(peer: float, ours: float) -> str:
    return f"**{peer / ours:.2f}x**" if ours > 0 else "n/a"


def jax_worker(work: Path) -> Worker:
    return Worker("urm-jax", sys.executable, "bench.peers.jax_side", work / "workers.log",
                  env={"URM_JAX_COMPILATION_CACHE": "off"})


def torch_worker(work: Path) -> Worker:
    return Worker("torch", envs.ensure("trl", say), "bench.peers.torch_side", work / "workers.log")


def write_ids(path: Path, seqs) -> Path:
    with open(path, "w") as out:
        for i, s in enumerate(seqs):
            out.write(json.dumps({"id": i, "input_ids": [int(t) for t in s]}) + "\n")
    return path


# --- (a) scoring ---------------------------------------------------------------------------------

def compare_score(args, shape: dict, work: Path) -> None:
    from urm_jax.data.datasets import synthetic_helpsteer_lengths

    ckpt = random_checkpoint(work / "score-hf", gate_dtype="float16", pad_token_id=shape["vocab_size"] - 1,
                             **shape)
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(4, shape["vocab_size"] - 2, n).tolist()  # noqa: E731
    mix = [int(n) for n in synthetic_helpsteer_lengths(args.mix_rows, seed=0, max_length=args.mix_max)]
    # The log-normal mix stops at 4000 tokens: the longest rows go up to --mix-max (8k) here.
    mix[: max(1, args.mix_rows // 24)] = [args.mix_max] * max(1, args.mix_rows // 24)
    workloads = {"(a) identical padded batches": [[args.fixed_length] * args.fixed_rows],
                 "(b) length mix, natural batching": [mix],
                 f"(c) rows of {args.long} tokens": [[args.long] * args.long_rows]}
    with jax_worker(work) as jx, torch_worker(work) as pt:
        jx.call("score_init", model=str(ckpt), batch_size=args.batch, max_length=max(args.mix_max, args.long),
                attention=args.attention, batch_tokens=args.batch_tokens)
        info = pt.call("hf_score_init", model=str(ckpt))
        rows = []
        for name, (lengths,) in ((k, v) for k, v in workloads.items()):
            seqs = [ids(n) for n in lengths]
            rounds = [seqs[i::args.rounds] for i in range(args.rounds)]
            rounds = [r for r in rounds if r]
            warm = jx.call("score_warmup", lengths=[[len(s) for s in r] for r in rounds])
            pt.call("hf_score", input=str(write_ids(work / "warm.jsonl", [seqs[0][:16]])), batch_size=1)
            tot = {"jax_s": 0.0, "hf_s": 0.0, "jax_cpu": 0.0, "hf_cpu": 0.0, "jax_rss": 0.0, "hf_rss": 0.0,
                   "tokens": 0}
            per_round = []
            for r, seq_round in enumerate(rounds):
                path = write_ids(work / f"score{r}.jsonl", seq_round)
                order = [("jax", lambda: jx.call("score", input=str(path), output=str(work / "out.jsonl"))),
                         ("hf", lambda: pt.call("hf_score", input=str(path), batch_size=args.batch))]
                got = {}
                for side, fn in (order if r % 2 == 0 else order[::-1]):
                    got[side] = fn()
                assert got["jax"]["tokens"] == got["hf"]["tokens"], (got["jax"]["tokens"], got["hf"]["tokens"])
                for side in ("jax", "hf"):
                    tot[f"{side}_s"] += got[side]["seconds"]
                    tot[f"{side}_cpu"] += got[side]["cpu_s"]
                    tot[f"{side}_rss"] = max(tot[f"{side}_rss"], got[side]["peak_rss_mb"])
                tot["tokens"] += got["jax"]["tokens"]
                per_round.append(got["hf"]["seconds"] / got["jax"]["seconds"])
                say(f"[score] {name} round {r + 1}/{len(rounds)}: ratio {per_round[-1]:.2f}")
            rows.append([name, tot["tokens"], f"{tot['tokens'] / tot['jax_s']:.0f}",
                         f"{tot['tokens'] / tot['hf_s']:.0f}", ratio(tot["hf_s"], tot["jax_s"]),
                         ratio(tot["hf_cpu"], tot["jax_cpu"]), ", ".join(f"{x:.2f}" for x in per_round),
                         f"{tot['jax_rss']:.0f} / {tot['hf_rss']:.0f}",
                         f"{warm['compile_s']:.1f} ({warm['shapes']} shapes)"])
            RESULTS.setdefault("score", {})[name] = tot | {"round_ratios": per_round, "compile_s": warm["compile_s"]}
    table(f"Scoring: urm-jax score vs HF transformers {info['transformers']} ({info['attention']}), "
          f"{param_text(shape)}, batch {args.batch}, urm-jax attention {args.attention}",
          ["workload", "real tokens", "urm-jax tok/s", "HF tok/s", "ratio (wall)", "ratio (CPU s)",
           "per-round ratios", "peak RSS MB urm-jax / HF", "urm-jax compile s (apart)"], rows)


def param_text(shape: dict) -> str:
    from urm_jax.config import ModelConfig
    from urm_jax.hf.synthetic import tiny_hf_config

    n = ModelConfig.from_hf_dict(tiny_hf_config(**shape)).param_count()["total"]
    return f"{n / 1e6:.0f}M-param Llama shape (hidden {shape['hidden_size']}, {shape['num_layers']} layers)"


# --- (b, c) training vs TRL ------------------------------------------------------------------

def interleave_training(args, jx: Worker, pt: Worker, name: str, jax_steps: int, trl_steps: int) -> list:
    """Rounds of `jax_steps` urm-jax steps and `trl_steps` TRL steps, alternating; returns the
    table row (CPU and wall seconds per real token, their ratio) and records the totals."""
    tot = {s: {"tokens": 0, "slots": 0, "wall": 0.0, "cpu": 0.0, "rss": 0.0} for s in ("jax", "trl")}
    for r in range(args.rounds):
        calls = [("jax", lambda: jx.call("train_steps", steps=jax_steps)),
                 ("trl", lambda: pt.call("trl_steps", steps=trl_steps))]
        for side, fn in (calls if r % 2 == 0 else calls[::-1]):
            got = fn()
            t = tot[side]
            t["tokens"] += got["tokens"]
            t["slots"] += got["slots"]
            t["wall"] += got["seconds"]
            t["cpu"] += got["cpu_s"]
            t["rss"] = max(t["rss"], got["peak_rss_mb"])
        say(f"[{name}] round {r + 1}/{args.rounds}")
    j, t = tot["jax"], tot["trl"]
    RESULTS.setdefault("train", {})[name] = tot
    per = lambda x, k: 1e3 * x[k] / max(x["tokens"], 1)  # noqa: E731  (ms per real token)
    return [name, f"{j['tokens']} / {t['tokens']}", f"{j['tokens'] / j['slots']:.0%} / {t['tokens'] / t['slots']:.0%}",
            f"{per(j, 'cpu'):.2f} / {per(t, 'cpu'):.2f}", ratio(per(t, "cpu"), per(j, "cpu")),
            f"{per(j, 'wall'):.2f} / {per(t, 'wall'):.2f}", ratio(per(t, "wall"), per(j, "wall")),
            f"{j['rss']:.0f} / {t['rss']:.0f}"]


TRAIN_HEADER = ["comparison", "real tokens urm-jax / TRL", "real-token fraction", "CPU ms per real token",
                "ratio (CPU)", "wall ms per real token", "ratio (wall)", "peak RSS MB"]


def compare_stage1(args, shape: dict, work: Path) -> None:
    from urm_jax.data.datasets import synthetic_helpsteer_lengths

    ckpt = random_checkpoint(work / "train-hf", **shape)
    lengths = [int(n) for n in synthetic_helpsteer_lengths(args.examples, seed=1, max_length=args.seq_len)]
    pairs = [[a, b] for a, b in zip(lengths[0::2], lengths[1::2])]
    with jax_worker(work) as jx, torch_worker(work) as pt:
        j = jx.call("stage1_init", model=str(ckpt), lengths=lengths, seq_len=args.seq_len, rows=args.rows)
        t = pt.call("trl_init", shape=shape, pairs=pairs, batch_pairs=args.trl_batch)
        row = interleave_training(args, jx, pt, "stage 1 (packed) vs TRL RewardTrainer", args.jax_steps, args.trl_steps)
    table(f"Stage 1 vs TRL {t['trl']} RewardTrainer per real token, {param_text(shape)}, float32; urm-jax "
          f"{args.rows} packed rows of {args.seq_len} a step (compile {j['compile_s']:.0f} s, apart), TRL "
          f"{args.trl_batch} pairs a step padded to the longest side; HelpSteer2-like lengths "
          f"(median {int(np.median(lengths))}, max {max(lengths)})", TRAIN_HEADER, [row])


def bundled_pair_lengths() -> list[list[int]]:
    """(chosen, rejected) token lengths of the bundled preference pairs (Llama-3 tokenizer)."""
    from transformers import AutoTokenizer

    from urm_jax.data.datasets import load_preference_pairs
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(cached_llama3_tokenizer_dir())
    pairs, _ = load_preference_pairs(str(REPO / "data/samples/preference_sample.jsonl"), tok, max_length=640,
                                     progress=False)
    return [[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs]


def compare_bt(args, shape: dict, work: Path) -> None:
    ckpt = random_checkpoint(work / "train-hf", **shape)
    pairs = bundled_pair_lengths()
    pairs = (pairs * (args.pairs // len(pairs) + 1))[: args.pairs]
    longest = max(max(p) for p in pairs)
    rows = []
    with jax_worker(work) as jx, torch_worker(work) as pt:
        j = jx.call("bt_init", model=str(ckpt), pairs=pairs, seq_len=longest, rows=args.bt_rows,
                    trainable=["backbone", "value_head", "gate"])
        t = pt.call("trl_init", shape=shape, pairs=pairs, batch_pairs=args.trl_batch)
        rows.append(interleave_training(args, jx, pt, "BT, every parameter (equal work)", args.jax_steps,
                                        args.trl_steps))
        # As users run them: urm-jax's default stage 2 (feature pass + gate on cached features)
        # for one epoch, twice (the second with its programs compiled), vs TRL's epoch at the
        # per-step cost just measured (its steps are all alike: batches of the same pairs).
        runs = [jx.call("bt_default_epoch", model=str(ckpt), pairs=pairs, seq_len=longest,
                        batch_pairs=args.trl_batch) for _ in range(2)]
        trl = RESULTS["train"]["BT, every parameter (equal work)"]["trl"]
        trl_steps = args.rounds * args.trl_steps
        trl_epoch_wall = t["steps_per_epoch"] * trl["wall"] / trl_steps
        trl_epoch_cpu = t["steps_per_epoch"] * trl["cpu"] / trl_steps
        warm = runs[-1]
        # Compile seconds (tracing + XLA, one thread) are reported apart and taken out of both.
        wall, cpu = warm["wall_s"] - warm["compile_s"], warm["cpu_s"] - warm["compile_s"]
        rows.append(["BT, urm-jax default (cached features, gate only) vs TRL default, one epoch",
                     f"{len(pairs)} pairs", "-", f"epoch CPU s {cpu:.1f} / {trl_epoch_cpu:.1f}",
                     ratio(trl_epoch_cpu, cpu),
                     f"epoch wall s {wall:.1f} (feature pass {warm['features_s']:.1f} incl. compile; compile "
                     f"{warm['compile_s']:.1f} apart) / {trl_epoch_wall:.1f}",
                     ratio(trl_epoch_wall, wall), f"{warm['peak_rss_mb']:.0f} / {trl['rss']:.0f}"])
        RESULTS["train"]["BT default epoch"] = {"urm-jax": runs, "trl_epoch_wall": trl_epoch_wall,
                                               "trl_epoch_cpu": trl_epoch_cpu}
    table(f"Bradley-Terry on the bundled pairs' lengths ({len(pairs)} pairs, median side "
          f"{int(np.median(pairs))}, longest {longest}) vs TRL {t['trl']} RewardTrainer (whole model), "
          f"{param_text(shape)}, float32; urm-jax stage 2 uncached, {args.bt_rows} packed rows of "
          f"2 x {longest} a step ({j['real_token_fraction']:.0%} real tokens, compile {j['compile_s']:.0f} s "
          f"apart); TRL {args.trl_batch} pairs a step", TRAIN_HEADER, rows)


# --- (d) forward vs EasyDeL ----------------------------------------------------------------------

def compare_easydel(args, shape: dict, work: Path) -> None:
    ckpt = random_checkpoint(work / "fwd-hf", **shape)
    ed_python = envs.ensure("easydel", say)
    rows_, length = args.fwd_rows, args.fwd_len
    rows = []
    for attn in ("bfloat16", "float32"):
        with jax_worker(work) as jx, Worker("easydel", ed_python, "bench.peers.easydel_side",
                                            work / "workers.log") as ed:
            jc = jx.call("forward_init", model=str(ckpt), rows=rows_, length=length)
            ec = ed.call("forward_init", shape=shape, rows=rows_, length=length, attn_dtype=attn)
            times = {"jax": [], "ed": []}
            cpu = {"jax": [], "ed": []}
            for r in range(args.rounds):
                calls = [("jax", jx), ("ed", ed)]
                for side, w in (calls if r % 2 == 0 else calls[::-1]):
                    got = w.call("forward", repeats=args.fwd_repeats)
                    times[side].append(got["wall_s"])
                    cpu[side].append(got["cpu_s"])
            med = {k: statistics.median(v) / args.fwd_repeats for k, v in times.items()}
            cmed = {k: statistics.median(v) / args.fwd_repeats for k, v in cpu.items()}
            rows.append([f"urm-jax fp32 vs EasyDeL {ec['easydel']} fp32 params, attention {attn}",
                         f"{med['jax']:.3f} / {med['ed']:.3f}", ratio(med["ed"], med["jax"]),
                         f"{cmed['jax']:.3f} / {cmed['ed']:.3f}", ratio(cmed["ed"], cmed["jax"]),
                         f"{jc['compile_s']:.1f} / {ec['compile_s']:.1f}"])
            RESULTS.setdefault("easydel", {})[attn] = {"wall": med, "cpu": cmed}
    table(f"Forward vs EasyDeL (jax {ec['jax']} in its venv), {param_text(shape)}, batch {rows_} x {length}, "
          f"median of {args.rounds} rounds of {args.fwd_repeats}",
          ["comparison", "s/forward urm-jax / EasyDeL", "ratio (wall)", "CPU s/forward", "ratio (CPU)",
           "compile s (apart)"], rows)


# --- (e) compile cold / warm ---------------------------------------------------------------------

PHASES = ("trace", "lower", "xla", "load", "save")


def compile_phases(log: Path) -> dict:
    """The last `CompileTotals.describe()` line of a log: total seconds, programs, cache hits and
    seconds per phase (trace / lower / xla / load / save; a phase under 0.05 s reads 0)."""
    import re

    text = log.read_text() if log.exists() else ""
    found = re.findall(r"compile ([0-9.]+) s \((\d+) programs(?:, (\d+) from the cache)?(?:; ([^)]*))?\)", text)
    if not found:
        return {"seconds": float("nan"), "programs": 0, "hits": 0} | {k: float("nan") for k in PHASES}
    total, programs, hits, parts = found[-1]
    phases = {k: 0.0 for k in PHASES} | {k: float(v) for k, v in (p.split() for p in parts.split(", ") if p)}
    return {"seconds": float(total), "programs": int(programs), "hits": int(hits or 0)} | phases


def resume_source(shape: dict, work: Path) -> tuple[Path, list[str]]:
    """A stage-1 run stopped at step 2 (checkpoint 2), trained with no compilation cache, and the
    `urm-jax train` arguments that resume it to step 4 (the run directory is copied first)."""
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir
    from urm_jax.hf.synthetic import llama3_hf_config, write_random_hf

    model_shape = {k: v for k, v in shape.items() if k not in ("vocab_size", "pad_token_id")}
    base = write_random_hf(work / "resume-hf", llama3_hf_config(**model_shape), dtype="float32",
                           gate_dtype="float16", tokenizer_dir=cached_llama3_tokenizer_dir(), overwrite=True,
                           progress=False)
    source = work / "resume-source"
    shutil.rmtree(source, ignore_errors=True)
    common = [str(REPO / "configs/train/tiny_stage1.yaml"), f"model={base}", "checkpoint.every_steps=2",
              "checkpoint.async_save=false", "plot=false", "tensorboard=false"]
    cli = [sys.executable, "-m", "urm_jax.cli", "train"]
    got = run_process(cli + common + [f"output_dir={source}", "max_steps=2"],
                      env={"URM_JAX_COMPILATION_CACHE": "off", "PYTHONPATH": str(REPO)},
                      log=work / "compile-resume-source.log")
    if got["returncode"]:
        raise RuntimeError(f"the run to resume failed; see {work / 'compile-resume-source.log'}")
    return source, cli[:-1] + ["train", "--allow-config-change", "max_steps"] + common + ["max_steps=4"]


def compare_compile(args, shape: dict, work: Path) -> None:
    """`urm-jax score` and a resumed `urm-jax train` (2 steps on from checkpoint 2), each run cold
    (a new cache) then warm (the same cache) in fresh processes, the commands interleaved; compile
    seconds per phase as each command's CompileMeter line reports them."""
    from urm_jax.data.datasets import synthetic_helpsteer_lengths

    ckpt = random_checkpoint(work / "compile-hf", gate_dtype="float16", pad_token_id=shape["vocab_size"] - 1,
                             **shape)
    rng = np.random.default_rng(0)
    lengths = synthetic_helpsteer_lengths(args.mix_rows, seed=0, max_length=args.mix_max)
    ids = write_ids(work / "compile-ids.jsonl", [rng.integers(4, shape["vocab_size"] - 2,
                                                              int(n)).tolist() for n in lengths])
    source, resume = resume_source(shape, work)
    run_dir = work / "compile-resume-run"

    def resume_command() -> list[str]:  # a fresh copy of the stopped run, at one path (cold and warm alike)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(source, run_dir)
        return resume + [f"output_dir={run_dir}"]

    commands = {
        "urm-jax score": lambda: [sys.executable, "-m", "urm_jax.cli", "score", "--model", str(ckpt), "--input",
                                  str(ids), "--output", str(work / "compile-out.jsonl"), "--no-progress",
                                  "--overwrite", "--max-length", str(args.mix_max)],
        "urm-jax train (resume)": resume_command,
    }
    rows, summary = [], {}
    for attempt in range(args.compile_reps):
        names = list(commands) if attempt % 2 == 0 else list(commands)[::-1]
        for name in names:
            cache = work / f"jax-cache-{attempt}-{name.split()[1]}"
            shutil.rmtree(cache, ignore_errors=True)
            env = {"URM_JAX_COMPILATION_CACHE": str(cache), "PYTHONPATH": str(REPO)}
            for phase in ("cold", "warm"):
                log = work / f"compile-{name.split()[1]}-{attempt}-{phase}.log"
                log.unlink(missing_ok=True)
                got = run_process(commands[name](), env=env, log=log)
                ph = compile_phases(log)
                summary.setdefault((name, phase), []).append(ph["seconds"])
                rows.append([name, attempt + 1, phase, f"{ph['seconds']:.2f}",
                             *(f"{ph[k]:.2f}" for k in PHASES), f"{ph['programs']} / {ph['hits']}",
                             f"{got['wall_s']:.1f}", f"{got['cpu_s']:.1f}", f"{os.getloadavg()[0]:.1f}",
                             got["returncode"]])
                RESULTS.setdefault("compile", []).append({"command": name, "attempt": attempt + 1, "cache": phase,
                                                          **ph, **got, "load1": os.getloadavg()[0]})
                say(f"[compile] {name} {phase}: {rows[-1]}")
    table(f"Compile time, `urm-jax score` of {args.mix_rows} HelpSteer2-like rows (max {args.mix_max}) and a "
          f"stage-1 `urm-jax train` resumed from step 2 to 4, fresh processes, a new cache dir per command and "
          f"attempt (cold, then warm), {param_text(shape)}; phases as CompileMeter reports them (trace: Python "
          f"to jaxpr; lower: to StableHLO; xla: XLA compile; load: programs read from the caches; save: programs "
          f"stored)",
          ["command", "attempt", "cache", "compile s", *(f"{k} s" for k in PHASES), "programs / from cache",
           "process wall s", "process CPU s", "load 1 min", "exit"], rows)
    ratios = [[name, f"{statistics.median(summary[(name, 'warm')]):.2f} / "
               f"{statistics.median(summary[(name, 'cold')]):.2f}",
               f"**{statistics.median(summary[(name, 'warm')]) / statistics.median(summary[(name, 'cold')]):.1%}**"]
              for name in commands]
    table("Warm start: compile seconds warm / cold (medians over attempts; target < 10%)",
          ["command", "warm / cold s", "warm as % of cold"], ratios)


# --- (f) conversion ------------------------------------------------------------------------------

def evict(path: Path) -> None:
    """Drop the page cache of every file under `path` (posix_fadvise DONTNEED): a cold read."""
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def compare_convert(args, shape: dict, work: Path) -> None:
    src = random_checkpoint(work / "convert-hf", dtype="bfloat16", gate_dtype="float16", **shape)
    size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    trl_python = envs.ensure("trl", say)
    env = {"PYTHONPATH": str(REPO)}
    ckpt = work / "convert-ckpt"
    save = ("from transformers import AutoModelForSequenceClassification as A; import sys; "
            "A.from_pretrained(sys.argv[1], trust_remote_code=True, dtype='auto').save_pretrained(sys.argv[2])")
    commands = {
        "convert from_hf": lambda out: [sys.executable, "-m", "convert", "from_hf", str(src), str(out)],
        "convert to_hf": lambda out: [sys.executable, "-m", "convert", "to_hf", str(ckpt), str(out)],
        "cp -r (HF dir)": lambda out: ["cp", "-r", str(src), str(out)],
        "transformers load + save": lambda out: [str(trl_python), "-c", save, str(src), str(out)],
    }
    run_process(commands["convert from_hf"](ckpt), env=env)  # the to_hf source, and a warm-up
    results = {(name, cache): [] for name in commands for cache in ("warm", "cold")}
    for r in range(args.rounds):
        for cache in ("warm", "cold"):
            names = list(commands) if r % 2 == 0 else list(commands)[::-1]
            for name in names:
                out = work / "convert-out"
                shutil.rmtree(out, ignore_errors=True)
                if cache == "cold":
                    evict(src)
                    evict(ckpt)
                # Start each command with nothing left to write back: a command that does not
                # fsync (cp) leaves ~2 GB dirty, and the next one (a convert's fsync) would pay it.
                os.sync()
                got = run_process(commands[name](out), env=env, log=work / "convert.log")
                if got["returncode"]:
                    raise RuntimeError(f"{name} failed; see {work / 'convert.log'}")
                results[(name, cache)].append(got)
            say(f"[convert] round {r + 1}/{args.rounds} {cache}")
    rows = []
    for cache in ("warm", "cold"):
        cp = statistics.median(g["wall_s"] for g in results[("cp -r (HF dir)", cache)])
        tf = statistics.median(g["wall_s"] for g in results[("transformers load + save", cache)])
        for name in commands:
            gs = results[(name, cache)]
            wall = statistics.median(g["wall_s"] for g in gs)
            rows.append([name, cache, f"{wall:.2f}", f"{statistics.median(g['cpu_s'] for g in gs):.2f}",
                         f"{max(g['peak_rss_mb'] for g in gs):.0f}", f"{wall / cp:.2f}x", ratio(tf, wall)])
    RESULTS["convert"] = {f"{k[0]} {k[1]}": v for k, v in results.items()}
    table(f"Conversion, {param_text(shape)} bf16 ({size / 1e9:.2f} GB), medians of {args.rounds} interleaved "
          f"rounds, whole processes (cold = page cache of the inputs dropped first)",
          ["command", "page cache", "wall s", "CPU s", "peak RSS MB", "wall / cp", "transformers / this"], rows)


COMPARISONS = {"score": compare_score, "stage1": compare_stage1, "bt": compare_bt, "easydel": compare_easydel,
               "compile": compare_compile, "convert": compare_convert}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(COMPARISONS), default=list(COMPARISONS))
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test (minutes)")
    parser.add_argument("--workdir", default="build/compare")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--attention", default="auto", help="urm-jax scoring attention (auto | reference | ...)")
    parser.add_argument("--json", help="also write every measurement here")
    # scoring
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fixed-length", type=int, default=256)
    parser.add_argument("--fixed-rows", type=int, default=64)
    parser.add_argument("--mix-rows", type=int, default=96)
    parser.add_argument("--mix-max", type=int, default=8192)
    parser.add_argument("--long", type=int, default=8192)
    parser.add_argument("--long-rows", type=int, default=4)
    parser.add_argument("--batch-tokens", type=int, default=8192,
                        help="urm-jax token budget per batch (long buckets get fewer rows; with the "
                             "L x L reference attention an 8k row alone holds ~3 GB of scores per layer)")
    # training
    parser.add_argument("--examples", type=int, default=256, help="stage-1 conversations")
    parser.add_argument("--seq-len", type=int, default=1024, help="stage-1 packed row length")
    parser.add_argument("--rows", type=int, default=2, help="stage-1 packed rows a step")
    parser.add_argument("--pairs", type=int, default=256, help="BT pairs (the bundled lengths, repeated)")
    parser.add_argument("--bt-rows", type=int, default=2, help="urm-jax packed pair rows a step")
    parser.add_argument("--trl-batch", type=int, default=4, help="TRL pairs a step")
    parser.add_argument("--jax-steps", type=int, default=2, help="urm-jax steps per round")
    parser.add_argument("--trl-steps", type=int, default=2, help="TRL steps per round")
    # forward, compile, convert
    parser.add_argument("--fwd-rows", type=int, default=2)
    parser.add_argument("--fwd-len", type=int, default=1024)
    parser.add_argument("--fwd-repeats", type=int, default=3)
    parser.add_argument("--compile-reps", type=int, default=1)
    parser.add_argument("--convert-layers", type=int, default=16, help="layers of the ~1B conversion model")
    args = parser.parse_args()
    shape = SHAPE | (QUICK_SHAPE if args.quick else {})  # every comparison gets the whole shape
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.fixed_rows, args.mix_rows, args.mix_max, args.long, args.long_rows = 8, 12, 1024, 1024, 2
        args.examples, args.seq_len, args.pairs, args.fwd_len, args.fwd_repeats = 32, 512, 32, 256, 2
        args.jax_steps = args.trl_steps = 1
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"# urm-jax vs peers ({'quick smoke run' if args.quick else 'full run'}); {load_line()}; "
          f"worker logs: {work / 'workers.log'}")
    failed = []
    for name in args.only:
        say(f"== {name} ({load_line()})")
        t = time.perf_counter()
        try:
            if name == "convert":
                # ~1B at the full size: hidden 2048, MLP 5632, 16 heads / 8 KV, vocab 128256 (quick: tiny).
                conv = shape if args.quick else SHAPE | dict(
                    vocab_size=128256, hidden_size=2048, intermediate_size=5632, num_layers=args.convert_layers,
                    num_heads=16, num_kv_heads=8)
                COMPARISONS[name](args, conv, work)
            else:
                COMPARISONS[name](args, shape, work)
        except Exception as err:  # one comparison failing must not cost the others' figures
            failed.append(name)
            print(f"\n**{name} failed**: {type(err).__name__}: {err}")
        print(f"\n({name}: {time.perf_counter() - t:.0f} s)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; {load_line()}")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=str))
    if failed:
        sys.exit(f"failed: {' '.join(failed)}")


if __name__ == "__main__":
    main()
