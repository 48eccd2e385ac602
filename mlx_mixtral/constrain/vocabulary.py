"""Our tokenizer as llguidance sees it: every id's bytes, which ids are special, how text encodes.

llguidance matches grammars against bytes, so it needs each id's bytes (`Tokenizer.token_bytes`);
control and special added tokens are marked with a leading 0xFF byte, as llguidance's own
adapters mark them, so no text can produce them and a grammar names them by id (`<[5]>`).
Building it walks the vocabulary once (~60 ms for 32k ids), so it is built once per tokenizer.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ..tokenizer import Tokenizer

if TYPE_CHECKING:
    import llguidance

SPECIAL = b"\xff"


class _Vocabulary:
    """The object llguidance.TokenizerWrapper reads (its attribute names are llguidance's)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for token in range(tokenizer.vocab_size):
            text = tokenizer.token_bytes(token)
            if tokenizer.is_control(token) or (token < tokenizer.sp_vocab_size and tokenizer._sp.IsUnknown(token)):
                text = SPECIAL + text
                self.special_token_ids.append(token)
            self.tokens.append(text)
        self._newline = tokenizer.encode_text("\n")

    def __call__(self, text: bytes | str) -> list[int]:
        """Ids of `text` in the middle of a reply (no "▁" put in front, as there is no start)."""
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        ids = self._tokenizer.encode_text("\n" + text)
        n = len(self._newline)
        return ids[n:] if ids[:n] == self._newline else ids


@functools.lru_cache(maxsize=4)
def llg_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for `tokenizer` (cached: one per loaded tokenizer)."""
    # llguidance is imported on first use: its import costs ~60 ms that plain generation need not pay.
    import llguidance

    eos = sorted(tokenizer.eos_token_ids)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)), n_vocab=tokenizer.vocab_size,
                                  eos_token=eos if len(eos) > 1 else eos[0])
