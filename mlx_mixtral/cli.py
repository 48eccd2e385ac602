"""`mlx-mixtral generate | chat | cache-prompt | serve | convert`: the command-line front doors.

Every user-fixable error ends as one line on stderr and a non-zero exit status (`run_main`, in
`arguments`); set MLX_MIXTRAL_DEBUG=1 to see the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

from rich.console import Console

from convert import __main__ as convert_cli

from . import prompt_cache
from .arguments import add_model_args, add_sampling_args, kv_from_args, load_from_args, run_main, sampling_from_args
from .cache import make_cache
from .chat import repl
from .constrain import Grammar, check, json_grammar
from .distributed.group import agreed_seed, end_with_peers, single_process, world
from .errors import MixtralError
from .experts.expert_view import heatmap, streaming_line
from .experts.routing import log_of
from .generate import GenerationResponse, prefill, stream_generate
from .progress import progress_bar
from .serve import server
from .tokenizer import BASE_MODEL_NOTE
from .units import gb


def _read_prompt(args: argparse.Namespace) -> str:
    """`--prompt`, or stdin without the one newline that ends what `echo` (or a file) sends, so
    `echo q | mlx-mixtral generate` and `--prompt q` see the same prompt."""
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if world().size() > 1:
        raise MixtralError("under mlx.launch, stdin never ends (it is forwarded line by line): pass --prompt TEXT")
    if sys.stdin.isatty():
        raise MixtralError("no prompt: pass --prompt TEXT, or pipe the prompt into stdin")
    text = sys.stdin.read()
    return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text


def cmd_generate(args: argparse.Namespace) -> int:
    """Answer one prompt: load, encode in the model's chat format (or raw), stream to stdout."""
    sampling = sampling_from_args(args)
    prompt, system = _read_prompt(args), args.system
    if args.prompt_cache is not None:  # continue the cached text: encode the whole, reuse its prefix
        prompt, system = _continue_cached(args, prompt, system)

    def encode(tokenizer) -> list[int]:
        return _encode(tokenizer, prompt, args.raw, system)

    grammar = _json_grammar(args)  # a bad schema file fails before the model loads
    model, tokenizer = load_from_args(args, _note, context=lambda t: len(encode(t)) + args.max_tokens)
    tokens = encode(tokenizer)
    if grammar is not None:
        check(grammar, tokenizer)
    if args.verbose:
        _note(f"chat format: {'none (--raw)' if args.raw else tokenizer.chat_format.name}")
    if not args.raw and tokenizer.chat_format.kind == "none":
        _note(BASE_MODEL_NOTE)
    fed, history, reused = tokens, [], 0
    if args.prompt_cache is not None:
        asked = kv_from_args(args) if args.kv_bits is not None else None
        cached, _ = prompt_cache.load(args.prompt_cache, model, tokenizer, asked)
        fed = cached.prepare(tokens)
        cache, history, reused = cached.cache, cached.ids, len(cached.ids)
    else:
        cache = make_cache(model, kv_from_args(args))
    if model.runtime.expert_cache is not None:
        model.runtime.expert_cache.reset_stats()
    if args.show_experts:
        log_of(model).reset()
    last = None
    for last in stream_generate(model, tokenizer, fed, max_tokens=args.max_tokens, sampling=sampling,
                                seed=agreed_seed(model, args.seed), stop=args.stop or (), cache=cache,
                                history=history, grammar=grammar):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        _report(model, last, f" (+{reused} from the prompt cache)" if args.prompt_cache is not None else "")
    if args.show_experts:
        table = heatmap(log_of(model), "experts used over this reply")
        if table is not None:
            Console(stderr=True).print(table)
    return 0


def _json_grammar(args: argparse.Namespace) -> Grammar | None:
    """`--json` or `--json-schema FILE` as a grammar (the file read and parsed, one-line errors)."""
    if args.json:
        return json_grammar(None, what="--json")
    if args.json_schema is None:
        return None
    path = Path(args.json_schema)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MixtralError(f"cannot read the JSON schema {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MixtralError(f"{path} is not JSON: {e}") from None
    return json_grammar(schema, what=f"the JSON schema in {path}")


def _note(line: str) -> None:
    print(line, file=sys.stderr)


def _continue_cached(args: argparse.Namespace, prompt: str, system: str | None) -> tuple[str, str | None]:
    """`generate --prompt-cache`: the cached text with the prompt after it (and its system text)."""
    single_process("generate --prompt-cache")
    saved = prompt_cache.peek(args.prompt_cache)
    if saved.get("mode") != ("raw" if args.raw else "chat"):
        raise MixtralError(f"{args.prompt_cache} was cached {'with' if args.raw else 'without'} the chat "
                           f"template: {'leave out' if args.raw else 'add'} --raw")
    return saved.get("text", "") + prompt, system if system is not None else saved.get("system")


def _report(model, last: GenerationResponse, from_cache: str) -> None:
    """`--verbose`: speed and memory, and the expert cache's figures when streaming."""
    _note(f"prompt: {last.prompt_tokens} tokens{from_cache}, {last.prompt_tps:.1f} tok/s | "
          f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s | "
          f"peak memory: {last.peak_memory_gb:.2f} GB | finish: {last.finish_reason}")
    if model.runtime.expert_cache is not None:
        _note(streaming_line(model))


def _encode(tokenizer, text: str, raw: bool, system: str | None) -> list[int]:
    """`text` as `generate` feeds it: plain (with BOS) when `raw`, else as one user message."""
    if raw:
        return tokenizer.encode(text)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    return tokenizer.apply_chat_template(messages)


def cmd_cache_prompt(args: argparse.Namespace) -> int:
    """Prefill a prompt once and save its KV state, for `generate --prompt-cache`."""
    single_process("cache-prompt")

    path = Path(args.prompt_file).expanduser()
    try:
        text = sys.stdin.read() if args.prompt_file == "-" else path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MixtralError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise MixtralError(f"cannot read {path}: {e.strerror or e}") from None
    if not text:
        raise MixtralError(f"{args.prompt_file} is empty: there is nothing to cache")
    if args.system and not args.chat:
        raise MixtralError("--system needs --chat (plain text has no system message)")
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise MixtralError(f"--out {out} is a folder; give the file to write")
    note = _note
    model, tokenizer = load_from_args(args, note, context=lambda t: len(_encode(t, text, not args.chat, args.system)))
    tokens = _encode(tokenizer, text, not args.chat, args.system)
    if args.chat:
        note(f"chat format: {tokenizer.chat_format.name}")
        if tokenizer.chat_format.kind == "none":
            note(BASE_MODEL_NOTE)
    limit = model.config.max_position_embeddings
    if len(tokens) >= limit:
        raise MixtralError(f"{args.prompt_file} takes {len(tokens)} tokens, which leaves no room to continue "
                           f"in the context of {limit} tokens; shorten it")
    cached = prompt_cache.PromptCache(model, kv_from_args(args, model.config.head_dim))
    start = time.perf_counter()
    with progress_bar("Prefilling", total=len(tokens)) as advance:
        prefill(model, tokens, cached.cache, progress=advance)
    cached.ids = tokens
    seconds = time.perf_counter() - start
    extra = {"mode": "chat" if args.chat else "raw", "text": text}
    if args.chat and args.system:
        extra["system"] = args.system
    prompt_cache.save(out, cached, tokenizer, extra)
    note(f"cached {len(tokens)} tokens ({gb(cached.nbytes)}, {cached.format.describe()} KV) in "
         f"{seconds:.1f} s ({len(tokens) / seconds:.1f} tok/s) to {out}")
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt, streamed to stdout",
                       description="Stream Mixtral's answer to one prompt to stdout.")
    add_model_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt; '-' or omitted reads stdin")
    p.add_argument("--system", default=None, help="system text (chat mode only)")
    p.add_argument("--raw", action="store_true", help="plain completion: no chat template")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="continue the text saved by cache-prompt: the prompt is appended to it, and the "
                        "cached keys/values are reused up to where the two encodings differ")
    p.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="answer with one JSON object (enforced token by token)")
    shape.add_argument("--json-schema", default=None, metavar="FILE",
                       help="answer with JSON that matches the JSON schema in FILE (enforced token by token)")
    p.add_argument("--verbose", "-v", action="store_true", help="print speed and memory (and streaming) to stderr")
    p.add_argument("--show-experts", action="store_true",
                   help="draw which experts each layer used (a heatmap on stderr)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)


def _cache_prompt_parser(sub) -> None:
    p = sub.add_parser("cache-prompt", help="prefill a prompt once and save its KV cache to a file",
                       description="Prefill a long prompt once and save its KV cache; "
                                   "`generate --prompt-cache FILE` then continues it without the prefill.")
    add_model_args(p)
    p.add_argument("--prompt-file", required=True, help="the text to cache ('-' reads stdin)")
    p.add_argument("--out", required=True, help="the cache file to write (replaced atomically)")
    p.add_argument("--chat", action="store_true",
                   help="cache the text as the start of a user message (for generate without --raw); "
                        "default: plain text, as generate --raw encodes it")
    p.add_argument("--system", default=None, help="system text (with --chat)")
    p.set_defaults(func=cmd_cache_prompt)


def _chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal",
                       description="Chat with Mixtral; /help lists the commands.")
    repl.add_arguments(p)
    p.set_defaults(func=repl.run)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)",
                       description="Serve Mixtral over the OpenAI HTTP API: /v1/chat/completions, "
                                   "/v1/completions, /v1/models, /health.")
    server.add_arguments(p)
    p.set_defaults(func=server.run)


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to MLX (optionally quantized)",
                       description="Convert a Hugging Face Mixtral checkpoint to MLX.")
    convert_cli.add_arguments(p)
    p.set_defaults(func=convert_cli.run)


def _version() -> str:
    """The installed package's version (pyproject.toml), with MLX's: what a bug report needs."""
    try:
        ours = package_version("mlx-mixtral")
    except PackageNotFoundError:  # run from a source tree that was never installed
        ours = "unknown (not installed)"
    try:
        return f"{ours} (mlx {package_version('mlx')})"
    except PackageNotFoundError:
        return ours


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-mixtral", description="Mixtral on your Mac with MLX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _chat_parser(sub)
    _cache_prompt_parser(sub)
    _serve_parser(sub)
    _convert_parser(sub)
    args = parser.parse_args(argv)
    def run() -> int:
        _join_the_run()  # inside run_main: a peer lost while joining is one line too
        return args.func(args)

    return run_main(run)


def _join_the_run() -> None:
    """Under mlx.launch every rank runs the command: join the others, end with them (in one line,
    never hanging on a dead peer), and let rank 0 alone write the answer."""
    end_with_peers()  # first: a peer that dies while this one joins is covered too
    group = world()
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")


if __name__ == "__main__":
    sys.exit(main())
