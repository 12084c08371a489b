"""Long context on CPU: attention alone (reference vs blockwise vs jax.nn.dot_product_attention)
and scoring vs HF transformers (SDPA) on rows up to 8k tokens, with peak memory of each side.

    PYTHONPATH=. .venv/bin/python bench/long_context.py [--quick] [--reps 3]

(a) Attention alone, one row, 8 query / 2 KV heads of 64 (the attention of a 512-wide model),
    fp32, causal, L = 1k, 2k, 4k, 8k: median forward time over --reps interleaved repetitions
    (the implementations alternate, so background load hits all alike), and memory as XLA's
    buffer assignment of the compiled program (temporaries + output: exact for what XLA
    allocates, no sampling), forward and forward+backward. The reference's forward at 8k holds
    ~3 GB: it is timed once (--reps 1) beyond 4k unless --dense-reps says otherwise.
(b) Scoring, tiny model widths at real lengths (hidden 256, 4 layers, 4 / 2 heads of 64, vocab
    32768, fp32 backbone, fp16 gate; random weights written by `urm_jax.hf.synthetic`, converted
    with `convert from_hf`, exported with `to_hf` and loaded by transformers with
    trust_remote_code and attn_implementation="sdpa"). Workloads: a HelpSteer2-like length mix
    plus long rows (3000, 5000, 8192, 8192 tokens), batch 4, each tool batching its natural way
    (urm-jax: length buckets, `attention auto` = reference below 256 tokens, blockwise above;
    HF: file order, padded to the longest row); and 8192-token rows alone at batch 1. Each tool
    runs in its own worker process (one process tree), the workers alternate round by round,
    and each reports its peak RSS (VmHWM, restarted after loading and warm-up so compiles do not
    count) and its RSS when scoring started: peak - start is what scoring itself took. urm-jax's warm-up compiles are timed apart. The ratio is HF time
    / urm-jax time for the same real tokens (> 1: urm-jax faster).
(c) One 3000-token conversation, urm-jax `reference` vs `auto` vs HF: seconds for the row alone
    (after warm-up), on the same model.

The load average is printed before and after. Inputs are token ids: no tokenisation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the scoring helpers of bench/score_throughput.py

SHAPE = dict(vocab_size=32768, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
             num_kv_heads=2, pad_token_id=32767, original_max_position_embeddings=8192,
             max_position_embeddings=131072, rope_theta=500000.0)
LONG_ROWS = (3000, 5000, 8192, 8192)


def _status_mb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Current resident set of this process (MB), from /proc (Linux)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set of this process (MB) since the last `reset_peak_rss`: VmHWM, which
    belongs to the process's own address space (getrusage's ru_maxrss would carry the parent's
    peak across fork + exec, and cannot be reset)."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs),
    so the peak of scoring is measured apart from loading and compiling."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# --- (a) attention alone ---------------------------------------------------------------------


def attention_table(lengths, reps: int, dense_reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from urm_jax.model.attention import allowed_mask, block_size, reference_attention
    from urm_jax.model.blockwise import blockwise_attention

    highest = jax.lax.Precision.HIGHEST
    impls = {
        "reference": lambda q, k, v, s: reference_attention(q, k, v, allowed_mask(s), highest),
        "blockwise": lambda q, k, v, s: blockwise_attention(q, k, v, s, highest, block=block_size()),
        "xla": lambda q, k, v, s: jax.nn.dot_product_attention(q, k, v, mask=allowed_mask(s)[:, None],
                                                               implementation="xla"),
    }
    rows = []
    for length in lengths:
        rng = np.random.default_rng(length)
        q, k, v = (jnp.asarray(rng.standard_normal((1, length, h, 64)), jnp.float32) for h in (8, 2, 2))
        seg = jnp.ones((1, length), jnp.int32)
        compiled, memory = {}, {}
        for name, fn in impls.items():
            forward = jax.jit(fn).lower(q, k, v, seg).compile()
            grad = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s)), argnums=(0, 1, 2)))
            backward = grad.lower(q, k, v, seg).compile()
            fm, bm = forward.memory_analysis(), backward.memory_analysis()
            memory[name] = (fm.temp_size_in_bytes + fm.output_size_in_bytes,
                            bm.temp_size_in_bytes + bm.output_size_in_bytes)
            compiled[name] = forward
            jax.block_until_ready(forward(q, k, v, seg))  # first run: allocator, page faults
        times = {name: [] for name in impls}
        dense_limit = reps if length <= 4096 else dense_reps
        for rep in range(reps):
            for name, forward in compiled.items():
                if name != "blockwise" and rep >= dense_limit:
                    continue
                start = time.perf_counter()
                jax.block_until_ready(forward(q, k, v, seg))
                times[name].append(time.perf_counter() - start)
        for name in impls:
            rows.append(dict(length=length, impl=name, seconds=float(np.median(times[name])),
                             reps=len(times[name]), forward_bytes=memory[name][0],
                             backward_bytes=memory[name][1]))
            print(f"[attention] L={length} {name}: {rows[-1]['seconds'] * 1e3:.0f} ms, "
                  f"{memory[name][0] / 1e6:.0f} MB fwd, {memory[name][1] / 1e6:.0f} MB fwd+bwd",
                  file=sys.stderr, flush=True)
    return rows


# --- (b), (c) scoring workers ----------------------------------------------------------------


def worker(kind: str, model: str, pad_id: int, batch: int, attention: str) -> None:
    """A scoring process: reads one JSON command per stdin line, answers one JSON line.
    {"warmup": [[lengths...]...]} -> compile seconds (then the peak RSS restarts from here);
    {"score": [[ids...]...]} -> seconds, tokens; {"quit": true} -> peak RSS while scoring, peak
    RSS of loading + warm-up, RSS when scoring started."""
    if kind == "jax":
        from score_throughput import jax_compile

        from urm_jax.scoring import Scorer

        scorer = Scorer(model, batch_size=batch, max_length=8192, attention=attention)
    else:
        import torch
        from score_throughput import hf_forward
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(os.cpu_count() or 1)
        hf = AutoModelForSequenceClassification.from_pretrained(
            model, trust_remote_code=True, attn_implementation="sdpa").eval()
    loaded, warmup_peak = rss_mb(), peak_rss_mb()
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the answer channel
    for line in sys.stdin:
        cmd = json.loads(line)
        if "quit" in cmd:
            answer = {"peak_rss_mb": peak_rss_mb(), "loaded_rss_mb": loaded, "warmup_peak_mb": warmup_peak}
        elif "warmup" in cmd:
            rounds = [[[1] * n for n in lengths] for lengths in cmd["warmup"]]
            if kind == "jax":
                answer = {"seconds": jax_compile(scorer, rounds)}
            else:  # one short forward: allocator and kernels
                answer = {"seconds": hf_forward(hf, [rounds[0][:1]], pad_id)[0]}
            warmup_peak = max(warmup_peak, peak_rss_mb())
            loaded = rss_mb()
            reset_peak_rss()
        else:
            seqs = cmd["score"]
            if kind == "jax":
                start = time.perf_counter()
                scores = scorer.score_ids(seqs)
                answer = {"seconds": time.perf_counter() - start, "tokens": int(scores.num_tokens.sum()),
                          "reward": scores.reward.tolist()}
            else:
                batches = [seqs[i:i + batch] for i in range(0, len(seqs), batch)]
                seconds, tokens = hf_forward(hf, batches, pad_id)
                answer = {"seconds": seconds, "tokens": tokens}
        out.write(json.dumps(answer) + "\n")
        out.flush()
        if "quit" in cmd:
            return


class Worker:
    def __init__(self, kind: str, model: Path, pad_id: int, batch: int, attention: str = "auto"):
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, "--model", str(model), "--pad-id", str(pad_id),
             "--batch", str(batch), "--attention", attention],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(HERE.parent), os.environ.get("PYTHONPATH", "")])})

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> dict:
        answer = self.ask(quit=True)
        self.proc.wait()
        return answer


def scoring_workload(name: str, ckpt: Path, export: Path, pad_id: int, rounds, batch: int) -> dict:
    """Both tools on the same rounds, alternating, each in its own process."""
    jax_worker = Worker("jax", ckpt, pad_id, batch)
    hf_worker = Worker("hf", export, pad_id, batch)
    compile_s = jax_worker.ask(warmup=[[len(s) for s in r] for r in rounds])["seconds"]
    hf_worker.ask(warmup=[[len(s) for s in r] for r in rounds])
    totals = dict(jax_s=0.0, hf_s=0.0, tokens=0)
    ratios = []
    for i, seqs in enumerate(rounds):
        j = jax_worker.ask(score=seqs)
        h = hf_worker.ask(score=seqs)
        assert j["tokens"] == h["tokens"], (j["tokens"], h["tokens"])
        totals["jax_s"] += j["seconds"]
        totals["hf_s"] += h["seconds"]
        totals["tokens"] += j["tokens"]
        ratios.append(h["seconds"] / j["seconds"])
        print(f"[{name}] round {i + 1}/{len(rounds)}: urm-jax {j['seconds']:.2f} s, HF {h['seconds']:.2f} s",
              file=sys.stderr, flush=True)
    jm, hm = jax_worker.close(), hf_worker.close()
    return dict(totals, compile_s=compile_s, ratio=totals["hf_s"] / totals["jax_s"], round_ratios=ratios,
                jax_peak=jm["peak_rss_mb"], jax_loaded=jm["loaded_rss_mb"], jax_warmup_peak=jm["warmup_peak_mb"],
                hf_peak=hm["peak_rss_mb"], hf_loaded=hm["loaded_rss_mb"], hf_warmup_peak=hm["warmup_peak_mb"])


def one_row(ckpt: Path, export: Path, pad_id: int, seq, reps: int) -> dict:
    """Seconds to score one row, after warm-up: urm-jax reference, urm-jax auto, HF (median)."""
    workers = {"urm-jax reference": Worker("jax", ckpt, pad_id, 1, "reference"),
               "urm-jax auto": Worker("jax", ckpt, pad_id, 1, "auto"),
               "HF sdpa": Worker("hf", export, pad_id, 1)}
    for w in workers.values():
        w.ask(warmup=[[len(seq)]])
    times = {name: [] for name in workers}
    for _ in range(reps):
        for name, w in workers.items():
            times[name].append(w.ask(score=[seq])["seconds"])
    peaks = {name: w.close() for name, w in workers.items()}
    return {name: dict(seconds=float(np.median(t)), peak=peaks[name]["peak_rss_mb"],
                       loaded=peaks[name]["loaded_rss_mb"]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench_long_context")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-reps", type=int, default=1, help="repetitions of the dense ops beyond 4k")
    parser.add_argument("--mix-rows", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip-attention", action="store_true", help="scoring parts only")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script runs")
    parser.add_argument("--worker", choices=["jax", "hf"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pad-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.pad_id, args.batch, args.attention)
    global LONG_ROWS
    if args.quick:
        SHAPE.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     vocab_size=4096, pad_token_id=4095)
        args.lengths, args.reps, args.mix_rows, args.rounds = [512, 1024], 2, 8, 1
        LONG_ROWS = (1500, 2048)

    import jax
    import torch

    from score_throughput import write_models

    from urm_jax.data.datasets import synthetic_helpsteer_lengths

    load_before = os.getloadavg()
    started = time.perf_counter()
    attention = [] if args.skip_attention else attention_table(args.lengths, args.reps, args.dense_reps)

    work = Path(args.workdir)
    params, ckpt, export = write_models(work, SHAPE)
    pad = SHAPE["pad_token_id"]
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(0, pad, int(n)).tolist()  # noqa: E731  (never the pad id)
    mix_lengths = list(synthetic_helpsteer_lengths(args.mix_rows, seed=0, max_length=8192)) + list(LONG_ROWS)
    mix = [ids(n) for n in mix_lengths]
    rng.shuffle(mix)
    split = lambda seqs: [seqs[i::args.rounds] for i in range(args.rounds)]  # noqa: E731
    longest = max(LONG_ROWS)
    results = {
        "mix": scoring_workload("mix", ckpt, export, pad, split(mix), args.batch),
        "long": scoring_workload("long", ckpt, export, pad, [[ids(longest)], [ids(longest)]], 1),
    }
    conversation = one_row(ckpt, export, pad, ids(min(3000, longest)), max(1, args.reps - 1))
    load_after = os.getloadavg()

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}; load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}; "
          f"total {time.perf_counter() - started:.0f} s\n")
    print("(a) attention alone: 1 row, 8 q / 2 kv heads of 64, fp32, causal; time = median forward "
          "(interleaved); memory = XLA buffer assignment (temporaries + output)\n")
    print("| L | reference ms | blockwise ms | xla ms | reference / blockwise | xla / blockwise | "
          "fwd MB ref / blockwise / xla | fwd+bwd MB ref / blockwise / xla |")
    print("|---|---|---|---|---|---|---|---|")
    for length in args.lengths if attention else []:
        r = {row["impl"]: row for row in attention if row["length"] == length}
        ms = {k: r[k]["seconds"] * 1e3 for k in r}
        print(f"| {length} | {ms['reference']:.0f} | {ms['blockwise']:.0f} | {ms['xla']:.0f} | "
              f"**{ms['reference'] / ms['blockwise']:.1f}x** | {ms['xla'] / ms['blockwise']:.1f}x | "
              f"{r['reference']['forward_bytes'] / 1e6:.0f} / {r['blockwise']['forward_bytes'] / 1e6:.1f} / "
              f"{r['xla']['forward_bytes'] / 1e6:.0f} | {r['reference']['backward_bytes'] / 1e6:.0f} / "
              f"{r['blockwise']['backward_bytes'] / 1e6:.1f} / {r['xla']['backward_bytes'] / 1e6:.0f} |")
    lengths = np.array(mix_lengths)
    print(f"\n(b) scoring, {params / 1e6:.1f}M-parameter model (hidden {SHAPE['hidden_size']}, "
          f"{SHAPE['num_layers']} layers), urm-jax attention auto vs HF sdpa; mix: {len(mix)} rows, "
          f"{lengths.min()}..{lengths.max()} tokens (median {int(np.median(lengths))}), batch {args.batch}; "
          f"long: {longest}-token rows at batch 1. RSS in MB (peak; peak - after load)\n")
    print("| workload | tokens | urm-jax s | HF s | ratio HF/urm-jax | per round | urm-jax compile s | "
          "urm-jax RSS peak scoring (+ over start) | HF RSS peak scoring (+ over start) | "
          "RSS peak load+warm-up urm-jax / HF |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens']} | {r['jax_s']:.2f} | {r['hf_s']:.2f} | **{r['ratio']:.2f}x** | "
              f"{', '.join(f'{x:.2f}' for x in r['round_ratios'])} | {r['compile_s']:.1f} | "
              f"{r['jax_peak']:.0f} (+{r['jax_peak'] - r['jax_loaded']:.0f}) | "
              f"{r['hf_peak']:.0f} (+{r['hf_peak'] - r['hf_loaded']:.0f}) | "
              f"{r['jax_warmup_peak']:.0f} / {r['hf_warmup_peak']:.0f} |")
    print(f"\n(c) one {min(3000, longest)}-token conversation, seconds after warm-up (median), peak RSS MB\n")
    print("| tool | seconds | RSS peak scoring (+ over start) |")
    print("|---|---|---|")
    for name, r in conversation.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['peak']:.0f} (+{r['peak'] - r['loaded']:.0f}) |")
    (work / "results.json").write_text(json.dumps(dict(attention=attention, scoring=results,
                                                       conversation=conversation), indent=2))


if __name__ == "__main__":
    main()
