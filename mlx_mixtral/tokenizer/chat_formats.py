"""Which chat format a model gets, decided from its own files, never from the folder's name.

1. A Mistral tokenizer, with a chat template that speaks `[INST]` (the Instruct models ship one):
   mistral-common's encoding. Its version is read off the vocabulary: `[INST]`, `[/INST]` and the
   tool pieces as single control ids is v3 (Mixtral-8x22B-Instruct); the 32000-piece v1 vocabulary
   without them is v1 (Mixtral-8x7B-Instruct).
2. Otherwise the folder's Jinja chat template (ChatML fine-tunes and the rest), as transformers
   renders it (`chat_template`).
3. Otherwise a base model: no chat format is invented. Turns are joined as plain text (below),
   after BOS, so a single user message is exactly what a raw prompt of its text gives.

A tokenizer built from a bare file (no folder) has no template to go by: a Mistral vocabulary
then gets its Mistral format, anything else the plain one.

Every format has a `name` the front doors show, a `kind`, and a `fingerprint` that saved caches
and chats record, so state made under one format is never reused under another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..errors import MixtralError
from .chat_template import TemplateFormat
from .mistral_format import CONTROL_PIECES, MistralFormat

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

PLAIN_JOIN = "\n\n"
BASE_MODEL_NOTE = ("this is a base model: it has no chat format, so messages go to it as plain text "
                   "(no [INST] or other markup is invented)")


class ChatFormat(Protocol):
    """What every chat format offers (Mistral, template, plain)."""

    kind: str
    name: str
    fingerprint: str
    supports_tools: bool
    tool_calls_id: int | None

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]: ...


class MistralChat(MistralFormat):
    """mistral-common's format as a `ChatFormat`."""

    def __init__(self, tokenizer: Tokenizer, version: int) -> None:
        control = {piece: tokenizer.token_id(piece) for piece in CONTROL_PIECES} if version == 3 else None
        super().__init__(version, tokenizer.encode_text, tokenizer.bos_id, tokenizer.eos_id, control)
        self.kind = f"mistral-v{version}"
        self.name = "Mistral v3 (control tokens)" if version == 3 else "Mistral v1 ([INST] text)"
        self.fingerprint = self.kind


class PlainFormat:
    """A base model's "format": the conversation's texts, joined by a blank line, after BOS.

    System text first, then each message's content in order; roles are not written (a base model
    was never taught any markup, and inventing one would be guessing). A final assistant message
    is simply continued. Tools are refused: a base model has no way to call them.
    """

    kind = "none"
    name = "none (base model)"
    fingerprint = "none"
    supports_tools = False
    tool_calls_id = None

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        if tools:
            raise MixtralError("this is a base model with no chat format: it cannot call tools")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise MixtralError("The conversation is empty: give at least one message.")
        texts = []
        for index, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, str):
                raise MixtralError(f"Message {index} must be a dict with string 'content'.")
            if content:
                texts.append(content)
        ids = [self._tokenizer.bos_id]
        return ids + self._tokenizer.encode_text(PLAIN_JOIN.join(texts)) if texts else ids


def mistral_version(tokenizer: Tokenizer) -> int | None:
    """3 when the Mistral control pieces are single control ids, 1 for the v1 vocabulary, else None."""
    control = [tokenizer.token_id(piece) for piece in CONTROL_PIECES]
    if all(i is not None and tokenizer.is_control(i) for i in control):
        return 3
    sp = tokenizer._sp
    if (tokenizer.sp_vocab_size == 32000 and [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
            and control[0] is None):
        return 1
    return None


def choose_format(tokenizer: Tokenizer) -> ChatFormat:
    """The chat format this tokenizer's files call for (see the module docstring)."""
    files = tokenizer.files
    version = mistral_version(tokenizer)
    template = files.template
    if files.folder is None:
        return MistralChat(tokenizer, version) if version else PlainFormat(tokenizer)
    if template is None:
        return PlainFormat(tokenizer)
    sources = template.values() if isinstance(template, dict) else [template]
    if version and any("[INST]" in source for source in sources):
        return MistralChat(tokenizer, version)
    return TemplateFormat(tokenizer, template, files.template_origin)
