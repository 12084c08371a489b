"""Stage-1 training throughput: urm-jax (`build_trainer`, 1-device mesh) vs the HF PyTorch reference
(`LlamaForSequenceClassificationWithNormal_Weights`) with torch.optim.AdamW, side by side in one run.

    .venv/bin/python bench/train_throughput.py [--quick] [--batch 2] [--seq-lens 256 512] [--steps 3] [--scan-too]

Same ~100M-parameter Llama shape, same random checkpoint (urm_jax/hf/synthetic.py), same batch of
full-length rows (every token real, so tokens/s = rows * seq_len / s), same loss (reparam
regression on the 5 attribute means / log-stds), same optimiser (AdamW, weight decay on matrices
only, global-norm clip 1.0), gate frozen in both (stage 1 trains backbone + value head).
JAX draws its reparam noise inside the step (keyed by step); torch uses one fixed noise tensor --
the loss is ~50 flops per row, so this does not affect timing.

Fairness: torch.set_num_threads(<cores>); XLA:CPU sizes its own intra-op pool to the same cores.
OMP_WAIT_POLICY defaults to PASSIVE here (override from the shell): torch's OpenMP/MKL threads
otherwise spin at every barrier, and on a shared, oversubscribed machine (load 7-9 on 2 cores when
this was written) that made torch's 2-thread steps 4-6x slower than with PASSIVE -- a contention
artefact, not the reference model's speed. XLA's thread pool does not busy-wait like that.
Implementations run in the same process, ROUND-ROBIN (one step of each per round, order rotated),
so a busy shared machine slows every row alike; each is warmed up (JAX: compile) before timing
and synchronised per step (JAX: fetch the loss; torch on CPU is synchronous). tokens/s, GFLOP/s
and the ratios use the median step; `best tok/s` uses the fastest (least disturbed) one.
`CPU s/step` is the process's CPU time (all threads, user + system) per step, median: the work
done, which other tenants of a shared machine disturb far less than wall time (idle torch
threads sleep under PASSIVE; XLA's pool spins briefly, which counts against JAX).
GFLOP/s is `urm_jax.flops.train_flops` (6 N_matmul T + causal attention: the model's useful work,
MFU's numerator; there is no CPU peak to divide by) / median step time -- the same FLOP count for
every row, so it ranks like tokens/s.

Defaults (2 rows, 256 and 512 tokens, 3 rounds) keep a run under ~10 minutes on a 2-core VM;
`--batch 4 --seq-lens 512 1024` is the larger setting (about 4x the time).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before torch (and its OpenMP runtime) loads; see the docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import make_stage1_batch as make_batch, random_checkpoint  # noqa: E402
from urm_jax.hf.modeling_custom import LlamaForSequenceClassificationWithNormal_Weights  # noqa: E402
from urm_jax.config import DTypePolicy, ModelConfig  # noqa: E402
from urm_jax.flops import train_flops  # noqa: E402
from urm_jax.loading import load_params_any  # noqa: E402
from urm_jax.model.urm import ModelOptions  # noqa: E402
from urm_jax.sharding import make_mesh  # noqa: E402
from urm_jax.train.loop import with_accum_axis  # noqa: E402
from urm_jax.train.config import OptimConfig, TrainConfig  # noqa: E402
from urm_jax.train.step import build_trainer  # noqa: E402

OPTIM = OptimConfig(learning_rate=2e-6, weight_decay=1e-3, warmup_ratio=0.0, clip_norm=1.0)


class JaxRunner:
    def __init__(self, name, cfg, params, compute: str, layer_loop: str = "auto"):
        self.name = name
        # attention and layer loop `auto`, what `urm-jax train` runs (TrainConfig.model_options): on
        # CPU the reference attention below AUTO_BLOCKWISE_LENGTH tokens, blockwise from there, and
        # the decoder layers unrolled (urm_jax.model.urm.LAYER_LOOP_AUTO)
        options = ModelOptions(DTypePolicy(param="float32", compute=compute, gate="float32"), attention="auto",
                               layer_loop=layer_loop)
        self.trainer = build_trainer(cfg, params, TrainConfig(optim=OPTIM), total_steps=10_000,
                                     mesh=make_mesh((1, 1, 1), jax.devices()[:1]), options=options)
        self.batch = None

    def set_batch(self, batch):
        self.batch = jax.device_put(with_accum_axis(batch, 1), self.trainer.batch_sharding)

    def step(self) -> float:
        return float(self.trainer.run(self.batch)["loss"])  # fetching the loss waits for the step


class TorchRunner:
    def __init__(self, name, path, attn: str):
        self.name = name
        model = LlamaForSequenceClassificationWithNormal_Weights.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn)
        self.model = model.train()
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("weights."))  # the gate is frozen in stage 1
            if p.requires_grad:
                (no_decay if n.endswith("norm.weight") else decay).append(p)
        self.params = decay + no_decay
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=OPTIM.learning_rate, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps)

    def set_batch(self, batch):
        self.ids = torch.as_tensor(batch["input_ids"]).long()
        self.mask = torch.as_tensor(batch["segment_ids"]).long()
        self.labels = torch.as_tensor(batch["labels"][:, 0])
        self.noise = torch.randn(self.labels.shape, generator=torch.Generator().manual_seed(0))

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        out = self.model(input_ids=self.ids, attention_mask=self.mask)
        sample = out.means + self.noise * out.log_stds.exp()
        loss = ((sample - self.labels) ** 2).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, OPTIM.clip_norm)
        self.opt.step()
        return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="rows per step")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds per sequence length")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="one length (256), one timed round")
    parser.add_argument("--skip-bf16", action="store_true")
    parser.add_argument("--scan-too", action="store_true",
                        help="also urm-jax fp32 with the layers as a scan (what accelerators run)")
    args = parser.parse_args()
    if args.quick:
        args.seq_lens, args.steps = [256], 1
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        path = random_checkpoint(Path(tmp) / "ckpt")
        cfg = ModelConfig.from_hf_dir(path)
        counts = cfg.param_count()
        params = load_params_any(path, cfg)
        runners = [JaxRunner("urm-jax fp32", cfg, params, "float32")]
        if not args.skip_bf16:
            runners.append(JaxRunner("urm-jax bf16 compute", cfg, params, "bfloat16"))
        if args.scan_too:
            runners.append(JaxRunner("urm-jax fp32 layer scan", cfg, params, "float32", layer_loop="scan"))
        del params
        runners += [TorchRunner("HF sdpa fp32", path, "sdpa"), TorchRunner("HF eager fp32", path, "eager")]

        results = {}  # (name, seq_len) -> (first step s, [timed step s], [timed step CPU s])
        for seq_len in args.seq_lens:
            batch = make_batch(args.batch, seq_len, cfg.vocab_size)
            for r in runners:
                r.set_batch(batch)
                t = time.perf_counter()
                r.step()  # warm-up: JAX compiles for this shape; torch allocates Adam moments
                results[(r.name, seq_len)] = (time.perf_counter() - t, [], [])
            for round_ in range(args.steps):
                k = round_ % len(runners)  # rotate so no implementation always runs first
                for r in runners[k:] + runners[:k]:
                    t, cpu = time.perf_counter(), time.process_time()
                    r.step()
                    results[(r.name, seq_len)][1].append(time.perf_counter() - t)
                    results[(r.name, seq_len)][2].append(time.process_time() - cpu)

    print(f"\nStage-1 training throughput, CPU: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, XLA:CPU default intra-op pool; "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"model: {counts['total']:,} params (backbone {counts['backbone']:,}, of which embedding "
          f"{cfg.vocab_size * cfg.hidden_size:,}; value head {counts['score']:,}; gate {counts['gate']:,}, frozen); "
          f"trainable {counts['backbone'] + counts['score']:,}")
    print(f"shape: hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads / {cfg.num_kv_heads} KV, "
          f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}; batch {args.batch} full rows; "
          f"median of {args.steps} timed step(s) after 1 warm-up\n")
    header = (f"{'implementation':<24} {'seq':>5} {'tokens/step':>11} {'warm-up s':>9} {'s/step':>8} "
              f"{'tokens/s':>9} {'best tok/s':>10} {'GFLOP/s':>8} {'CPU s/step':>10} "
              f"{'÷ HF sdpa':>9} {'÷ HF eager':>10}")
    print(header)
    print("-" * len(header))
    for seq_len in args.seq_lens:
        tokens = args.batch * seq_len
        flops = train_flops(cfg, [seq_len] * args.batch)
        tps = {r.name: tokens / statistics.median(results[(r.name, seq_len)][1]) for r in runners}
        for r in runners:
            first, times, cpu = results[(r.name, seq_len)]
            median = statistics.median(times)
            ratios = f"{tps[r.name] / tps['HF sdpa fp32']:>9.2f} {tps[r.name] / tps['HF eager fp32']:>10.2f}"
            print(f"{r.name:<24} {seq_len:>5} {tokens:>11} {first:>9.1f} {median:>8.2f} {tps[r.name]:>9.1f} "
                  f"{tokens / min(times):>10.1f} {flops / median / 1e9:>8.1f} {statistics.median(cpu):>10.2f} "
                  f"{ratios}")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
