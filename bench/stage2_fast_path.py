"""Stage-2 (gate-only, Bradley-Terry) seconds per epoch: the full path, which runs the frozen
backbone on every step, vs the fast path, which pools every pair once (`compute_features` +
`pooled_forward`) and then trains the gate on cached features (`use_features=True`).

    .venv/bin/python bench/stage2_fast_path.py [--quick] [--pairs 256] [--epochs 10] [--full-epochs 1]

Small random URM (hidden 256, 4 layers, 4 heads / 2 KV, vocab 32000, fp32 everywhere on CPU) and
synthetic pairs whose side lengths follow the HelpSteer2-like distribution scaled to the window
(the recipe's median ~600 of 4096 tokens -> ~75 of 512), so rows carry the recipe's share of padding.
Both paths see the same pairs in the same order (both shuffle with `epoch_order(seed, epoch)`)
and are driven like `urm_jax/train/loop.py`: host batch -> `with_accum_axis` -> device -> step.
Epoch times include host batch assembly and end with a fetched loss (synchronised). Wall seconds
fill the table; process CPU seconds (all threads) are printed too, because on a shared machine
other tenants move wall time far more than CPU time.

Compilation is done before timing with a step whose pairs are all masked (zero gradients; stage-2
weight decay is 0, so the parameters do not move) and reported separately. The full path repeats
the same work every epoch, so its N-epoch time is `--full-epochs` measured epochs scaled to N;
the fast path's epochs are all measured. After one epoch both gates must agree (printed).

Third row, a bench-only sketch (not library behaviour): `compute_features` pads every row to
seq_len, although features are per pair and any grouping gives the same numbers. Calling it per
length bucket (rows padded to the next power of two >= the pair's longer side) shows what the
one-off pass would cost with bucketing; the features are compared with the padded pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf  # noqa: E402
from urm_jax.config import DTypePolicy, ModelConfig  # noqa: E402
from urm_jax.data.batching import BatchIterator  # noqa: E402
from urm_jax.data.datasets import PairExample, synthetic_helpsteer_lengths  # noqa: E402
from urm_jax.loading import load_params_any  # noqa: E402
from urm_jax.model.urm import ModelBinder, ModelOptions, param_shardings  # noqa: E402
from urm_jax.sharding import batch_sharding, make_mesh, use_mesh  # noqa: E402
from urm_jax.train.features import FeatureIterator, compute_features, pooled_forward  # noqa: E402
from urm_jax.train.loop import with_accum_axis  # noqa: E402
from urm_jax.train.config import LossConfig, OptimConfig, TrainConfig  # noqa: E402
from urm_jax.train.step import build_trainer  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2)
OPTIONS = ModelOptions(DTypePolicy(param="float32", compute="float32", gate="float32"))
OPTIM = OptimConfig(learning_rate=1e-4, weight_decay=0.0, warmup_ratio=0.03, clip_norm=1.0)  # the recipe's
STAGE2 = TrainConfig(stage=2, loss=LossConfig(kind="bt"), optim=OPTIM, stage2_cached_features=False)
STAGE2_CACHED = TrainConfig(stage=2, loss=LossConfig(kind="bt"), optim=OPTIM, stage2_cached_features=True)


def synthetic_pairs(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[PairExample]:
    lengths = synthetic_helpsteer_lengths(2 * n, seed) * (seq_len / 4096)
    lengths = np.clip(np.rint(lengths), 8, seq_len).astype(int)
    rng = np.random.default_rng(seed)
    side = lambda m: rng.integers(4, vocab - 2, m).astype(np.int32)  # noqa: E731
    return [PairExample(side(lengths[2 * i]), side(lengths[2 * i + 1])) for i in range(n)]


def length_buckets(pairs: list[PairExample], seq_len: int, smallest: int = 64) -> dict[int, np.ndarray]:
    """Pair indices by padded length: the next power of two >= the longer side, in [smallest, seq_len]."""
    longest = np.array([max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs])
    padded = np.clip(2 ** np.ceil(np.log2(longest)).astype(int), smallest, seq_len)
    return {int(b): np.flatnonzero(padded == b) for b in np.unique(padded)}


def device_batch(trainer, host_batch: dict, accum: int) -> dict:
    batch = with_accum_axis(host_batch, accum)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x), batch)


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def compile_step(trainer, host_batch: dict, accum: int) -> float:
    """Compile (and run) the step on an all-masked copy of a batch: zero gradients, no update."""
    masked = dict(host_batch, pair_mask=np.zeros_like(host_batch["pair_mask"]))
    t = time.perf_counter()
    float(trainer.run(device_batch(trainer, masked, accum))["loss"])
    return time.perf_counter() - t


def run_epoch(trainer, iterator, steps: int, accum: int) -> Clock:
    with Clock() as clock:
        for _ in range(steps):
            metrics = trainer.run(device_batch(trainer, next(iterator), accum))
        float(metrics["loss"])  # waits for the last step (and so every earlier one)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="pairs per optimiser step")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step on the full path")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--full-epochs", type=int, default=1, help="full-path epochs actually timed")
    parser.add_argument("--quick", action="store_true", help="64 pairs, 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.epochs = 64, 3
    started = time.perf_counter()
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])

    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_hf(Path(tmp) / "ckpt", tiny_hf_config(**SHAPE), dtype="float32",
                               gate_dtype="float32", progress=False)
        cfg = ModelConfig.from_hf_dir(path)
        params = load_params_any(path, cfg)
    pairs = synthetic_pairs(args.pairs, args.seq_len, cfg.vocab_size)
    tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)

    # --- full path: BatchIterator over token pairs, backbone forward inside every step.
    full_iter = BatchIterator(pairs, args.batch, args.seq_len, seed=0, pack=False)
    steps = full_iter.steps_in_epoch(0)
    total_steps = steps * args.epochs
    full = build_trainer(cfg, params, STAGE2, total_steps, mesh, options=OPTIONS)
    full_compile = compile_step(full, next(BatchIterator(pairs, args.batch, args.seq_len, seed=0, pack=False)),
                                args.accum)
    full_clocks = [run_epoch(full, full_iter, steps, args.accum) for _ in range(args.full_epochs)]
    full_gate_1 = jax.device_get(full.state.params)
    del full

    # --- fast path: one pooled forward over every pair, then gate steps on cached features.
    micro_pairs = args.batch // args.accum  # the feature pass runs at the full path's micro-batch
    forward = pooled_forward(ModelBinder(cfg, OPTIONS))
    sharded = jax.device_put(params, param_shardings(cfg, mesh, None, OPTIONS))
    sharding = batch_sharding(mesh)

    def features_of(examples, seq_len=args.seq_len):
        with use_mesh(mesh):
            return compute_features(lambda b: forward(sharded, b), examples, seq_len=seq_len,
                                    batch_pairs=micro_pairs, batch_sharding=sharding, progress=False)

    t = time.perf_counter()
    features_of(pairs[:1])  # compile the pooled forward (one padded batch)
    feature_compile = time.perf_counter() - t
    with Clock() as feature_clock:
        features = features_of(pairs)
    feature_pass = feature_clock.wall

    # Bench-only: the same features from one compute_features call per length bucket.
    buckets = length_buckets(pairs, args.seq_len)
    t = time.perf_counter()
    for length, idx in buckets.items():
        features_of([pairs[idx[0]]], length)  # one compile per bucket shape
    bucket_compile = time.perf_counter() - t
    with Clock() as bucket_clock:
        bucketed = np.empty_like(features)
        for length, idx in buckets.items():
            bucketed[idx] = features_of([pairs[i] for i in idx], length)
    bucket_pass = bucket_clock.wall
    bucket_diff = float(np.max(np.abs(bucketed - features)) / np.max(np.abs(features)))

    fast_iter = FeatureIterator(features, args.batch, seed=0)
    fast = build_trainer(cfg, params, STAGE2_CACHED, total_steps, mesh, options=OPTIONS)
    fast_compile = compile_step(fast, next(FeatureIterator(features, args.batch, seed=0)), 1)
    fast_clocks = []
    for epoch in range(args.epochs):
        fast_clocks.append(run_epoch(fast, fast_iter, steps, 1))
        if epoch == 0:
            fast_gate_1 = jax.device_get(fast.state.params)
    gate_diff = max(float(np.max(np.abs(a - b)))
                    for a, b in zip(jax.tree.leaves(full_gate_1), jax.tree.leaves(fast_gate_1)))

    # --- table
    full_epochs, fast_epochs = [c.wall for c in full_clocks], [c.wall for c in fast_clocks]
    full_epoch = statistics.mean(full_epochs)
    fast_epoch = statistics.mean(fast_epochs)
    print(f"\nStage-2 gate training, CPU ({jax.device_count()} device), fp32: model hidden {cfg.hidden_size}, "
          f"{cfg.num_layers} layers, vocab {cfg.vocab_size} ({cfg.param_count()['total']:,} params)")
    print(f"{args.pairs} pairs ({tokens:,} real tokens, {tokens / (2 * args.pairs * args.seq_len):.0%} of "
          f"{2 * args.pairs} rows x seq_len {args.seq_len}); {args.batch} pairs/step "
          f"(full path: {args.accum} micro-batches of {micro_pairs}); {steps} steps/epoch\n")
    header = (f"{'path':<34} {'one-off s':>9} {'s/epoch':>8} {'1 epoch s':>9} {f'{args.epochs} epochs s':>12} "
              f"{'speed-up 1':>10} {f'speed-up {args.epochs}':>11}")
    print(header)
    print("-" * len(header))
    print(f"{'full (backbone every step)':<34} {0.0:>9.1f} {full_epoch:>8.3f} {full_epoch:>9.1f} "
          f"{full_epoch * args.epochs:>12.1f} {1.0:>10.2f} {1.0:>11.2f}")
    total_1 = feature_pass + fast_epochs[0]
    total_n = feature_pass + sum(fast_epochs)
    print(f"{'fast (features once, gate steps)':<34} {feature_pass:>9.1f} {fast_epoch:>8.3f} {total_1:>9.1f} "
          f"{total_n:>12.1f} {full_epoch / total_1:>10.2f} {full_epoch * args.epochs / total_n:>11.2f}")
    total_1b, total_nb = bucket_pass + fast_epochs[0], bucket_pass + sum(fast_epochs)
    print(f"{'fast, length-bucketed pass [sketch]':<34} {bucket_pass:>9.1f} {fast_epoch:>8.3f} {total_1b:>9.1f} "
          f"{total_nb:>12.1f} {full_epoch / total_1b:>10.2f} {full_epoch * args.epochs / total_nb:>11.2f}")
    recipe = 12.5
    print(f"\nfull path: {args.full_epochs} epoch(s) timed ({', '.join(f'{s:.1f}' for s in full_epochs)} s), "
          f"{args.epochs}-epoch column = mean x {args.epochs}; fast path: all {args.epochs} epochs timed "
          f"(first {fast_epochs[0]:.3f} s, min {min(fast_epochs):.3f} s)")
    print(f"one-off = the feature pass ({args.pairs} pairs, {-(-args.pairs // micro_pairs)} forward batches of "
          f"{micro_pairs} pairs); fast path's per-epoch cost is {fast_epoch / full_epoch:.2%} of the full path's")
    print(f"recipe (~{recipe} epochs): projected speed-up "
          f"{full_epoch * recipe / (feature_pass + fast_epoch * recipe):.1f}x")
    print(f"compile (excluded above): full step {full_compile:.1f} s, pooled forward {feature_compile:.1f} s, "
          f"feature step {fast_compile:.1f} s, {len(buckets)} bucket shapes {bucket_compile:.1f} s")
    print(f"buckets (padded length: pairs): {', '.join(f'{b}: {len(i)}' for b, i in buckets.items())}; "
          f"bucketed vs padded features: max relative difference {bucket_diff:.1e}")
    full_cpu = statistics.mean(c.cpu for c in full_clocks)
    fast_cpu = sum(c.cpu for c in fast_clocks)
    print(f"CPU seconds: full-path epoch {full_cpu:.1f}, feature pass {feature_clock.cpu:.1f}, bucketed pass "
          f"{bucket_clock.cpu:.1f}, {args.epochs} fast epochs {fast_cpu:.2f}; {args.epochs}-epoch speed-up by CPU "
          f"time {full_cpu * args.epochs / (feature_clock.cpu + fast_cpu):.2f} (bucketed "
          f"{full_cpu * args.epochs / (bucket_clock.cpu + fast_cpu):.2f})")
    print(f"same training: max |gate(full) - gate(fast)| after epoch 1 = {gate_diff:.1e}")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
