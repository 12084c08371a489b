"""The urm-jax worker of bench/compare.py (runs in the project's environment): scoring through
`Scorer` + `score_jsonl` (what `urm-jax score` runs), stage-1 and stage-2 training steps through
`build_trainer` and the training data path (`BatchIterator`: packed rows), and the forward pass.
Compile time is measured apart (`urm_jax.compile_cache.CompileMeter`) in every `*_init`/warm-up.
"""

from __future__ import annotations

import jax
import numpy as np

from bench.peers.worker import serve
from urm_jax.compile_cache import CompileMeter
from urm_jax.config import ModelConfig
from urm_jax.data.datasets import PairExample, RegressionExample
from urm_jax.loading import load_params_any
from urm_jax.sharding import make_mesh
from urm_jax.train.config import DataConfig, LossConfig, OptimConfig, PrecisionConfig, TrainConfig
from urm_jax.train.loop import feature_iterator, make_iterator, segment_lengths, with_accum_axis
from urm_jax.train.step import build_trainer

STATE: dict = {}
FP32 = PrecisionConfig(param="float32", compute="float32", gate_param="float32", gate_compute="float32")


def _ids(rng, n: int, vocab: int) -> np.ndarray:
    return rng.integers(4, vocab - 2, n).astype(np.int32)  # never the pad id (vocab - 1)


# --- scoring ---------------------------------------------------------------------------------

def score_init(model: str, batch_size: int, max_length: int, attention: str = "auto",
               batch_tokens: int | None = None) -> dict:
    from urm_jax.scoring import Scorer

    STATE["scorer"] = Scorer(model, batch_size=batch_size, max_length=max_length, attention=attention,
                             batch_tokens=batch_tokens)
    return {"jax": jax.__version__, "attention": attention}


def score_warmup(lengths: list[list[int]]) -> dict:
    """Compile every padded batch shape the workloads (lists of row lengths) will use."""
    scorer = STATE["scorer"]
    shapes = {(scorer.padded_rows(len(idx), L), L) for rows in lengths for L, idx in scorer.plan(rows)}
    with CompileMeter() as meter:
        for rows, length in sorted(shapes):
            scorer.score_arrays([[1] * length] * rows)
    return {"compile_s": meter.totals.seconds, "shapes": len(shapes)}


def score(input: str, output: str) -> dict:
    from urm_jax.scoring import score_jsonl

    run = score_jsonl(STATE["scorer"], input, output, progress=False, overwrite=True)  # every round rewrites it
    return {"tokens": run.tokens, "seconds": run.seconds}


# --- training --------------------------------------------------------------------------------

def _trainer(cfg: TrainConfig, model: str, examples) -> dict:
    model_cfg = ModelConfig.from_hf_dir(model)
    params = load_params_any(model, model_cfg)
    iterator = make_iterator(cfg, examples, None, model_cfg.pad_token_id or 0)
    trainer = build_trainer(model_cfg, params, cfg, total_steps=10_000,
                            mesh=make_mesh((1, 1, 1), jax.devices()[:1]))
    STATE.update(trainer=trainer, iterator=iterator, cfg=cfg)
    with CompileMeter() as meter:
        steps = train_steps(1)
    return {"compile_s": meter.totals.seconds, "first_step_s": steps["seconds"],
            "real_token_fraction": iterator.epoch_stats(0)["padding_efficiency"],
            "steps_per_epoch": iterator.steps_in_epoch(0)}


def stage1_init(model: str, lengths: list[int], seq_len: int, rows: int, seed: int = 0) -> dict:
    """Stage 1 (regression on the attribute labels) as `urm-jax train` runs it: conversations
    packed into rows of `seq_len` (`data.pack`, `rows` rows a step), backbone + value head
    trained, float32 throughout (TRL's CPU default)."""
    vocab = ModelConfig.from_hf_dir(model).vocab_size
    rng = np.random.default_rng(seed)
    examples = [RegressionExample(_ids(rng, n, vocab), rng.integers(0, 5, 5).astype(np.float32))
                for n in lengths]
    cfg = TrainConfig(stage=1, data=DataConfig(seq_len=seq_len, pack=True), global_batch_size=rows,
                      optim=OptimConfig(warmup_ratio=0.0), precision=FP32, attention="auto")
    return _trainer(cfg, model, examples)


def bt_init(model: str, pairs: list[list[int]], seq_len: int, rows: int, trainable: list[str],
            seed: int = 0) -> dict:
    """Stage 2 (Bradley-Terry on pairs) through the backbone (`stage2_cached_features: false`),
    whole pairs packed side by side (`data.pack`: rows of 2 x `seq_len`), `trainable` path
    patterns, float32 throughout."""
    vocab = ModelConfig.from_hf_dir(model).vocab_size
    rng = np.random.default_rng(seed)
    examples = [PairExample(_ids(rng, a, vocab), _ids(rng, b, vocab)) for a, b in pairs]
    cfg = TrainConfig(stage=2, loss=LossConfig(kind="bt"), stage2_cached_features=False,
                      data=DataConfig(seq_len=seq_len, pack=True), global_batch_size=rows,
                      trainable=tuple(trainable), optim=OptimConfig(warmup_ratio=0.0),
                      precision=FP32, attention="auto")
    return _trainer(cfg, model, examples)


def train_steps(steps: int) -> dict:
    """`steps` optimiser steps on the next batches; real tokens and token slots they held."""
    import time

    trainer, iterator, cfg = STATE["trainer"], STATE["iterator"], STATE["cfg"]
    tokens = slots = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(iterator)
        tokens += sum(segment_lengths(batch))
        slots += batch["segment_ids"].size
        metrics = trainer.run(jax.device_put(with_accum_axis(batch, cfg.grad_accum), trainer.batch_sharding))
    loss = float(metrics["loss"])  # waits for the last step
    return {"tokens": tokens, "slots": slots, "loss": loss, "seconds": time.perf_counter() - start}


def bt_default_epoch(model: str, pairs: list[list[int]], seq_len: int, batch_pairs: int, seed: int = 0) -> dict:
    """Stage 2 as `urm-jax train` runs it by default, one epoch: every pair pooled once by the
    frozen backbone (the packed feature pass, `urm_jax.train.loop.feature_iterator`), then the
    gate trained on the cached features. Fresh feature cache each call; compile apart."""
    import tempfile
    import time
    import types
    from pathlib import Path

    vocab = ModelConfig.from_hf_dir(model).vocab_size
    rng = np.random.default_rng(seed)
    examples = [PairExample(_ids(rng, a, vocab), _ids(rng, b, vocab)) for a, b in pairs]
    cfg = TrainConfig(stage=2, model=model, loss=LossConfig(kind="bt"), data=DataConfig(seq_len=seq_len),
                      global_batch_size=batch_pairs, optim=OptimConfig(warmup_ratio=0.0), precision=FP32,
                      attention="auto")
    model_cfg = ModelConfig.from_hf_dir(model)
    params = load_params_any(model, model_cfg)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    with CompileMeter() as meter, tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        iterator = feature_iterator(cfg, types.SimpleNamespace(root=Path(tmp)), model_cfg, params, examples,
                                    mesh, progress=False)
        features_s = time.perf_counter() - start
        trainer = build_trainer(model_cfg, params, cfg, total_steps=10_000, mesh=mesh)
        steps = iterator.steps_in_epoch(0)
        for _ in range(steps):
            metrics = trainer.run(jax.device_put(with_accum_axis(next(iterator), 1), trainer.batch_sharding))
        float(metrics["loss"])
        total_s = time.perf_counter() - start
    return {"features_s": features_s, "epoch_s": total_s, "compile_s": meter.totals.seconds, "steps": steps}


# --- forward ---------------------------------------------------------------------------------

def forward_init(model: str, rows: int, length: int, compute: str = "float32") -> dict:
    """The jitted forward `urm-jax score` runs (urm_jax.scoring.engine.forward_batch), compiled
    for [rows, length]."""
    from urm_jax.loading import load_model
    from urm_jax.scoring.engine import forward_batch
    from flax import nnx

    net, _ = load_model(model, compute_dtype=compute, attention="auto")
    graphdef, state = nnx.split(net)
    ids = jax.device_put(np.random.default_rng(0).integers(4, 1000, (rows, length)).astype(np.int32))
    mask = jax.device_put(np.ones((rows, length), np.int32))
    STATE["forward"] = lambda: jax.block_until_ready(forward_batch(graphdef, state, ids, mask))
    with CompileMeter() as meter:
        STATE["forward"]()
    return {"compile_s": meter.totals.seconds}


def forward(repeats: int) -> dict:
    for _ in range(repeats):
        STATE["forward"]()
    return {}


if __name__ == "__main__":
    serve({name: fn for name, fn in globals().items()
           if callable(fn) and not name.startswith("_") and fn.__module__ == __name__ and name != "serve"})
