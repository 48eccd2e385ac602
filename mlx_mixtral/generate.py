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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import make_cache
from .constrain import Constraint, Grammar
from .device import fused_attention, wired_limit
from .errors import MixtralError
from .sampling import (
    REPETITION_WINDOW,
    SamplingParams,
    apply_openai_penalties,
    apply_repetition_penalty,
    check_max_tokens,
    check_seed,
    make_sampler,
)
from .tokenizer import Tokenizer

PREFILL_STEP = 512  # most tokens per prefill chunk
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
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
        model.model(prompt[:, done:done + n], cache, cache_only=True)
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
    # With logprobs: log-probability of `token` and the best alternatives (id, log-probability)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    stop_string: str | None = None  # the stop string that ended generation, if one did


def _stop_split(text: str, stops: Sequence[str]) -> tuple[str, str, str | None]:
    """Split pending text into (safe to emit, held back, the stop string found or None).

    Text is held back while its tail could still grow into a stop string; at a stop string the
    text before it is emitted and generation stops (at the earliest, the longest one there).
    """
    if not stops:
        return text, "", None
    found = [(i, -len(s), s) for s in stops if (i := text.find(s)) >= 0]
    if found:
        first, _, stop = min(found)
        return text[:first], "", stop
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold :], None


class PenalizedSampler:
    """The sampler, with what it applies to the logits first: the repetition penalty (over a
    window of recent ids, prompt and generated), OpenAI's penalties, and a grammar's mask. With
    `logprobs` (a count of alternatives, 0 for none) it also keeps, per token, the log-softmax of
    the logits it sampled from (after penalties and mask, before temperature and filters)."""

    def __init__(self, sampling: SamplingParams, recent: Sequence[int], constraint: Constraint | None = None,
                 logprobs: int | None = None):
        self.sampling = sampling
        self._sample = make_sampler(sampling)
        self._recent = mx.array(list(recent)[-REPETITION_WINDOW:])
        self._counts: mx.array | None = None  # generated tokens per id (OpenAI's penalties)
        self._openai = sampling.frequency_penalty != 0 or sampling.presence_penalty != 0
        self._constraint = constraint
        self._last: mx.array | None = None  # the token sampled last (the constraint takes it next call)
        self._logprobs = logprobs
        self._kept: deque[tuple[mx.array, ...]] = deque()  # per sampled token, oldest first

    def __call__(self, logits: mx.array) -> mx.array:
        """The next token (shape [1]) from a forward pass's logits [1, L, vocab] (last position)."""
        s = self.sampling
        logits = apply_repetition_penalty(logits[:, -1, :], self._recent, s.repetition_penalty)
        if self._openai and self._counts is None:
            self._counts = mx.zeros((logits.shape[-1],), mx.float32)
        logits = apply_openai_penalties(logits, self._counts, s.frequency_penalty, s.presence_penalty)
        if self._constraint is not None:
            mx.async_eval(logits)  # the forward pass runs while the grammar works out the mask
            if self._last is not None:
                self._constraint.advance(self._last.item())
            logits = mx.where(self._constraint.allowed(), logits, -mx.inf)
        y = self._sample(logits)
        if self._logprobs is not None:
            self._kept.append(_log_softmax_at(logits, y, self._logprobs))
            mx.async_eval(*self._kept[-1])
        if s.repetition_penalty != 1.0:
            self._recent = mx.concatenate([self._recent, y])[-REPETITION_WINDOW:]
        if self._openai:
            self._counts = self._counts.at[y].add(1.0)
        self._last = y
        return y

    def logprobs(self) -> tuple[float, list[tuple[int, float]]] | None:
        """The oldest sampled token's log-probability and its `logprobs` best alternatives (id,
        log-probability; most likely first), or None without `logprobs`."""
        if self._logprobs is None:
            return None
        chosen, ids, values = self._kept.popleft()
        top = sorted(((i, v) for i, v in zip(ids.tolist(), values.tolist()) if v != -math.inf),
                     key=lambda pair: -pair[1])
        return chosen.item(), top


def _log_softmax_at(logits: mx.array, token: mx.array, k: int) -> tuple[mx.array, ...]:
    """log-softmax(logits) at `token`, and the ids and values of its `k` largest entries."""
    logprobs = logits[0].astype(mx.float32)
    logprobs = logprobs - mx.logsumexp(logprobs)
    chosen = logprobs[token[0]]
    if k == 0:
        return chosen, mx.array([], mx.int32), mx.array([], mx.float32)
    top = mx.argpartition(-logprobs, k - 1)[:k]
    return chosen, top, logprobs[top]


def generate_step(model, tokens: Sequence[int], cache: list, sample: Callable[[mx.array], mx.array],
                  max_tokens: int, prefill_step: int = PREFILL_STEP) -> Iterator[int]:
    """The token loop: prefill `tokens` into `cache`, then yield up to `max_tokens` new ids.

    Every prompt token but the last only has to leave its keys and values in the cache (`prefill`);
    the last runs as an ordinary decode step. Double-buffered: step n+1 is dispatched before token
    n is read back, so the device never waits on the host. Stopping early leaves at most that one
    extra step in the cache.
    """
    prefill(model, tokens[:-1], cache, prefill_step)
    y = sample(model(mx.array(list(tokens[-1:]))[None], cache=cache))
    mx.async_eval(y)
    for n in range(max_tokens):
        if n + 1 < max_tokens:  # dispatch step n+1 before waiting for token n
            next_y = sample(model(y[:, None], cache=cache))
            mx.async_eval(next_y)
        yield y.item()
        if n + 1 < max_tokens:
            y = next_y


class _TextStream:
    """Generated ids -> text: detokenizing, holding back what may grow into a stop string, EOS."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], stop_on_eos: bool, shown: Sequence[int] = ()):
        self._eos = tokenizer.eos_token_ids if stop_on_eos else set()
        self._detok = tokenizer.detokenizer(shown)
        self._stop = stop
        self._pending = ""
        self.tokens: list[int] = []  # generated ids, EOS excluded
        self.stopped_by: str | None = None  # the stop string that ended the text

    def add(self, token: int, last: bool) -> tuple[str, str | None]:
        """The text `token` makes final, and the finish reason if generation ends here."""
        finish = None
        if token in self._eos:
            finish, piece = "stop", self._detok.finalize()
        else:
            self.tokens.append(token)
            piece = self._detok.add_token(token)
            if last:
                finish = "length"
                piece += self._detok.finalize()
        emit, self._pending, self.stopped_by = _stop_split(self._pending + piece, self._stop)
        if self.stopped_by is not None:
            return emit, "stop"
        if finish is not None:
            emit, self._pending = emit + self._pending, ""
        return emit, finish


def _checked_prompt(model, tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens:
        raise MixtralError("the prompt is empty: give at least one token")
    rows = model.config.vocab_size
    bad = next((t for t in tokens if not 0 <= t < rows), None)
    if bad is not None:
        raise MixtralError(f"the prompt holds token id {bad}, which the model's {rows}-row vocabulary does not have: "
                           "the tokenizer files do not belong to this model")
    return tokens


def _room(model, cache: list, prompt: int, max_tokens: int, max_context: int | None) -> int:
    """`max_tokens`, cut to what the context leaves after the cache and the prompt (or an error)."""
    limit = model.config.max_position_embeddings
    if max_context:
        limit = min(limit, max_context)
    cached = cache[0].offset
    if cached + prompt >= limit:
        held = f" plus {cached} already in context" if cached else ""
        raise MixtralError(
            f"the prompt has {prompt} tokens{held}, which does not fit the context of "
            f"{limit} tokens with room to answer; shorten it"
        )
    return min(max_tokens, limit - cached - prompt)


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
    grammar: Grammar | None = None,
    logprobs: int | None = None,
    shown: Sequence[int] = (),
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, encoded with BOS; or token ids, used as given): the token
    loop (`generate_step`) with text, stop strings and speed figures on top.

    `max_context` caps the context below the model's `max_position_embeddings`. `history`: the
    ids `cache` already holds, if known; only the repetition penalty reads them, so that its
    window covers the context before this call too (a chat turn feeds only its new tokens).
    `grammar` holds the reply to it (`constrain`: JSON, a schema, tool calls); `logprobs` (a count
    of alternatives, 0 to 20) fills each response's `logprob` and `top_logprobs`; the control ids
    in `shown` appear in the text as their names.
    """
    sampling = sampling or SamplingParams()
    if seed is not None:
        mx.random.seed(check_seed(seed))
    tokens = _checked_prompt(model, tokenizer, prompt)
    check_max_tokens(max_tokens)
    if cache is None:
        cache = make_cache(model)
    max_tokens = _room(model, cache, len(tokens), max_tokens, max_context)
    constraint = Constraint(grammar, tokenizer, model.config.vocab_size) if grammar is not None else None
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise MixtralError(f"logprobs must be from 0 to {MAX_TOP_LOGPROBS} alternatives, got {logprobs}")
    sample = PenalizedSampler(sampling, [*history[-REPETITION_WINDOW:], *tokens], constraint, logprobs)
    text = _TextStream(tokenizer, stop, stop_on_eos, shown)
    with wired_limit():
        mx.reset_peak_memory()
        start = time.perf_counter()
        gen_start = prompt_tps = 0.0
        for n, token in enumerate(generate_step(model, tokens, cache, sample, max_tokens, prefill_step), 1):
            if n == 1:
                gen_start = time.perf_counter()
                prompt_tps = len(tokens) / (gen_start - start)
            emit, finish = text.add(token, last=n >= max_tokens)
            elapsed = time.perf_counter() - gen_start
            chosen, top = sample.logprobs() or (None, None)
            yield GenerationResponse(
                text=emit, token=token, prompt_tokens=len(tokens), prompt_tps=prompt_tps,
                generation_tokens=n, generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
                peak_memory_gb=mx.get_peak_memory() / 1e9, finish_reason=finish, tokens=text.tokens,
                logprob=chosen, top_logprobs=top, stop_string=text.stopped_by,
            )
            if finish is not None:
                return


def generate(model, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole completion as one string (see `stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
