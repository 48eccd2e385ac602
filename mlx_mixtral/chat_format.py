"""The Mixtral-Instruct v0.1 chat format, token for token as mistral-common's v1 instruct tokenizer.

The model was trained on mistral-common's encoding, not on a Jinja template: Hugging Face's
templates for this model differ on whitespace runs, literal `</s>`, system-only conversations and
continuation. So this module reproduces mistral-common 1.x (`MistralTokenizer.v1()`, default "test"
validation mode) exactly, without depending on it at runtime:

* Validation (`MistralRequestValidator`): a non-empty list; one message alone must be user or
  system; with several, the last must be user, system, or an assistant with `prefix=True`; no
  system message directly after an assistant; assistant content non-empty; `prefix=True` only on
  the last message (and only on assistant messages, whose schema is the only one with that field).
* Normalisation (`InstructRequestNormalizer`): every non-empty system content, in order, joined
  with "\\n\\n", becomes the system prompt. Runs of consecutive same-role messages merge into one
  (non-empty contents joined with "\\n\\n"); a system message ends a run without joining it, so
  `user, system, user` stays two user turns. If the first remaining turn is not a user turn, an
  empty user turn is put in front.
* Encoding (`InstructTokenizerV1`): BOS once; the system prompt goes in front of the FIRST user
  turn as `system + "\\n\\n" + user`; a user turn is `encode("[INST] " + text + " [/INST]")` (plain
  text, not control tokens, so a literal "[INST]" or "</s>" in content is indistinguishable from
  the markers); an assistant turn is `encode(text)` followed by EOS unless it is a prefix to
  continue. Each turn is sentencepiece-encoded on its own, so every turn gets the leading "▁".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import MixtralError

_JOIN = "\n\n"
_ALLOWED_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "prefix"},
}


@dataclass
class _Turn:
    role: str
    content: str
    prefix: bool = False


def encode_chat(
    messages: Sequence[dict],
    encode: Callable[[str], list[int]],
    bos_id: int,
    eos_id: int,
) -> list[int]:
    """Token ids of a conversation in the Mixtral-Instruct v1 format (see the module docstring).

    `encode(text)` must be plain sentencepiece encoding without BOS/EOS. Raises `MixtralError` for
    every conversation mistral-common rejects, so a bad conversation fails before generation.
    """
    _validate(messages)
    system_prompt = _JOIN.join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    turns = _merge_turns(messages)
    if not turns or turns[0].role != "user":
        turns.insert(0, _Turn("user", ""))

    tokens = [bos_id]
    for index, turn in enumerate(turns):
        if turn.role == "user":
            text = system_prompt + _JOIN + turn.content if index == 0 and system_prompt else turn.content
            tokens.extend(encode(f"[INST] {text} [/INST]"))
        else:
            tokens.extend(encode(turn.content))
            if not turn.prefix:
                tokens.append(eos_id)
    return tokens


def _merge_turns(messages: Sequence[dict]) -> list[_Turn]:
    """Merge runs of same-role messages; system messages only break runs (they are the prompt)."""
    turns: list[_Turn] = []
    previous_role = None
    for message in messages:
        role, content = message["role"], message["content"]
        if role != "system":
            if role == previous_role:
                turn = turns[-1]
                turn.content = _JOIN.join(part for part in (turn.content, content) if part)
                turn.prefix = turn.prefix or message.get("prefix", False)
            else:
                turns.append(_Turn(role, content, message.get("prefix", False)))
        previous_role = role
    return turns


def _validate(messages: Sequence[dict]) -> None:
    """Reject what mistral-common's v1 validator (or its message schema) rejects, one line each."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MixtralError("The conversation is empty: give at least one user or system message.")
    last = len(messages) - 1
    for index, message in enumerate(messages):
        _validate_message(index, message, is_last=index == last)
        if index > 0 and message["role"] == "system" and messages[index - 1]["role"] == "assistant":
            raise MixtralError(f"Message {index}: a system message cannot follow an assistant message.")
    final = messages[-1]
    if len(messages) == 1 and final["role"] == "assistant":
        raise MixtralError("The conversation must start with a user or system message, not an assistant one.")
    if final["role"] == "assistant" and not final.get("prefix", False):
        raise MixtralError(
            "The conversation must end with a user message, or an assistant message with prefix=True to continue."
        )


def _validate_message(index: int, message: object, is_last: bool) -> None:
    """Per-message schema and content rules (mistral-common's pydantic models plus its validator)."""
    if not isinstance(message, dict):
        raise MixtralError(f"Message {index} must be a dict with 'role' and 'content', got {type(message).__name__}.")
    role = message.get("role")
    if not isinstance(role, str) or role not in _ALLOWED_KEYS:
        raise MixtralError(f"Message {index} has role {role!r}; Mixtral's chat format has system, user, assistant.")
    extra = sorted(set(message) - _ALLOWED_KEYS[role])
    if extra:
        raise MixtralError(f"Message {index} ({role}) has unsupported keys {extra}.")
    content = message.get("content")
    if not isinstance(content, str):
        raise MixtralError(f"Message {index} ({role}) must have string content, got {type(content).__name__}.")
    if role != "assistant":
        return
    prefix = message.get("prefix", False)
    if not isinstance(prefix, bool):
        raise MixtralError(f"Message {index}: 'prefix' must be true or false, got {prefix!r}.")
    if not content:
        raise MixtralError(f"Message {index}: an assistant message must have non-empty content.")
    if prefix and not is_last:
        raise MixtralError(f"Message {index}: only the last message may be an assistant prefix (prefix=True).")
