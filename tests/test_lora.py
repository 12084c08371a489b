"""LoRA (urm_jax.model.lora): adapters are parameters in the tree, stacked and scanned with their
kernels; fresh ones change nothing, merged ones equal unmerged ones, only adapters and the value
head train and hold optimiser state, any mesh trains like one device, and every saved model
(final/, `urm-jax export`, `convert to_hf`) is a plain URM with the adapters merged."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import make_tiny_urm
from test_train_step import add_accum_axis, pair_batch, rel, unpacked_batch

from urm_jax.checkpoint import load_params
from urm_jax.config import DTypePolicy
from urm_jax.loading import load_model
from urm_jax.memory import estimate
from urm_jax.model.lora import LoraConfig, merge_kernel
from urm_jax.model.paths import leaf_paths, merge, path_name
from urm_jax.model.urm import ModelBinder, ModelOptions, init_lora, model_from_params, param_shardings
from urm_jax.sharding import make_mesh
from urm_jax.train.config import (LossConfig, OptimConfig, PrecisionConfig, TrainConfig, TrainConfigError,
                                  load_train_config)
from urm_jax.train.step import build_trainer

ROOT = Path(__file__).resolve().parent.parent
LORA_RECIPE = str(ROOT / "configs/train/tiny_stage1_lora.yaml")
FULL_RECIPE = str(ROOT / "configs/train/tiny_stage1.yaml")
SAMPLES = str(ROOT / "data/samples/helpsteer2_sample.jsonl")
FP32 = DTypePolicy(param="float32", compute="float32", gate="float32")
EVERY_KERNEL = ("backbone/layers/*_proj", "value_head", "gate")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_urm(tmp_path_factory.mktemp("lora"), gate_dtype="float32", seed=7)
    model, cfg = load_model(path, compute_dtype="float32")
    return path, cfg, nnx.state(model).to_pure_dict()


def token_batch(rng, n=3):
    """(input_ids, attention_mask) of n right-padded random rows."""
    batch = unpacked_batch(rng, n, labels=False)
    return jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"])


def with_random_adapters(params, cfg, options, seed=1, b_scale=0.05):
    """The checkpoint's parameters plus adapters whose B is random (a trained adapter's shape)."""
    fresh = init_lora(cfg, options, seed)
    keys = iter(jax.random.split(jax.random.key(seed), 64))

    def fill(path, x):
        return x if path[-1].key == "lora_a" else b_scale * jax.random.normal(next(keys), x.shape, x.dtype)

    return merge(params, jax.tree_util.tree_map_with_path(fill, fresh))


def merged_base(params: dict, lora: LoraConfig) -> dict:
    """What save_model writes: every adapted kernel as W + s A B (float32), no `lora` group."""
    out = {k: v for k, v in params.items() if k != "lora"}
    out = jax.tree.map(lambda x: x, out)
    for target in lora_targets_paths(params):
        node_w, node_a = out, params["lora"]
        for key in target[:-1]:
            node_w, node_a = node_w[key], node_a[key]
        ad = node_a[target[-1]]
        node_w[target[-1]] = merge_kernel(node_w[target[-1]], ad["lora_a"], ad["lora_b"], lora.scaling,
                                          stacked=target[0] == "backbone")
    return out


def lora_targets_paths(params: dict) -> list[tuple[str, ...]]:
    return sorted({p[1:-1] for p in leaf_paths({"lora": params["lora"]})})


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("lora.r=0", "`lora.r`: the rank must be an integer >= 1, got 0"),
    ("lora.r=2.5", "`lora.r`: expected int"),
    ("lora.alpha=0", "`lora.alpha`: must be a finite number > 0"),
    ("lora.dropout=1.0", "`lora.dropout`: must be in [0, 1)"),
    ("lora.init=xavier", "`lora.init`: 'xavier' is not one of ['kaiming', 'gaussian']"),
    ("lora.targets=[backbone/layers/qproj]", "pattern 'backbone/layers/qproj' selects no parameter"),
    ("lora.targets=[backbone/layers/input_norm]", "selects backbone/layers/input_norm, not a projection kernel"),
    ("lora.targets=[backbone/embed_tokens]", "selects backbone/embed_tokens, not a projection kernel"),
    ("lora.targets=[gate/fc0/bias]", "selects gate/fc0/bias, not a projection kernel"),
    ("lora.targets=[]", "`lora.targets`: expected a non-empty list"),
    ("lora.rank=8", "unknown config key `lora.rank`"),
    ("lora=8", "`lora` must be a mapping"),
])
def test_config_errors_name_the_lora_key(override, message):
    with pytest.raises(TrainConfigError) as err:
        load_train_config(LORA_RECIPE, ["model=m", "output_dir=o", override])
    assert message in str(err.value)


def test_config_defaults_presets_and_scaling():
    cfg = load_train_config(LORA_RECIPE, ["model=m", "output_dir=o"])
    assert cfg.lora == LoraConfig(targets=("backbone/layers/*_proj",), r=8, alpha=16.0, dropout=0.05)
    assert cfg.trainable_patterns == ("lora", "value_head")  # the fresh value head trains too
    assert cfg.lora.scaling == 2.0
    assert dataclasses.replace(cfg.lora, use_rslora=True).scaling == 16 / math.sqrt(8)
    assert load_train_config(LORA_RECIPE, ["model=m", "output_dir=o", "lora=null"]).lora is None
    peft_defaults = load_train_config(FULL_RECIPE, ["model=m", "output_dir=o", "lora.r=8"]).lora
    assert (peft_defaults.r, peft_defaults.alpha, peft_defaults.dropout) == (8, 8.0, 0.0)
    assert peft_defaults.targets == ("backbone/layers/*_proj",)
    # `gate/fc0` names a layer: its kernel is adapted, its bias is not.
    assert lora_lib_targets("gate/fc0") == ["gate/fc0/kernel"]
    assert lora_lib_targets("backbone") == [f"backbone/layers/{n}" for n in (
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")]
    # Stage 2 adapts the gate only (its backbone is frozen, usually not even run).
    stage2 = str(ROOT / "configs/train/tiny_stage2.yaml")
    assert load_train_config(stage2, ["model=m", "output_dir=o", "lora.targets=[gate]"]).trainable_patterns == ("lora",)
    with pytest.raises(TrainConfigError, match="stage 2 trains the gate; .* not backbone/layers/q_proj"):
        load_train_config(stage2, ["model=m", "output_dir=o", "lora.targets=[backbone/layers/q_proj]"])


def lora_lib_targets(pattern):
    from urm_jax.model.urm import lora_target_paths

    return [path_name(p) for p in lora_target_paths(LoraConfig(targets=(pattern,)))]


def test_trainable_must_select_an_adapter(tiny):
    _, cfg, params = tiny
    train = TrainConfig(lora=LoraConfig(), trainable=("value_head",), precision=PrecisionConfig(
        param="float32", compute="float32", gate_compute="float32", gate_param="float32"))
    with pytest.raises(ValueError, match="selects none of the LoRA adapters"):
        build_trainer(cfg, params, train, 10, make_mesh((1, 1, 1), jax.devices()[:1]))


# -- the model ----------------------------------------------------------------------------------

def test_adapters_are_stacked_parameters_with_axes_and_standard_init(tiny):
    _, cfg, _ = tiny
    lora = LoraConfig(targets=EVERY_KERNEL, r=4)
    options = ModelOptions(FP32, lora=lora)
    fresh = init_lora(cfg, options, seed=0)["lora"]
    n, d, hq, hd = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim
    q, o = fresh["backbone"]["layers"]["q_proj"], fresh["backbone"]["layers"]["o_proj"]
    assert q["lora_a"].shape == (n, d, 4) and q["lora_b"].shape == (n, 4, hq, hd)
    assert o["lora_a"].shape == (n, hq, hd, 4) and o["lora_b"].shape == (n, 4, d)
    assert fresh["gate"]["fc4"]["kernel"]["lora_b"].shape == (4, cfg.num_attributes)
    for path, x in jax.tree_util.tree_flatten_with_path(fresh)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("['lora_b']"):
            assert not np.any(x), name  # B = 0: the adapter starts as the identity update
    # Kaiming-uniform (a = sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = the input size.
    for a, fan_in in ((q["lora_a"], d), (o["lora_a"], hq * hd)):
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    gauss = init_lora(cfg, ModelOptions(FP32, lora=dataclasses.replace(lora, init="gaussian", r=16)), 0)
    a = np.asarray(gauss["lora"]["backbone"]["layers"]["up_proj"]["lora_a"])
    assert abs(a.std() - 1 / 16) < 0.1 / 16  # N(0, 1/r^2), peft's "gaussian"
    # Adapters of each target are drawn from its own stream: adding targets changes no other.
    only_q = init_lora(cfg, ModelOptions(FP32, lora=LoraConfig(targets=("backbone/layers/q_proj",), r=4)), 0)
    np.testing.assert_array_equal(only_q["lora"]["backbone"]["layers"]["q_proj"]["lora_a"], q["lora_a"])
    # Logical axes: the kernel's input axes + lora_rank, lora_rank + its output axes.
    from urm_jax.model.urm import abstract_model, param_logical_axes

    axes = param_logical_axes(abstract_model(cfg, options))["lora"]["backbone"]["layers"]
    assert axes["q_proj"] == {"lora_a": ("layers", "embed", "lora_rank"),
                              "lora_b": ("layers", "lora_rank", "q_heads", "head_dim")}
    assert axes["down_proj"]["lora_a"] == ("layers", "mlp", "lora_rank")


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_zero_adapters_leave_outputs_bit_identical(tiny, compute):
    _, cfg, params = tiny
    dtypes = DTypePolicy(param="float32", compute=compute, gate="float32")
    lora = LoraConfig(targets=EVERY_KERNEL, r=4, dropout=0.3)
    options = ModelOptions(dtypes, lora=lora)
    with_lora = merge(params, init_lora(cfg, options, seed=3))  # A random, B zero
    ids, mask = token_batch(np.random.default_rng(0))
    base = model_from_params(cfg, params, ModelOptions(dtypes))(ids, mask)
    adapted = ModelBinder(cfg, options)(with_lora)
    for key in (None, jax.random.key(5)):  # with dropout drawn too: B = 0 still adds exact zeros
        out = adapted.heads(adapted.pooled(ids, mask, key), key)
        for name, a, b in zip(out._fields, out, base):
            assert a.dtype == b.dtype and np.array_equal(a, b), (compute, name, key)


def test_merged_outputs_equal_unmerged_in_float32(tiny):
    _, cfg, params = tiny
    lora = LoraConfig(targets=EVERY_KERNEL, r=4, alpha=8)
    options = ModelOptions(FP32, lora=lora)
    trained = with_random_adapters(params, cfg, options)
    ids, mask = token_batch(np.random.default_rng(1))
    unmerged = ModelBinder(cfg, options)(trained)(ids, mask)
    merged = model_from_params(cfg, merged_base(trained, lora), ModelOptions(FP32))(ids, mask)
    base = model_from_params(cfg, params, ModelOptions(FP32))(ids, mask)
    for name, a, b, c in zip(unmerged._fields, unmerged, merged, base):
        # The outputs parity measures within 1e-6; the uncertainty is sum exp(2 log_std), which
        # doubles log_std's absolute error into a relative one.
        assert rel(a, b) <= (1e-6 if name != "uncertainty" else 1e-5), (name, rel(a, b))
        assert rel(c, b) > 1e-3, name  # the adapters really changed the model


def test_dropout_is_training_only_and_keyed(tiny):
    _, cfg, params = tiny
    lora = LoraConfig(targets=EVERY_KERNEL, r=4, dropout=0.5)
    options = ModelOptions(FP32, lora=lora)
    model = ModelBinder(cfg, options)(with_random_adapters(params, cfg, options, b_scale=0.5))
    no_dropout = ModelBinder(cfg, ModelOptions(FP32, lora=dataclasses.replace(lora, dropout=0.0)))(
        with_random_adapters(params, cfg, options, b_scale=0.5))
    ids, mask = token_batch(np.random.default_rng(2))

    def reward(key):
        return np.asarray(model.heads(model.pooled(ids, mask, key), key).reward)

    np.testing.assert_array_equal(reward(None), np.asarray(no_dropout(ids, mask).reward))
    np.testing.assert_array_equal(reward(jax.random.key(1)), reward(jax.random.key(1)))
    assert not np.allclose(reward(jax.random.key(1)), reward(jax.random.key(2)))
    assert not np.allclose(reward(jax.random.key(1)), reward(None))


# -- the train step -----------------------------------------------------------------------------

def lora_train(lora=None, **changes) -> TrainConfig:
    lora = lora or LoraConfig(r=4, alpha=8, dropout=0.1)
    return TrainConfig(lora=lora, optim=OptimConfig(learning_rate=1e-2, warmup_ratio=0.0),
                       precision=PrecisionConfig(param="float32", compute="float32",
                                                 gate_compute="float32", gate_param="float32"), **changes)


def run_steps(cfg, params, train, mesh_shape, steps=3):
    devices = jax.devices()[:math.prod(mesh_shape)]
    trainer = build_trainer(cfg, params, train, 100, make_mesh(mesh_shape, devices))
    batch = add_accum_axis(unpacked_batch(np.random.default_rng(3), 8))
    metrics = [jax.device_get(trainer.run(batch)) for _ in range(steps)]
    return trainer, metrics


def test_optimizer_state_holds_only_adapters_and_value_head(tiny):
    _, cfg, params = tiny
    train = lora_train()
    trainer, metrics = run_steps(cfg, params, train, (1, 1, 1), steps=2)
    trained = jax.device_get(trainer.state.params)
    assert set(trained) == {"lora", "value_head"}
    assert set(trainer.frozen) == {"backbone", "gate"}
    assert {p[:3] for p in leaf_paths(trained["lora"])} == {("backbone", "layers", n) for n in (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    # AdamW's mu and nu: one leaf per trained leaf each, nothing for the frozen base.
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0]
    n_trained, trained_bytes = len(jax.tree.leaves(trained)), sum(x.nbytes for x in jax.tree.leaves(trained))
    assert len(moments) == 2 * n_trained == 2 * (2 * 7 + 1)
    assert sum(x.nbytes for x in moments) == 2 * trained_bytes
    frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.frozen))
    assert trained_bytes < frozen_bytes / 4
    # The memory estimate counts exactly these bytes (one device, float32).
    est = estimate(cfg, train, mesh_shape=(1, 1, 1), num_devices=1, platform="cpu")
    assert est["params"] == est["gradients"] == trained_bytes
    assert est["optimizer"] == 2 * trained_bytes
    assert est["frozen_params"] == frozen_bytes
    assert est["trainable_param_count"] == sum(x.size for x in jax.tree.leaves(trained))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    # The frozen base never moves; the adapters' B did (they start at zero).
    for a, b in zip(jax.tree.leaves(jax.device_get(trainer.frozen["backbone"])),
                    jax.tree.leaves(params["backbone"])):
        assert np.array_equal(a, b)
    assert np.any(trained["lora"]["backbone"]["layers"]["up_proj"]["lora_b"])


def test_mesh_equals_one_device_and_shards_adapters(tiny):
    """(1, 4, 2) on 8 simulated devices trains the adapters (dropout on) as one device does,
    with the adapters split like their kernels (fsdp on the input axis, tensor on heads/mlp)."""
    _, cfg, params = tiny
    train = lora_train()
    one, m1 = run_steps(cfg, params, train, (1, 1, 1))
    eight, m8 = run_steps(cfg, params, train, (1, 4, 2))
    want, got = jax.device_get(one.state.params), jax.device_get(eight.state.params)
    start = {"value_head": params["value_head"], "lora": jax.device_get(init_lora(cfg, train.model_options(), 0))["lora"]}
    for (path, a), b, s in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                               jax.tree.leaves(start)):
        name = jax.tree_util.keystr(path)
        # 2e-3 of each leaf's update: sharded sums round differently. The worst leaf is o_proj's
        # lora_a (its B starts at zero, so its gradients start at zero and its update is the
        # smallest, and the same rounding the largest share of it): 7.6e-4 with the layer scan,
        # 1.3e-3 with the layers unrolled (training on CPU); every other leaf is under 5e-5.
        assert np.max(np.abs(a - b)) <= 2e-3 * max(np.max(np.abs(b - s)), 1e-6), name
    for a, b in zip(m8, m1):
        assert rel(a["loss"], b["loss"]) < 1e-5 and rel(a["grad_norm"], b["grad_norm"]) < 1e-5
    shardings = param_shardings(cfg, make_mesh((1, 4, 2), jax.devices()[:8]), None, train.model_options())
    q = shardings["lora"]["backbone"]["layers"]["q_proj"]
    assert tuple(q["lora_a"].spec) == (None, "fsdp", None)
    assert tuple(q["lora_b"].spec) == (None, None, "tensor", None)


def test_stage2_trains_gate_adapters_on_cached_features(tiny, tmp_path):
    """Stage 2 with `lora.targets: [gate]`: only the gate's adapters train (the gate itself, the
    backbone and the value head stay bit-identical), cached features and the full path agree,
    and the saved gate is the merged one in the gate's save dtype."""
    from urm_jax.train.loop import save_model

    path, cfg, params = tiny
    lora = LoraConfig(targets=("gate",), r=4, alpha=8)
    raw = pair_batch(np.random.default_rng(7), 4)
    binder = ModelBinder(cfg, ModelOptions(FP32))
    features = binder(params).pooled_segments(raw["input_ids"], raw["segment_ids"], raw["pool_index"])[:, 0]
    cached = {"features": np.asarray(features), "pair_mask": raw["pair_mask"]}
    runs = {}
    for use_features, batch in ((False, raw), (True, cached)):
        train = lora_train(lora, stage=2, loss=LossConfig(kind="bt"), stage2_cached_features=use_features)
        trainer = build_trainer(cfg, params, train, 100, make_mesh((1, 1, 1), jax.devices()[:1]))
        for _ in range(3):
            metrics = jax.device_get(trainer.run(add_accum_axis(batch)))
        runs[use_features] = trainer, metrics
    trainer, metrics = runs[True]
    trained = jax.device_get(trainer.state.params)
    assert set(trained) == {"lora"} and set(trained["lora"]) == {"gate"}
    assert set(trainer.frozen) == {"backbone", "value_head", "gate"}
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(jax.device_get(runs[False][0].state.params))):
        assert np.max(np.abs(a - b)) < 1e-6
    assert np.any(trained["lora"]["gate"]["fc0"]["kernel"]["lora_b"])
    out = load_params(save_model(tmp_path / "final", train, cfg, trainer, str(path)))
    for group in ("backbone", "value_head"):
        for a, b in zip(jax.tree.leaves(out[group]), jax.tree.leaves(params[group])):
            assert np.array_equal(a, b)
    np.testing.assert_array_equal(out["gate"]["fc0"]["bias"], params["gate"]["fc0"]["bias"])
    ad = trained["lora"]["gate"]["fc0"]["kernel"]
    want = np.asarray(merge_kernel(params["gate"]["fc0"]["kernel"], ad["lora_a"], ad["lora_b"], 2.0, False))
    np.testing.assert_array_equal(out["gate"]["fc0"]["kernel"], want.astype(out["gate"]["fc0"]["kernel"].dtype))
    assert not np.array_equal(out["gate"]["fc0"]["kernel"], params["gate"]["fc0"]["kernel"])


def test_save_merges_in_float32_then_rounds_once(tiny, tmp_path):
    """final/ holds W + s A B computed in float32 and rounded once to the save dtype, and no
    adapter tensor."""
    from urm_jax.train.loop import save_model

    path, cfg, params = tiny
    train = lora_train(LoraConfig(targets=EVERY_KERNEL, r=4, alpha=8))
    train = dataclasses.replace(train, precision=dataclasses.replace(train.precision, save="bfloat16",
                                                                     gate_save="float32"))
    trainer = build_trainer(cfg, params, train, 10, make_mesh((1, 1, 1), jax.devices()[:1]))
    trained = with_random_adapters(params, cfg, train.model_options())
    trainer.state = trainer.state._replace(params={"lora": trained["lora"],
                                                   "value_head": trained["value_head"]})
    out = save_model(tmp_path / "final", train, cfg, trainer, str(path))
    saved = load_params(out)
    assert set(saved) == {"backbone", "value_head", "gate"}
    for target in lora_targets_paths(trained):
        w, ad = params, trained["lora"]
        for key in target:
            w, ad = w[key], ad[key]
        a, b = np.asarray(ad["lora_a"], np.float64), np.asarray(ad["lora_b"], np.float64)
        if target[0] == "backbone":
            delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
        else:
            delta = np.tensordot(a, b, axes=1)
        exact = np.asarray(w, np.float64) + 2.0 * delta
        got = saved
        for key in target:
            got = got[key]
        want_dtype = np.float32 if target[0] == "gate" else jnp.bfloat16
        assert got.dtype == want_dtype, target
        # float32 merge then one rounding: within half an ulp of the save dtype of the exact sum
        # (plus float32's own error), never the double rounding of a bf16 merge.
        _, exponent = np.frexp(exact)  # |exact| in [2^(e-1), 2^e): one ulp is 2^(e-1-nmant)
        ulp = np.ldexp(1.0, exponent - 1 - jnp.finfo(want_dtype).nmant)
        f32_error = 1e-6 * (np.abs(np.asarray(w, np.float64)) + np.abs(2.0 * delta))
        assert np.all(np.abs(got.astype(np.float64) - exact) <= 0.5 * ulp + f32_error), target
        merged32 = np.asarray(merge_kernel(w, ad["lora_a"], ad["lora_b"], 2.0, target[0] == "backbone"))
        np.testing.assert_array_equal(got, merged32.astype(want_dtype))
    np.testing.assert_array_equal(saved["backbone"]["embed_tokens"],
                                  np.asarray(params["backbone"]["embed_tokens"]).astype(jnp.bfloat16))


# -- urm-jax train end to end ---------------------------------------------------------------------

def cli_env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def run_cli(*args):
    done = subprocess.run([sys.executable, "-m", "urm_jax.cli", *map(str, args)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True)
    return done


def run_train(config, *overrides) -> Path:
    done = run_cli("train", config, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(json.loads(done.stdout.strip().splitlines()[-1])["final_checkpoint"])


RUN_OVERRIDES = ("checkpoint.async_save=false", f"data.eval={SAMPLES}", "data.eval_split=train", "eval_every=2")


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir
    from urm_jax.hf.load import from_hf
    from urm_jax.hf.synthetic import llama3_hf_config, write_random_hf

    os.environ.setdefault("URM_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    root = tmp_path_factory.mktemp("base")
    hf_cfg = llama3_hf_config(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, rope_theta=500000.0)
    hf = write_random_hf(root / "hf", hf_cfg, dtype="float32", gate_dtype="float16",
                         tokenizer_dir=cached_llama3_tokenizer_dir(), progress=False)
    return hf, from_hf(hf, root / "ckpt", progress=False)


@pytest.fixture(scope="module")
def lora_run(base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, run_train(LORA_RECIPE, f"model={base_model[0]}", f"output_dir={out}", *RUN_OVERRIDES)


@pytest.fixture(scope="module")
def full_run(base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, run_train(FULL_RECIPE, f"model={base_model[0]}", f"output_dir={out}", *RUN_OVERRIDES)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def changed(before: dict, after: dict) -> set[str]:
    out = set()
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(after)[0],
                                 jax.tree_util.tree_flatten_with_path(before)[0]):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        if not np.array_equal(a, b):
            out.add(path_name(path))
    return out


def test_lora_training_reduces_the_loss_and_changes_what_full_fine_tuning_changes(base_model, lora_run,
                                                                                 full_run):
    base = load_params(base_model[1])
    (lora_dir, lora_final), (full_dir, full_final) = lora_run, full_run
    lora_log, full_log = records(lora_dir), records(full_dir)
    assert [r["step"] for r in lora_log] == [r["step"] for r in full_log] == list(range(1, 9))
    evals = [r["eval/loss"] for r in lora_log if "eval/loss" in r]
    # On all 96 bundled samples (a batch's own loss is too noisy to compare with another's).
    assert len(evals) == 4 and all(b < a for a, b in zip(evals, evals[1:])), evals
    lora_changed = changed(base, load_params(lora_final))
    full_changed = changed(base, load_params(full_final))
    targets = {f"backbone/layers/{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                "up_proj", "down_proj")}
    # LoRA: the merged kernels of its targets and the value head, nothing else (norms, the
    # embedding and the gate are bit for bit the base's).
    assert lora_changed == targets | {"value_head/kernel"}
    # Full fine-tuning changes all of that too, and more of the backbone; neither touches the gate.
    assert lora_changed < full_changed
    assert not {p for p in full_changed if p.startswith("gate/")}
    assert "backbone/layers/input_norm" in full_changed and "backbone/embed_tokens" in full_changed
    # The saved model is a plain URM: the same tensors, names and dtypes as the base's.
    saved = load_params(lora_final)
    assert leaf_paths(saved) == leaf_paths(base) and "lora" not in saved
    config = yaml_load(lora_dir / "config.yaml")
    assert config["lora"]["r"] == 8 and config["lora"]["targets"] == ["backbone/layers/*_proj"]


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_export_and_to_hf_of_a_lora_run_match_urm_jax_scoring(base_model, lora_run, tmp_path):
    from safetensors import safe_open

    from urm_jax.hf.export import to_hf
    from urm_jax.parity import run_parity
    from urm_jax.train.loop import export_step

    run, final = lora_run
    export = export_step(run, tmp_path / "export", progress=False)  # `urm-jax export RUN OUT`
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(load_params(export))[0],
                                 jax.tree_util.tree_flatten_with_path(load_params(final))[0]):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(path)
    hf = to_hf(final, tmp_path / "hf", progress=False)
    names = set()
    for shard in hf.glob("*.safetensors"):
        with safe_open(shard, "np") as f:
            names |= set(f.keys())
    assert names and not [n for n in names if "lora" in n]
    # Provenance: the adapters are gone from the weights, so the training record and the model
    # card say how they were trained; published files name the data, not a local path.
    record = json.loads((final / "config.json").read_text())["urm_jax_training"][-1]
    assert record["lora"] == {"r": 8, "alpha": 16, "scaling": 2.0, "dropout": 0.05,
                              "targets": ["backbone/layers/*_proj"], "use_rslora": False,
                              "init": "kaiming"}
    assert record["data"] == Path(SAMPLES).name and len(record["data_sha256"]) == 64
    card = (hf / "README.md").read_text()
    assert ("LoRA: rank 8, alpha 16 (scaling 2), dropout 0.05, targets `backbone/layers/*_proj`, "
            "A init kaiming; merged into the weights") in card, card
    for published in ((hf / "README.md").read_text(), (hf / "config.json").read_text()):
        assert str(run) not in published and str(ROOT) not in published
    # transformers (trust_remote_code: the class the export ships) scores what urm-jax scores,
    # within `urm-jax parity`'s bound for float32 with the model's float16 gate.
    report = run_parity(hf, final, dtype="float32", trust_remote_code=True)
    assert report.ok, report.format()


def test_kill_and_resume_of_a_lora_run_is_bit_identical(base_model, lora_run, tmp_path):
    """Dropout masks are keyed by (seed, step, micro-batch): a run killed after its first
    checkpoint and restarted ends bit-identical to the uninterrupted one."""
    _, uninterrupted = lora_run
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "urm_jax.cli", "train", LORA_RECIPE, f"model={base_model[0]}",
            f"output_dir={out}", *RUN_OVERRIDES]
    proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "2").is_dir():  # the first committed checkpoint
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before the kill: the test proves nothing"
    resumed = run_train(LORA_RECIPE, f"model={base_model[0]}", f"output_dir={out}", *RUN_OVERRIDES)
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(load_params(resumed))[0],
                                 jax.tree_util.tree_flatten_with_path(load_params(uninterrupted))[0]):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)


def test_a_rank_above_a_matrix_size_is_refused_before_the_run_dir(base_model, tmp_path):
    """`lora.r` larger than min(in, out) of a targeted matrix: one error line naming the key
    and the matrix, exit 2, no run directory (the reviewer's r=100000 was OOM-killed instead)."""
    out = tmp_path / "run"
    done = run_cli("train", LORA_RECIPE, f"model={base_model[0]}", f"output_dir={out}", "lora.r=100000")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
    assert "`lora.r`: rank 100000 is larger than min(in, out) = 16 of backbone/layers/k_proj" in errors[0]
    assert "use `lora.r` <= 16" in errors[0] and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_run_the_host_cannot_hold_is_refused_before_the_run_dir(base_model, tmp_path, monkeypatch):
    """On the CPU backend, preflight compares `urm-jax memory`'s estimate with the host's
    available memory (here made 1 MB) and refuses in one line: estimate, available, what to
    change; nothing is written."""
    import urm_jax.memory
    from urm_jax.train.loop import train

    out = tmp_path / "run"
    cfg = load_train_config(LORA_RECIPE, [f"model={base_model[0]}", f"output_dir={out}",
                                          "global_batch_size=8"])  # 8 rows: the 8 test devices
    monkeypatch.setattr(urm_jax.memory, "host_available_bytes", lambda: 10**6)
    with pytest.raises(TrainConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "training needs about" in message and "but only 1.0 MB is available" in message
    assert "largest:" in message and "or run on a machine with more memory" in message
    assert "\n" not in message and not out.exists()
