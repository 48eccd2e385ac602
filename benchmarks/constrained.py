"""What constrained decoding costs per token: the same model and prompt generating freely, held
to a JSON schema, and held to a tool-call grammar, interleaved trial by trial; median ms per
generated token of each, their ratio, and the grammar's own time per token (mask + advance).

    python -m benchmarks.constrained --synthetic small --bits 4 --tokens 32 --trials 3

The tokenizer is Mixtral-8x7B's own (mistral-common ships it), so masks are over the real
32000-piece vocabulary. The schemas are long enough that no reply ends before `--tokens`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mistral_common

from mlx_mixtral.constrain import Constraint, check, json_grammar, tool_grammar
from mlx_mixtral.generate import stream_generate
from mlx_mixtral.sampling import SamplingParams
from mlx_mixtral.tokenizer import Tokenizer, tool_syntax

from . import synthetic

V1 = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
ROWS = {"type": "array", "minItems": 64, "maxItems": 64, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "name": {"type": "string", "maxLength": 12}},
    "required": ["id", "name"], "additionalProperties": False}}
TOOLS = [{"type": "function", "function": {"name": "add_rows", "parameters": {
    "type": "object", "properties": {"rows": ROWS}, "required": ["rows"], "additionalProperties": False}}}]


def _per_token(model, tokenizer, prompt, tokens: int, seed: int, grammar=None) -> float:
    start = n = None
    for n, _ in enumerate(stream_generate(model, tokenizer, prompt, max_tokens=tokens + 1, grammar=grammar,
                                          sampling=SamplingParams(temp=1.0), seed=seed, stop_on_eos=False)):
        if n == 0:
            start = time.perf_counter()  # after the first token: prefill is the same for all
    return (time.perf_counter() - start) / n * 1e3


def _grammar_ms(grammar, tokenizer, rows: int, tokens: list[int]) -> float:
    """The grammar's own time per token: a mask, then taking the token (no model)."""
    constraint = Constraint(grammar, tokenizer, rows)
    start = time.perf_counter()
    for token in tokens:
        constraint.allowed()
        constraint.advance(token)
    return (time.perf_counter() - start) / len(tokens) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", default="small", choices=sorted(synthetic.SHAPES))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    config = synthetic.shape_config(args.synthetic, args.bits)
    model = synthetic.fill_random(synthetic.skeleton(config, synthetic.float_dtype()))
    tokenizer = Tokenizer(V1)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "List 64 rows as JSON."}])
    grammars = {"json schema": json_grammar(ROWS), "tool call": tool_grammar(tool_syntax(tokenizer.chat_format),
                                                                            TOOLS, required=True)}
    for grammar in grammars.values():
        check(grammar, tokenizer)
    samples: dict[str, list[float]] = {"free": [], **{k: [] for k in grammars}}
    for trial in range(args.trials + 1):  # the first is a warm-up
        for name in samples:
            ms = _per_token(model, tokenizer, prompt, args.tokens, trial, grammars.get(name))
            if trial:
                samples[name].append(ms)
    out = {"model": f"synthetic {args.synthetic} {args.bits}-bit", "tokens": args.tokens, "trials": args.trials}
    free = statistics.median(samples["free"])
    print(f"{out['model']}, {args.tokens} tokens x {args.trials} trials (median ms/token)")
    print(f"  free           {free:8.2f}")
    rows = [{"id": 7, "name": "x"}] * 64
    texts = {"json schema": json.dumps(rows, separators=(",", ":")),
             "tool call": "[TOOL_CALLS] " + json.dumps([{"name": "add_rows", "arguments": {"rows": rows}}])}
    for name, grammar in grammars.items():
        own = _grammar_ms(grammar, tokenizer, config.vocab_size, tokenizer.encode_text(texts[name])[:args.tokens])
        median = statistics.median(samples[name])
        ratios = [c / f for c, f in zip(samples[name], samples["free"])]
        out[name] = {"ms_per_token": median, "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                     "grammar_ms_per_token": own}
        print(f"  {name:14} {median:8.2f}  x{statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f}), grammar alone {own:.3f} ms/token")
    out["free"] = {"ms_per_token": free}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
