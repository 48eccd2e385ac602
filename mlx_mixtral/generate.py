"""Streaming generation: prefill the prompt in chunks, then decode token by token.

The decode loop is double-buffered: it dispatches the computation of token n+1 (`mx.async_eval`)
before it reads token n back to the host, so the device never idles while Python detokenizes and
prints. Stop conditions: an EOS token, `max_tokens`, a stop string, or the context limit.

Cache contract: `stream_generate` appends to whatever `cache` already holds, so a caller that keeps
a cache (the chat REPL) passes only the new tokens. Afterwards the cache holds the prompt and the
generated tokens, possibly except the last one (check `cache[0].offset`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import make_cache
from .device import fused_attention, wired_limit
from .errors import MixtralError
from .sampling import (REPETITION_WINDOW, SamplingParams, apply_repetition_penalty, check_max_tokens,
                       check_seed, make_sampler)
from .tokenizer import Tokenizer

PREFILL_STEP = 512  # most tokens per prefill chunk
# Most bytes a prefill chunk's attention scores (and their softmax) may take where they are
# materialised (device.fused_attention): deep in a long prompt, chunks shrink to stay within it.
SCORES_BUDGET = 512 * 2**20
MIN_PREFILL_CHUNK = 32  # below this, re-reading the weights per chunk costs more than it saves


def prefill_chunk(config, cache, step: int = PREFILL_STEP, budget: int = SCORES_BUDGET) -> int:
    """Tokens to feed in the next prefill chunk, at most `step`.

    Where attention scores are materialised, a chunk of L queries over the K keys already held
    takes 2 x heads x L x (K + L) x 4 bytes (scores and probabilities, float32 at most), so L is
    the largest that fits `budget` (never below MIN_PREFILL_CHUNK).
    """
    if fused_attention(cache.format.bits is not None):
        return step
    held = cache.offset - cache.start
    per_pair = 2 * config.num_attention_heads * 4
    # largest L with L * (held + L) * per_pair <= budget
    fit = int((-held + math.sqrt(held * held + 4 * budget / per_pair)) / 2)
    return min(step, max(MIN_PREFILL_CHUNK, fit))


def prefill(model, tokens: Sequence[int], cache: list, step: int = PREFILL_STEP,
            progress: Callable[[int], None] | None = None) -> None:
    """Feed `tokens` into `cache`, computing only what the cache keeps: every layer's keys and
    values, never the lm_head (nor the last layer's MoE, whose output only the lm_head reads).
    `progress(n)` is told each chunk's size."""
    prompt = mx.array(list(tokens))[None]
    done = 0
    while done < prompt.shape[1]:
        n = min(prefill_chunk(model.config, cache[0], step), prompt.shape[1] - done)
        model.model(prompt[:, done:done + n], cache)
        mx.eval([c.state for c in cache])
        done += n
        if progress is not None:
            progress(n)


@dataclass
class GenerationResponse:
    """One streamed step: the text this token completed, and running statistics."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None while running
    tokens: list[int] = field(default_factory=list, repr=False)  # every token generated so far


def _stop_split(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split pending text into (safe to emit, held back, stopped).

    Text is held back while its tail could still grow into a stop string; at a stop string the
    text before it is emitted and generation stops.
    """
    if not stops:
        return text, "", False
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if first >= 0:
        return text[:first], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


def stream_generate(
    model,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    cache: list | None = None,
    max_context: int | None = None,
    stop_on_eos: bool = True,
    prefill_step: int = PREFILL_STEP,
    history: Sequence[int] = (),
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, encoded with BOS; or token ids, used as given).

    `max_context` caps the context below the model's `max_position_embeddings`. `history`: the
    ids `cache` already holds, if known; only the repetition penalty reads them, so that its
    window covers the context before this call too (a chat turn feeds only its new tokens).
    """
    sampling = sampling or SamplingParams()
    sampler = make_sampler(sampling)
    if seed is not None:
        mx.random.seed(check_seed(seed))
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens:
        raise MixtralError("the prompt is empty: give at least one token")
    rows = model.config.vocab_size
    if not all(0 <= t < rows for t in tokens):
        bad = next(t for t in tokens if not 0 <= t < rows)
        raise MixtralError(f"the prompt holds token id {bad}, which the model's {rows}-row vocabulary does not have: "
                           "the tokenizer files do not belong to this model")
    check_max_tokens(max_tokens)
    if cache is None:
        cache = make_cache(model)
    limit = model.config.max_position_embeddings
    if max_context:
        limit = min(limit, max_context)
    cached = cache[0].offset
    if cached + len(tokens) >= limit:
        held = f" plus {cached} already in context" if cached else ""
        raise MixtralError(
            f"the prompt has {len(tokens)} tokens{held}, which does not fit the context of "
            f"{limit} tokens with room to answer; shorten it"
        )
    max_tokens = min(max_tokens, limit - cached - len(tokens))
    recent = mx.array([*history[-REPETITION_WINDOW:], *tokens][-REPETITION_WINDOW:])

    def next_token(logits: mx.array) -> mx.array:
        nonlocal recent
        logits = apply_repetition_penalty(logits[:, -1, :], recent, sampling.repetition_penalty)
        y = sampler(logits)
        if sampling.repetition_penalty != 1.0:
            recent = mx.concatenate([recent, y])[-REPETITION_WINDOW:]
        return y

    with wired_limit():
        mx.reset_peak_memory()
        start = time.perf_counter()
        # Every prompt token but the last only has to leave its keys/values in the cache; the
        # last then runs as an ordinary decode step.
        prefill(model, tokens[:-1], cache, prefill_step)
        y = next_token(model(mx.array(tokens[-1:])[None], cache=cache))
        mx.async_eval(y)

        detok = tokenizer.detokenizer()
        generated: list[int] = []
        pending = ""
        prompt_tps = gen_start = 0.0
        n = 0
        while True:
            if n + 1 < max_tokens:  # dispatch step n+1 before waiting for token n
                next_y = next_token(model(y[:, None], cache=cache))
                mx.async_eval(next_y)
            token = y.item()
            if n == 0:
                gen_start = time.perf_counter()
                prompt_tps = len(tokens) / (gen_start - start)
            n += 1
            finish = None
            if stop_on_eos and token in tokenizer.eos_token_ids:
                finish, piece = "stop", detok.finalize()
            else:
                generated.append(token)
                piece = detok.add_token(token)
                if n >= max_tokens:
                    finish = "length"
                    piece += detok.finalize()
            emit, pending, stopped = _stop_split(pending + piece, stop)
            if stopped:
                finish = "stop"
            elif finish is not None:
                emit, pending = emit + pending, ""
            elapsed = time.perf_counter() - gen_start
            yield GenerationResponse(
                text=emit,
                token=token,
                prompt_tokens=len(tokens),
                prompt_tps=prompt_tps,
                generation_tokens=n,
                generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
                peak_memory_gb=mx.get_peak_memory() / 1e9,
                finish_reason=finish,
                tokens=generated,
            )
            if finish is not None:
                return
            y = next_y


def generate(model, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
