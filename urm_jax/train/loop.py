"""`urm-jax train`: both URM stages on one host or many, on any (data, fsdp, tensor) mesh.

A run directory holds
    checkpoints/<step>/   Orbax CheckpointManager steps: train state (trainable params, optimiser
                          state, step) + data-iterator position; RNG is derived from (seed, step)
    final/                a full urm-jax checkpoint (feeds stage 2, `urm-jax score`, `convert to_hf`)
                          (`urm-jax export RUN_DIR OUT --step N` makes one from any kept step)
    metrics.jsonl, tensorboard/, loss.png, config.yaml, data_report.txt
Resuming is automatic: a run pointed at a directory with checkpoints continues from the latest
one and ends with the parameters an uninterrupted run would have, bit for bit.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from tqdm.auto import tqdm

from urm_jax.config import DTypePolicy, ModelConfig
from urm_jax.loading import load_config_any, load_params_any
from urm_jax.model.urm import ModelBinder, ModelOptions
from urm_jax.scoring import load_tokenizer
from urm_jax.sharding import make_mesh
from urm_jax.train.config import TrainConfig, to_dict
from urm_jax.train.preemption import PreemptionWatch, TrainingPreempted
from urm_jax.train.step import StepSettings, Trainer, build_trainer, merge_params


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def model_options(cfg: TrainConfig) -> ModelOptions:
    p = cfg.precision
    return ModelOptions(DTypePolicy(param=p.param, compute=p.compute, gate=p.gate_compute,
                                    gate_param=p.gate_param), remat=cfg.remat, attention=cfg.attention)


def load_examples(cfg: TrainConfig, tokenizer, source: str, split: str):
    from urm_jax.data.datasets import load_helpsteer2, load_preference_pairs

    load = load_helpsteer2 if cfg.stage == 1 else load_preference_pairs
    return load(source, tokenizer, split=split, max_length=cfg.data.seq_len,
                progress=jax.process_index() == 0)


def make_iterator(cfg: TrainConfig, examples, num_epochs, pad_id: int):
    from urm_jax.data.batching import BatchIterator

    return BatchIterator(examples, cfg.global_batch_size, cfg.data.seq_len, cfg.data.shuffle_seed,
                         pack=cfg.data.pack and cfg.stage == 1,
                         max_segments=cfg.data.max_segments, process_index=jax.process_index(),
                         process_count=jax.process_count(), num_epochs=num_epochs, pad_id=pad_id)


def with_accum_axis(batch: dict, accum: int) -> dict:
    """[B, ...] -> [accum, B / accum, ...]: contiguous micro-batches of the host's rows (pairs
    are interleaved row by row, so a contiguous split never separates chosen from rejected)."""
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def segment_lengths(batch: dict) -> list[int]:
    """Real lengths of every sequence in a token batch (for the FLOP count)."""
    seg = batch["segment_ids"]
    lengths = []
    for row in seg.reshape(-1, seg.shape[-1]):
        ids, counts = np.unique(row[row > 0], return_counts=True)
        lengths.extend(int(c) for c in counts)
    return lengths


class NonFiniteTrainingError(ValueError):
    """The loss, gradient or weights stopped being finite: the run stops before checkpointing."""


def check_finite(metrics: dict, step: int, manager: ocp.CheckpointManager) -> None:
    """Raise if the step's loss, gradient norm or parameter norm is NaN/Inf, naming the last
    checkpoint (written before this step, so it holds finite weights) to resume or export from."""
    bad = {k: float(np.asarray(metrics[k])) for k in ("loss", "grad_norm", "param_norm")
           if k in metrics and not np.isfinite(np.asarray(metrics[k])).all()}
    if bad:
        manager.wait_until_finished()
        last = manager.latest_step()
        raise NonFiniteTrainingError(
            f"step {step}: {', '.join(f'{k} {v}' for k, v in bad.items())} - training diverged; "
            f"nothing after step {last or 0} was checkpointed"
            + (f" (resume or `urm-jax export` from step {last})" if last else "")
            + "; lower optim.learning_rate or check the data")


class RunDirectory:
    def __init__(self, cfg: TrainConfig, root: str | Path | None = None):
        self.root = Path(root or cfg.output_dir).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / "final"


def checkpoint_manager(run: RunDirectory, cfg: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep,
                                           enable_async_checkpointing=cfg.checkpoint.async_save,
                                           create=True)
    return ocp.CheckpointManager(run.checkpoints, options=options)


def restore_latest(manager: ocp.CheckpointManager, trainer: Trainer, iterator) -> int:
    """Resume from the newest complete checkpoint; returns the step (0 when starting fresh)."""
    step = manager.latest_step()
    if step is None:
        return 0
    iterator.restore(restore_step(manager, trainer, step, data=True))
    return int(step)


def restore_step(manager: ocp.CheckpointManager, trainer: Trainer, step: int, data: bool = False):
    """Put a checkpointed train state onto the trainer's shardings (Orbax reshards it if the mesh
    changed); returns the data-iterator state when `data`."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            trainer.state, trainer.state_shardings)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data:
        items["data"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    trainer.state = type(trainer.state)(*restored["state"])
    return restored["data"] if data else None


def save_model(out_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, trainer: Trainer,
               tokenizer_dir: str, overwrite: bool = True) -> Path:
    """Write the trained model as a full urm-jax checkpoint, chunk by chunk: every process takes
    part in gathering each chunk of the (possibly multi-host) arrays, process 0 writes it. Memory
    stays at one chunk per host whatever the model size or the number of hosts."""
    import contextlib

    from jax.experimental import multihost_utils

    from urm_jax.checkpoint import checkpoint_writer, chunk_rows, stacked_paths
    from urm_jax.config import np_dtype

    params = merge_params(trainer.state.params, trainer.frozen)
    gate = model_cfg.gate_dtype if cfg.precision.gate_save == "source" else cfg.precision.gate_save
    backbone = cfg.precision.save

    def out_dtype(path, leaf):
        if path[0] == "gate":
            return np_dtype(gate)
        return np.dtype(leaf.dtype) if backbone == "keep" else np_dtype(backbone)

    leaves = [(tuple(str(k.key) for k in p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
    dtypes = {"torch_dtype": out_dtype(("backbone",), params["backbone"]["embed_tokens"]).name,
              "gate_dtype": np_dtype(gate).name}
    is_main = jax.process_index() == 0
    writer_ctx = (checkpoint_writer(out_dir, model_cfg.to_hf_dict(**dtypes), tokenizer_dir=tokenizer_dir,
                                    overwrite=overwrite) if is_main else contextlib.nullcontext(None))
    stacked = stacked_paths(model_cfg)
    with writer_ctx as writer:
        for path, leaf in leaves:
            dtype = out_dtype(path, leaf)
            rows = chunk_rows(leaf.shape, dtype, path in stacked)
            if writer is not None:
                writer.add(path, leaf.shape, dtype, rows)
            for start in range(0, leaf.shape[0], rows):
                block = multihost_utils.process_allgather(leaf[start:start + rows], tiled=True)
                if writer is not None:
                    writer.write(path, start, np.asarray(block).astype(dtype))
    multihost_utils.sync_global_devices("urm-jax model checkpoint written")
    return Path(out_dir)


def step_settings(cfg: TrainConfig) -> StepSettings:
    return StepSettings(stage=cfg.stage, loss=cfg.loss.kind, label_scale=cfg.loss.label_scale,
                        label_shift=cfg.loss.label_shift,
                        use_features=cfg.stage == 2 and cfg.stage2_cached_features)


def export_step(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
                overwrite: bool = False, progress: bool = True) -> Path:
    """A kept training step of a run (default: the newest) as a full urm-jax checkpoint, like
    `final/`: the run's own config.yaml rebuilds its trainer (frozen parameters from its `model`,
    on its mesh), the step's train state is restored onto it, and the model is written as
    `final/` would be. Needs the memory training needed (run it where the run ran)."""
    from urm_jax.io_utils import OutputExistsError
    from urm_jax.train.config import load_train_config

    run_dir, out_dir = Path(run_dir).absolute(), Path(out_dir).absolute()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ValueError(f"{saved}: not found ({run_dir} is not an `urm-jax train` run directory)")
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    cfg = load_train_config(saved)
    run = RunDirectory(cfg, run_dir)
    manager = checkpoint_manager(run, cfg)
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"{run.checkpoints}: no checkpoints")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{run.checkpoints}: no step {step}; kept steps: {steps}")
    mesh = make_mesh(cfg.mesh)
    model_cfg = load_config_any(cfg.model)
    params = load_params_any(cfg.model, model_cfg, progress=progress and jax.process_index() == 0)
    trainer = build_trainer(model_cfg, params, model_options(cfg), step_settings(cfg), cfg.optim,
                            total_steps=max(step, 1), mesh=mesh, seed=cfg.seed)
    del params
    restore_step(manager, trainer, step)
    manager.close()
    return save_model(out_dir, cfg, model_cfg, trainer, cfg.model, overwrite=overwrite)


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run (or resume) one training stage; returns the final checkpoint directory."""
    from urm_jax.flops import peak_flops_per_device, train_flops
    from urm_jax.train.metrics import MetricsWriter, Throughput, plot_metrics

    run = RunDirectory(cfg)
    is_main = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh)
    log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)")

    model_cfg = load_config_any(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise ValueError(f"{cfg.model}: no tokenizer files; training renders chats with the checkpoint's tokenizer")
    pad_id = model_cfg.pad_token_id if model_cfg.pad_token_id is not None else 0
    examples, report = load_examples(cfg, tokenizer, cfg.data.train, cfg.data.split)
    log(report.format())
    if is_main:
        (run.root / "data_report.txt").write_text(report.format() + "\n")
        (run.root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    options = model_options(cfg)
    settings = step_settings(cfg)
    params = load_params_any(cfg.model, model_cfg, progress=is_main and progress)

    if settings.use_features:
        iterator = feature_iterator(cfg, run, model_cfg, options, params, examples, mesh, progress)
    else:
        iterator = make_iterator(cfg, examples, cfg.epochs, pad_id)
    steps_per_epoch = iterator.steps_in_epoch(0)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    log(f"stage {cfg.stage}: {len(examples)} examples, {steps_per_epoch} steps/epoch, {total_steps} steps")

    trainer = build_trainer(model_cfg, params, options, settings, cfg.optim, total_steps, mesh, seed=cfg.seed)
    del params

    eval_batches = load_eval_batches(cfg, tokenizer, pad_id, trainer)
    manager = checkpoint_manager(run, cfg)
    start = restore_latest(manager, trainer, iterator)
    if start:
        log(f"resumed from step {start}")
    writer = MetricsWriter(run.root, tensorboard=cfg.tensorboard, enabled=is_main)
    writer.truncate_after(start)
    peak = peak_flops_per_device(jax.devices()[0])
    throughput = Throughput()
    bar = tqdm(total=total_steps, initial=start, desc=f"stage {cfg.stage}", unit="step",
               disable=not (is_main and progress), file=sys.stderr)
    window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
    watch = PreemptionWatch()
    try:
        for step in range(start, total_steps):
            host_batch = next(iterator)
            batch = with_accum_axis(host_batch, cfg.grad_accum)
            batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x), batch)
            metrics = trainer.run(batch)
            if not settings.use_features:  # FLOPs of the real (unpadded) sequences, all hosts
                lengths = segment_lengths(host_batch)
                window_tokens += sum(lengths) * jax.process_count()
                window_flops += train_flops(model_cfg, lengths) * jax.process_count()
            done = step + 1
            record = {}
            if done % cfg.log_every == 0 or done == total_steps:
                metrics = jax.device_get(metrics)  # waits for the step, so the window timing is honest
                now = time.perf_counter()
                throughput.record(now - window_start, window_tokens, window_flops)
                window_start, window_tokens, window_flops = now, 0, 0.0
                record = dict(metrics, epoch=iterator.epoch)
                if not settings.use_features:
                    record.update(tokens_per_s=throughput.tokens_per_second(),
                                  mfu=throughput.mfu(jax.device_count(), peak))
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
            if eval_batches and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
                results = trainer.evaluate(eval_batches)
                record.update({f"eval/{k}": v for k, v in results.items()})
                log(f"step {done} eval: " + ", ".join(f"{k} {float(np.mean(v)):.4f}" for k, v in results.items()))
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if record:  # one line per step: train and eval metrics together
                writer.write(done, {k: v for k, v in record.items() if v is not None})
            bar.update(1)
            preempted = watch.reached(done)
            saving = done % cfg.checkpoint.every_steps == 0 or done == total_steps or preempted
            if record or saving:  # never checkpoint (or go on from) weights that are not finite
                check_finite(jax.device_get(metrics), done, manager)
            if saving:
                manager.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.state),
                                                           data=ocp.args.JsonSave(iterator.state())),
                             force=preempted)
            if preempted:
                manager.wait_until_finished()
                raise TrainingPreempted(f"SIGTERM: stopped after step {done} of {total_steps}, "
                                        f"checkpoint {done} saved in {run.checkpoints}; run the "
                                        "same command to resume from it")
    except (NonFiniteTrainingError, TrainingPreempted):  # the bad step's metrics are written
        bar.close()
        writer.close()
        manager.close()
        raise
    finally:
        watch.close()
    bar.close()
    manager.wait_until_finished()
    manager.close()
    final = save_model(run.final, cfg, model_cfg, trainer, cfg.model)
    writer.close()
    if is_main and cfg.plot:
        plot_metrics(run.root / "metrics.jsonl", run.root / "loss.png")
    log(f"final checkpoint: {final}")
    return final


def load_eval_batches(cfg: TrainConfig, tokenizer, pad_id: int, trainer: Trainer) -> list:
    """The held-out set as device batches, loaded once (empty when no `data.eval`)."""
    if not cfg.data.eval:
        return []
    examples, report = load_examples(cfg, tokenizer, cfg.data.eval, cfg.data.eval_split)
    log(f"eval: {report.format()}")
    iterator = make_iterator(cfg, examples, 1, pad_id)
    return [jax.tree.map(lambda x: jax.make_array_from_process_local_data(trainer.eval_sharding, x),
                         host_batch) for host_batch in iterator]


def feature_iterator(cfg, run, model_cfg, options, params, examples, mesh, progress):
    """Stage-2 fast path: pool every pair once with the frozen backbone (cached on disk)."""
    from urm_jax.model.urm import param_shardings
    from urm_jax.sharding import batch_sharding, use_mesh
    from urm_jax.train.features import (FeatureIterator, cache_key, compute_features, load_or_compute,
                                        pooled_forward)

    key = cache_key(cfg.model, examples, cfg.data.seq_len, options.dtypes.compute)

    def compute():
        sharded = jax.device_put(params, param_shardings(model_cfg, mesh, None, options))
        forward = pooled_forward(ModelBinder(model_cfg, options))
        with use_mesh(mesh):
            return compute_features(lambda b: forward(sharded, b), examples, seq_len=cfg.data.seq_len,
                                    batch_pairs=cfg.micro_batch_size, batch_sharding=batch_sharding(mesh),
                                    progress=progress and jax.process_index() == 0)

    features = load_or_compute(run.root / "feature_cache", key, compute)
    return FeatureIterator(features, cfg.global_batch_size, cfg.data.shuffle_seed, cfg.epochs,
                           jax.process_index(), jax.process_count())


def main_train(config_path: str, overrides: list[str]) -> int:
    from urm_jax.train.config import load_train_config

    cfg = load_train_config(config_path, overrides)
    final = train(cfg)
    print(json.dumps({"final_checkpoint": str(final)}))
    return 0
