"""One prepared GPU check: JAX-vs-HF parity, stage-1 training throughput + MFU, and scoring
throughput vs HF transformers (SDPA), on one GPU, in one run that prints ONE table.

    python3 bench/gpu_check.py [--budget 420] [--out DIR] [--json FILE]    # GPU, ~1B shape
    .venv/bin/python bench/gpu_check.py --quick                          # CPU smoke run, tiny shape

Sizing (default, ~1.0B parameters, Llama-3.2-1B-like GQA, Llama-3.1 vocabulary + 1 pad):
hidden 2048, 16 layers, 16 heads / 8 KV heads (head_dim 128), intermediate 5632, vocab 128257.
Everything (parity, training, scoring) uses one random checkpoint in the real HF format written by
`urm_jax.hf.synthetic.write_random_hf` (backbone and gate fp32) under --out, deleted at the end.

Rows of the table:
* parity fp32 / bf16: the HF PyTorch reference (the checkpoint's own modeling_custom.py through
  trust_remote_code, eager attention, like `urm-jax parity`) and urm-jax on the SAME padded batch
  (8 sequences, 5..1024 tokens, right padding), both on the GPU. Max relative difference per
  output (max|jax - hf| / max|hf|, as urm_jax/parity.py) against urm_jax.parity.TOLERANCES.
  bf16 runs the real model's mixture: bf16 backbone, fp16 gate (both sides cast from the same
  fp32 tensors). The bf16 rows also show how far HF bf16 itself is from HF fp32 (the noise floor).
  `urm_jax.parity.run_parity` is not used: it runs the reference on the CPU.
* train: stage-1 step (`build_trainer`, reparam loss, AdamW, gate frozen) on full rows, fp32
  params, bf16 compute, remat full and none, attention auto (cudnn on GPU; xla is tried if cudnn
  fails); then the same step in PyTorch (`Check.train_hf`: HF SDPA, bf16 autocast, fused AdamW)
  with and without gradient checkpointing, and the equal-work ratios (remat full vs
  checkpointing, none vs none).
  tokens/s from the median step; MFU = `urm_jax.flops.train_flops` (6 N_matmul T + causal
  attention, remat not counted) / step time / `peak_flops_per_device` (H100 SXM: 989 TFLOP/s
  dense bf16; override with URM_JAX_PEAK_TFLOPS).
* score: forward of one padded batch (16 x 1024, real lengths 512..1024, right padding), bf16
  backbone + fp16 gate, urm-jax (the jitted forward `urm-jax score` runs, with its reference
  attention, and with attention auto -> cudnn) vs HF transformers with attn_implementation
  "sdpa" on the same GPU and the same ids/mask. tokens/s counts real (unpadded) tokens; the
  ratio row divides by HF sdpa.

Timing: every timed call synchronises (jax.block_until_ready / torch.cuda.synchronize) because
both frameworks dispatch asynchronously and a timer around an unsynchronised call measures only
the launch. Each implementation is warmed up first (JAX: compile; torch: cuBLAS/cuDNN autotune
and allocator growth), then timed; the median is reported.

Memory: JAX and torch share the GPU, so JAX's default preallocation of 75% of the GPU memory is
turned off (XLA_PYTHON_CLIENT_PREALLOCATE=false) before JAX starts, and each section frees its
models before the next.

Robustness: each section runs under try/except and records an error in its row instead of
stopping the run; a global --budget (seconds) skips the sections that would start after it.
A missing piece (no JAX GPU backend, no CUDA torch, wrong flax) is named in the output with what
to install. Exit status: 0 all rows ran and passed, 1 a row failed or errored, 2 the environment
lacks what the GPU run needs.

On the lent GPU machine (no network there): its image's python3 already has jax + the CUDA 13
plugin, flax, optax, orbax, torch (CUDA), transformers; run from the repository root with
`PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_check.py`. Elsewhere: `pip install -e .` plus
`pip install -U "jax[cuda12]"` (or "jax[cuda13]" for a CUDA 13 driver) and a CUDA build of torch.
"""

from __future__ import annotations

import os

# Before JAX starts (see "Memory" above) and before transformers looks for the network.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE_GPU = dict(vocab_size=128257, hidden_size=2048, intermediate_size=5632, num_layers=16,
                 num_heads=16, num_kv_heads=8, original_max_position_embeddings=8192,
                 max_position_embeddings=131072, rope_theta=500000.0)
SHAPE_QUICK = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=4, num_kv_heads=2, original_max_position_embeddings=32,
                   max_position_embeddings=4096)

JAX_GPU_HINT = ('JAX has no GPU backend here. With network: pip install -U "jax[cuda12]" (CUDA 12 '
                'driver) or "jax[cuda13]" (CUDA 13 driver, e.g. 580.x). On the lent GPU machine use '
                "its image's python3 (/opt/torch/.venv), which has jax-cuda13-plugin; those CUDA "
                "wheels are far over the 64 MiB that can be carried there.")
TORCH_GPU_HINT = ("torch has no CUDA here. Install a CUDA build of torch (pip install torch "
                  "--index-url https://download.pytorch.org/whl/cu126, or the lent machine's "
                  "python3, which has torch 2.11+cu130).")


# --- table -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    check: str
    setting: str
    result: str
    status: str  # ok | FAIL | ERROR | SKIPPED | MISSING | info


ROWS: list[Row] = []


def add(check, setting, result, status="info") -> None:
    ROWS.append(Row(check, setting, result, status))
    print(f"  [{status}] {check}: {result}", flush=True)


def print_table() -> None:
    print("\n| check | setting | result | status |\n|---|---|---|---|")
    for r in ROWS:
        cells = [str(c).replace("|", "/").replace("\n", " ") for c in (r.check, r.setting, r.result, r.status)]
        print("| " + " | ".join(cells) + " |")


class Budget:
    """A global wall-clock budget: sections that would start after it are skipped, timing loops
    stop early (after at least one timed call) once it is spent."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def section(budget: Budget, check: str, setting: str, fn, min_left: float = 10.0) -> bool:
    """Run one section; record SKIPPED (budget) or ERROR in the table instead of raising."""
    if budget.left() < min_left:
        add(check, setting, f"not started: {budget.elapsed():.0f} s of the budget used", "SKIPPED")
        return False
    print(f"\n== {check} ({setting}) [t={budget.elapsed():.0f} s]", flush=True)
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001 -- recorded in the table, traceback on stderr
        traceback.print_exc()
        msg = " ".join(str(e).split())[:300]
        add(check, setting, f"{type(e).__name__}: {msg}", "ERROR")
        return False
    finally:
        free_memory()


def free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn, *, warmup: int, reps: int, budget: Budget) -> tuple[float, list[float]]:
    """(first warm-up call s, timed call s). `fn` must synchronise its device itself."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if budget.left() < 0:
            break
    return first, times


# --- environment -----------------------------------------------------------------------------


def version(name: str) -> str:
    try:
        from importlib.metadata import version as v

        return v(name)
    except Exception:  # noqa: BLE001
        return "not installed"


def check_environment(quick: bool) -> tuple[dict, list[str]]:
    """Print what is installed; return (facts, problems). Problems stop the GPU sections."""
    facts, problems = {}, []
    print(f"python {platform.python_version()} ({sys.executable}), {os.cpu_count()} CPUs")
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "transformers", "safetensors", "torch"):
        try:
            importlib.import_module({"orbax-checkpoint": "orbax.checkpoint"}.get(name, name))
            ok = True
        except Exception as e:  # noqa: BLE001
            ok = False
            problems.append(f"cannot import {name}: {type(e).__name__}: {e}")
        print(f"  {name:<17} {version(name) if ok else 'MISSING'}")
    flax_v = version("flax")
    if flax_v != "not installed" and not flax_v.startswith("0.12."):
        print(f"  warning: urm-jax is written for flax 0.12.x (pyproject), found {flax_v}; if the NNX "
              "sections error, carry a flax 0.12.8 wheel (bench/gpu_check.py docstring)")
    for plugin in ("jax-cuda12-plugin", "jax-cuda13-plugin", "jaxlib"):
        print(f"  {plugin:<17} {version(plugin)}")

    if "jax" in sys.modules:
        import jax

        facts["jax_backend"] = jax.default_backend()
        devs = jax.devices()
        facts["jax_devices"] = [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in devs]
        print(f"jax backend {facts['jax_backend']}, devices {facts['jax_devices']}")
        if facts["jax_backend"] != "gpu" and not quick:
            problems.append(JAX_GPU_HINT)
    if "torch" in sys.modules:
        import torch

        cuda = torch.cuda.is_available()
        facts["torch_cuda"] = cuda
        name = torch.cuda.get_device_name(0) if cuda else "-"
        print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {cuda}, "
              f"device {name}, cuDNN {torch.backends.cudnn.version() if cuda else '-'}")
        if not cuda and not quick:
            problems.append(TORCH_GPU_HINT)
    for var in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS", "URM_JAX_PEAK_TFLOPS", "CUDA_VISIBLE_DEVICES"):
        if os.environ.get(var):
            print(f"  {var}={os.environ[var]}")
    return facts, problems


# --- shared helpers --------------------------------------------------------------------------


def rel_diffs(jx: dict, hf: dict) -> dict:
    """max|a - b| / max|b| per output (urm_jax/parity.py's measure)."""
    from urm_jax.parity import differences

    return differences(jx, hf)[1]


def jax_model(cfg, params, *, param: str, compute: str, gate: str, attention: str):
    """(graphdef, device state) of a URM. The state is device_put once: model_from_params keeps
    numpy leaves that need no cast, and jit would copy those to the GPU on every call."""
    import jax
    from flax import nnx

    from urm_jax.config import DTypePolicy
    from urm_jax.model.urm import ModelOptions, model_from_params

    options = ModelOptions(DTypePolicy(param=param, compute=compute, gate=gate), attention=attention)
    graphdef, state = nnx.split(model_from_params(cfg, params, options))
    return graphdef, jax.device_put(state, jax.devices()[0])


def jax_outputs(graphdef, state, ids: np.ndarray, mask: np.ndarray) -> dict:
    import jax

    from urm_jax.scoring.engine import forward_batch  # the jitted forward `urm-jax score` runs

    out = jax.device_get(forward_batch(graphdef, state, jax.device_put(ids), jax.device_put(mask)))
    return {k: np.asarray(getattr(out, k), np.float64) for k in ("reward", "means", "log_stds", "gate")}


def load_hf(path, dtype: str, gate: str, attn: str, device: str):
    """The reference from the checkpoint's own modeling_custom.py, gate cast to `gate` (the
    checkpoint stores it fp32; the real model runs it fp16), on `device`."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.utils.logging.disable_progress_bar()
    # IEEE fp32 matmuls (no TF32) so the fp32 row compares exact fp32 on both sides: urm-jax passes
    # Precision.HIGHEST for fp32 compute. torch's default is already "highest"; set it anyway.
    torch.set_float32_matmul_precision("highest")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, trust_remote_code=True, dtype=getattr(torch, dtype), attn_implementation=attn)
    model.weights.to(getattr(torch, gate))  # from the fp32 tensors, as a fp16-gate checkpoint loads
    return model.to(device).eval()


def sync_torch(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def auto_is_cudnn() -> bool:
    """Whether attention "auto" means cuDNN here: then a failed auto row is retried with xla."""
    from urm_jax.model.attention import resolve

    return resolve("auto") == "cudnn"


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


# --- sections --------------------------------------------------------------------------------


class Check:
    def __init__(self, args, budget: Budget):
        self.args, self.budget = args, budget
        self.shape = SHAPE_QUICK if args.quick else SHAPE_GPU
        self.path = None
        self.cfg = None
        self.params = None  # host numpy, fp32, as stored
        self.hf_cache = {}  # parity reference outputs per dtype (fp32 is also the bf16 noise floor)
        self.torch_device = "cpu"

    # checkpoint

    def write_checkpoint(self) -> None:
        from urm_jax.hf.synthetic import tiny_hf_config, write_random_hf
        from urm_jax.config import ModelConfig
        from urm_jax.loading import load_params_any

        t = time.perf_counter()
        hf = tiny_hf_config(**self.shape)
        self.path = write_random_hf(Path(self.args.out) / "urm_random", hf, dtype="float32",
                                    gate_dtype="float32", progress=False, fill=self.args.fill,
                                    overwrite=True)
        self.cfg = ModelConfig.from_hf_dir(self.path)
        self.params = load_params_any(self.path, self.cfg)
        n = self.cfg.param_count()
        add("checkpoint", f"random HF, fp32, fill {self.args.fill}",
            f"{n['total'] / 1e6:,.1f}M params (embedding {self.cfg.vocab_size * self.cfg.hidden_size / 1e6:,.1f}M); "
            f"hidden {self.cfg.hidden_size}, {self.cfg.num_layers} layers, {self.cfg.num_heads}/"
            f"{self.cfg.num_kv_heads} heads, ffn {self.cfg.intermediate_size}, vocab {self.cfg.vocab_size}; "
            f"written + read in {time.perf_counter() - t:.0f} s", "info")

    # parity

    def parity_batch(self):
        from urm_jax.data.tokenization import pad_batch
        from urm_jax.parity import default_long_length, synthetic_sequences

        long = default_long_length(self.cfg)  # 1024 at the GPU shape, past 4x the RoPE window at --quick
        seqs = synthetic_sequences(self.cfg, long, seed=0) + synthetic_sequences(self.cfg, long, seed=1)
        ids, mask = pad_batch(seqs, pad_id=self.cfg.pad_token_id)
        return ids, mask, f"{len(seqs)} seqs {min(map(len, seqs))}..{max(map(len, seqs))} tok"

    def parity(self, dtype: str, attention: str) -> None:
        from urm_jax.model.attention import resolve
        from urm_jax.parity import TOLERANCES

        ids, mask, what = self.parity_batch()
        gate = "float32" if dtype == "float32" else "float16"
        setting = f"{what}, compute {dtype}, gate {gate}, attention {attention}->{resolve(attention)}, HF eager"
        if dtype not in self.hf_cache:  # one reference run per dtype, shared by the attention rows
            model = load_hf(self.path, dtype, gate, "eager", self.torch_device)
            from urm_jax.parity import reference_outputs

            self.hf_cache[dtype] = reference_outputs(model, ids, mask, self.torch_device)
            del model
            free_memory()
        hf = self.hf_cache[dtype]
        graphdef, state = jax_model(self.cfg, self.params, param=dtype, compute=dtype, gate=gate,
                                    attention=attention)
        jx = jax_outputs(graphdef, state, ids, mask)
        del graphdef, state
        rel = rel_diffs(jx, hf)
        tol = TOLERANCES.get((dtype, gate), 1e-1)
        worst = max(rel.values())
        finite = all(np.all(np.isfinite(v)) for v in jx.values())
        text = " ".join(f"{k} {v:.1e}" for k, v in rel.items()) + f"; tol {tol:.0e}"
        if dtype != "float32" and "float32" in self.hf_cache:
            floor = max(rel_diffs(hf, self.hf_cache["float32"]).values())
            text += f"; HF {dtype} vs HF fp32 {floor:.1e}"
        if not finite:
            text += "; NON-FINITE urm-jax outputs"
        add(f"parity {dtype} ({attention}->{resolve(attention)})", setting, text,
            "ok" if worst <= tol and finite else "FAIL")

    # training

    def train(self, attention: str, remat: str = "full", results: dict | None = None) -> None:
        import jax

        from urm_jax.config import DTypePolicy
        from urm_jax.flops import mfu, peak_flops_per_device, train_flops
        from urm_jax.model.attention import resolve
        from urm_jax.model.urm import ModelOptions
        from urm_jax.sharding import make_mesh
        from urm_jax.train.config import OptimConfig, TrainConfig
        from urm_jax.train.step import build_trainer

        rows, seq = self.args.train_batch, self.args.train_seq
        impl = resolve(attention)
        setting = (f"{rows}x{seq} full rows, fp32 params, bf16 compute, remat {remat}, "
                   f"attention {attention}->{impl}, AdamW, gate frozen")
        options = ModelOptions(DTypePolicy(param="float32", compute="bfloat16", gate="float32"),
                               remat=remat, attention=attention, layer_loop="auto")
        optim = OptimConfig(learning_rate=2e-6, weight_decay=1e-3, warmup_ratio=0.0, clip_norm=1.0)
        trainer = build_trainer(self.cfg, self.params, TrainConfig(optim=optim), total_steps=10_000,
                                mesh=make_mesh((1, 1, 1), jax.devices()[:1]), options=options)
        rng = np.random.default_rng(0)
        # Full rows (every token real) with ids that avoid the pad id; leading accumulation axis 1.
        batch = {"input_ids": rng.integers(4, self.cfg.vocab_size - 2, (rows, seq)).astype(np.int32),
                 "segment_ids": np.ones((rows, seq), np.int32),
                 "pool_index": np.full((rows, 1), seq - 1, np.int32),
                 "pool_mask": np.ones((rows, 1), np.float32),
                 "labels": rng.integers(0, 5, (rows, 1, 5)).astype(np.float32)}
        batch = jax.device_put({k: v[None] for k, v in batch.items()}, trainer.batch_sharding)
        losses = []

        def step():
            metrics = trainer.run(batch)
            jax.block_until_ready((trainer.state, metrics))  # the step is async until here
            losses.append(float(metrics["loss"]))

        first, times = timed(step, warmup=2, reps=self.args.steps, budget=self.budget)
        med = statistics.median(times)
        flops = train_flops(self.cfg, [seq] * rows)
        peak = peak_flops_per_device(jax.devices()[0])
        util = mfu(flops, med, 1, peak)
        mfu_text = f"MFU {100 * util:.1f}% of {peak / 1e12:.0f} TFLOP/s" if util is not None else "MFU n/a (no peak for this device)"
        ok = all(np.isfinite(losses))
        if results is not None:
            results[f"urm-jax remat {remat}"] = rows * seq / med
        add(f"train stage 1 ({attention}->{impl}, remat {remat})", setting,
            f"{fmt_rate(rows * seq / med)} tok/s, {1e3 * med:.0f} ms/step (median of {len(times)}; "
            f"first step incl. compile {first:.1f} s), {flops / med / 1e12:.3g} TFLOP/s, {mfu_text}; "
            f"loss {losses[0]:.3f}->{losses[-1]:.3f}" + ("" if ok else " NON-FINITE"),
            "ok" if ok else "FAIL")

    def train_hf(self, checkpointing: bool, results: dict) -> None:
        """The same stage-1 step in PyTorch: the checkpoint's HF class with SDPA attention, fp32
        parameters under bf16 autocast (urm-jax's fp32 params + bf16 compute), the same loss
        (reparam regression on means / log-stds), torch AdamW (fused) with weight decay on
        matrices only, global-norm clip 1.0, the gate frozen; with or without HF's gradient
        checkpointing (the counterpart of urm-jax's remat full / none)."""
        import torch

        rows, seq = self.args.train_batch, self.args.train_seq
        model = load_hf(self.path, "float32", "float32", "sdpa", self.torch_device).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("weights."))  # the gate is frozen in stage 1
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        params = decay + no_decay
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-3},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=2e-6,
                                fused=self.torch_device == "cuda")
        rng = np.random.default_rng(0)
        dev = self.torch_device
        ids = torch.as_tensor(rng.integers(4, self.cfg.vocab_size - 2, (rows, seq)), device=dev)
        mask = torch.ones((rows, seq), dtype=torch.long, device=dev)
        labels = torch.as_tensor(rng.integers(0, 5, (rows, 5)), dtype=torch.float32, device=dev)
        noise = torch.randn(labels.shape, generator=torch.Generator().manual_seed(0)).to(dev)
        losses = []

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev, dtype=torch.bfloat16):
                out = model(input_ids=ids, attention_mask=mask)
            sample = out.means.float() + noise * out.log_stds.float().exp()
            loss = ((sample - labels) ** 2).sum(-1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())  # waits for the step
            sync_torch(dev)

        first, times = timed(step, warmup=2, reps=self.args.steps, budget=self.budget)
        med = statistics.median(times)
        name = f"HF sdpa{' + checkpointing' if checkpointing else ''}"
        results[name] = rows * seq / med
        ok = all(np.isfinite(losses))
        add(f"train {name}", f"{rows}x{seq} full rows, fp32 params, bf16 autocast, torch AdamW{' (fused)' if dev == 'cuda' else ''}, "
            f"gate frozen; transformers {version('transformers')}, torch {version('torch')}",
            f"{fmt_rate(rows * seq / med)} tok/s, {1e3 * med:.0f} ms/step (median of {len(times)}; "
            f"first {first:.1f} s); loss {losses[0]:.3f}->{losses[-1]:.3f}" + ("" if ok else " NON-FINITE"),
            "ok" if ok else "FAIL")
        del model, opt, params, decay, no_decay

    # scoring

    def score_batch(self):
        rows, seq = self.args.score_batch, self.args.score_seq
        rng = np.random.default_rng(1)
        lengths = rng.integers(seq // 2, seq + 1, rows)
        lengths[0] = seq
        ids = np.full((rows, seq), self.cfg.pad_token_id, np.int32)
        mask = np.zeros((rows, seq), np.int32)
        for r, n in enumerate(lengths):
            ids[r, :n] = rng.integers(4, self.cfg.vocab_size - 2, n)
            mask[r, :n] = 1
        return ids, mask, [int(n) for n in lengths]

    def score_jax(self, attention: str, results: dict) -> None:
        import jax

        from urm_jax.model.attention import resolve
        from urm_jax.scoring.engine import forward_batch

        ids, mask, lengths = self.score_batch()
        graphdef, state = jax_model(self.cfg, self.params, param="bfloat16", compute="bfloat16",
                                    gate="float16", attention=attention)
        d_ids, d_mask = jax.device_put(ids), jax.device_put(mask)

        def call():
            jax.block_until_ready(forward_batch(graphdef, state, d_ids, d_mask))

        first, times = timed(call, warmup=2, reps=self.args.reps, budget=self.budget)
        name = f"urm-jax {attention}->{resolve(attention)}"
        label = " (the attention `urm-jax score` uses)" if attention == "reference" else ""
        self._score_row(name, f"urm-jax{label}", lengths, ids.shape, first, times, results)

    def score_hf(self, results: dict) -> None:
        import torch

        ids, mask, lengths = self.score_batch()
        model = load_hf(self.path, "bfloat16", "float16", "sdpa", self.torch_device)
        t_ids = torch.as_tensor(ids, dtype=torch.long, device=self.torch_device)
        t_mask = torch.as_tensor(mask, dtype=torch.long, device=self.torch_device)

        def call():
            with torch.inference_mode():
                model(input_ids=t_ids, attention_mask=t_mask, return_dict=False)
            sync_torch(self.torch_device)

        first, times = timed(call, warmup=2, reps=self.args.reps, budget=self.budget)
        self._score_row("HF sdpa", f"transformers {version('transformers')}, torch {version('torch')}",
                        lengths, ids.shape, first, times, results)

    def _score_row(self, name, setting, lengths, shape, first, times, results) -> None:
        import jax

        from urm_jax.flops import forward_flops, mfu, peak_flops_per_device

        med = statistics.median(times)
        real = sum(lengths)
        results[name] = real / med
        peak = peak_flops_per_device(jax.devices()[0])  # None on CPU: no MFU there
        util = mfu(forward_flops(self.cfg, lengths), med, 1, peak)
        add(f"score {name}", f"{shape[0]}x{shape[1]} padded, {real} real tok, bf16 + fp16 gate; {setting}",
            f"{fmt_rate(real / med)} real tok/s ({fmt_rate(shape[0] * shape[1] / med)} padded), "
            f"{1e3 * med:.1f} ms/batch (median of {len(times)}; first {first:.1f} s)"
            + (f", MFU {100 * util:.1f}%" if util is not None else ""), "info")


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU in ~1-3 min")
    p.add_argument("--out", help="folder for the temporary checkpoint (default: a new temp dir); deleted at the end")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint under --out")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    p.add_argument("--fill", choices=("normal", "fast"), default="normal",
                   help="random weight fill (urm_jax/hf/synthetic.py); fast tiles a pool of draws")
    p.add_argument("--train-batch", type=int, default=None, help="rows per training step (default 4; quick 2)")
    p.add_argument("--train-seq", type=int, default=None, help="tokens per training row (default 2048; quick 128)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 5; quick 2)")
    p.add_argument("--score-batch", type=int, default=None, help="rows per scoring batch (default 16; quick 4)")
    p.add_argument("--score-seq", type=int, default=None, help="padded scoring length (default 1024; quick 128)")
    p.add_argument("--reps", type=int, default=None, help="timed scoring batches (default 10; quick 3)")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args()
    defaults = dict(train_batch=(2, 4), train_seq=(128, 2048), steps=(2, 5), score_batch=(4, 16),
                    score_seq=(128, 1024), reps=(3, 10))
    for k, (quick, full) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)

    budget = Budget(args.budget)
    print(f"urm-jax GPU check ({'quick, tiny shapes' if args.quick else '~1B shape'}), budget {args.budget:.0f} s")
    facts, problems = check_environment(args.quick)
    jax_ok = all(m in sys.modules for m in ("jax", "flax", "optax"))
    torch_ok = all(m in sys.modules for m in ("torch", "transformers"))
    jax_gpu = facts.get("jax_backend") == "gpu"
    torch_gpu = bool(facts.get("torch_cuda"))
    for prob in problems:
        print(f"MISSING: {prob}")

    tmp_owned = args.out is None
    args.out = args.out or tempfile.mkdtemp(prefix="urm_gpu_check_")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    check = Check(args, budget)
    check.torch_device = "cuda" if torch_gpu else "cpu"

    run_jax = jax_ok and (jax_gpu or args.quick)
    run_torch = torch_ok and (torch_gpu or args.quick)
    why_jax = "" if run_jax else ("JAX/flax/optax missing" if not jax_ok else "JAX has no GPU backend")
    why_torch = "" if run_torch else ("torch/transformers missing" if not torch_ok else "torch has no CUDA")
    try:
        have_ckpt = run_jax and section(budget, "checkpoint", "write + read", check.write_checkpoint)
        if not run_jax:
            add("checkpoint", "write + read", why_jax, "MISSING")

        for dtype, attention in (("float32", "reference"), ("bfloat16", "reference"), ("bfloat16", "auto")):
            name = f"parity {dtype} ({attention})"
            if not (have_ckpt and run_torch):
                add(name, "HF eager vs urm-jax", "; ".join(filter(None, (why_jax, why_torch))) or "no checkpoint",
                    "MISSING" if (why_jax or why_torch) else "SKIPPED")
                continue
            section(budget, name, "HF eager vs urm-jax", lambda d=dtype, a=attention: check.parity(d, a))

        train_results: dict[str, float] = {}
        if have_ckpt:
            for remat in ("full", "none"):
                shape = f"{args.train_batch}x{args.train_seq}, remat {remat}"
                ran = section(budget, "train stage 1 (auto)", shape,
                              lambda r=remat: check.train("auto", r, train_results), min_left=30.0)
                if not ran and auto_is_cudnn() and ROWS[-1].status == "ERROR":
                    section(budget, "train stage 1 (xla fallback)", shape,
                            lambda r=remat: check.train("xla", r, train_results), min_left=30.0)
            if run_torch:
                for checkpointing in (True, False):
                    section(budget, "train HF sdpa", f"{args.train_batch}x{args.train_seq}",
                            lambda c=checkpointing: check.train_hf(c, train_results), min_left=30.0)
            pairs = [("urm-jax remat full", "HF sdpa + checkpointing"), ("urm-jax remat none", "HF sdpa")]
            ratios = [f"{a} / {b} {train_results[a] / train_results[b]:.2f}x" for a, b in pairs
                      if a in train_results and b in train_results]
            if ratios:
                add("train ratio", "tok/s, equal work (recompute matched)", ", ".join(ratios), "info")
        else:
            add("train stage 1", f"{args.train_batch}x{args.train_seq}", why_jax or "no checkpoint",
                "MISSING" if why_jax else "SKIPPED")

        results: dict[str, float] = {}
        setting = f"{args.score_batch}x{args.score_seq}"
        if have_ckpt:
            for attention in ("auto", "reference"):
                ok = section(budget, f"score urm-jax ({attention})", setting,
                             lambda a=attention: check.score_jax(a, results))
                if not ok and attention == "auto" and auto_is_cudnn() and ROWS[-1].status == "ERROR":
                    section(budget, "score urm-jax (xla fallback)", setting,
                            lambda: check.score_jax("xla", results))
        else:
            add("score urm-jax", setting, why_jax or "no checkpoint", "MISSING" if why_jax else "SKIPPED")
        if have_ckpt and run_torch:
            section(budget, "score HF sdpa", setting, lambda: check.score_hf(results))
        else:
            add("score HF sdpa", setting, "; ".join(filter(None, (why_jax, why_torch))) or "no checkpoint",
                "MISSING" if (why_jax or why_torch) else "SKIPPED")
        if "HF sdpa" in results:
            ratios = [f"{k} {v / results['HF sdpa']:.2f}x" for k, v in results.items() if k != "HF sdpa"]
            if ratios:
                add("score ratio", "urm-jax tok/s / HF sdpa tok/s", ", ".join(ratios), "info")
    finally:
        check.params = None
        target = Path(args.out) / "urm_random"
        if not args.keep:
            shutil.rmtree(target, ignore_errors=True)
            if tmp_owned:
                shutil.rmtree(args.out, ignore_errors=True)

    device = facts.get("jax_devices", ["?"])[0]
    print(f"\nurm-jax GPU check, {'quick (tiny shapes)' if args.quick else 'full'}; JAX device {device}, "
          f"torch device {check.torch_device}; jax {version('jax')}, flax {version('flax')}, "
          f"torch {version('torch')}, transformers {version('transformers')}; "
          f"total {budget.elapsed():.0f} s of {args.budget:.0f} s budget")
    print_table()
    if args.json:
        Path(args.json).write_text(json.dumps({"facts": facts, "rows": [dataclasses.asdict(r) for r in ROWS]},
                                              indent=2))
    if problems:
        return 2
    return 1 if any(r.status in ("FAIL", "ERROR") for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
