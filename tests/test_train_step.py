"""The train step: losses and gradients against PyTorch on the HF reference, AdamW against
torch.optim.AdamW, mesh-shape independence, gradient accumulation, packing, frozen params and
the stage-2 cached-feature fast path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import load_reference, make_tiny_urm

from urm_jax.hf.mapping import TABLE, get_path
from urm_jax.config import DTypePolicy
from urm_jax.loading import load_model
from urm_jax.model.urm import ModelBinder, ModelOptions
from urm_jax.sharding import make_mesh
from urm_jax.train.losses import bradley_terry_loss, regression_loss
from urm_jax.train.config import LossConfig, OptimConfig, PrecisionConfig, TrainConfig
from urm_jax.train.step import build_trainer

FP32 = ModelOptions(DTypePolicy(param="float32", compute="float32", gate="float32"))


def step_config(stage=1, loss="reparam", use_features=False, optim=None) -> TrainConfig:
    """The training settings a step test needs, everything in float32."""
    return TrainConfig(stage=stage, loss=LossConfig(kind=loss), stage2_cached_features=use_features,
                       optim=optim or OptimConfig(),
                       precision=PrecisionConfig(param="float32", compute="float32",
                                                 gate_compute="float32", gate_param="float32"))
L = 48


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_urm(tmp_path_factory.mktemp("train"), gate_dtype="float32", seed=11)
    model, cfg = load_model(path, compute_dtype="float32")
    return path, cfg, nnx.state(model).to_pure_dict()


def unpacked_batch(rng, n, lengths=None, labels=True):
    """Right-padded rows, one sequence each (S = 1), with a leading accumulation axis of 1."""
    lengths = lengths or list(rng.integers(5, L, n))
    ids = np.full((n, L), 511, np.int32)  # the tiny vocab's pad id: the HF reference pools by it
    seg = np.zeros((n, L), np.int32)
    for i, m in enumerate(lengths):
        ids[i, :m] = rng.integers(4, 500, m)
        seg[i, :m] = 1
    batch = {"input_ids": ids, "segment_ids": seg,
             "pool_index": (np.array(lengths, np.int32) - 1)[:, None],
             "pool_mask": np.ones((n, 1), np.float32)}
    if labels:
        batch["labels"] = rng.integers(0, 5, (n, 1, 5)).astype(np.float32)
    return batch


def add_accum_axis(batch, accum=1):
    return {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in batch.items()}


def torch_grads_as_jax_layout(model, params):
    """HF param grads mapped into the JAX tree layout through the mapping table."""
    named = dict(model.named_parameters())
    out = {}
    for entry in TABLE:
        ref = get_path(params, entry.path)
        keys = entry.hf_keys(ref.shape[0] if entry.stacked else 1)
        grads = [named[k].grad for k in keys]
        if any(g is None for g in grads):
            continue
        slices = [entry.to_jax(g.double().numpy(), ref.shape) for g in grads]
        out[entry.jax_name] = np.stack(slices) if entry.stacked else slices[0]
    return out


@pytest.mark.parametrize("kind", ["reparam", "nll"])
def test_stage1_loss_and_grads_match_torch(tiny, kind):
    path, cfg, params = tiny
    rng = np.random.default_rng(0)
    batch = unpacked_batch(rng, 4)
    noise = rng.standard_normal((4, 1, 5)).astype(np.float32)
    binder = ModelBinder(cfg, FP32)

    def loss_fn(p):
        model = binder(p)
        out = model.heads(model.pooled_segments(batch["input_ids"], batch["segment_ids"], batch["pool_index"]))
        total, sums = regression_loss(out.means, out.log_stds, batch["labels"], batch["pool_mask"],
                                      noise, kind=kind, label_scale=0.5, label_shift=-1.0)
        return total / sums["count"]

    loss, grads = jax.value_and_grad(loss_fn)(params)

    ref = load_reference(path, dtype=torch.float32)
    mask = torch.as_tensor(batch["segment_ids"]).long()
    out = ref(input_ids=torch.as_tensor(batch["input_ids"]).long(), attention_mask=mask)
    mu, sigma = out.means, out.log_stds
    y = torch.as_tensor(batch["labels"][:, 0]) * 0.5 - 1.0
    if kind == "reparam":
        per = ((mu + torch.as_tensor(noise[:, 0]) * sigma.exp() - y) ** 2).sum(-1)
    else:
        per = (sigma + 0.5 * np.log(2 * np.pi) + (y - mu) ** 2 / (2 * (2 * sigma).exp())).sum(-1)
    torch_loss = per.mean()
    torch_loss.backward()
    assert rel(loss, torch_loss.item()) < 1e-5
    torch_grads = torch_grads_as_jax_layout(ref, params)
    assert "gate/fc0/kernel" not in torch_grads or np.all(torch_grads["gate/fc0/kernel"] == 0)
    for entry in TABLE:
        if entry.path[0] == "gate":
            continue
        assert rel(get_path(grads, entry.path), torch_grads[entry.jax_name]) < 1e-5, entry.jax_name


def test_bradley_terry_grads_match_torch(tiny):
    path, cfg, params = tiny
    rng = np.random.default_rng(1)
    batch = unpacked_batch(rng, 6, labels=False)
    binder = ModelBinder(cfg, FP32)
    pooled = binder(params).pooled_segments(batch["input_ids"], batch["segment_ids"], batch["pool_index"])[:, 0]

    def loss_fn(gate):
        reward = binder({**params, "gate": gate}).heads(pooled).reward
        total, sums = bradley_terry_loss(reward[:3], reward[3:], jnp.ones(3))
        return total / sums["count"]

    loss, grads = jax.value_and_grad(loss_fn)(params["gate"])
    ref = load_reference(path, dtype=torch.float32)
    reward = ref(input_ids=torch.as_tensor(batch["input_ids"]).long(),
                 attention_mask=torch.as_tensor(batch["segment_ids"]).long()).logits[:, 0]
    torch_loss = -torch.nn.functional.logsigmoid(reward[:3] - reward[3:]).mean()
    torch_loss.backward()
    assert rel(loss, torch_loss.item()) < 1e-5
    torch_grads = torch_grads_as_jax_layout(ref, params)
    for entry in TABLE:
        if entry.path[0] == "gate":
            assert rel(get_path({"gate": grads}, entry.path), torch_grads[entry.jax_name]) < 1e-5, entry.jax_name


def test_two_adamw_steps_match_torch(tiny):
    path, cfg, params = tiny
    rng = np.random.default_rng(2)
    batches = [unpacked_batch(rng, 4) for _ in range(2)]
    lr, wd = 1e-4, 0.1
    optim = OptimConfig(learning_rate=lr, weight_decay=wd, warmup_ratio=0.0, min_lr_ratio=1.0,
                              clip_norm=1.0)
    trainer = build_trainer(cfg, params, step_config(stage=1, loss="nll", optim=optim), 10,
                            make_mesh((1, 1, 1), jax.devices()[:1]), options=FP32)
    for b in batches:
        trainer.run(add_accum_axis(b))
    ours = jax.device_get(trainer.state.params)

    ref = load_reference(path, dtype=torch.float32)
    trainable = [(n, p) for n, p in ref.named_parameters() if not n.startswith("weights.")]
    for n, p in ref.named_parameters():
        p.requires_grad_(not n.startswith("weights."))
    no_decay = [p for n, p in trainable if n.endswith("norm.weight")]
    decay = [p for n, p in trainable if not n.endswith("norm.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-8)
    for b in batches:
        opt.zero_grad()
        out = ref(input_ids=torch.as_tensor(b["input_ids"]).long(),
                  attention_mask=torch.as_tensor(b["segment_ids"]).long())
        y = torch.as_tensor(b["labels"][:, 0])
        sigma = out.log_stds
        loss = (sigma + 0.5 * np.log(2 * np.pi) + (y - out.means) ** 2 / (2 * (2 * sigma).exp())).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
    named = dict(ref.named_parameters())
    before = params
    for entry in TABLE:
        if entry.path[0] == "gate":
            continue
        keys = entry.hf_keys(cfg.num_layers)
        start = get_path(before, entry.path)
        want = [entry.to_jax(named[k].detach().double().numpy(), start.shape) for k in keys]
        want = np.stack(want) if entry.stacked else want[0]
        got = get_path(ours, entry.path)
        assert rel(got, want) < 1e-5, entry.jax_name
        assert not np.array_equal(got, start), entry.jax_name  # the step really moved it


def run_steps(cfg, params, mesh_shape, settings, steps, batch, lr=2e-6, options=FP32, optim=None):
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    optim = optim or OptimConfig(learning_rate=lr, warmup_ratio=0.0)
    train = dataclasses.replace(settings, optim=optim)
    trainer = build_trainer(cfg, params, train, 100, make_mesh(mesh_shape, devices), options=options)
    metrics = [jax.device_get(trainer.run(batch)) for _ in range(steps)]
    return jax.device_get(trainer.state.params), metrics, trainer


MESH_BATCH = add_accum_axis(unpacked_batch(np.random.default_rng(3), 8))
MESH_SETTINGS = step_config(stage=1, loss="reparam")


@pytest.fixture(scope="module")
def single_device_runs(tiny):
    _, cfg, params = tiny
    return {lr: run_steps(cfg, params, (1, 1, 1), MESH_SETTINGS, 3, MESH_BATCH, lr=lr)[:2]
            for lr in (2e-6, 1e-3)}


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1), (1, 4, 2)])
def test_mesh_shapes_give_the_same_training(tiny, single_device_runs, mesh_shape):
    _, cfg, params = tiny
    settings, batch = MESH_SETTINGS, MESH_BATCH
    # The recipe's learning rate: parameters equal within 1e-6 after 3 steps.
    want, want_m = single_device_runs[2e-6]
    got, got_m, _ = run_steps(cfg, params, mesh_shape, settings, 3, batch)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert np.max(np.abs(a - b)) <= 1e-6, jax.tree_util.keystr(path)
    for m_got, m_want in zip(got_m, want_m):
        assert rel(m_got["loss"], m_want["loss"]) < 1e-5
        assert rel(m_got["grad_norm"], m_want["grad_norm"]) < 1e-5
    # A large learning rate makes the updates themselves comparable (at 2e-6 they sit near
    # float32's resolution of the weights): the total update agrees to 1e-3 of its size.
    want, _ = single_device_runs[1e-3]
    got, _, _ = run_steps(cfg, params, mesh_shape, settings, 3, batch, lr=1e-3)
    start = {k: params[k] for k in got}
    delta = lambda p: np.concatenate([(x.astype(np.float64) - y).ravel() for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(start))])  # noqa: E731
    assert np.linalg.norm(delta(got) - delta(want)) <= 1e-3 * np.linalg.norm(delta(want))


def test_gradient_accumulation_equals_one_big_batch(tiny):
    _, cfg, params = tiny
    batch = unpacked_batch(np.random.default_rng(4), 8)
    batch["pool_mask"][5] = 0  # a padding row: must not count in either split
    settings = step_config(stage=1, loss="nll")
    one, m1, _ = run_steps(cfg, params, (1, 1, 1), settings, 2, add_accum_axis(batch), lr=1e-4)
    four, m4, _ = run_steps(cfg, params, (1, 1, 1), settings, 2, add_accum_axis(batch, 4), lr=1e-4)
    assert m1[0]["count"] == m4[0]["count"] == 7
    assert rel(m4[0]["loss"], m1[0]["loss"]) < 1e-6
    for a, b in zip(jax.tree.leaves(four), jax.tree.leaves(one)):
        assert np.max(np.abs(a - b)) < 1e-6


def test_packed_rows_equal_unpacked_rows(tiny):
    """Two sequences packed in one row give the outputs and gradients they give alone."""
    _, cfg, params = tiny
    rng = np.random.default_rng(5)
    lengths = [13, 20, 9, 30]
    single = unpacked_batch(rng, 4, lengths)
    packed = {"input_ids": np.zeros((2, L), np.int32), "segment_ids": np.zeros((2, L), np.int32),
              "pool_index": np.zeros((2, 2), np.int32), "pool_mask": np.ones((2, 2), np.float32),
              "labels": single["labels"].reshape(2, 2, 5)}
    for row, (a, b) in enumerate([(0, 1), (2, 3)]):
        la, lb = lengths[a], lengths[b]
        packed["input_ids"][row, :la] = single["input_ids"][a, :la]
        packed["input_ids"][row, la:la + lb] = single["input_ids"][b, :lb]
        packed["segment_ids"][row, :la], packed["segment_ids"][row, la:la + lb] = 1, 2
        packed["pool_index"][row] = [la - 1, la + lb - 1]
    binder = ModelBinder(cfg, FP32)

    def outputs_and_loss(p, b):
        model = binder(p)
        out = model.heads(model.pooled_segments(b["input_ids"], b["segment_ids"], b["pool_index"]))
        total, sums = regression_loss(out.means, out.log_stds, b["labels"], b["pool_mask"],
                                      jnp.zeros(out.means.shape), kind="nll")
        return total / sums["count"], out

    (loss_s, out_s), grads_s = jax.value_and_grad(outputs_and_loss, has_aux=True)(params, single)
    (loss_p, out_p), grads_p = jax.value_and_grad(outputs_and_loss, has_aux=True)(params, packed)
    assert rel(out_p.reward.reshape(-1), out_s.reward.reshape(-1)) < 1e-6
    assert rel(out_p.means.reshape(-1, 5), out_s.means.reshape(-1, 5)) < 1e-6
    assert rel(loss_p, loss_s) < 1e-6
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads_p)[0], jax.tree.leaves(grads_s)):
        if np.max(np.abs(b)) > 0:
            assert rel(a, b) < 1e-5, jax.tree_util.keystr(path)


def pair_batch(rng, pairs):
    rows = unpacked_batch(rng, 2 * pairs, labels=False)
    rows["pair_mask"] = np.ones((pairs,), np.float32)
    return rows


def test_stage2_trains_only_the_gate(tiny):
    _, cfg, params = tiny
    batch = add_accum_axis(pair_batch(np.random.default_rng(6), 4))
    got, metrics, trainer = run_steps(cfg, params, (2, 2, 2), step_config(stage=2, loss="bt"), 3,
                                      batch, lr=1e-3)
    assert set(got) == {"gate"}
    assert set(trainer.frozen) == {"backbone", "value_head"}
    frozen = jax.device_get(trainer.frozen)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves({k: params[k] for k in frozen})):
        assert np.array_equal(a, b)  # bit-identical
    assert max(np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params["gate"]))) > 1e-4
    # Optimiser state only for the gate: no moments for the 100x larger frozen backbone.
    state_leaves = jax.tree.leaves(trainer.state.opt_state)
    assert sum(x.size for x in state_leaves) <= 2 * sum(x.size for x in jax.tree.leaves(got)) + 10
    assert 0 <= metrics[-1]["accuracy"] <= 1


def test_stage2_cached_features_give_the_same_updates(tiny):
    _, cfg, params = tiny
    raw = pair_batch(np.random.default_rng(7), 4)
    binder = ModelBinder(cfg, FP32)
    features = jax.jit(lambda p, b: binder(p).pooled_segments(b["input_ids"], b["segment_ids"], b["pool_index"])[:, 0])(params, raw)
    cached = {"features": np.asarray(features), "pair_mask": raw["pair_mask"]}
    full, m_full, _ = run_steps(cfg, params, (1, 1, 1), step_config(stage=2, loss="bt"), 3,
                                add_accum_axis(raw), lr=1e-3)
    fast, m_fast, _ = run_steps(cfg, params, (1, 1, 1), step_config(stage=2, loss="bt", use_features=True),
                                3, add_accum_axis(cached), lr=1e-3)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(full)):
        assert np.max(np.abs(a - b)) < 1e-7
    assert rel(m_fast[-1]["loss"], m_full[-1]["loss"]) < 1e-6


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_change_memory_not_numbers(tiny, remat):
    _, cfg, params = tiny
    batch = unpacked_batch(np.random.default_rng(8), 4)
    noise = np.zeros((4, 1, 5), np.float32)

    def grads(options):
        binder = ModelBinder(cfg, options)

        def loss_fn(p):
            model = binder(p)
            out = model.heads(model.pooled_segments(batch["input_ids"], batch["segment_ids"], batch["pool_index"]))
            return regression_loss(out.means, out.log_stds, batch["labels"], batch["pool_mask"], noise)[0]

        return jax.jit(jax.grad(loss_fn))(params)

    plain = grads(FP32)
    remat_grads = grads(ModelOptions(FP32.dtypes, remat=remat))
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain)):
        assert rel(a, b) < 1e-5  # recomputation fuses ops differently: rounding, not numbers


def test_bucketed_feature_pass_equals_full_length_padding(tiny):
    """Features pooled at bucketed lengths equal those of sequences padded to seq_len."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from urm_jax.data.datasets import PairExample
    from urm_jax.train.features import compute_features, pooled_forward

    _, cfg, params = tiny
    rng = np.random.default_rng(9)
    examples = [PairExample(rng.integers(4, 500, a).astype(np.int32), rng.integers(4, 500, b).astype(np.int32))
                for a, b in [(5, 9), (200, 30), (17, 140), (3, 3), (90, 250)]]
    forward = pooled_forward(ModelBinder(cfg, FP32))
    sharding = NamedSharding(make_mesh((1, 1, 1), jax.devices()[:1]), P())
    got = compute_features(lambda b: forward(params, b), examples, seq_len=256, batch_pairs=2,
                           batch_sharding=sharding, progress=False)
    for i, example in enumerate(examples):
        for side, ids in enumerate((example.chosen_ids, example.rejected_ids)):
            seg = np.zeros((1, 256), np.int32)
            seg[0, :len(ids)] = 1
            padded = np.zeros((1, 256), np.int32)
            padded[0, :len(ids)] = ids
            want = forward(params, {"input_ids": padded, "segment_ids": seg,
                                    "pool_index": np.array([[len(ids) - 1]], np.int32)})
            assert rel(got[i, side], np.asarray(want)[0]) < 1e-5


def test_packed_pairs_give_the_unpacked_loss_and_gradients(tiny):
    """Pairs packed side by side in rows (each side its own segment) give the loss, accuracy and
    gradient norm of the same pairs laid out one side per row."""
    from urm_jax.data.batching import packed_pair_batch
    from urm_jax.data.batching import pair_batch as unpacked_pair_batch
    from urm_jax.data.datasets import PairExample

    _, cfg, params = tiny
    rng = np.random.default_rng(12)
    examples = [PairExample(rng.integers(4, 500, a).astype(np.int32), rng.integers(4, 500, b).astype(np.int32))
                for a, b in [(5, 9), (20, 30), (17, 14), (3, 3), (40, 7), (11, 12)]]
    unpacked = unpacked_pair_batch([[i] for i in range(6)] + [[], []], examples, seq_len=L)
    packed = packed_pair_batch([[0, 1, 2], [3, 4], [5], []], examples, seq_len=L, max_segments=6)
    assert packed["input_ids"].shape == (4, 2 * L)
    settings = step_config(stage=2, loss="bt")
    _, m_unpacked, _ = run_steps(cfg, params, (1, 1, 1), settings, 1, add_accum_axis(unpacked), lr=1e-3)
    _, m_packed, _ = run_steps(cfg, params, (1, 1, 1), settings, 1, add_accum_axis(packed), lr=1e-3)
    for key in ("loss", "accuracy", "grad_norm", "margin"):
        assert rel(m_packed[0][key], m_unpacked[0][key]) < 1e-6, key


def test_head_lr_scale_scales_only_the_heads_updates():
    """`optim.head_lr_scale`: the value head and gate step head_lr_scale x the backbone's (Adam's
    first update is lr x sign(grad) per element, so the ratio is exact), the backbone unchanged."""
    import optax

    from urm_jax.train.config import OptimConfig
    from urm_jax.train.step import make_optimizer

    params = {"backbone": {"w": jnp.ones((3, 2))}, "value_head": {"kernel": jnp.ones((2, 4))},
              "gate": {"fc0": {"bias": jnp.ones(2)}}}
    grads = jax.tree.map(lambda x: 0.5 * x, params)
    updates = {}
    for scale in (1.0, 25.0):
        settings = OptimConfig(learning_rate=1e-3, weight_decay=0.0, warmup_ratio=0.0,
                               clip_norm=None, head_lr_scale=scale)
        optimizer, _ = make_optimizer(settings, 10, params)
        updates[scale], _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_array_equal(updates[25.0]["backbone"]["w"], updates[1.0]["backbone"]["w"])
    for group, leaf in (("value_head", ("kernel",)), ("gate", ("fc0", "bias"))):
        a, b = updates[1.0][group], updates[25.0][group]
        for key in leaf:
            a, b = a[key], b[key]
        np.testing.assert_allclose(b, 25.0 * a, rtol=1e-6)
    assert float(optax.global_norm(updates[1.0]["backbone"])) > 0
