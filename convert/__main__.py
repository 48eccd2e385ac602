"""`python -m convert` and `mlx-mixtral convert`: Hugging Face Mixtral -> MLX, optionally quantized.

    python -m convert --hf-path mistralai/Mixtral-8x7B-Instruct-v0.1 --mlx-path ~/models/mixtral-4bit -q

Both front doors share `add_arguments` and `run`; errors end as one line on stderr (`run_main`).
Option values are checked by the converter rather than by argparse `choices`, so a bad value gets
the same one-line error from the CLI and from Python.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mlx_mixtral import units
from mlx_mixtral.arguments import run_main
from mlx_mixtral.errors import MixtralError

from .convert import DTYPES, convert
from .quant_policy import (
    DEFAULT_EMBED_BITS,
    DEFAULT_LM_HEAD_BITS,
    DEFAULT_ROUTER_BITS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    parse_precision,
)

# dest, flag, bit widths offered: the router gate is never quantized below 8 bits (quant_policy.py).
_POLICY_FLAGS = (("router_bits", "--router-bits", (8,)), ("embed_bits", "--embed-bits", SUPPORTED_BITS),
                 ("lm_head_bits", "--lm-head-bits", SUPPORTED_BITS))


def _precision_text(bits: int | None) -> str:
    return "float" if bits is None else str(bits)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The converter's flags, for `python -m convert` and the `mlx-mixtral convert` subcommand."""
    bits = "|".join(map(str, SUPPORTED_BITS))
    parser.add_argument("--hf-path", required=True, metavar="SRC", help="source: a local model folder or a Hugging Face repo id")
    parser.add_argument("--mlx-path", required=True, metavar="DST", help="destination folder (must not exist, unless --force)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize (experts and attention at --q-bits)")
    parser.add_argument("--q-bits", type=int, default=4, metavar="BITS", help=f"bits per weight: {bits} (default: %(default)s)")
    parser.add_argument("--q-group-size", type=int, default=64, metavar="N",
                        help=f"weights per scale/bias: {'|'.join(map(str, SUPPORTED_GROUP_SIZES))} (default: %(default)s)")
    parser.add_argument("--dtype", default=None, metavar="DTYPE",
                        help=f"{'|'.join(DTYPES)}: float weights and quantization scales (default: the source's)")
    parser.add_argument("--attention-bits", type=int, default=None, metavar="BITS",
                        help=f"with -q: attention's bits, {bits} (default: --q-bits), e.g. 6 with --q-bits 3")
    parser.add_argument("--router-bits", default=None, metavar="BITS",
                        help=f"with -q: router gate precision, 8|float (default: {_precision_text(DEFAULT_ROUTER_BITS)})")
    parser.add_argument("--embed-bits", default=None, metavar="BITS",
                        help=f"with -q: embedding precision, {bits}|float (default: {_precision_text(DEFAULT_EMBED_BITS)})")
    parser.add_argument("--lm-head-bits", default=None, metavar="BITS",
                        help=f"with -q: lm_head precision, {bits}|float (default: {_precision_text(DEFAULT_LM_HEAD_BITS)})")
    parser.add_argument("--dequantize", action="store_true", help="turn a quantized MLX folder back into float")
    parser.add_argument("--miss-bits", type=int, default=None, metavar="BITS",
                        help="also write a 2- or 3-bit copy of the experts (miss-BITSbit/), which streaming "
                             "can read for misses a token weights little (`--max-memory ... --miss-bits BITS`)")
    parser.add_argument("--calibration", nargs="?", const=True, default=None, metavar="TEXT",
                        help="with -q: choose every group's scale and bias by the error weighted by what each input "
                             "channel carries on this text (a file of the kind the model will read; alone: the "
                             "text this package ships); same format, nothing slower to run")
    parser.add_argument("--force", action="store_true", help="replace --mlx-path if it exists")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest output file, e.g. 5GB or 500MB; peak memory is about this plus 1-2 GB "
                        "(default: %(default)s)")


def parse_size(text: str) -> int:
    """"5GB", "500MB", "2.5GB" or a byte count -> bytes (decimal units, as Hugging Face uses)."""
    return units.parse_size(text, "--max-shard-size", "5GB or 500MB")


def run(args: argparse.Namespace) -> int:
    """Convert as the flags say; print the summary line. Returns the exit status."""
    policy = {}
    for name, flag, allowed in _POLICY_FLAGS:
        value = getattr(args, name)
        if value is not None:
            if not args.quantize:
                raise MixtralError(f"{flag} only applies with -q")
            policy[name] = parse_precision(value, flag, allowed)
    if args.attention_bits is not None:
        if not args.quantize:
            raise MixtralError("--attention-bits only applies with -q")
        policy["attention_bits"] = args.attention_bits
    summary = convert(
        args.hf_path, args.mlx_path, quantize=args.quantize, bits=args.q_bits, group_size=args.q_group_size,
        dtype=args.dtype, force=args.force, dequantize=args.dequantize,
        max_shard_bytes=parse_size(args.max_shard_size), miss_bits=args.miss_bits, calibration=args.calibration,
        **policy,
    )
    print(summary.text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert",
                                     description="Convert a Hugging Face Mixtral checkpoint to MLX.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
