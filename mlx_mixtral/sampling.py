"""Turning next-token logits into a token: greedy, or temperature sampling with the usual filters.

Everything runs on the device as MLX ops on `[batch, vocab]` logits, so sampling never forces a
host synchronisation: the generator can dispatch step n+1 before it reads token n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .errors import MixtralError

# How many recent tokens the repetition penalty looks at (mlx-lm and llama.cpp use a window too;
# an unbounded one would make each step cost more as the reply grows).
REPETITION_WINDOW = 64


@dataclass
class SamplingParams:
    """The knobs users set; defaults are greedy decoding with no filters."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's: subtract count x frequency_penalty + presence_penalty (once it appeared) from the
    # logit of every token already generated in this reply.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def validate(self) -> None:
        checks = [
            (self.temp >= 0, f"temperature must be >= 0, got {self.temp}"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top-k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 <= self.min_p < 1, f"min-p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency penalty must be from -2 to 2, got {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence penalty must be from -2 to 2, got {self.presence_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise MixtralError(message)


def check_seed(seed: int) -> int:
    """MLX seeds are unsigned 64-bit; anything else would surface as a TypeError deep inside."""
    if not 0 <= seed < 2**64:
        raise MixtralError(f"seed must be from 0 to 2**64 - 1, got {seed}")
    return seed


def check_max_tokens(max_tokens: int) -> int:
    if max_tokens < 1:
        raise MixtralError(f"max_tokens must be at least 1, got {max_tokens}")
    return max_tokens


def make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array]:
    """`logits [B, V] -> tokens [B]` for these parameters."""
    params.validate()
    if params.temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32) / params.temp
        if params.top_k and params.top_k < logits.shape[-1]:
            # Everything below the k-th largest logit is out.
            kth = mx.partition(logits, -params.top_k, axis=-1)[..., -params.top_k, None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if params.min_p > 0:
            # Out: tokens less likely than min_p times the most likely one.
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            floor = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(params.min_p))
            logits = mx.where(logprobs < floor, -mx.inf, logits)
        if params.top_p < 1:
            # Keep the smallest set of most likely tokens whose mass reaches top_p.
            probs = mx.softmax(logits, axis=-1)
            order = mx.argsort(-probs, axis=-1)
            sorted_probs = mx.take_along_axis(probs, order, axis=-1)
            mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
            keep_sorted = mass_before < params.top_p
            keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
            logits = mx.where(keep, logits, -mx.inf)
        return mx.random.categorical(logits, axis=-1)

    return sample


def apply_openai_penalties(logits: mx.array, counts: mx.array | None, frequency: float, presence: float) -> mx.array:
    """OpenAI's frequency and presence penalties, from `counts` [V] of the tokens generated so far."""
    if counts is None or (frequency == 0 and presence == 0):
        return logits
    return logits - (counts * frequency + (counts > 0).astype(counts.dtype) * presence).astype(logits.dtype)


def apply_repetition_penalty(logits: mx.array, recent: mx.array | None, penalty: float) -> mx.array:
    """CTRL-style penalty (as Hugging Face): divide positive logits of recent tokens, multiply negative ones."""
    if penalty == 1.0 or recent is None or recent.size == 0:
        return logits
    picked = logits[:, recent]
    picked = mx.where(picked > 0, picked / penalty, picked * penalty)
    logits[:, recent] = picked
    return logits
