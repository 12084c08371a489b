"""The jitted, sharded train step for both URM stages.

State = (step, trainable params, optimiser state over the trainable params only). Which
parameters train is a list of path patterns (`TrainConfig.trainable_patterns`; stage 1: backbone
and value head, stage 2: the gate); the frozen rest is a separate argument: it gets no gradient
(JAX differentiates only w.r.t. the trainable tree), no optimiser state, and is never written, so
frozen parameters stay bit-identical by construction.

One call = one optimiser update: a batch carries a leading gradient-accumulation axis
[accum, micro, ...] that the step scans over, summing loss and gradient sums, then divides once by
the number of real examples in the whole global batch (padding rows and empty pack slots count 0).
Every random draw (the reparameterisation noise, LoRA dropout masks) is keyed by (seed, step,
micro-batch), so a resumed run draws exactly what an uninterrupted one would, on any mesh.

LoRA (`TrainConfig.lora`): the adapters join the parameter tree (fresh ones from the seed when
the starting checkpoint has none), and the trainable patterns choose them like any parameter:
by default the adapters and the value head train, and the base weights they adapt are frozen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from urm_jax.compile_cache import stored_jit
from urm_jax.config import ModelConfig
from urm_jax.model import lora as lora_lib
from urm_jax.model.paths import HEAD_GROUPS, LORA, is_gate, merge, select
from urm_jax.model.urm import ModelBinder, ModelOptions, abstract_model, init_lora, param_shardings
from urm_jax.sharding import AxisRules, batch_sharding, mesh_key, use_mesh
from urm_jax.train.config import CheckpointConfig, OptimConfig, PlanConfig, TrainConfig
from urm_jax.train.losses import bradley_terry_loss, finalize_metrics, regression_loss


class TrainState(NamedTuple):
    """What a train step carries: `step` (int32 scalar, optimiser updates done), `params` (the trainable
    leaves only, pure-dict tree, sharded) and the optax `opt_state` (moments sharded like params)."""
    step: jax.Array  # int32 scalar: optimiser updates done
    params: dict  # trainable params only
    opt_state: Any


def split_params(params: dict, patterns) -> tuple[dict, dict]:
    """(trainable, frozen) pure-dict trees: the leaves some path pattern selects, and the rest
    (see urm_jax.model.paths; ValueError names a pattern that selects nothing)."""
    return select(params, patterns)


def merge_params(trainable: dict, frozen: dict) -> dict:
    """The whole parameter tree again from `split_params`'s two halves."""
    return merge(trainable, frozen)


def weight_decay_mask(params: dict) -> dict:
    """Decay matrices only, not norm weights or biases (as the HF Trainer the recipe used)."""
    def decays(path, _):
        name = jax.tree_util.keystr(path)
        return not (name.endswith("norm']") or name.endswith("bias']"))

    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(settings: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine to min_lr_ratio * lr (HF's cosine-with-warmup)."""
    total_steps = max(int(total_steps), 1)
    warmup = int(math.ceil(settings.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=settings.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=settings.learning_rate * settings.min_lr_ratio)


def make_optimizer(settings: OptimConfig, total_steps: int, trainable_params: dict):
    """(AdamW with decay on matrices only, after global-norm clipping; its schedule)."""
    schedule = learning_rate_schedule(settings, total_steps)
    adamw = optax.adamw(schedule, b1=settings.b1, b2=settings.b2, eps=settings.eps,
                        weight_decay=settings.weight_decay, mask=weight_decay_mask(trainable_params))
    chain = [adamw] if not settings.clip_norm else [optax.clip_by_global_norm(settings.clip_norm), adamw]
    if settings.head_lr_scale != 1.0:  # the fresh heads' step, head_lr_scale x the backbone's
        heads = jax.tree_util.tree_map_with_path(lambda path, _: str(path[0].key) in HEAD_GROUPS,
                                                 trainable_params)
        chain.append(optax.masked(optax.scale(settings.head_lr_scale), heads))
    return optax.chain(*chain), schedule


def _loss_sums(model, train: TrainConfig, batch: dict, key: jax.Array, use_features: bool,
               training: bool = True):
    """(loss_sum, metric_sums) of one micro-batch; `key` draws the reparameterisation noise and,
    when `training`, the LoRA dropout masks (evaluation runs without dropout)."""
    lora_key = None
    if training and train.lora is not None and train.lora.dropout > 0:
        lora_key = jax.random.fold_in(key, lora_lib.DROPOUT_STREAM)
    if train.stage == 1:
        pooled = model.pooled_segments(batch["input_ids"], batch["segment_ids"], batch["pool_index"],
                                       lora_key)
        out = model.heads(pooled, lora_key)  # [b, S, 5]
        noise = jax.random.normal(key, out.means.shape, jnp.float32)
        return regression_loss(out.means, out.log_stds, batch["labels"], batch["pool_mask"], noise,
                               kind=train.loss.kind, label_scale=train.loss.label_scale,
                               label_shift=train.loss.label_shift)
    if use_features:
        pooled = batch["features"]  # [2b, D], cached by the frozen backbone
    else:  # [2b, 1, D] unpacked or [rows, S, D] packed (urm_jax.data.batching)
        pooled = model.pooled_segments(batch["input_ids"], batch["segment_ids"], batch["pool_index"],
                                       lora_key)
    # Flattened in row-major order, rewards alternate chosen / rejected in every layout.
    reward = model.heads(pooled, lora_key).reward.reshape(-1)
    return bradley_terry_loss(reward[0::2], reward[1::2], batch["pair_mask"].reshape(-1))


def float32_global_norm(tree) -> jax.Array:
    """sqrt(sum of squares) over every leaf, accumulated in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(cfg: ModelConfig, train: TrainConfig, options: ModelOptions,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
    """step(state, frozen, batch) -> (state, metrics); batch leaves have a leading accum axis.
    `options`: the model's (normally `train.model_options()`)."""
    binder = ModelBinder(cfg, options)
    base_key = jax.random.key(train.seed)

    def micro_grads(trainable, frozen, micro, key):
        def loss_fn(tp):
            model = binder(merge_params(tp, jax.lax.stop_gradient(frozen)))
            return _loss_sums(model, train, micro, key, train.use_features)

        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return grads, sums

    def step(state: TrainState, frozen: dict, batch: dict):
        step_key = jax.random.fold_in(base_key, state.step)
        accum = jax.tree.leaves(batch)[0].shape[0]

        def body(carry, inputs):
            index, micro = inputs
            grads, sums = micro_grads(state.params, frozen, micro, jax.random.fold_in(step_key, index))
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        if accum == 1:
            # One micro-batch (the usual case): its gradients are the sums. A scan with a
            # zero-filled carry would write and re-read a zero gradient for every parameter
            # (~6% of a CPU step).
            grad_sums, metric_sums = micro_grads(state.params, frozen, jax.tree.map(lambda x: x[0], batch),
                                                 jax.random.fold_in(step_key, 0))
        else:
            # Several: one scan from zeros, so one micro-batch's program is compiled once and the
            # peak holds the running sums and one micro-batch's gradients (what urm_jax.memory's
            # calibrated estimate counts; peeling the first micro-batch off the scan adds a third
            # gradient-sized buffer on TPU).
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: micro_grads(state.params, frozen, jax.tree.map(lambda x: x[0], batch), step_key)))
            (grad_sums, metric_sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), batch))
        count = jnp.maximum(metric_sums["count"], 1.0)
        grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grad_sums)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # param_norm: a non-finite value means the update broke the weights (the loop refuses to
        # checkpoint them); one fused pass over the parameters, small next to the step.
        metrics = finalize_metrics(metric_sums) | {"grad_norm": optax.global_norm(grads),
                                                   "param_norm": float32_global_norm(params),
                                                   "learning_rate": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_step(cfg: ModelConfig, train: TrainConfig, options: ModelOptions) -> Callable:
    """eval(trainable, frozen, batch) -> metric sums of one batch (no gradients). Token batches
    without an accumulation axis; stage 2 evaluates through the backbone (eval pairs are not
    cached). The noise key is fixed, so reparam eval losses are comparable across steps."""
    # A forward only: the layer scan (unrolling pays off in the backward, and costs compile time
    # per eval shape; urm_jax.model.urm.LAYER_LOOP_AUTO)
    binder = ModelBinder(cfg, dataclasses.replace(options, layer_loop="scan"))
    key = jax.random.fold_in(jax.random.key(train.seed), 2**31 - 1)

    def evaluate(trainable, frozen, batch):
        model = binder(merge_params(trainable, frozen))
        return _loss_sums(model, train, batch, key, use_features=False, training=False)[1]

    return evaluate


def cast_params(params: dict, cfg: ModelConfig, options: ModelOptions) -> dict:
    """Storage dtypes for training: backbone/value head in the param dtype, gate in its own."""
    dt = options.dtypes
    backbone = jnp.dtype(dt.param or cfg.torch_dtype)
    gate = jnp.dtype(dt.gate_param_dtype(cfg))

    def cast(path, x):  # host arrays stay on the host: device_put then places them sharded
        dtype = gate if is_gate(path) else backbone
        return jnp.asarray(x).astype(dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


@dataclasses.dataclass
class Trainer:
    """Everything a training loop needs, placed on a mesh: the compiled step, the sharded state
    and frozen params, and the batch sharding."""

    step_fn: Callable
    state: TrainState
    frozen: dict
    batch_sharding: Any
    schedule: optax.Schedule
    state_shardings: Any

    eval_fn: Callable | None = None
    eval_sharding: Any = None  # held-out batches: the batch sharding without the accumulation axis

    def run(self, batch: dict) -> dict:
        """One optimiser step on `batch` (arrays placed with `batch_sharding`; the state is donated and
        replaced). Returns the step's metrics as replicated scalars: the loss's metric means,
        `grad_norm`, `learning_rate`."""
        self.state, metrics = self.step_fn(self.state, self.frozen, batch)
        return metrics

    def evaluate(self, batches) -> dict:
        """Metric means over every batch (sums first, then one division by the example count)."""
        totals = None  # summed on the device: no host round trip between batches
        for batch in batches:
            sums = self.eval_fn(self.state.params, self.frozen, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        return jax.device_get(finalize_metrics(totals)) if totals is not None else {}


def optimizer_state_shardings(optimizer, train_params: dict, train_sh: dict, mesh):
    """(abstract optimiser state, its shardings): each moment sharded like its parameter,
    counters and other scalars replicated."""
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(optimizer.init, train_params)
    return abstract, optax.tree_utils.tree_map_params(optimizer, lambda _, s: s, abstract, train_sh,
                                                      transform_non_params=lambda _: replicated)


def jit_train_step(step: Callable, mesh, rules, state_sh: TrainState, frozen_sh: dict, batch_sh):
    """The train step jitted over the mesh: sharded in and out, state donated, logical-axis
    constraints resolved under `use_mesh`."""
    def step_in_mesh(state, frozen_params, batch):
        with use_mesh(mesh, rules):
            return step(state, frozen_params, batch)

    return jax.jit(step_in_mesh, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))


def batch_shapes(cfg: ModelConfig, train: TrainConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch one step takes (the loop's batches after `with_accum_axis`), each key
    [accum, micro, ...] with A = grad_accum, B = micro-batch examples or pairs, L = seq_len,
    S = max_segments, D = hidden:
      stage 1:  input_ids, segment_ids [A, B, L] int32; pool_index [A, B, S] int32; pool_mask
                [A, B, S] float32; labels [A, B, S, attributes] float32;
      stage 2 on cached features: features [A, 2B, D] in the compute dtype, pair_mask [A, B];
      stage 2 on tokens: input_ids, segment_ids [A, 2B, L]; pool_index, pool_mask [A, 2B, 1];
      pair_mask [A, B] (rows 2r / 2r+1: pair r's chosen / rejected)."""
    a, b, length = train.grad_accum, train.micro_batch_size, train.data.seq_len
    i32, f32 = jnp.int32, jnp.float32
    if train.stage == 1:
        segs = train.data.max_segments
        layout = {"input_ids": ((a, b, length), i32), "segment_ids": ((a, b, length), i32),
                  "pool_index": ((a, b, segs), i32), "pool_mask": ((a, b, segs), f32),
                  "labels": ((a, b, segs, cfg.num_attributes), f32)}
    elif train.use_features:
        layout = {"features": ((a, 2 * b, cfg.hidden_size), jnp.dtype(train.precision.compute)),
                  "pair_mask": ((a, b), f32)}
    else:
        layout = {"input_ids": ((a, 2 * b, length), i32), "segment_ids": ((a, 2 * b, length), i32),
                  "pool_index": ((a, 2 * b, 1), i32), "pool_mask": ((a, 2 * b, 1), f32),
                  "pair_mask": ((a, b), f32)}
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in layout.items()}


@dataclasses.dataclass
class StepLayout:
    """How `train` lays the step out on a mesh, before any array exists: the parameter shardings
    (all, trainable, frozen), the optimiser and its state shardings, the batch sharding, and the
    jitted step. `build_trainer` places real arrays with it; `urm_jax.plan` compiles it with
    abstract ones for a TPU topology, so both see the same program."""

    options: ModelOptions
    shardings: dict  # every parameter
    train_sh: dict
    frozen_sh: dict
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    opt_sh: Any
    state_sh: TrainState
    batch_sh: Any  # with the leading accumulation axis
    step_fn: Callable  # jitted step(state, frozen, batch) -> (state, metrics), state donated


def step_layout(cfg: ModelConfig, train: TrainConfig, total_steps: int, mesh, rules=None,
                options: ModelOptions | None = None) -> StepLayout:
    """The layout of `train`'s step on `mesh` (see StepLayout); `options` overrides
    `train.model_options()`. ValueError when a trainable pattern selects nothing."""
    options = options or train.model_options()
    if options.lora != train.lora:
        raise ValueError("the model options' LoRA differs from the training config's")
    shardings = param_shardings(cfg, mesh, rules, options)
    train_sh, frozen_sh = split_params(shardings, train.trainable_patterns)
    train_shapes, _ = split_params(training_param_shapes(cfg, options), train.trainable_patterns)
    if options.lora is not None and LORA not in train_shapes:
        raise ValueError(f"`trainable` {list(train.trainable_patterns)} selects none of the LoRA "
                         f"adapters, which would stay at zero: add `{LORA}` (or leave `trainable` "
                         "unset: stage 1 trains the adapters and the value head)")
    optimizer, schedule = make_optimizer(train.optim, total_steps, train_shapes)
    _, opt_sh = optimizer_state_shardings(optimizer, train_shapes, train_sh, mesh)
    state_sh = TrainState(NamedSharding(mesh, P()), train_sh, opt_sh)
    batch_sh = batch_sharding(mesh, rules, accum_axis=True)
    step = make_train_step(cfg, train, options, optimizer, schedule)
    return StepLayout(options, shardings, train_sh, frozen_sh, optimizer, schedule, opt_sh, state_sh,
                      batch_sh, jit_train_step(step, mesh, rules, state_sh, frozen_sh, batch_sh))


def training_param_shapes(cfg: ModelConfig, options: ModelOptions) -> dict:
    """Every parameter as a ShapeDtypeStruct in its training storage dtype (`cast_params`)."""
    shapes = nnx.state(abstract_model(cfg, options)).to_pure_dict()
    return jax.eval_shape(lambda p: cast_params(p, cfg, options), shapes)


def abstract_step_args(cfg: ModelConfig, train: TrainConfig, layout: StepLayout) -> tuple[TrainState, dict]:
    """(state, frozen) as ShapeDtypeStructs with the layout's shardings: what `layout.step_fn`
    takes before its batch, for compiling without allocating (urm_jax.plan, urm_jax.memory)."""
    def place(tree, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

    trainable, frozen = split_params(training_param_shapes(cfg, layout.options), train.trainable_patterns)
    opt_state = jax.eval_shape(layout.optimizer.init, trainable)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=layout.state_sh.step)
    return (TrainState(step, place(trainable, layout.train_sh), place(opt_state, layout.opt_sh)),
            place(frozen, layout.frozen_sh))


def program_settings(train: TrainConfig) -> TrainConfig:
    """`train` without the settings no compiled program reads (where the model and data come
    from, where the run writes, logging, checkpointing, the TPU plan): the part of a training
    configuration that keys its stored programs, so a run in another directory, or reading
    another copy of the data, reuses them. The step's schedule reads total_steps, keyed apart."""
    data = dataclasses.replace(train.data, train="", split="", eval=None, eval_split="", shuffle_seed=0)
    return dataclasses.replace(train, model="", output_dir="", data=data, checkpoint=CheckpointConfig(),
                               log_every=1, eval_every=None, tensorboard=False, plot=False,
                               plan=PlanConfig(), epochs=1, max_steps=None)


def build_trainer(cfg: ModelConfig, params: dict, train: TrainConfig, total_steps: int, mesh,
                  rules=None, options: ModelOptions | None = None) -> Trainer:
    """The compiled step and the sharded state for training `params` (the full pure-dict tree,
    host or device arrays in any dtype) as `train` says: the parameters its patterns select
    train, the rest is frozen. `options` overrides `train.model_options()` (e.g. Pallas
    interpret mode in tests)."""
    layout = step_layout(cfg, train, total_steps, mesh, rules, options)
    options = layout.options
    if options.lora is not None and LORA not in params:  # a fresh LoRA run: adapters from the seed
        params = merge(params, init_lora(cfg, options, train.seed))
    # A private copy: the step donates its state, which must never free the caller's arrays
    # (device_put alone may reuse a buffer already on the right device).
    private = jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x,
                           cast_params(params, cfg, options))
    params = jax.device_put(private, layout.shardings)
    train_params, frozen = split_params(params, train.trainable_patterns)
    replicated = NamedSharding(mesh, P())
    opt_state = jax.jit(layout.optimizer.init, out_shardings=layout.opt_sh)(train_params)
    state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated), train_params, opt_state)
    evaluate = make_eval_step(cfg, train, options)

    def eval_in_mesh(trainable, frozen_params, batch):
        with use_mesh(mesh, rules):
            return evaluate(trainable, frozen_params, batch)

    eval_sharding = batch_sharding(mesh, rules)
    compiled_eval = jax.jit(eval_in_mesh, in_shardings=(layout.train_sh, layout.frozen_sh, eval_sharding),
                            out_shardings=replicated)
    # Stored whole in the compilation cache: a resumed (or repeated) run loads the step and the
    # eval programs without tracing or lowering them. The key is everything they close over.
    key = (cfg, program_settings(train), options, total_steps, mesh_key(mesh), rules or AxisRules())
    return Trainer(stored_jit(layout.step_fn, name="train_step", key=("train_step", *key)), state, frozen,
                   layout.batch_sh, layout.schedule, layout.state_sh,
                   stored_jit(compiled_eval, name="eval_step", key=("eval_step", *key)), eval_sharding)
