"""LoRA vs full fine-tuning of stage 1: trainable parameters, optimiser memory, loss curves.

    .venv/bin/python bench/lora.py [--skip-curves] [--rank 16]

1. The tiny recipe's model (hidden 32, 2 layers, vocab 128257 - the demo's random base): the
   trainer `urm-jax train` builds for `configs/train/tiny_stage1_lora.yaml` (r 8 on every
   projection) and for `configs/train/tiny_stage1.yaml`, counted leaf by leaf: trainable
   parameters, AdamW mu + nu bytes (the optimiser state as allocated), frozen bytes.
2. The real 8B (configs/model/urm-llama-3.1-8b.json) from the memory estimate (`urm_jax.memory`,
   the same model as `urm-jax memory`): the stage-1 recipe with LoRA r = --rank (alpha 2r) on
   q, k, v, o, gate, up, down vs full fine-tuning; whole-model bytes (mesh 1x1x1) and per device
   on the v5p-8 layout (FSDP over 4 chips, as configs/hardware/v5p-8.yaml).
3. Loss on the bundled samples (data/samples/helpsteer2_sample.jsonl, 96 rows), both tiny
   recipes from the same random base, same data order, same 8 steps (lr 1e-3): the training
   loss of each step's batch and the loss on all 96 samples every 2 steps (`urm-jax train` with
   `data.eval` = the samples). CPU, one device; a few minutes on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from urm_jax.config import ModelConfig, read_json_file  # noqa: E402
from urm_jax.memory import GB, estimate  # noqa: E402
from urm_jax.train.config import load_train_config  # noqa: E402

LORA = ROOT / "configs/train/tiny_stage1_lora.yaml"
FULL = ROOT / "configs/train/tiny_stage1.yaml"
SAMPLES = ROOT / "data/samples/helpsteer2_sample.jsonl"
PROJECTIONS = "[backbone/layers/q_proj, backbone/layers/k_proj, backbone/layers/v_proj, " \
              "backbone/layers/o_proj, backbone/layers/gate_proj, backbone/layers/up_proj, " \
              "backbone/layers/down_proj]"


def tiny_base(tmp: Path) -> Path:
    from urm_jax.data.tokenizer import cached_llama3_tokenizer_dir
    from urm_jax.hf.synthetic import llama3_hf_config, write_random_hf

    cfg = llama3_hf_config(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, rope_theta=500000.0)
    return write_random_hf(tmp / "base", cfg, dtype="float32", gate_dtype="float16",
                           tokenizer_dir=cached_llama3_tokenizer_dir(), progress=False)


def tiny_counts(base: Path) -> None:
    from urm_jax.loading import load_config_any, load_params_any
    from urm_jax.sharding import make_mesh
    from urm_jax.train.step import build_trainer

    cfg = load_config_any(str(base))
    params = load_params_any(str(base), cfg, progress=False)
    print("tiny recipe model (hidden 32, 2 layers, vocab 128257), as allocated by build_trainer:")
    print(f"  {'':<26}{'trainable':>12}{'frozen':>12}{'mu+nu bytes':>14}{'moment leaves':>15}")
    for name, recipe in (("LoRA r8, all projections", LORA), ("full fine-tune", FULL)):
        train = load_train_config(recipe, ["model=m", "output_dir=o"])
        trainer = build_trainer(cfg, params, train, 8, make_mesh((1, 1, 1), jax.devices()[:1]))
        trained = jax.tree.leaves(trainer.state.params)
        moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0]
        frozen = sum(x.size for x in jax.tree.leaves(trainer.frozen))
        print(f"  {name:<26}{sum(x.size for x in trained):>12,}{frozen:>12,}"
              f"{sum(x.nbytes for x in moments):>14,}{len(moments):>15}")


def real_8b(rank: int) -> None:
    cfg = ModelConfig.from_hf_dict(read_json_file(ROOT / "configs/model/urm-llama-3.1-8b.json"))
    recipe = ROOT / "configs/train/stage1_helpsteer2.yaml"
    lora = [f"lora.r={rank}", f"lora.alpha={2 * rank}", f"lora.targets={PROJECTIONS}"]
    print("\nURM-LLaMa-3.1-8B stage 1 (memory estimate; fp32 master weights and moments):")
    print(f"  {'':<30}{'trainable':>15}{'optimizer GB':>14}{'params+grads+opt GB':>21}"
          f"{'v5p-8 per chip GB':>19}")
    for name, overrides in ((f"LoRA r{rank} q,k,v,o,gate,up,down", lora), ("full fine-tune", [])):
        train = load_train_config(recipe, overrides, runnable=False)
        whole = estimate(cfg, train, mesh_shape=(1, 1, 1), num_devices=1)
        chip = estimate(cfg, train, mesh_shape=(1, 4, 1), num_devices=4)
        state = whole["params"] + whole["gradients"] + whole["optimizer"]
        print(f"  {name:<30}{whole['trainable_param_count']:>15,}{whole['optimizer'] / GB:>14.3f}"
              f"{state / GB:>21.3f}{chip['total'] / GB:>19.2f}")


def curves(base: Path, tmp: Path) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    logs = {}
    for name, recipe in (("lora", LORA), ("full", FULL)):
        out = tmp / name
        cmd = [sys.executable, "-m", "urm_jax.cli", "train", str(recipe), f"model={base}",
               f"output_dir={out}", f"data.eval={SAMPLES}", "data.eval_split=train", "eval_every=2",
               "checkpoint.async_save=false", "plot=false", "tensorboard=false"]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        logs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print("\nloss on the bundled samples, same base, data order and steps (lr 1e-3, 2 epochs):")
    print(f"  {'step':>4}  {'LoRA batch':>10} {'full batch':>10}  {'LoRA all 96':>11} {'full all 96':>11}")
    for lo, fu in zip(logs["lora"], logs["full"]):
        ev = lambda r: f"{r['eval/loss']:.3f}" if "eval/loss" in r else ""  # noqa: E731
        print(f"  {lo['step']:>4}  {lo['loss']:>10.3f} {fu['loss']:>10.3f}  {ev(lo):>11} {ev(fu):>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-curves", action="store_true")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_base(Path(tmp))
        tiny_counts(base)
        real_8b(args.rank)
        if not args.skip_curves:
            curves(base, Path(tmp))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
