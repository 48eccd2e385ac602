"""The server's prompt cache: the KV state of several recent conversations, within a byte budget.

A chat client re-sends the whole conversation every turn, so the request for turn N starts with
everything turn N-1 held (its prompt and reply). `take` finds the cached conversation sharing the
longest prefix with a new prompt: if the prompt continues all of it, the request takes that cache
over; if they share only a part (a common system prompt, an edited or regenerated turn), the
shared part is copied into a new cache and the old one stays for whoever continues it. After the
request, `put` keeps its cache as the most recently used, and the least recently used are evicted
until the pool fits its budget. One request at a time uses the pool (the scheduler's worker).
"""

from __future__ import annotations

from ..kv_format import FLOAT, KVFormat
from ..prompt_cache import PromptCache, common_prefix_length


class PromptPool:
    """Cached conversations (most recently used last), at most `budget` bytes of KV buffers."""

    def __init__(self, model, fmt: KVFormat = FLOAT, budget: int = 0) -> None:
        self.model, self.format, self.budget = model, fmt, budget
        self.entries: list[PromptCache] = []

    def take(self, prompt: list[int]) -> PromptCache:
        """A cache for `prompt`, holding the longest prefix of it that any cached conversation
        holds (the caller feeds the rest: `PromptCache.prepare`)."""
        usable = len(prompt) - 1  # the last prompt id is always fed: its logits give the next token
        best, shared = None, 0
        for entry in self.entries:
            n = min(common_prefix_length(entry.ids, prompt), usable)
            if n > shared:
                best, shared = entry, n
        if best is None:
            return PromptCache(self.model, self.format)
        if shared == len(best.ids):  # the prompt continues this conversation: take it over
            self.entries.remove(best)
            return best
        return best.fork(shared)

    def put(self, cache: PromptCache) -> None:
        """Keep `cache` as the most recently used, dropping any entry it extends (whatever would
        match that one matches this one at least as far); evict the least recently used beyond
        the budget."""
        if cache.ids:
            n = len(cache.ids)
            self.entries = [e for e in self.entries if not (len(e.ids) <= n and cache.ids[:len(e.ids)] == e.ids)]
            self.entries.append(cache)
        while self.entries and self.nbytes > self.budget:
            self.entries.pop(0)

    @property
    def nbytes(self) -> int:
        return sum(e.allocated for e in self.entries)
