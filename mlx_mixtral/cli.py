"""`mlx-mixtral generate | chat | convert`: the command-line front doors.

Every user-fixable error ends as one line on stderr and a non-zero exit status; set
MLX_MIXTRAL_DEBUG=1 to see the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import MixtralError

if TYPE_CHECKING:  # the module itself imports lazily, so `--help` starts fast
    from .sampling import SamplingParams


def add_sampling_args(parser: argparse.ArgumentParser, temp: float = 0.0) -> None:
    """Sampling flags shared by `generate` and `chat`."""
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate (default: %(default)s)")
    parser.add_argument("--temp", type=float, default=temp, help="sampling temperature; 0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s, off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0, off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (default: 0, off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise recent tokens (default: 1.0, off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable sampling")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """Validated sampling parameters, so a bad flag fails before a multi-GB load."""
    from .sampling import SamplingParams, check_max_tokens, check_seed

    params = SamplingParams(temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    params.validate()
    if args.seed is not None:
        check_seed(args.seed)
    check_max_tokens(args.max_tokens)
    return params


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is None or args.prompt == "-":
        if sys.stdin.isatty():
            raise MixtralError("no prompt: pass --prompt TEXT, or pipe the prompt into stdin")
        return sys.stdin.read()
    return args.prompt


def cmd_generate(args: argparse.Namespace) -> int:
    import mlx_mixtral

    sampling = sampling_from_args(args)
    prompt = _read_prompt(args)
    model, tokenizer = mlx_mixtral.load(args.model)
    if args.raw:
        tokens = tokenizer.encode(prompt)
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        tokens = tokenizer.apply_chat_template(messages)
    last = None
    for last in mlx_mixtral.stream_generate(
        model, tokenizer, tokens, max_tokens=args.max_tokens, sampling=sampling,
        seed=args.seed, stop=args.stop or (),
    ):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
            f"peak memory: {last.peak_memory_gb:.2f} GB | finish: {last.finish_reason}",
            file=sys.stderr,
        )
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt, streamed to stdout",
                       description="Stream Mixtral's answer to one prompt to stdout.")
    p.add_argument("--model", required=True, help="model folder or Hugging Face repo id")
    p.add_argument("--prompt", "-p", default=None, help="the prompt; '-' or omitted reads stdin")
    p.add_argument("--system", default=None, help="system text (chat mode only)")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true", help="print speed and memory to stderr")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)


def _chat_parser(sub) -> None:
    from .repl import add_arguments, run

    p = sub.add_parser("chat", help="interactive chat in the terminal",
                       description="Chat with Mixtral; /help lists the commands.")
    add_arguments(p)
    p.set_defaults(func=run)


def _convert_parser(sub) -> None:
    from convert.__main__ import add_arguments, run

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to MLX (optionally quantized)",
                       description="Convert a Hugging Face Mixtral checkpoint to MLX.")
    add_arguments(p)
    p.set_defaults(func=run)


def run_main(func: Callable[[], int]) -> int:
    """Run a front door, turning errors into one line on stderr and an exit status."""
    try:
        return func()
    except MixtralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mlx-mixtral generate ... | head`
        return 0
    except Exception as e:  # a bug: still one line, unless asked for the traceback
        if os.environ.get("MLX_MIXTRAL_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (set MLX_MIXTRAL_DEBUG=1 for details)",
              file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-mixtral", description="Mixtral on your Mac with MLX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _chat_parser(sub)
    _convert_parser(sub)
    args = parser.parse_args(argv)
    return run_main(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
