"""`urm-jax train`: both URM stages on one host or many, on any (data, fsdp, tensor) mesh.

A run directory (see `urm_jax.train.run_dir`) holds the Orbax checkpoints (train state:
trainable params, optimiser state, step; data-iterator position; RNG derives from (seed, step)),
`final/` (a full urm-jax checkpoint that feeds stage 2, `urm-jax score` and `convert to_hf`;
`urm-jax export RUN_DIR OUT --step N` makes one from any kept step; a LoRA run's adapters are
merged into their kernels there, so every saved model is a plain URM), metrics, the data report
and the accepted config.yaml. Resuming is automatic: a run pointed at a directory with
checkpoints continues from the latest one and ends with the parameters an uninterrupted run
would have, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from urm_jax.attributes import label_range_for
from urm_jax.checkpoint import (check_orbax_step, checkpoint_writer, chunk_rows, is_jax_checkpoint,
                               orbax_read_error, stacked_paths)
from urm_jax.compile_cache import CompileMeter
from urm_jax.config import ModelConfig, np_dtype
from urm_jax.data.batching import BatchIterator
from urm_jax.data.datasets import load_helpsteer2, load_preference_pairs
from urm_jax.flops import peak_flops_per_device, train_flops
from urm_jax.finite import checked_astype
from urm_jax.io_utils import check_creatable, check_outputs
from urm_jax.loading import load_config_any, load_params_any, load_tokenizer
from urm_jax.memory import check_host_memory
from urm_jax.model.attention import check_available as check_attention
from urm_jax.model.lora import LORA_A, LORA_B, check_rank, merge_kernel
from urm_jax.model.paths import LORA, is_gate, leaf_paths
from urm_jax.model.urm import ModelBinder, abstract_model, lora_targets, param_shardings
from urm_jax.provenance import local_source
from urm_jax.sharding import batch_shards, batch_sharding, fit_mesh, make_mesh, use_mesh
from urm_jax.train.config import (TrainConfig, TrainConfigError, check_attention_length, check_model_context,
                                   load_train_config)
from urm_jax.train.features import (FeatureIterator, cache_key, compute_features, load_or_compute,
                                    pooled_forward)
from urm_jax.train.metrics import METRICS_FILE, MetricsWriter, Throughput, plot_metrics, read_metrics
from urm_jax.train.preemption import PreemptionWatch, TrainingPreempted
from urm_jax.train.run_dir import RunDirectory, RunDirectoryError, agree
from urm_jax.train.start_model import record_start_model, start_model_for_export
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
    """This process's slice of every global token batch (packed when `data.pack`: stage 1
    conversations, stage 2 whole pairs; see urm_jax.data.batching)."""
    return BatchIterator(examples, cfg.global_batch_size, cfg.data.seq_len, cfg.data.shuffle_seed,
                         pack=cfg.data.pack,
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


def checkpoint_manager(run: RunDirectory, cfg: TrainConfig, *, writer: bool = True) -> ocp.CheckpointManager:
    """Orbax's manager of the run's step checkpoints (keep N, async as configured). The writer
    (the training run, which holds the directory) first removes partial steps a killed run left
    behind; a reader (`urm-jax export`, possibly while the run goes on) changes nothing."""
    if writer:
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep,
                                               enable_async_checkpointing=cfg.checkpoint.async_save,
                                               create=True, cleanup_tmp_directories=True)
        return ocp.CheckpointManager(run.checkpoints, options=options)
    # A reader's options are what Orbax would force for read_only (it warns for each it changes).
    options = ocp.CheckpointManagerOptions(read_only=True, max_to_keep=None, save_interval_steps=0,
                                           create=False, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False)
    # Orbax warns 'Given directory is read only=...' for every reader: it is our choice (we
    # never write into another run's checkpoints), not a property of the directory.
    absl_logger, quiet = logging.getLogger("absl"), _DropReadOnlyNotice()
    absl_logger.addFilter(quiet)
    try:
        return ocp.CheckpointManager(run.checkpoints, options=options)
    finally:
        absl_logger.removeFilter(quiet)


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Given directory is read only=%s"


class CheckpointWriteError(OSError):
    """A step checkpoint or `final/` could not be written (disk full, quota, I/O error). The
    partial output is removed; the kept steps are intact and the same command resumes."""


# Orbax writes a step under `<step>.orbax-checkpoint-tmp` and renames it when complete.
PARTIAL_STEP_GLOB = "*.orbax-checkpoint-tmp*"


def os_reason(err: BaseException) -> str:
    """The operating system's reason inside an error, e.g. 'No space left on device (errno 28)':
    TensorStore (under Orbax) reports write errors as ValueError text ending in
    `<strerror> [os_error_code='28']`; plain OSErrors carry it as strerror."""
    text = str(err)
    found = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='?(\d+)'?\]", text)
    if found:
        return f"{found.group(1)} (errno {found.group(2)})"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} (errno {err.errno})" if err.errno else err.strerror
    first = text.splitlines()[0] if text else type(err).__name__
    return first if len(first) <= 300 else first[:300] + "..."


def kept_steps(run: RunDirectory) -> list[int]:
    """The run's complete step checkpoints, oldest first."""
    if not run.checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in run.checkpoints.iterdir() if p.name.isdigit())


def remove_partial_steps(run: RunDirectory) -> list[str]:
    """Delete step directories Orbax did not finish (process 0 only: the directory is shared)."""
    if jax.process_index() != 0 or not run.checkpoints.is_dir():
        return []
    partial = sorted(run.checkpoints.glob(PARTIAL_STEP_GLOB))
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in partial]


class _DropOrbaxErrors(logging.Filter):
    """Orbax logs every failed background save with a traceback from each thread involved
    (four for one full disk); the same error reaches the trainer, which reports it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


@contextlib.contextmanager
def checkpoint_writes(run: RunDirectory, manager: ocp.CheckpointManager):
    """Turn a failed step save into one CheckpointWriteError. Orbax raises it from `save`,
    `wait_until_finished` or `close` (an asynchronous save's error arrives at the next of
    these, possibly steps later): the manager is closed, partial steps are removed and the
    message names the failed step, the reason and the kept steps to resume from."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every failure of a save call is a failed write
        with contextlib.suppress(Exception):  # the same error again, from the closing wait
            manager.close()
        removed = remove_partial_steps(run)
        failed = sorted({name.split(".")[0] for name in removed})
        kept = kept_steps(run)
        resume = (f"the kept steps {kept} are intact: free space (or lower checkpoint.keep) and run the "
                  f"same command to resume from step {kept[-1]}" if kept else
                  "no step was kept yet: free space and run the same command to start again")
        raise CheckpointWriteError(
            f"{run.checkpoints}: writing the checkpoint of step {', '.join(failed) or '?'} failed: "
            f"{os_reason(err)}; " + ("its partial directory was removed; " if removed else "")
            + resume) from None


def restore_step(manager: ocp.CheckpointManager, trainer: Trainer, step: int, data: bool = False):
    """Put a checkpointed train state onto the trainer's shardings (Orbax reshards it when the
    mesh differs from the one that saved it); returns the data-iterator state when `data`."""
    check_orbax_step(Path(str(manager.directory)) / str(step))  # a corrupt file named, not parsed blind
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            trainer.state, trainer.state_shardings)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data:
        items["data"] = ocp.args.JsonRestore()
    restored = restore_named(manager, step, ocp.args.Composite(**items))
    trainer.state = type(trainer.state)(*restored["state"])
    return restored["data"] if data else None


def restore_named(manager: ocp.CheckpointManager, step: int, args):
    """`manager.restore(step, args=args)`; a data file TensorStore cannot read (truncated,
    missing, corrupt) is one CheckpointError naming the step and the file."""
    try:
        return manager.restore(step, args=args)
    except Exception as err:  # noqa: BLE001 - only TensorStore read failures are translated
        named = orbax_read_error(Path(str(manager.directory)) / str(step), err)
        if named is None:
            raise
        raise named from None


TRAINING_KEY = "urm_jax_training"  # config.json: how the model was trained, one record per stage
_RECORDED_METRICS = ("loss", "accuracy", "margin", "sigma_mean", "mse_per_attribute/")


def training_record(cfg: TrainConfig, run_root: Path, step: int) -> dict:
    """What a model card says about one training stage: the recipe's settings that shape the
    model (LoRA's too), the steps run, and the last logged training metrics and evaluation (from
    the run's metrics.jsonl, up to `step`). The data source is named by its base name and
    content hash, never a local path (`urm_jax.provenance`). Standard JSON values only."""
    records = [r for r in read_metrics(run_root / "metrics.jsonl") if r.get("step", 0) <= step]
    last = next((r for r in reversed(records) if "loss" in r), {})
    last_eval = next((r for r in reversed(records) if any(k.startswith("eval/") for k in r)), {})
    data = local_source(cfg.data.train)  # published with the model: no local path (provenance)
    return {
        "stage": cfg.stage, "data": data["name"], "data_sha256": data.get("sha256"),
        "split": cfg.data.split,
        "steps": step, "epochs": cfg.epochs, "global_batch_size": cfg.global_batch_size,
        "seq_len": cfg.data.seq_len, "learning_rate": cfg.optim.learning_rate,
        "head_lr_scale": cfg.optim.head_lr_scale, "loss": cfg.loss.kind,
        "trainable": list(cfg.trainable_patterns), "compute_dtype": cfg.precision.compute,
        "final_metrics": {k: v for k, v in last.items() if k.startswith(_RECORDED_METRICS)},
        "eval": {k[len("eval/"):]: v for k, v in last_eval.items() if k.startswith("eval/")},
        "eval_step": last_eval.get("step"),
        "lora": None if cfg.lora is None else lora_record(cfg.lora),
    }


def lora_record(lora) -> dict:
    """A LoRA run's adapter settings, as peft names them (the adapters are merged into the
    saved weights, so this is the only trace of them)."""
    return {"r": lora.r, "alpha": lora.alpha, "scaling": lora.scaling, "dropout": lora.dropout,
            "targets": list(lora.targets), "use_rslora": lora.use_rslora, "init": lora.init}


def save_model(out_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, trainer: Trainer,
               tokenizer_dir: str, overwrite: bool = True, record: dict | None = None) -> Path:
    """Write the trained model as a full urm-jax checkpoint, chunk by chunk: every process takes
    part in gathering each chunk of the (possibly multi-host) arrays, process 0 writes it. Memory
    stays at one chunk per host whatever the model size or the number of hosts. Dtypes: the
    backbone and value head in `precision.save` (keep: as trained), the gate in
    `precision.gate_save` (source: the checkpoint's gate dtype). `record` (`training_record`) is
    appended to the config's `urm_jax_training` list, after the earlier stages' records.

    LoRA: each adapted kernel is saved merged, W + s * A B computed in float32 block by block
    (`urm_jax.model.lora.merge_kernel`) and rounded once, to the kernel's save dtype; the
    adapters themselves are not saved."""
    params = merge_params(trainer.state.params, trainer.frozen)
    adapters = params.pop(LORA, None)
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
            adapter = _adapter(adapters, path)
            for start in range(0, leaf.shape[0], rows):
                block = leaf[start:start + rows]
                if adapter is not None:
                    b = adapter[LORA_B][start:start + rows] if path in stacked else adapter[LORA_B]
                    block = _merge_fn(cfg.lora.scaling, path in stacked)(
                        block, adapter[LORA_A][start:start + rows], b)
                block = multihost_utils.process_allgather(block, tiled=True)
                if writer is not None:
                    writer.write(path, start, checked_astype(
                        np.asarray(block), dtype, f"{out_dir}: parameter {'.'.join(path)} "
                        f"(precision.save / gate_save {dtype.name})",
                        wider=("precision.gate_save: float32" if is_gate(path)
                               else "precision.save: keep or float32")))
    multihost_utils.sync_global_devices("urm-jax model checkpoint written")
    return Path(out_dir)


def _adapter(adapters: dict | None, path: tuple[str, ...]) -> dict | None:
    """The {"lora_a", "lora_b"} of the kernel at `path`, if it is adapted."""
    node = adapters
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


@functools.lru_cache(maxsize=None)
def _merge_fn(scaling: float, stacked: bool):
    """The jitted float32 merge of one row block of an adapted kernel."""
    return jax.jit(functools.partial(merge_kernel, scaling=scaling, stacked=stacked))


def export_step(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None,
                overwrite: bool = False, progress: bool = True,
                mesh_shape: tuple[int, int, int] | None = None, model: str | Path | None = None) -> Path:
    """A kept training step of a run (default: the newest) as a full urm-jax checkpoint, like
    `final/`: the run's own config.yaml rebuilds its trainer (frozen parameters from its `model`),
    the step's train state is restored onto it, and the model is written as `final/` would be.
    Runs on whatever devices are present: the run's mesh if it fits them, else FSDP over all of
    them (`mesh_shape` chooses); Orbax reshards the saved state. Needs the memory of the model's
    parameters and optimiser state spread over those devices. `model`: where the run's start
    model is now, when it moved (checked against the run's record: `start_model_for_export`)."""
    run, out_dir = RunDirectory(run_dir), Path(out_dir).absolute()
    if not run.config.is_file():
        raise ValueError(f"{run.config}: not found ({run.root} is not an `urm-jax train` run directory)")
    cfg = load_train_config(run.config)
    start = start_model_for_export(run.root, cfg.model, model)
    check_outputs([("RUN_DIR", run_dir), ("model (from RUN_DIR's config.yaml)", start)],
                  [("OUT_DIR", out_dir, "dir")], overwrite=overwrite)
    manager = checkpoint_manager(run, cfg, writer=False)
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"{run.checkpoints}: no checkpoints")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{run.checkpoints}: no step {step}; kept steps: {steps}")
    mesh = make_mesh(mesh_shape) if mesh_shape is not None else fit_mesh(cfg.mesh)
    model_cfg = load_config_any(start)
    params = load_params_any(start, model_cfg, progress=progress and jax.process_index() == 0)
    trainer = build_trainer(model_cfg, params, cfg, total_steps=max(step, 1), mesh=mesh)
    del params
    restore_step(manager, trainer, step)
    manager.close()
    return save_model(out_dir, cfg, model_cfg, trainer, str(start), overwrite=overwrite,
                      record=training_record(cfg, run.root, step))


def feature_iterator(cfg: TrainConfig, run: RunDirectory, model_cfg: ModelConfig, params, examples,
                     mesh, progress: bool) -> FeatureIterator:
    """Stage-2 fast path: pool every pair once with the frozen backbone (cached on disk)."""
    # The frozen backbone alone: stage 2's adapters (gate kernels only) never touch the features;
    # a forward only, so the layer scan (one compile; unrolling pays off in a backward)
    options = dataclasses.replace(cfg.model_options(), lora=None, layer_loop="scan")
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


@dataclasses.dataclass(frozen=True)
class Setup:
    """What `preflight` checked and built: the device mesh, the model's config, its tokenizer."""

    mesh: Any
    model_cfg: ModelConfig
    tokenizer: Any


def preflight(cfg: TrainConfig) -> Setup:
    """Check what the configuration cannot check alone, before the run directory is touched and
    before anything compiles: the mesh against the devices present, the batch against the mesh
    and the processes, the attention kernel against the backend, `model` (a model, not a run directory; config and tokenizer load) and
    `data.seq_len` against the model's context. TrainConfigError names the key."""
    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as err:
        raise TrainConfigError(f"`mesh`: {err}") from None
    if cfg.global_batch_size % jax.process_count():
        raise TrainConfigError(f"`global_batch_size`: {cfg.global_batch_size} is not divisible by "
                               f"the {jax.process_count()} processes")
    rows = cfg.micro_batch_rows
    shards = batch_shards(mesh)
    if rows % shards:
        per_micro = (f"{cfg.micro_batch_size} pairs ({rows} rows)" if rows != cfg.micro_batch_size
                     else f"{rows} rows")
        raise TrainConfigError(
            f"`global_batch_size`: {cfg.global_batch_size} / grad_accum {cfg.grad_accum} = "
            f"{per_micro} per micro-batch cannot be split over the "
            f"{shards} data-parallel devices of mesh {list(mesh.shape.values())} (data x fsdp): "
            f"make the rows per micro-batch a multiple of {shards}")
    try:
        check_attention(cfg.attention)  # splash needs a TPU, cudnn a GPU
    except ValueError as err:
        raise TrainConfigError(f"`attention`: {err}") from None
    model = Path(cfg.model)
    if (model / "config.yaml").is_file() and not is_jax_checkpoint(model):
        raise TrainConfigError(f"`model`: {model} is a training run directory; start from its "
                               f"final/ ({model / 'final'}) or a step exported with `urm-jax export`")
    model_cfg = load_config_any(cfg.model)
    check_model_context(cfg, model_cfg, model)
    check_attention_length(cfg)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise ValueError(f"{cfg.model}: no tokenizer files; training renders chats with the "
                         "checkpoint's tokenizer")
    check_capacity(cfg, model_cfg, tuple(mesh.shape.values()))
    return Setup(mesh, model_cfg, tokenizer)


def check_capacity(cfg: TrainConfig, model_cfg: ModelConfig, mesh_shape: tuple[int, int, int]) -> None:
    """What the model's sizes decide about the recipe (part of `preflight`): a LoRA rank no
    larger than min(in, out) of each targeted matrix, and, on the CPU backend, the memory
    estimate within the host's available memory (an over-large run would be OOM-killed, exit
    137, with no message). TrainConfigError names the key."""
    if cfg.lora is not None:
        try:
            check_rank(cfg.lora, lora_targets(cfg.lora, abstract_model(model_cfg)))
        except ValueError as err:
            raise TrainConfigError(str(err)) from None
    if jax.default_backend() == "cpu":
        check_host_memory(model_cfg, cfg, mesh_shape)


class TrainingRun:
    """One stage, set up: data, trainer (resumed if the run has checkpoints), metrics. `run()`
    trains to the end and writes `final/`."""

    def __init__(self, cfg: TrainConfig, run: RunDirectory, setup: Setup, *, progress: bool = True,
                 compile_meter: CompileMeter | None = None):
        self.cfg, self.dir, self.progress = cfg, run, progress
        self.compile = compile_meter if compile_meter is not None else CompileMeter()
        self.is_main = jax.process_index() == 0
        self.mesh, self.model_cfg, tokenizer = setup.mesh, setup.model_cfg, setup.tokenizer
        log(f"mesh {dict(self.mesh.shape)} over {jax.device_count()} devices, "
            f"{jax.process_count()} process(es)")
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
        if self.total_steps < 1:  # never write the untrained model as final/
            raise ValueError(f"{cfg.data.train}: {len(examples)} examples make no full batch of "
                             f"global_batch_size {cfg.global_batch_size}")
        log(f"stage {cfg.stage}: {len(examples)} examples, {steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps"
            + ("" if cfg.use_features else f"; {self.iterator.epoch_stats(0)['padding_efficiency']:.1%} "
               "of the first epoch's token slots are real tokens"))
        hint = None if cfg.use_features else self.iterator.segment_cap_hint(0)
        if hint:
            log(f"hint: {hint}")
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
        self.compile.start()  # compile time (up to and with the first step) is reported apart
        watch = PreemptionWatch()
        try:
            for step in range(self.start, self.total_steps):
                self._train_step(step + 1, watch)
                if step == self.start:
                    log(f"step {step + 1}: {self.compile.totals.describe()}")
        except BaseException as stop:
            self.bar.close()  # before the error line, so it starts a line of its own
            self.writer.close()  # the last step's metrics are written
            if isinstance(stop, (NonFiniteTrainingError, TrainingPreempted)):
                with checkpoint_writes(self.dir, self.manager):
                    self.manager.close()
            raise
        finally:
            watch.close()
            self.compile.stop()
        self.bar.close()
        with checkpoint_writes(self.dir, self.manager):
            self.manager.wait_until_finished()
            self.manager.close()
        self.writer.close()  # metrics.jsonl complete: the training record reads it
        try:
            final = save_model(self.dir.final, cfg, self.model_cfg, self.trainer, cfg.model,
                               record=training_record(cfg, self.dir.root, self.total_steps))
        except OSError as err:  # the writer removed its temporary: nothing half-written is left
            raise CheckpointWriteError(
                f"{self.dir.final}: writing the final model failed: {os_reason(err)}"
                f"{f' ({err.filename})' if err.filename else ''}; nothing of it was left behind and "
                f"the kept steps {kept_steps(self.dir)} are intact: free space and run the same "
                "command to write it") from None
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
            with checkpoint_writes(self.dir, self.manager):
                self.manager.save(done, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(self.trainer.state),
                    data=ocp.args.JsonSave(self.iterator.state())), force=preempted)
        if preempted:
            with checkpoint_writes(self.dir, self.manager):
                self.manager.wait_until_finished()
            raise TrainingPreempted(f"{watch.signal_name}: stopped after step {done} of {self.total_steps}, "
                                    f"checkpoint {done} saved in {self.dir.checkpoints}; run the "
                                    "same command to resume from it", exit_code=watch.exit_code)

    def _log_record(self, metrics: dict) -> dict:
        """The step's metrics plus epoch, tokens/s and MFU over the window since the last log."""
        now = time.perf_counter()
        start, tokens, flops = self.window
        self.throughput.record(now - start, tokens, flops)
        self.window = [now, 0, 0.0]
        record = dict(metrics, epoch=self.iterator.epoch, compile_seconds=self.compile.totals.seconds)
        if not self.cfg.use_features:
            record.update(tokens_per_s=self.throughput.tokens_per_second(),
                          mfu=self.throughput.mfu(jax.device_count(), self.peak),
                          real_token_fraction=self.iterator.epoch_stats(
                              self.iterator.epoch)["padding_efficiency"])
        self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        return record


def check_run_outputs(cfg: TrainConfig, run: RunDirectory) -> None:
    """What a run writes (final/, checkpoints/, the feature cache, metrics, config.yaml) never
    holds, replaces or sits inside what it reads (the model, local data files), e.g. stage 2
    with `output_dir` = stage 1's run and `model` = its final/ would replace the stage-1 model.
    A run's own outputs exist on resume: only inputs are protected here."""
    data = [(f"data.{name}", path) for name, path in (("train", cfg.data.train), ("eval", cfg.data.eval))
            if path and Path(path).exists()]  # else a hub dataset name
    if os.path.lexists(run.root) and not run.root.is_dir():
        raise RunDirectoryError(f"output_dir: {run.root} is a file, not a directory")
    check_creatable("output_dir", run.root)
    outputs = [(f"output_dir's {path.name}", path) for path in (
        run.final, run.checkpoints, run.root / "feature_cache", run.root / METRICS_FILE, run.config)]
    check_outputs([("model", cfg.model), *data], outputs, overwrite=True)


def train(cfg: TrainConfig, *, progress: bool = True, allow_changes: tuple[str, ...] = ()) -> Path:
    """Run (or resume) one training stage; returns the final checkpoint directory. Nothing
    touches the run directory before `preflight` has passed; then process 0 claims it (one
    `urm-jax train` per directory), checks a resume against the recorded configuration
    (`allow_changes`: keys allowed to differ, or 'all') and only then writes config.yaml. Every
    process follows process 0's verdict, so a refused multi-host run stops on every host. An
    attempt that fails (or is interrupted) before producing a checkpoint, metrics or features
    takes back what it created (`RunDirectory.take_back`): a new directory is removed."""
    run = RunDirectory(cfg.output_dir)
    check_run_outputs(cfg, run)  # before any model is read, as every command's outputs
    setup = preflight(cfg)
    is_main = jax.process_index() == 0
    with contextlib.ExitStack() as held:
        refusal = before = None
        if is_main:
            before = run.attempt_state()
            try:
                held.enter_context(run.claim())
            except RunDirectoryError as err:  # another run's, or cannot be created: not ours
                refusal = str(err)
                for path in before.created:  # only the empty directories this attempt made
                    with contextlib.suppress(OSError):
                        path.rmdir()
                before = None
        try:
            if is_main and refusal is None:
                try:
                    run.check_resume(cfg, allow_changes)
                    run.write_config(cfg)
                    record_start_model(run.root, cfg.model)  # export works when `model` moves
                except RunDirectoryError as err:
                    refusal = str(err)
            refusal = agree(refusal)
            if refusal is not None:
                raise RunDirectoryError(refusal)
            # Compile time from here on: the start-up's (optimiser init, a restore, the feature
            # pass) and the first step's, reported together once the first step is done.
            with _orbax_failures_reported_once(), CompileMeter() as meter:
                return TrainingRun(cfg, run, setup, progress=progress, compile_meter=meter).run()
        except BaseException:
            # Failed before producing anything of value: leave the directory as it was (still
            # holding it, so no other run is in it).
            if before is not None:
                run.take_back(before)
            raise


@contextlib.contextmanager
def _orbax_failures_reported_once():
    """While training: a failed save reaches the trainer as one CheckpointWriteError, so drop
    the echoes of it: Orbax's logged tracebacks (`_DropOrbaxErrors`), and the 'Event loop is
    closed' that TensorStore reports (sys.unraisablehook) for each write still in flight when
    Orbax closed the event loop of the failed save."""
    logger, drop, hook = logging.getLogger("absl"), _DropOrbaxErrors(), sys.unraisablehook

    def unraisablehook(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            hook(unraisable)

    logger.addFilter(drop)
    sys.unraisablehook = unraisablehook
    yield
    # Only after a clean finish: after a failure, writes still in flight may echo it later.
    logger.removeFilter(drop)
    sys.unraisablehook = hook
