"""`urm-jax` command line: score, eval, parity (train arrives with its issue)."""

from __future__ import annotations

import argparse
import json
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def shard_spec(text: str) -> tuple[int, int]:
    """`K/N`: the K-th (0-based) of N shards."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text}: need N >= 1 and 0 <= K < N")
    return index, count


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
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def add_attention_option(p: argparse.ArgumentParser) -> None:
    from urm_jax.model.attention import IMPLEMENTATIONS

    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="reference",
                   help="reference: HF's eager attention op by op (default, the parity path); "
                   "auto: splash on TPU, cuDNN flash on GPU (bf16/fp16 compute), reference on CPU")


def load_ensemble(args):
    from urm_jax.scoring import Ensemble

    return Ensemble.load(args.model, compute_dtype=args.compute_dtype, gate_dtype=args.gate_dtype,
                         batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                         max_length=args.max_length, truncation=args.truncation,
                         attention=args.attention)


def run_score(args) -> int:
    from urm_jax.scoring import score_jsonl

    if args.bad_lines and args.on_bad_line != "skip":
        raise ValueError("--bad-lines needs --on-bad-line skip")
    run = score_jsonl(load_ensemble(args), args.input, args.output, chunk_size=args.chunk_size,
                      on_bad_line=args.on_bad_line, bad_lines_path=args.bad_lines,
                      progress=not args.no_progress, shard=args.shard)
    if len(run.skipped):
        print(f"warning: {run.skipped.summary()}", file=sys.stderr)
    print(f"scored {run.written} examples -> {args.output} ({run.tokens} tokens, "
          f"{run.tokens / max(run.seconds, 1e-9):.0f} tokens/s, {run.shapes} batch shapes"
          f"{f', {len(run.skipped)} bad lines skipped' if len(run.skipped) else ''})")
    return 0


def run_eval_command(args) -> int:
    from pathlib import Path

    from urm_jax.eval import check_output_dir, format_summary, run_eval

    out_dir = args.output_dir or f"eval-{Path(args.pairs).stem}"
    check_output_dir(out_dir, args.overwrite)  # before the (slow) model load
    if not Path(args.pairs).is_file():
        raise FileNotFoundError(f"{args.pairs}: no such pairs file")
    run = run_eval(load_ensemble(args), args.pairs, out_dir, measure=args.uncertainty,
                   chunk_size=args.chunk_size, on_bad_line=args.on_bad_line, bins=args.bins,
                   overwrite=args.overwrite, progress=not args.no_progress,
                   meta={"models": list(args.model)})
    if len(run.skipped):
        print(f"warning: {run.skipped.summary()}", file=sys.stderr)
    print(format_summary(run))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="urm-jax", description="URM reward model in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--bins", type=positive_int, default=10, help="reliability plot bins")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="pairs scored at a time")

    p = sub.add_parser("parity", help="compare against the HF PyTorch reference")
    p.add_argument("--hf", required=True, help="HF directory (the reference)")
    p.add_argument("--model", required=True, help="HF directory or urm-jax checkpoint (JAX side)")
    p.add_argument("--input", default=None, help="JSONL of examples (default: bundled samples + "
                   "synthetic ids, one row past 4x the RoPE original context)")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16"], default="keep",
                   help="keep: each side uses the checkpoint's dtypes; else cast backbone (gate keeps its own)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--tolerance", type=float, default=None, help="max relative difference "
                   "(default: the measured bound for the dtypes, see urm_jax/parity.py)")
    p.add_argument("--golden", default=None, help="JSONL examples with expected_reward "
                   "(e.g. urm_jax/data/model_card_goldens.jsonl for the real weights)")
    p.add_argument("--golden-tolerance", type=float, default=2e-2)
    p.add_argument("--long-length", type=positive_int, default=None, help="length of the long synthetic row")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    add_attention_option(p)

    p = sub.add_parser("export", help="a kept step of a training run as a full urm-jax checkpoint "
                       "(like the run's final/), for scoring or `convert to_hf`")
    p.add_argument("run_dir", help="the run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("out_dir")
    p.add_argument("--step", type=positive_int, default=None, help="default: the newest kept step")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("train", help="train stage 1 or 2 from a YAML recipe (resumes automatically)")
    p.add_argument("config", help="YAML recipe, e.g. configs/train/stage1_helpsteer2.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.learning_rate=1e-5")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-host GPU/CPU; "
                   "TPU pods need none of these flags with URM_JAX_DISTRIBUTED=1)")
    p.add_argument("--num-processes", type=positive_int, default=None)
    p.add_argument("--process-id", type=int, default=None)

    from urm_jax.serve import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from urm_jax.errors import USER_ERRORS

    try:
        if args.command == "score":
            return run_score(args)
        if args.command == "eval":
            return run_eval_command(args)
        if args.command == "serve":
            from urm_jax.serve import run_serve

            return run_serve(args)
        if args.command == "parity":
            from urm_jax.parity import main_parity

            return main_parity(args)
        if args.command == "export":
            from urm_jax.train.loop import export_step

            out = export_step(args.run_dir, args.out_dir, step=args.step, overwrite=args.overwrite)
            print(json.dumps({"checkpoint": str(out)}))
            return 0
        if args.command == "train":
            from urm_jax.distributed import maybe_initialize

            maybe_initialize(args.coordinator, args.num_processes, args.process_id)
            from urm_jax.train.loop import main_train
            from urm_jax.train.preemption import PREEMPTED_EXIT_CODE, TrainingPreempted

            try:
                return main_train(args.config, args.overrides)
            except TrainingPreempted as stop:
                print(f"stopped: {stop}", file=sys.stderr)
                return PREEMPTED_EXIT_CODE
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
