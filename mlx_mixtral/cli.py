"""`mlx-mixtral generate | chat | convert`: the command-line front doors.

Every user-fixable error ends as one line on stderr and a non-zero exit status (`run_main`, in
`arguments`); set MLX_MIXTRAL_DEBUG=1 to see the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .arguments import add_model_args, add_sampling_args, load_from_args, run_main, sampling_from_args
from .errors import MixtralError


def _read_prompt(args: argparse.Namespace) -> str:
    """`--prompt`, or stdin without the one newline that ends what `echo` (or a file) sends, so
    `echo q | mlx-mixtral generate` and `--prompt q` see the same prompt."""
    if args.prompt is None or args.prompt == "-":
        if sys.stdin.isatty():
            raise MixtralError("no prompt: pass --prompt TEXT, or pipe the prompt into stdin")
        text = sys.stdin.read()
        return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    return args.prompt


def cmd_generate(args: argparse.Namespace) -> int:
    import mlx_mixtral

    sampling = sampling_from_args(args)
    prompt = _read_prompt(args)

    def encode(tokenizer) -> list[int]:
        if args.raw:
            return tokenizer.encode(prompt)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages)

    note = lambda line: print(line, file=sys.stderr)  # noqa: E731
    model, tokenizer = load_from_args(args, note, context=lambda t: len(encode(t)) + args.max_tokens)
    tokens = encode(tokenizer)
    streaming = getattr(model, "expert_cache", None)
    if streaming is not None:
        streaming.reset_stats()
    log = None
    if args.show_experts:
        from .routing import log_of

        log = log_of(model)
        log.reset()
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
        if streaming is not None:
            from .expert_view import streaming_line

            print(streaming_line(model), file=sys.stderr)
    if log is not None:
        from rich.console import Console

        from .expert_view import heatmap

        table = heatmap(log_of(model), "experts used over this reply")
        if table is not None:
            Console(stderr=True).print(table)
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt, streamed to stdout",
                       description="Stream Mixtral's answer to one prompt to stdout.")
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt; '-' or omitted reads stdin")
    p.add_argument("--system", default=None, help="system text (chat mode only)")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    p.add_argument("--verbose", "-v", action="store_true", help="print speed and memory (and streaming) to stderr")
    p.add_argument("--show-experts", action="store_true",
                   help="draw which experts each layer used (a heatmap on stderr)")
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
