"""`urm-jax` command line: score, parity (train and eval arrive with their issues)."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="urm-jax", description="URM reward model in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score a JSONL file of conversations")
    p.add_argument("--model", required=True, help="HF directory or urm-jax checkpoint")
    p.add_argument("--input", required=True, help='JSONL: {"messages": [...]}, {"prompt", "response"} '
                   'or {"input_ids": [...]}, optional "id"')
    p.add_argument("--output", required=True)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="default: the model's max_position_embeddings")
    p.add_argument("--truncation", choices=["error", "left"], default="error",
                   help="over --max-length: reject the line, or drop tokens from the start")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: the checkpoint's backbone dtype")
    p.add_argument("--gate-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: the checkpoint's gate dtype (float16 in the real model)")

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from urm_jax.errors import USER_ERRORS

    try:
        if args.command == "score":
            from urm_jax.scoring import Scorer, score_file

            scorer = Scorer(args.model, compute_dtype=args.compute_dtype, gate_dtype=args.gate_dtype,
                            batch_size=args.batch_size, max_length=args.max_length,
                            truncation=args.truncation)
            n = score_file(scorer, args.input, args.output)
            print(f"scored {n} examples -> {args.output}")
            return 0
        if args.command == "parity":
            from urm_jax.parity import main_parity

            return main_parity(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
