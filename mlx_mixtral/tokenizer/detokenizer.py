"""Streaming detokenization: text out as each generated id comes in, equal in total to `decode`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


class StreamingDetokenizer:
    """Turns generated ids into text as they arrive, equal in total to `Tokenizer.decode`.

    How sentencepiece decodes (and so what must be reproduced): byte pieces `<0xNN>` collect into
    a run that is converted to UTF-8 when a non-byte piece comes or the ids end, scanning greedily:
    a lead byte needs 2, 3 or 4 bytes (by its high bits), anything else needs 1; a complete valid
    sequence becomes its character, otherwise one byte becomes U+FFFD and the scan moves on by one.
    Every other piece is independent of its neighbours, except that the leading "▁" of the first
    non-control piece is dropped (so whether anything but control ids came before matters).

    So text is final, and is emitted, at these boundaries: a non-byte piece is emitted at once
    (with any bytes pending before it); a pending byte run is emitted as soon as it holds the
    bytes its first byte needs, or when the next byte is not a continuation byte (then the
    pending lead is invalid with or without it). At most 3 bytes are ever pending. Each emission
    decodes only this small window with sentencepiece itself; once the text has started, a fixed
    context piece goes in front (and its text is cut off again) so the first-piece rule does not
    apply. Every id is decoded once, so a whole sequence costs linear time.
    """

    def __init__(self, tokenizer: Tokenizer, shown: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._shown = {int(t): tokenizer.token_bytes(int(t)).decode() for t in shown}
        self._sp = tokenizer._sp
        self._tokens: list[int] = []
        self._pending: list[int] = []  # byte ids whose text is not final yet
        self._needed = 0  # how many bytes the first pending byte needs
        self._started = False  # whether a non-control id has been emitted
        self._chunks: list[str] = []

    def add_token(self, token: int) -> str:
        """Add one id; return the text it made final (may be "", e.g. half of a CJK character)."""
        token = int(token)
        self._tokens.append(token)
        own = self._shown.get(token)
        if own is None:
            own = self._tokenizer.id_to_text(token)
        if own is not None:
            text = self._emit()
            self._chunks.append(own)
            self._started = self._started or bool(own)
            return text + own
        if not self._sp.IsByte(token):
            return self._emit(token)
        byte = int(self._sp.id_to_piece(token)[3:5], 16)
        text = self._emit() if self._pending and not 0x80 <= byte <= 0xBF else ""
        if not self._pending:
            self._needed = _utf8_bytes_needed(byte)
        self._pending.append(token)
        if len(self._pending) >= self._needed:
            text += self._emit()
        return text

    def finalize(self) -> str:
        """Flush what is pending at the end of the sequence (broken UTF-8 becomes U+FFFD, as in decode)."""
        return self._emit()

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    @property
    def tokens(self) -> list[int]:
        """All ids added so far (the internal list: do not modify it)."""
        return self._tokens

    def _emit(self, token: int | None = None) -> str:
        """Decode the pending bytes (plus `token`), record and return the text; empty the window."""
        window = self._pending if token is None else [*self._pending, token]
        self._pending = []
        if not window:
            return ""
        if self._started:
            context = self._tokenizer._context_text
            text = self._sp.decode([self._tokenizer._context_id, *window])[len(context) :]
        else:
            text = self._sp.decode(window)
            self._started = not all(self._sp.IsControl(t) for t in window)
        self._chunks.append(text)
        return text


def _utf8_bytes_needed(byte: int) -> int:
    """Bytes sentencepiece's UTF-8 decoder reads for a sequence starting with `byte` (1 if not a lead)."""
    if 0xC0 <= byte <= 0xDF:
        return 2
    if 0xE0 <= byte <= 0xEF:
        return 3
    if 0xF0 <= byte <= 0xF7:
        return 4
    return 1
