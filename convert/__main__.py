"""python -m convert from_hf HF_DIR OUT_DIR | to_hf CKPT_DIR OUT_DIR | verify HF_DIR CKPT_DIR
                 | init BASE_HF_DIR OUT_DIR [--attributes NAME|a,b,c|a,] [--label-range LOW,HIGH]

A thin command line over the library's HF bridge (`urm_jax.hf`): argument parsing, one `error:`
line and exit 2 for bad input, exit 1 when `verify` finds a difference."""

from __future__ import annotations

import argparse
import signal
import sys

# The signals `main` answers (Ctrl-C: 130, SIGTERM: 143, one `error:` line each). Until it can, a
# Ctrl-C would land inside some module's import below (a traceback, or a half-imported numpy and
# exit 1): run as a command, they wait, blocked, and are delivered once `main` is ready.
ANSWERED = {signal.SIGINT, signal.SIGTERM}
if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, ANSWERED)

from urm_jax.attributes import DEFAULT_PRESET, PRESETS, parse_attributes, parse_label_range
from urm_jax.cli_args import OneLineParser, join_negative_values, number, seed
from urm_jax.errors import USER_ERRORS, warning_lines
from urm_jax.hf.base import init_from_base
from urm_jax.hf.export import to_hf
from urm_jax.hf.load import from_hf
from urm_jax.hf.verify import format_verify, verify
from urm_jax.signals import INTERRUPTED_EXIT_CODE, output_ids, run_until_sigterm, stopped_note


def build_parser() -> argparse.ArgumentParser:
    """The `python -m convert` parser: subcommands from_hf, to_hf, verify and init with their options."""
    parser = OneLineParser(prog="python -m convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("from_hf", help="HF safetensors dir -> urm-jax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"],
                   help="backbone + value head dtype (default: each tensor keeps its own)")
    p.add_argument("--gate-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="gate dtype, stored and computed (default: tensors keep their dtype and the "
                        "gate computes in config.json's gate_dtype, else float16 as the released "
                        "class; recorded in the output)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors holding NaN/Inf")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("to_hf", help="urm-jax checkpoint -> HF safetensors dir (trust_remote_code)")
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"])
    p.add_argument("--gate-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="gate dtype, stored and computed (default: tensors keep their dtype, the "
                        "checkpoint's gate_dtype is recorded)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--allow-nonfinite", action="store_true", help="export tensors holding NaN/Inf")
    p.add_argument("--base-model", default=None, metavar="HUB_ID",
                   help="the model card's base_model (default: what `convert init` recorded)")
    p.add_argument("--license", default=None, help="the model card's license (e.g. apache-2.0)")
    p.add_argument("--eval", default=None, metavar="METRICS_JSON",
                   help="an `urm-jax eval` metrics.json whose numbers the model card reports")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("init", help="base Llama HF dir (e.g. Skywork-Reward-Llama-3.1-8B) -> urm-jax "
                       "checkpoint with its backbone and fresh URM heads: the stage-1 start")
    p.add_argument("base_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=seed, default=0, help="seed of the fresh heads")
    p.add_argument("--init-std", type=number(float, 0, 10), default=None,
                   help="std of the fresh head weights (default: the base's initializer_range, "
                        "else 0.02; biases start at zero)")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"],
                   help="backbone + value head dtype (default: the base's)")
    p.add_argument("--gate-dtype", default="float16", choices=["float32", "bfloat16", "float16"],
                   help="gate dtype (default float16, as the HF reference builds it)")
    p.add_argument("--attributes", default=DEFAULT_PRESET, metavar="NAME|a,b,c",
                   help=f"the attribute set: a preset ({', '.join(PRESETS)}; default "
                        f"{DEFAULT_PRESET}) or comma-separated label column names (one custom "
                        "attribute takes a trailing comma: quality,; a single name that is not a "
                        "preset is refused); value head 2 x K outputs, gate K")
    p.add_argument("--base-model", default=None, metavar="HUB_ID",
                   help="the base's Hub id, recorded for model cards (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    p.add_argument("--license", default=None, help="the base's license, recorded for model cards")
    p.add_argument("--label-range", default=None, metavar="LOW,HIGH",
                   help="range of the training labels, recorded for stage 1, e.g. -3,3 "
                        "(default: the preset's: helpsteer2 0,4; ultrafeedback 1,5; none for "
                        "other names)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors holding NaN/Inf")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("verify", help="compare every tensor of an HF dir and a urm-jax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("ckpt_dir")
    p.add_argument("--all", action="store_true", help="print every tensor, not only differences")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="compare a checkpoint holding NaN/Inf (bit for bit) instead of refusing it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse `argv` (default sys.argv[1:]) and `run` it, library notices shown as one
    `warning:` line each. Returns the exit code (0 ok, 1 verify found a difference, 2 bad input,
    130 Ctrl-C, 143 SIGTERM: then one `error:` line, and the output's temporary is removed)."""
    parser = build_parser()
    args = parser.parse_args(join_negative_values(parser, sys.argv[1:] if argv is None else argv))
    outputs = [] if args.command == "verify" else [args.out_dir]
    before = output_ids(outputs)
    try:
        with warning_lines():  # library notices (pad id == eos id) as one `warning:` line
            # SIGTERM unwinds like Ctrl-C: the output's temporary is removed on the way out
            return run_until_sigterm(lambda: run(args, unblock=True), outputs)
    except KeyboardInterrupt:  # before the rename: nothing written; after it: OUT_DIR is whole
        print(f"error: interrupted (Ctrl-C): python -m convert {args.command} stopped"
              f"{stopped_note(before)}", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE


def run(args: argparse.Namespace, unblock: bool = False) -> int:
    """Run one parsed command. Prints `wrote OUT_DIR` (from_hf, to_hf, init) or verify's report, and
    returns 0, or 1 when verify finds a tensor that differs; bad input (USER_ERRORS: a missing or
    corrupt checkpoint, a config field out of range, an existing output without --overwrite, a full
    disk) prints one `error:` line and returns 2. `unblock`: first deliver the signals held
    while the command imported its modules (the caller answers them)."""
    if unblock:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, ANSWERED)
    try:
        if args.command == "verify":
            lines, same = format_verify(verify(args.hf_dir, args.ckpt_dir,
                                               allow_nonfinite=args.allow_nonfinite), args.all)
            print("\n".join(lines))
            return 0 if same else 1
        if args.command == "init":
            out = init_from_base(args.base_dir, args.out_dir, seed=args.seed,
                                 init_std=args.init_std, dtype=args.dtype,
                                 gate_dtype=args.gate_dtype, overwrite=args.overwrite,
                                 allow_nonfinite=args.allow_nonfinite,
                                 attributes=parse_attributes(args.attributes),
                                 base_model=args.base_model, license=args.license,
                                 label_range=(parse_label_range(args.label_range)
                                              if args.label_range else None))
        elif args.command == "from_hf":
            out = from_hf(args.hf_dir, args.out_dir, dtype=args.dtype, gate_dtype=args.gate_dtype,
                          overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite)
        else:
            out = to_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype, gate_dtype=args.gate_dtype,
                        max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                        allow_nonfinite=args.allow_nonfinite, base_model=args.base_model,
                        license=args.license, eval_metrics=args.eval)
    except USER_ERRORS as err:  # OSError among them: disk full, permissions, unreadable input
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
