"""Scoring throughput: `urm-jax score` vs the exported model run by HF transformers
(trust_remote_code), on a ~100M-parameter Llama-shaped URM, in one run on this machine.

    .venv/bin/python bench/score_throughput.py [--quick]

Model: hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocab 32768 (101.6M parameters),
fp32 backbone, fp16 gate (the real checkpoint's layout), random weights written by
`urm_jax.hf.synthetic`, converted with `convert from_hf`, exported with `convert to_hf` and loaded by
`AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True)` with its
defaults (the attention implementation transformers picks, i.e. SDPA).

(a) identical padded batches: every row has L tokens (a bucket length), batch B, so both tools
    run exactly the same [B, L] batches.
(b) a realistic length mix (log-normal, median 600 tokens, clipped to --mix-max; the
    HelpSteer2-like model in `urm_jax.data.datasets.synthetic_helpsteer_lengths`) with each
    tool's natural batching: urm-jax sorts into length buckets (its engine); HF takes the file in
    order, B rows at a time, padded to the longest row (what `tokenizer(..., padding=True)` +
    model does).

tokens/s counts real (non-pad) tokens. urm-jax is timed end to end through `score_jsonl` (the
`urm-jax score` code path in-process: JSONL read, id validation, batching, device, JSON write),
after its programs are compiled; the one-off warm-up (compile, plus one batch run, per padded
shape) is reported separately. HF is timed on
the forward passes only (inputs already tensors), so the comparison favours HF slightly. Inputs
are token-id lines, so neither side pays for tokenisation. Each workload is split into --rounds
interleaved slices and the tools alternate slice by slice, so on a shared machine background
load hits both alike; the ratio is total HF time / total urm-jax time for the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
             num_kv_heads=4, pad_token_id=32767, original_max_position_embeddings=8192,
             max_position_embeddings=131072, rope_theta=500000.0)


def write_ids(path: Path, seqs) -> Path:
    with open(path, "w") as out:
        for i, s in enumerate(seqs):
            out.write(json.dumps({"id": i, "input_ids": [int(t) for t in s]}) + "\n")
    return path


def write_models(work: Path, shape: dict) -> tuple[int, Path, Path]:
    """A random URM of `shape` (fp32 backbone, fp16 gate) in a fresh `work` directory: written
    as an HF directory, converted to a urm-jax checkpoint and exported back to HF (with its
    modelling file). Returns (parameter count, checkpoint, export)."""
    from urm_jax.config import ModelConfig
    from urm_jax.hf.export import to_hf
    from urm_jax.hf.load import from_hf
    from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hf_cfg = tiny_hf_config(**shape)
    src = write_random_hf(work / "hf", hf_cfg, dtype="float32", gate_dtype="float16", progress=False)
    ckpt = from_hf(src, work / "jax", progress=False)
    export = to_hf(ckpt, work / "export", progress=False)
    return ModelConfig.from_hf_dict(hf_cfg).param_count()["total"], ckpt, export


def hf_forward(model, batches, pad_id: int) -> tuple[float, int]:
    """Seconds and real tokens for right-padded batches (each padded to its longest row)."""
    import torch

    from urm_jax.data.tokenization import pad_batch

    tokens, seconds = 0, 0.0
    with torch.inference_mode():
        for rows in batches:
            ids, mask = pad_batch(rows, pad_id=pad_id)
            ids, mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask).logits.sum().item()
            seconds += time.perf_counter() - start
            tokens += int(mask.sum())
    return seconds, tokens


def jax_compile(scorer, rounds) -> float:
    """Compile every padded batch shape the run will use, once (one dummy batch per shape)."""
    start = time.perf_counter()
    shapes = {(scorer.padded_rows(len(idx), L), L)
              for seqs in rounds for L, idx in scorer.plan([len(s) for s in seqs])}
    for rows, length in sorted(shapes):
        scorer.score_arrays([[1] * length] * rows)
    return time.perf_counter() - start


def run_workload(scorer, hf, rounds, batch: int, work: Path, name: str) -> dict:
    """Alternate the two tools round by round on the same slices of the workload, so background
    load on a shared machine hits both alike; totals give tokens/s, per-round ratios a spread."""
    from urm_jax.scoring import score_jsonl

    compile_s = jax_compile(scorer, rounds)
    hf_forward(hf, [rounds[0][0:1]], scorer.pad_id)  # warm-up (allocator, kernels)
    totals = dict(jax_s=0.0, hf_s=0.0, tokens=0, jax_slots=0, hf_slots=0)
    ratios = []
    for r, seqs in enumerate(rounds):
        inp = write_ids(work / f"{name}{r}.jsonl", seqs)
        run = score_jsonl(scorer, inp, work / f"{name}{r}.out.jsonl", progress=False)
        batches = [seqs[i:i + batch] for i in range(0, len(seqs), batch)]
        hf_s, hf_tok = hf_forward(hf, batches, scorer.pad_id)
        assert hf_tok == run.tokens, (hf_tok, run.tokens)
        totals["jax_s"] += run.seconds
        totals["hf_s"] += hf_s
        totals["tokens"] += run.tokens
        totals["jax_slots"] += sum(scorer.padded_rows(len(idx), L) * L
                                   for L, idx in scorer.plan([len(s) for s in seqs]))
        totals["hf_slots"] += sum(len(b) * max(map(len, b)) for b in batches)
        ratios.append((run.tokens / run.seconds) / (hf_tok / hf_s))
        print(f"[{name}] round {r + 1}/{len(rounds)}: urm-jax {run.tokens / run.seconds:.0f} tok/s, "
              f"HF {hf_tok / hf_s:.0f} tok/s", file=sys.stderr, flush=True)
    t = totals
    return dict(t, compile_s=compile_s, jax_tps=t["tokens"] / t["jax_s"], hf_tps=t["tokens"] / t["hf_s"],
                ratio=t["hf_s"] / t["jax_s"], round_ratios=ratios,
                pad_eff_jax=t["tokens"] / t["jax_slots"], pad_eff_hf=t["tokens"] / t["hf_slots"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench_score")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fixed-length", type=int, default=256)
    parser.add_argument("--fixed-rows", type=int, default=64)
    parser.add_argument("--mix-rows", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--mix-max", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        SHAPE.update(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
        args.fixed_rows, args.mix_rows, args.mix_max, args.rounds = 16, 16, 512, 2

    import jax
    import torch
    from transformers import AutoModelForSequenceClassification

    from urm_jax.data.datasets import synthetic_helpsteer_lengths
    from urm_jax.scoring import Scorer

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(args.workdir)
    params, ckpt, export = write_models(work, SHAPE)
    hf = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True).eval()
    attn = getattr(hf.config, "_attn_implementation", "?")
    scorer = Scorer(ckpt, batch_size=args.batch, max_length=args.mix_max)
    pad = scorer.pad_id

    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(0, pad, n).tolist()  # noqa: E731  (never the pad id)
    fixed = [ids(args.fixed_length) for _ in range(args.fixed_rows)]
    mix = [ids(int(n)) for n in synthetic_helpsteer_lengths(args.mix_rows, seed=0, max_length=args.mix_max)]
    lengths = np.array([len(s) for s in mix])
    split = lambda seqs: [seqs[i::args.rounds] for i in range(args.rounds)]  # noqa: E731

    load_before = os.getloadavg()
    results = {"a": run_workload(scorer, hf, split(fixed), args.batch, work, "a"),
               "b": run_workload(scorer, hf, split(mix), args.batch, work, "b")}
    load_after = os.getloadavg()

    print(f"\nmachine: {platform.processor() or platform.machine()}, {threads} cores; jax {jax.__version__} "
          f"({jax.devices()[0].platform}, {len(jax.devices())} device), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), HF attention {attn}")
    print(f"model: {params / 1e6:.1f}M parameters (hidden {SHAPE['hidden_size']}, {SHAPE['num_layers']} layers, "
          f"vocab {SHAPE['vocab_size']}), fp32 backbone, fp16 gate; batch {args.batch}")
    print(f"(a) {args.fixed_rows} rows x {args.fixed_length} tokens; (b) {args.mix_rows} rows, lengths "
          f"{lengths.min()}..{lengths.max()} (median {int(np.median(lengths))}, mean {lengths.mean():.0f})\n")
    print(f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (shared machine: the tools "
          f"alternate in {args.rounds} rounds so both see the same background load)\n")
    print("| workload | tokens | urm-jax score tok/s | HF tok/s | ratio urm-jax/HF | per-round ratios | "
          "padding efficiency urm-jax / HF | urm-jax warm-up s (compile + 1 batch per shape, once) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in (("a", "(a) identical padded batches"), ("b", "(b) length mix, natural batching")):
        r = results[name]
        spread = ", ".join(f"{x:.2f}" for x in r["round_ratios"])
        print(f"| {label} | {r['tokens']} | {r['jax_tps']:.0f} | {r['hf_tps']:.0f} | **{r['ratio']:.2f}x** | "
              f"{spread} | {r['pad_eff_jax']:.2f} / {r['pad_eff_hf']:.2f} | {r['compile_s']:.1f} |")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
