"""python -m convert from_hf HF_DIR OUT_DIR | to_hf CKPT_DIR OUT_DIR | verify HF_DIR CKPT_DIR
                 | init BASE_HF_DIR OUT_DIR"""

from __future__ import annotations

import argparse
import math
import sys

from convert.core import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("from_hf", help="HF safetensors dir -> urm-jax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"],
                   help="backbone + value head dtype (default: each tensor keeps its own)")
    p.add_argument("--gate-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="gate dtype (default: keep the checkpoint's, float16 in the real model)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors holding NaN/Inf")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("to_hf", help="urm-jax checkpoint -> HF safetensors dir (trust_remote_code)")
    p.add_argument("ckpt_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"])
    p.add_argument("--gate-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("init", help="base Llama HF dir (e.g. Skywork-Reward-Llama-3.1-8B) -> urm-jax "
                       "checkpoint with its backbone and fresh URM heads: the stage-1 start")
    p.add_argument("base_dir")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh heads")
    p.add_argument("--init-std", type=float, default=None,
                   help="std of the fresh head weights (default: the base's initializer_range, "
                        "else 0.02; biases start at zero)")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"],
                   help="backbone + value head dtype (default: the base's)")
    p.add_argument("--gate-dtype", default="float16", choices=["float32", "bfloat16", "float16"],
                   help="gate dtype (default float16, as the HF reference builds it)")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors holding NaN/Inf")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser("verify", help="compare every tensor of an HF dir and a urm-jax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("ckpt_dir")
    p.add_argument("--all", action="store_true", help="print every tensor, not only differences")
    return parser


def print_verify(rows: list[dict], show_all: bool) -> bool:
    bad = [r for r in rows if not r["identical"]]
    for r in rows if show_all else bad:
        state = "identical" if r["identical"] else f"DIFFERS (max |diff| {r['max_abs_diff']:.3e})"
        print(f"{r['key']:<55} {str(r['shape']):<16} {r['hf_dtype']:>9} vs {r['ckpt_dtype']:<9} {state}")
    total = sum(math.prod(r["shape"]) for r in rows)
    print(f"{len(rows) - len(bad)}/{len(rows)} tensors identical ({total:,} values)")
    return not bad


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from convert import core
    from convert.hf_io import WeightsError
    from urm_jax.checkpoint import CheckpointError
    from urm_jax.config import ConfigError
    from urm_jax.io_utils import OutputExistsError

    try:
        if args.command == "verify":
            return 0 if print_verify(core.verify(args.hf_dir, args.ckpt_dir), args.all) else 1
        if args.command == "init":
            from convert.from_base import init_from_base

            out = init_from_base(args.base_dir, args.out_dir, seed=args.seed,
                                 init_std=args.init_std, dtype=args.dtype,
                                 gate_dtype=args.gate_dtype, overwrite=args.overwrite,
                                 allow_nonfinite=args.allow_nonfinite)
        elif args.command == "from_hf":
            out = core.from_hf(args.hf_dir, args.out_dir, dtype=args.dtype,
                               gate_dtype=args.gate_dtype, overwrite=args.overwrite,
                               allow_nonfinite=args.allow_nonfinite)
        else:
            out = core.to_hf(args.ckpt_dir, args.out_dir, dtype=args.dtype,
                             gate_dtype=args.gate_dtype, max_shard_size=args.max_shard_size,
                             overwrite=args.overwrite)
    except (ConversionError, WeightsError, ConfigError, CheckpointError, OutputExistsError,
            ValueError, OSError) as err:  # OSError: disk full, permissions, unreadable input
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
