"""Padding waste of stage-1 batches with and without sequence packing, on a HelpSteer2-like length
distribution (`synthetic_helpsteer_lengths`: log-normal, median ~600 tokens; an ASSUMPTION, the
hub is unreachable here -- rerun on real lengths where it is), and of preference pairs (stage 2)
on the bundled pairs (data/samples/preference_sample.jsonl, rendered with the real Llama-3
tokenizer) and on HelpSteer2-like pairs (two independent draws per pair).

    .venv/bin/python bench/padding_waste.py [--seed 0] [--examples 20324] [--pairs 4000]

Pair layouts: unpacked = one side per row of seq_len (2 rows a pair: the old layout); packed =
whole pairs side by side in rows of 2 x seq_len (`BatchIterator(pack=True)`, 8 pairs a row);
feature pass, old = one side per row at the power of two >= the pair's longer side; feature
pass, packed = `FeaturePlan` (every side its own segment, best-fit into a few row lengths).

Rows: unpacked = one conversation per row, 64 rows per step (the paper's batch of 64 examples);
packed = first-fit into rows of seq_len tokens, 16 rows per step (the recipe), max 8 or 16
segments per row. Everything comes from `plan_epoch` (the plan `BatchIterator` executes), epoch 0.
Conversations longer than seq_len are clipped to it (the loader left-truncates them instead).

Columns: efficiency = real tokens / token slots over the epoch (final partial batch included);
real tok/step = real tokens per optimiser step (mean); slots/step = rows x seq_len, what the
model computes per step; examples/step = conversations per step (mean). `compute` = token slots
per epoch relative to the packed 8-segment plan at the same seq_len: the linear part of the
step cost (matmuls), since the dense attention/MLP run on every slot, pad or not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from urm_jax.data.batching import plan_epoch  # noqa: E402
from urm_jax.data.datasets import PairExample, load_preference_pairs, synthetic_helpsteer_lengths  # noqa: E402
from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir  # noqa: E402
from urm_jax.train.features import FeaturePlan, bucket_length  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

HELPSTEER2_TRAIN = 20324  # rows in nvidia/HelpSteer2 train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=HELPSTEER2_TRAIN)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=4000, help="HelpSteer2-like pairs")
    args = parser.parse_args()
    pair_table(args)

    # (label, rows per step, pack, max_segments); 32 packed rows at 2048 = 16 rows of 4096 in slots.
    layouts = [("unpacked", 64, False, 1), ("packed, 8 seg", 16, True, 8), ("packed, 16 seg", 16, True, 16)]
    print(f"{args.examples} HelpSteer2-like conversations (synthetic_helpsteer_lengths, seed {args.seed}), epoch 0\n")
    header = (f"{'seq_len':>7} {'layout':<16} {'rows/step':>9} {'efficiency':>10} {'steps/epoch':>11} "
              f"{'real tok/step':>13} {'slots/step':>10} {'examples/step':>13} {'seg/row':>7} "
              f"{'compute':>7} {'plan s':>6}")
    print(header)
    print("-" * len(header))
    for seq_len in (4096, 2048):
        lengths = synthetic_helpsteer_lengths(args.examples, args.seed, max_length=seq_len)
        rows_for = {4096: layouts, 2048: layouts + [("packed, 8 seg", 32, True, 8)]}[seq_len]
        plans = []
        for label, rows, pack, segments in rows_for:
            t = time.perf_counter()
            plan = plan_epoch(lengths, batch_size=rows, seq_len=seq_len, seed=args.seed, epoch=0,
                              pack=pack, max_segments=segments)
            plans.append((label, rows, plan, plan.num_batches * rows * seq_len, time.perf_counter() - t))
        base_slots = plans[1][3]  # packed, 8 segments, 16 rows
        for plan_row in plans:
            print(_row(seq_len, args.examples, plan_row, base_slots))
        print(f"{'':>7} lengths: median {int(np.median(lengths))}, mean {lengths.mean():.0f}, "
              f"p99 {int(np.percentile(lengths, 99))}, max {lengths.max()}, "
              f"{(lengths >= seq_len).mean():.1%} clipped at seq_len")
        # The paper's batch is 64 examples; in packed rows that is 64 * mean length of tokens.
        packed = plans[1][2]
        print(f"{'':>7} 64 examples/step in tokens = {64 * lengths.mean() / (seq_len * packed.padding_efficiency):.1f} "
              f"packed rows of {seq_len} (16 rows hold {16 * seq_len * packed.padding_efficiency / lengths.mean():.0f} "
              "examples)\n")


def old_feature_fraction(examples, seq_len: int, batch_pairs: int) -> float:
    """The feature pass before packing: pairs sorted by their longer side, one side per row padded
    to the power of two >= it, `batch_pairs` pairs (2x rows) per batch."""
    longest = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: longest[i])
    slots = sum(2 * batch_pairs * bucket_length(max(longest[i] for i in order[s:s + batch_pairs]), seq_len)
                for s in range(0, len(order), batch_pairs))
    real = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    return real / slots


def pair_table(args) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cached_llama3_tokenizer_dir())
    bundled, _ = load_preference_pairs(str(ROOT / "data/samples/preference_sample.jsonl"), tok, max_length=640)
    draws = zip(synthetic_helpsteer_lengths(args.pairs, args.seed), synthetic_helpsteer_lengths(args.pairs, args.seed + 1))
    mix = [PairExample(np.zeros(a, np.int32), np.zeros(b, np.int32)) for a, b in draws]
    print("Preference pairs: real tokens / token slots over one epoch (final partial batches included)\n")
    header = f"{'pairs':<30} {'seq_len':>7} {'unpacked':>9} {'packed':>7} {'features old':>12} {'features packed':>15}"
    print(header)
    print("-" * len(header))
    for name, examples, seq_len, rows, batch_pairs in (
            (f"bundled ({len(bundled)} pairs)", bundled, 640, 2, 8),
            (f"HelpSteer2-like ({len(mix)} pairs)", mix, 4096, 16, 128)):
        lengths = np.array([len(e.chosen_ids) + len(e.rejected_ids) for e in examples])
        unpacked = plan_epoch(lengths, batch_size=batch_pairs, seq_len=2 * seq_len, seed=args.seed, epoch=0,
                              pack=False, max_segments=1, tokens_per_row=2 * seq_len)
        packed = plan_epoch(lengths, batch_size=rows, seq_len=2 * seq_len, seed=args.seed, epoch=0,
                            pack=True, max_segments=8, tokens_per_row=2 * seq_len)
        features = FeaturePlan.build(examples, seq_len=seq_len, rows_per_batch=2 * batch_pairs)
        print(f"{name:<30} {seq_len:>7} {unpacked.padding_efficiency:>9.1%} {packed.padding_efficiency:>7.1%} "
              f"{old_feature_fraction(examples, seq_len, batch_pairs):>12.1%} {features.real_token_fraction:>15.1%}")
    print()


def _row(seq_len, examples, plan_row, base_slots) -> str:
    label, rows, plan, slots, seconds = plan_row
    steps = plan.num_batches
    seg_per_row = np.mean([len(r) for r in plan.rows])
    compute = f"{slots / base_slots:.2f}x"
    return (f"{seq_len:>7} {label:<16} {rows:>9} {plan.padding_efficiency:>10.1%} {steps:>11} "
            f"{plan.real_tokens / steps:>13,.0f} {rows * seq_len:>10,} {examples / steps:>13.1f} "
            f"{seg_per_row:>7.2f} {compute:>7} {seconds:>6.2f}")


if __name__ == "__main__":
    main()
