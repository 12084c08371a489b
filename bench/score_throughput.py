"""Scoring throughput: `urm-jax score` vs the exported model run by HF transformers
(trust_remote_code), on a ~100M-parameter Llama-shaped URM, in one run on this machine.

    .venv/bin/python bench/score_throughput.py [--quick]

Model: hidden 768, 12 layers, 12 heads / 4 KV heads, MLP 2048, vocab 32768 (101.6M parameters),
fp32 backbone, fp16 gate (the real checkpoint's layout), random weights written by
`convert.synthetic`, converted with `convert from_hf`, exported with `convert to_hf` and loaded by
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
after its programs are compiled; the one-off compile time is reported separately. HF is timed on
the forward passes only (inputs already tensors), so the comparison favours HF slightly. Inputs
are token-id lines, so neither side pays for tokenisation.
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
             max_position_embeddings=8192, rope_theta=500000.0)


def write_ids(path: Path, seqs) -> Path:
    with open(path, "w") as out:
        for i, s in enumerate(seqs):
            out.write(json.dumps({"id": i, "input_ids": [int(t) for t in s]}) + "\n")
    return path


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


def jax_compile(scorer, seqs) -> float:
    """Compile every padded batch shape the run will use, once (one dummy batch per shape)."""
    start = time.perf_counter()
    shapes = {(scorer.padded_rows(len(idx), L), L) for L, idx in scorer.plan([len(s) for s in seqs])}
    for rows, length in sorted(shapes):
        scorer.score_arrays([[1] * length] * rows)
    return time.perf_counter() - start


def jax_file(scorer, seqs, work: Path, name: str) -> tuple[float, int]:
    from urm_jax.scoring import score_jsonl

    inp = write_ids(work / f"{name}.jsonl", seqs)
    run = score_jsonl(scorer, inp, work / f"{name}.out.jsonl", progress=False)
    return run.seconds, run.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="build/bench_score")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fixed-length", type=int, default=256)
    parser.add_argument("--fixed-rows", type=int, default=128)
    parser.add_argument("--mix-rows", type=int, default=128)
    parser.add_argument("--mix-max", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        SHAPE.update(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2)
        args.fixed_rows, args.mix_rows, args.mix_max = 16, 16, 512

    import jax
    import torch
    from transformers import AutoModelForSequenceClassification

    from convert import core
    from convert.synthetic import tiny_hf_config, write_random_hf
    from urm_jax.config import ModelConfig
    from urm_jax.data.datasets import synthetic_helpsteer_lengths
    from urm_jax.scoring import Scorer

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    hf_cfg = tiny_hf_config(**SHAPE)
    params = ModelConfig.from_hf_dict(hf_cfg).param_count()["total"]
    src = write_random_hf(work / "hf", hf_cfg, dtype="float32", gate_dtype="float16", progress=False)
    ckpt = core.from_hf(src, work / "jax", progress=False)
    export = core.to_hf(ckpt, work / "export", progress=False)
    hf = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True).eval()
    attn = getattr(hf.config, "_attn_implementation", "?")
    scorer = Scorer(ckpt, batch_size=args.batch, max_length=args.mix_max)
    pad = scorer.pad_id

    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(0, pad, n).tolist()  # noqa: E731  (never the pad id)
    fixed = [ids(args.fixed_length) for _ in range(args.fixed_rows)]
    mix = [ids(int(n)) for n in synthetic_helpsteer_lengths(args.mix_rows, seed=0, max_length=args.mix_max)]
    lengths = np.array([len(s) for s in mix])

    results = {}
    for name, seqs in (("a", fixed), ("b", mix)):
        compile_s = jax_compile(scorer, seqs)
        jax_s, jax_tok = jax_file(scorer, seqs, work, name)
        engine_start = time.perf_counter()
        scorer.score_arrays(seqs)
        engine_s = time.perf_counter() - engine_start
        hf_forward(hf, [seqs[0:1]], pad)  # warm-up (allocator, kernels)
        batches = [seqs[i:i + args.batch] for i in range(0, len(seqs), args.batch)]
        hf_s, hf_tok = hf_forward(hf, batches, pad)
        assert hf_tok == jax_tok, (hf_tok, jax_tok)
        padded_hf = sum(len(b) * max(map(len, b)) for b in batches)
        padded_jax = sum(scorer.padded_rows(len(idx), L) * L for L, idx in scorer.plan([len(s) for s in seqs]))
        results[name] = dict(tokens=jax_tok, jax_s=jax_s, engine_s=engine_s, compile_s=compile_s, hf_s=hf_s,
                             jax_tps=jax_tok / jax_s, engine_tps=jax_tok / engine_s, hf_tps=hf_tok / hf_s,
                             ratio=(jax_tok / jax_s) / (hf_tok / hf_s),
                             pad_eff_jax=jax_tok / padded_jax, pad_eff_hf=hf_tok / padded_hf)
        print(f"[{name}] done: {results[name]}", file=sys.stderr, flush=True)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {threads} cores; jax {jax.__version__} "
          f"({jax.devices()[0].platform}, {len(jax.devices())} device), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), HF attention {attn}")
    print(f"model: {params / 1e6:.1f}M parameters (hidden {SHAPE['hidden_size']}, {SHAPE['num_layers']} layers, "
          f"vocab {SHAPE['vocab_size']}), fp32 backbone, fp16 gate; batch {args.batch}")
    print(f"(a) {args.fixed_rows} rows x {args.fixed_length} tokens; (b) {args.mix_rows} rows, lengths "
          f"{lengths.min()}..{lengths.max()} (median {int(np.median(lengths))}, mean {lengths.mean():.0f})\n")
    print("| workload | urm-jax score tok/s | (engine only) | HF tok/s | ratio urm-jax/HF | "
          "padding efficiency urm-jax / HF | urm-jax compile s |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (("a", "(a) identical padded batches"), ("b", "(b) length mix, natural batching")):
        r = results[name]
        print(f"| {label} | {r['jax_tps']:.0f} | {r['engine_tps']:.0f} | {r['hf_tps']:.0f} | "
              f"**{r['ratio']:.2f}x** | {r['pad_eff_jax']:.2f} / {r['pad_eff_hf']:.2f} | {r['compile_s']:.1f} |")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
