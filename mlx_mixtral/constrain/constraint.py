"""One reply held to a grammar: which tokens may come next, and the token that came.

The sampler calls `allowed()` before each token and `advance(token)` with each token sampled
(see `generate.PenalizedSampler`). When the grammar is complete only end-of-sequence is allowed,
so a constrained reply ends itself ("stop") as soon as it is whole.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import MixtralError
from ..tokenizer import Tokenizer
from .grammars import Grammar, one_line
from .vocabulary import llg_tokenizer


class Constraint:
    """An llguidance matcher for one reply, over a model's `rows` logits."""

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, rows: int) -> None:
        import llguidance  # on first use (see vocabulary)

        self.grammar = grammar
        self._matcher = llguidance.LLMatcher(llg_tokenizer(tokenizer),
                                             llguidance.LLMatcher.grammar_from_lark(grammar.lark), log_level=0)
        if self._matcher.is_error():
            raise MixtralError(f"{grammar.what} cannot be enforced: {one_line(self._matcher.get_error())}")
        self._rows = rows
        self._vocab = tokenizer.vocab_size
        self._end = np.zeros(rows, dtype=bool)
        self._end[[t for t in tokenizer.eos_token_ids if 0 <= t < rows]] = True

    @property
    def done(self) -> bool:
        """The grammar is complete (and only end-of-sequence may follow)."""
        return self._matcher.is_stopped() or self._matcher.is_accepting()

    def allowed(self) -> mx.array:
        """The tokens that may come next, as a bool mask over the model's rows (ids past the
        tokenizer's vocabulary never)."""
        if self._matcher.is_stopped():
            return mx.array(self._end)
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        bits = np.unpackbits(words, bitorder="little")[: self._vocab].astype(bool)
        if self._rows > self._vocab:
            bits = np.concatenate([bits, np.zeros(self._rows - self._vocab, dtype=bool)])
        return mx.array(bits[: self._rows])

    def advance(self, token: int) -> None:
        """Take the token sampled (from the allowed ones)."""
        if self._matcher.is_stopped():
            return  # end-of-sequence was taken; the reply is over
        if not self._matcher.consume_token(int(token)):
            raise MixtralError(f"token {token} broke the grammar for {self.grammar.what}: "
                               f"{one_line(self._matcher.get_error())}")
