"""Flags and error handling shared by every front door (`generate`, `chat`, `cache-prompt`, `serve`, `convert`).

One module both the CLI and the REPL import, so neither imports the other. Every user-fixable
error ends as one line on stderr and a non-zero exit status; set MLX_MIXTRAL_DEBUG=1 to see the
traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .distributed.group import peer_lost, world
from .errors import MixtralError
from .experts.budget import AUTO
from .experts.expert_cache import POLICIES
from .experts.low_bit import MISS_BITS
from .kv_format import DEFAULT_KV_GROUP_SIZE, KV_BITS, KV_GROUP_SIZES, KVFormat, kv_format
from .loading import load_model, resolve, would_fit
from .sampling import SamplingParams, check_max_tokens, check_seed
from .tokenizer import Tokenizer
from .units import gb, parse_size

DEFAULT_MODEL = "mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Which model, how much memory it may take, how its KV cache is stored (`generate`, `chat`, ...)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="model folder or Hugging Face repo id (default: %(default)s)")
    parser.add_argument("--max-memory", default=None, metavar="SIZE|auto",
                        help="keep the weights within SIZE (e.g. 12GB), streaming experts from disk; "
                             "auto: what this machine offers. Default: fully resident if the model "
                             "fits, else auto")
    parser.add_argument("--cache-policy", choices=POLICIES, default=None,
                        help="which streamed expert to evict: the least often (lfu) or least recently (lru) "
                             "used, or the one whose layer comes round last (cyclic) (default: cyclic on a GPU, "
                             "as on a Mac, where reads set the pace; lfu on the CPU backend; README)")
    parser.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                        help="streaming: read the next layer's likely experts ahead (default: off on a GPU, "
                             "as on a Mac, where wrong guesses cost reads; on for the CPU backend)")
    parser.add_argument("--miss-bits", type=int, choices=MISS_BITS, default=None,
                        help="streaming: read the converter's 2- or 3-bit copy of a missing expert that a token "
                             "weights little (convert with --miss-bits); fewer bytes per token, output no "
                             "longer exactly the model's")
    parser.add_argument("--expert-skip", type=float, default=0.0, metavar="FRACTION",
                        help="leave out a token's second expert when the router weighs it at most FRACTION of the "
                             "first: fewer experts computed and read (0: off, the default; 1: top-1 routing); "
                             "output no longer exactly the model's")
    add_kv_args(parser)


def add_kv_args(parser: argparse.ArgumentParser) -> None:
    """How the KV cache stores keys and values (`generate`, `chat`, `cache-prompt`, `serve`)."""
    parser.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None,
                        help="store the KV cache quantized to this many bits (default: float); "
                             "8 takes 53%% of a float16 cache, 4 takes 28%%")
    parser.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=None,
                        help=f"values per quantization group of --kv-bits (default: {DEFAULT_KV_GROUP_SIZE})")


def kv_from_args(args: argparse.Namespace, head_dim: int | None = None) -> KVFormat:
    """The KV format the flags ask for (`kv_format.FLOAT` without --kv-bits)."""
    return kv_format(args.kv_bits, args.kv_group_size, head_dim)


def load_from_args(args: argparse.Namespace, note: Callable[[str], None],
                   context: Callable[[Tokenizer], int | None] = lambda _: None):
    """Load `--model` as the flags say: resident when it fits (or `--max-memory` is absent and it
    fits), else streaming within `--max-memory` or `auto`, saying so in one line."""
    max_memory = args.max_memory
    if max_memory is not None and max_memory.strip().lower() != AUTO:
        parse_size(max_memory)  # a typo fails before a download
    folder = resolve(args.model)
    tokenizer = Tokenizer.from_folder(folder)
    group = world()
    if group.size() > 1:  # started by mlx.launch: this process holds its 1/N of every layer
        model = load_model(folder, progress=group.rank() == 0, max_memory=max_memory, kv=kv_from_args(args),
                           expert_skip=args.expert_skip)
        if group.rank() == 0:
            note(f"tensor parallel over {group.size()} processes: each holds "
                 f"{model.config.num_attention_heads} of {model.config.num_attention_heads * group.size()} "
                 f"attention heads and 1/{group.size()} of every expert")
        return model, tokenizer
    tokens = context(tokenizer)
    kv = kv_from_args(args)
    if max_memory is None:
        fits, why = would_fit(folder, tokens, kv)
        if not fits:
            note(f"{why}: streaming experts from disk with --max-memory auto")
            max_memory = AUTO
    if args.miss_bits is not None and max_memory is None:
        raise MixtralError("--miss-bits reads a low-bit copy of experts that are not in memory: it needs --max-memory")
    model = load_model(folder, progress=True, max_memory=max_memory, policy=args.cache_policy,
                       prefetch=args.prefetch, context=tokens, kv=kv, miss_bits=args.miss_bits,
                       expert_skip=args.expert_skip)
    cache = model.runtime.expert_cache
    if cache is not None:
        for line in cache.plan.notes:
            note(line)
        low = f"; misses a token weights little read the {args.miss_bits}-bit copy" if cache.low_bit else ""
        note(f"streaming experts within {gb(cache.plan.budget)}: {cache.plan.cached_experts} of "
             f"{cache.plan.total_experts} experts fit in memory ({cache.policy}){low}")
    return model, tokenizer


def add_sampling_args(parser: argparse.ArgumentParser, temp: float = 0.0, max_tokens: int | None = 512) -> None:
    """Sampling flags shared by `generate`, `chat` and `serve` (whose replies run to the end of the
    context unless --max-tokens caps them)."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens,
                        help="most tokens to generate (default: %s)" % (max_tokens or "until the model stops"))
    parser.add_argument("--temp", type=float, default=temp, help="sampling temperature; 0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s, off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0, off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (default: 0, off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise recent tokens (default: 1.0, off)")
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="OpenAI's: lower a token's logit by this much per time it was generated (-2 to 2; default: 0)")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="OpenAI's: lower a generated token's logit by this much once (-2 to 2; default: 0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable sampling")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """Validated sampling parameters, so a bad flag fails before a multi-GB load."""
    params = SamplingParams(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty)
    params.validate()
    if args.seed is not None:
        check_seed(args.seed)
    if args.max_tokens is not None:
        check_max_tokens(args.max_tokens)
    return params


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
        if peer_lost(e):
            print(f"error: another process of this run died or lost its connection ({str(e).splitlines()[0]}); "
                  "any reply is incomplete", file=sys.stderr)
            return 1
        if os.environ.get("MLX_MIXTRAL_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (set MLX_MIXTRAL_DEBUG=1 for details)",
              file=sys.stderr)
        return 1
