"""Mixtral's SentencePiece tokenizer, its chat template, and a streaming detokenizer.

`tokenizer.model` is used through sentencepiece directly: Hugging Face's tokenizers split some
whitespace runs differently, and mistral-common (the reference for the chat format) also encodes
with plain sentencepiece. A folder with only `tokenizer.json` (what recent `mlx_lm convert` writes)
gets the equivalent sentencepiece model rebuilt from it (`sentencepiece_json`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from .chat_format import encode_chat
from .errors import MixtralError
from .sentencepiece_json import model_proto_from_tokenizer_json


class Tokenizer:
    """SentencePiece tokenizer.model used directly (not HF tokenizers, which split some whitespace runs differently)."""

    def __init__(self, model_file: str | os.PathLike, model_proto: bytes | None = None) -> None:
        """Load the sentencepiece model `model_file`, or `model_proto` (its serialized bytes) if given.

        `model_file` is the file the tokenizer came from: `tokenizer.model`, or the `tokenizer.json`
        that `model_proto` was rebuilt from (see `from_tokenizer_json`).
        """
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise MixtralError(f"Tokenizer file not found: {self.model_file}")
        try:
            if model_proto is None:
                self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
            else:
                self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (OSError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MixtralError(f"Cannot read tokenizer {self.model_file}: {reason}") from None
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.eos_token_ids: set[int] = {self.eos_id}
        # Tells tokenizers apart (saved KV caches record the ids of one tokenizer).
        self.fingerprint = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:32]
        self._context_id, self._context_text = self._pick_context_piece()

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load `folder/tokenizer.model`, else the same model rebuilt from `folder/tokenizer.json`."""
        folder = Path(folder)
        if (folder / "tokenizer.model").is_file():
            return cls(folder / "tokenizer.model")
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json")
        raise MixtralError(f"No tokenizer.model or tokenizer.json in {folder}: is it a Mixtral model folder?")

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> Tokenizer:
        """The sentencepiece model equivalent to a Llama/Mistral-style Hugging Face `tokenizer.json`."""
        path = Path(path)
        if not path.is_file():
            raise MixtralError(f"Tokenizer file not found: {path}")
        return cls(path, model_proto=model_proto_from_tokenizer_json(path))

    def save_model(self, path: str | os.PathLike) -> None:
        """Write the sentencepiece model as a `tokenizer.model` file (e.g. one rebuilt from tokenizer.json)."""
        Path(path).write_bytes(self._sp.serialized_model_proto())

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`, with BOS in front when `bos` (a prompt starts with it)."""
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Exactly `sentencepiece.decode`: BOS/EOS vanish, <unk> is " ⁇ ", bad bytes become U+FFFD."""
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Prompt ids for a conversation, identical to mistral-common's v1 instruct tokenizer."""
        return encode_chat(messages, self._sp.encode, self.bos_id, self.eos_id)

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated sequence."""
        return StreamingDetokenizer(self)

    def _pick_context_piece(self) -> tuple[int, str]:
        """A normal piece without a leading "▁", whose text marks "not at the start of the text"."""
        sp = self._sp
        for piece_id in range(self.vocab_size):
            if sp.IsControl(piece_id) or sp.IsUnknown(piece_id) or sp.IsByte(piece_id) or sp.IsUnused(piece_id):
                continue
            if not sp.id_to_piece(piece_id).startswith("▁"):
                return piece_id, sp.decode([piece_id])
        raise MixtralError(f"Tokenizer {self.model_file} has no ordinary piece; is it a SentencePiece BPE model?")


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

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
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
