"""`urm-jax train`: both URM stages on one host or many, on any (data, fsdp, tensor) mesh.

A run directory (see `urm_jax.train.run_dir`) holds the Orbax checkpoints (train state:
trainable params, optimiser state, step; data-iterator position; RNG derives from (seed, step)),
`final/` (a full urm-jax checkpoint that feeds stage 2, `urm-jax score` and `convert to_hf`;
`urm-jax export RUN_DIR OUT --step N` makes one from any kept step), metrics, the data report
and the accepted config.yaml. Resuming is automatic: a run pointed at a directory with
checkpoints continues from the latest one and ends with the parameters an uninterrupted run
would have, bit for bit.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from urm_jax.attributes import label_range_for
from urm_jax.checkpoint import checkpoint_writer, chunk_rows, stacked_paths
from urm_jax.config import ModelConfig, np_dtype
from urm_jax.data.batching import BatchIterator
from urm_jax.data.datasets import load_helpsteer2, load_preference_pairs
from urm_jax.flops import peak_flops_per_device, train_flops
from urm_jax.io_utils import OutputExistsError
from urm_jax.loading import load_config_any, load_params_any, load_tokenizer
from urm_jax.model.paths import is_gate, leaf_paths
from urm_jax.model.urm import ModelBinder, param_shardings
from urm_jax.sharding import batch_sharding, fit_mesh, make_mesh, use_mesh
from urm_jax.train.config import TrainConfig, load_train_config
from urm_jax.train.features import (FeatureIterator, cache_key, compute_features, load_or_compute,
                                    pooled_forward)
from urm_jax.train.metrics import MetricsWriter, Throughput, plot_metrics, read_metrics
from urm_jax.train.preemption import PreemptionWatch, TrainingPreempted
from urm_jax.train.run_dir import RunDirectory
from urm_jax.train.step import Trainer, build_trainer, merge_params


def log(message: str) -> None:
    """A line on stderr from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def load_examples(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer, source: str, split: str):
    """(examples, DatasetReport) of a stage's data source, rendered with the model's tokenizer;
    stage 1 maps the model's attribute columns by name."""
    if cfg.stage == 1:
        label_range = label_range_for(model_cfg.attributes, model_cfg.hf_config,
                                      cfg.data.label_range, source=f"{cfg.model}/config.json")
        return load_helpsteer2(source, tokenizer, split=split, max_length=cfg.data.seq_len,
                               progress=jax.process_index() == 0, attributes=model_cfg.attributes,
                               label_range=label_range)
    return load_preference_pairs(source, tokenizer, split=split, max_length=cfg.data.seq_len,
                                 progress=jax.process_index() == 0)


def make_iterator(cfg: TrainConfig, examples, num_epochs, pad_id: int) -> BatchIterator:
    """This process's slice of every global token batch (stage 1 packed when `data.pack`)."""
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
        _, counts = np.unique(row[row > 0], return_counts=True)
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


def checkpoint_manager(run: RunDirectory, cfg: TrainConfig) -> ocp.CheckpointManager:
    """Orbax's manager of the run's step checkpoints (keep N, async as configured)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep,
                                           enable_async_checkpointing=cfg.checkpoint.async_save,
                                           create=True)
    return ocp.CheckpointManager(run.checkpoints, options=options)


def restore_step(manager: ocp.CheckpointManager, trainer: Trainer, step: int, data: bool = False):
    """Put a checkpointed train state onto the trainer's shardings (Orbax reshards it when the
    mesh differs from the one that saved it); returns the data-iterator state when `data`."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            trainer.state, trainer.state_shardings)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data:
        items["data"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    trainer.state = type(trainer.state)(*restored["state"])
    return restored["data"] if data else None


TRAINING_KEY = "urm_jax_training"  # config.json: how the model was trained, one record per stage
_RECORDED_METRICS = ("loss", "accuracy", "margin", "sigma_mean", "mse_per_attribute/")


def training_record(cfg: TrainConfig, run_root: Path, step: int) -> dict:
    """What a model card says about one training stage: the recipe's settings that shape the
    model, the steps run, and the last logged training metrics and evaluation (from the run's
    metrics.jsonl, up to `step`). Standard JSON values only."""
    records = [r for r in read_metrics(run_root / "metrics.jsonl") if r.get("step", 0) <= step]
    last = next((r for r in reversed(records) if "loss" in r), {})
    last_eval = next((r for r in reversed(records) if any(k.startswith("eval/") for k in r)), {})
    return {
        "stage": cfg.stage, "run_dir": str(run_root), "data": cfg.data.train, "split": cfg.data.split,
        "steps": step, "epochs": cfg.epochs, "global_batch_size": cfg.global_batch_size,
        "seq_len": cfg.data.seq_len, "learning_rate": cfg.optim.learning_rate,
        "head_lr_scale": cfg.optim.head_lr_scale, "loss": cfg.loss.kind,
        "trainable": list(cfg.trainable_patterns), "compute_dtype": cfg.precision.compute,
        "final_metrics": {k: v for k, v in last.items() if k.startswith(_RECORDED_METRICS)},
        "eval": {k[len("eval/"):]: v for k, v in last_eval.items() if k.startswith("eval/")},
        "eval_step": last_eval.get("step"),
    }


def save_model(out_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, trainer: Trainer,
               tokenizer_dir: str, overwrite: bool = True, record: dict | None = None) -> Path:
    """Write the trained model as a full urm-jax checkpoint, chunk by chunk: every process takes
    part in gathering each chunk of the (possibly multi-host) arrays, process 0 writes it. Memory
    stays at one chunk per host whatever the model size or the number of hosts. Dtypes: the
    backbone and value head in `precision.save` (keep: as trained), the gate in
    `precision.gate_save` (source: the checkpoint's gate dtype). `record` (`training_record`) is
    appended to the config's `urm_jax_training` list, after the earlier stages' records."""
    params = merge_params(trainer.state.params, trainer.frozen)
    gate = np_dtype(model_cfg.gate_dtype if cfg.precision.gate_save == "source" else cfg.precision.gate_save)
    backbone = cfg.precision.save

    def out_dtype(path, leaf):
        if is_gate(path):
            return gate
        return np.dtype(leaf.dtype) if backbone == "keep" else np_dtype(backbone)

    leaves = list(zip(leaf_paths(params), jax.tree.leaves(params)))
    embed = params["backbone"]["embed_tokens"]
    dtypes = {"torch_dtype": out_dtype(("backbone",), embed).name, "gate_dtype": gate.name}
    is_main = jax.process_index() == 0
    hf_config = model_cfg.to_hf_dict(**dtypes)
    if record is not None:
        hf_config[TRAINING_KEY] = [*model_cfg.hf_config.get(TRAINING_KEY, []), record]
    writer_ctx = (checkpoint_writer(out_dir, hf_config, tokenizer_dir=tokenizer_dir,
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


def export_step(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
                overwrite: bool = False, progress: bool = True,
                mesh_shape: tuple[int, int, int] | None = None) -> Path:
    """A kept training step of a run (default: the newest) as a full urm-jax checkpoint, like
    `final/`: the run's own config.yaml rebuilds its trainer (frozen parameters from its `model`),
    the step's train state is restored onto it, and the model is written as `final/` would be.
    Runs on whatever devices are present: the run's mesh if it fits them, else FSDP over all of
    them (`mesh_shape` chooses); Orbax reshards the saved state. Needs the memory of the model's
    parameters and optimiser state spread over those devices."""
    run, out_dir = RunDirectory(run_dir), Path(out_dir).absolute()
    if not run.config.is_file():
        raise ValueError(f"{run.config}: not found ({run.root} is not an `urm-jax train` run directory)")
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    cfg = load_train_config(run.config)
    manager = checkpoint_manager(run, cfg)
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"{run.checkpoints}: no checkpoints")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{run.checkpoints}: no step {step}; kept steps: {steps}")
    mesh = make_mesh(mesh_shape) if mesh_shape is not None else fit_mesh(cfg.mesh)
    model_cfg = load_config_any(cfg.model)
    params = load_params_any(cfg.model, model_cfg, progress=progress and jax.process_index() == 0)
    trainer = build_trainer(model_cfg, params, cfg, total_steps=max(step, 1), mesh=mesh)
    del params
    restore_step(manager, trainer, step)
    manager.close()
    return save_model(out_dir, cfg, model_cfg, trainer, cfg.model, overwrite=overwrite,
                      record=training_record(cfg, run.root, step))


def feature_iterator(cfg: TrainConfig, run: RunDirectory, model_cfg: ModelConfig, params, examples,
                     mesh, progress: bool) -> FeatureIterator:
    """Stage-2 fast path: pool every pair once with the frozen backbone (cached on disk)."""
    options = cfg.model_options()
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


def load_eval_batches(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer, pad_id: int,
                      trainer: Trainer) -> list:
    """The held-out set as device batches, loaded once (empty when no `data.eval`)."""
    if not cfg.data.eval:
        return []
    examples, report = load_examples(cfg, model_cfg, tokenizer, cfg.data.eval, cfg.data.eval_split)
    log(f"eval: {report.format()}")
    iterator = make_iterator(cfg, examples, 1, pad_id)
    return [jax.tree.map(lambda x: jax.make_array_from_process_local_data(trainer.eval_sharding, x),
                         host_batch) for host_batch in iterator]


class TrainingRun:
    """One stage, set up: data, trainer (resumed if the run has checkpoints), metrics. `run()`
    trains to the end and writes `final/`."""

    def __init__(self, cfg: TrainConfig, run: RunDirectory, *, progress: bool = True):
        self.cfg, self.dir, self.progress = cfg, run, progress
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh(cfg.mesh)
        log(f"mesh {dict(self.mesh.shape)} over {jax.device_count()} devices, "
            f"{jax.process_count()} process(es)")
        self.model_cfg = load_config_any(cfg.model)
        tokenizer = load_tokenizer(cfg.model)
        if tokenizer is None:
            raise ValueError(f"{cfg.model}: no tokenizer files; training renders chats with the "
                             "checkpoint's tokenizer")
        pad_id = self.model_cfg.pad_token_id if self.model_cfg.pad_token_id is not None else 0
        examples, report = load_examples(cfg, self.model_cfg, tokenizer, cfg.data.train, cfg.data.split)
        log(report.format())
        if self.is_main:
            (run.root / "data_report.txt").write_text(report.format() + "\n")
        params = load_params_any(cfg.model, self.model_cfg, progress=self.is_main and progress)
        if cfg.use_features:
            self.iterator = feature_iterator(cfg, run, self.model_cfg, params, examples, self.mesh,
                                             progress)
        else:
            self.iterator = make_iterator(cfg, examples, cfg.epochs, pad_id)
        steps_per_epoch = self.iterator.steps_in_epoch(0)
        self.total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        log(f"stage {cfg.stage}: {len(examples)} examples, {steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps")
        self.trainer = build_trainer(self.model_cfg, params, cfg, self.total_steps, self.mesh)
        del params
        self.eval_batches = load_eval_batches(cfg, self.model_cfg, tokenizer, pad_id, self.trainer)
        self.manager = checkpoint_manager(run, cfg)
        self.start = self._resume()
        self.writer = MetricsWriter(run.root, tensorboard=cfg.tensorboard, enabled=self.is_main,
                                    attributes=self.model_cfg.attributes)
        self.writer.truncate_after(self.start)

    def _resume(self) -> int:
        """Continue from the newest complete checkpoint; returns its step (0 when fresh)."""
        step = self.manager.latest_step()
        if step is None:
            return 0
        self.iterator.restore(restore_step(self.manager, self.trainer, step, data=True))
        log(f"resumed from step {step}")
        return int(step)

    def run(self) -> Path:
        """Train from `start` to `total_steps`, checkpointing and logging as configured; then
        write `final/`. SIGTERM checkpoints the current step and raises TrainingPreempted; a
        non-finite loss or norm raises NonFiniteTrainingError before any checkpoint holds it."""
        cfg = self.cfg
        self.bar = tqdm(total=self.total_steps, initial=self.start, desc=f"stage {cfg.stage}",
                        unit="step", disable=not (self.is_main and self.progress), file=sys.stderr)
        self.peak = peak_flops_per_device(jax.devices()[0])
        self.throughput = Throughput()
        self.window = [time.perf_counter(), 0, 0.0]  # start, tokens, flops since the last log
        watch = PreemptionWatch()
        try:
            for step in range(self.start, self.total_steps):
                self._train_step(step + 1, watch)
        except (NonFiniteTrainingError, TrainingPreempted):  # the bad step's metrics are written
            self.bar.close()
            self.writer.close()
            self.manager.close()
            raise
        finally:
            watch.close()
        self.bar.close()
        self.manager.wait_until_finished()
        self.manager.close()
        self.writer.close()  # metrics.jsonl complete: the training record reads it
        final = save_model(self.dir.final, cfg, self.model_cfg, self.trainer, cfg.model,
                           record=training_record(cfg, self.dir.root, self.total_steps))
        if self.is_main and cfg.plot:
            plot_metrics(self.dir.root / "metrics.jsonl", self.dir.root / "loss.png")
        log(f"final checkpoint: {final}")
        return final

    def _train_step(self, done: int, watch: PreemptionWatch) -> None:
        """Step number `done` (1-based): train, log, evaluate, checkpoint, stop if preempted."""
        cfg = self.cfg
        host_batch = next(self.iterator)
        batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self.trainer.batch_sharding, x), with_accum_axis(host_batch, cfg.grad_accum))
        metrics = self.trainer.run(batch)
        if not cfg.use_features:  # FLOPs of the real (unpadded) sequences, all hosts
            lengths = segment_lengths(host_batch)
            self.window[1] += sum(lengths) * jax.process_count()
            self.window[2] += train_flops(self.model_cfg, lengths) * jax.process_count()
        record = {}
        if done % cfg.log_every == 0 or done == self.total_steps:
            metrics = jax.device_get(metrics)  # waits for the step, so the window timing is honest
            record = self._log_record(metrics)
        if self.eval_batches and ((cfg.eval_every and done % cfg.eval_every == 0)
                                  or done == self.total_steps):
            results = self.trainer.evaluate(self.eval_batches)
            record.update({f"eval/{k}": v for k, v in results.items()})
            log(f"step {done} eval: " + ", ".join(f"{k} {float(np.mean(v)):.4f}" for k, v in results.items()))
            self.window[0] = time.perf_counter()  # evaluation time is not training throughput
        if record:  # one line per step: train and eval metrics together
            self.writer.write(done, {k: v for k, v in record.items() if v is not None})
        self.bar.update(1)
        preempted = watch.reached(done)
        saving = done % cfg.checkpoint.every_steps == 0 or done == self.total_steps or preempted
        if record or saving:  # never checkpoint (or go on from) weights that are not finite
            check_finite(jax.device_get(metrics), done, self.manager)
        if saving:
            self.manager.save(done, args=ocp.args.Composite(
                state=ocp.args.StandardSave(self.trainer.state),
                data=ocp.args.JsonSave(self.iterator.state())), force=preempted)
        if preempted:
            self.manager.wait_until_finished()
            raise TrainingPreempted(f"SIGTERM: stopped after step {done} of {self.total_steps}, "
                                    f"checkpoint {done} saved in {self.dir.checkpoints}; run the "
                                    "same command to resume from it")

    def _log_record(self, metrics: dict) -> dict:
        """The step's metrics plus epoch, tokens/s and MFU over the window since the last log."""
        now = time.perf_counter()
        start, tokens, flops = self.window
        self.throughput.record(now - start, tokens, flops)
        self.window = [now, 0, 0.0]
        record = dict(metrics, epoch=self.iterator.epoch)
        if not self.cfg.use_features:
            record.update(tokens_per_s=self.throughput.tokens_per_second(),
                          mfu=self.throughput.mfu(jax.device_count(), self.peak))
        self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        return record


def train(cfg: TrainConfig, *, progress: bool = True, allow_changes: tuple[str, ...] = ()) -> Path:
    """Run (or resume) one training stage; returns the final checkpoint directory. The run
    directory is claimed first (one `urm-jax train` per directory), a resume is checked against
    the recorded configuration (`allow_changes`: keys allowed to differ, or 'all'), and only then
    is config.yaml written."""
    run = RunDirectory(cfg.output_dir)
    with run.claim(owner=jax.process_index() == 0):
        run.check_resume(cfg, allow_changes)
        if jax.process_index() == 0:
            run.write_config(cfg)
        return TrainingRun(cfg, run, progress=progress).run()
