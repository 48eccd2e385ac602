"""Mistral's instruct formats, token for token as mistral-common encodes them (v1 and v3).

The Mixtral-Instruct models were trained on mistral-common's encoding, not on a Jinja template:
Hugging Face's templates differ on whitespace runs, literal `</s>`, system-only conversations and
continuation. So this module reproduces mistral-common 1.x (default "test" validation mode)
exactly, without depending on it at runtime.

* v1 (Mixtral-8x7B-Instruct-v0.1, `tokenizer.model.v1`): a user turn is the plain text
  `"[INST] " + text + " [/INST]"`; the system prompt goes in front of the FIRST user turn; no tools.
* v3 (Mixtral-8x22B-Instruct-v0.1, `mistral_instruct_tokenizer_240323.model.v3`): `[INST]`,
  `[/INST]`, `[TOOL_CALLS]`, `[AVAILABLE_TOOLS]`, `[/AVAILABLE_TOOLS]`, `[TOOL_RESULTS]`,
  `[/TOOL_RESULTS]` are single control ids. The system prompt and, when the request has tools,
  `[AVAILABLE_TOOLS] json [/AVAILABLE_TOOLS]` go in front of the LAST user turn. An assistant turn
  with tool calls is `[TOOL_CALLS]` + a JSON list of {"name", "arguments", "id"}; a tool reply is
  `[TOOL_RESULTS]` + {"content", "call_id"} + `[/TOOL_RESULTS]`. Assistant text loses trailing
  spaces. Tool call ids are 9 letters or digits (mistral-common's rule; `mistral_call_id` maps
  any other id onto one).

Common to both (`InstructRequestNormalizer`, `MistralRequestValidator`): every non-empty system
content, in order, joined with "\\n\\n", is the system prompt; runs of consecutive same-role
messages merge (contents joined with "\\n\\n", tool calls concatenated), except tool replies, which
stay one each; a system message only breaks runs. If the first remaining turn is not a user turn,
an empty user turn goes in front. BOS once; each piece of text is sentencepiece-encoded on its own;
text in messages is never a control token.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import MixtralError

_JOIN = "\n\n"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALPHABET = string.ascii_letters + string.digits
_KEYS = {
    1: {"system": {"role", "content"}, "user": {"role", "content"}, "assistant": {"role", "content", "prefix"}},
    3: {"system": {"role", "content"}, "user": {"role", "content"},
        "assistant": {"role", "content", "prefix", "tool_calls"},
        "tool": {"role", "content", "tool_call_id", "name"}},
}
_FOLLOWS = {"system": {"user", "assistant", "system"}, "user": {"assistant", "system", "user"},
            "assistant": {"assistant", "user", "tool"}, "tool": {"assistant", "tool", "user"}}
CONTROL_PIECES = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                  "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@dataclass
class _Call:
    name: str
    arguments: Any  # the parsed JSON arguments, or the string when they are not JSON
    id: str | None


@dataclass
class _Turn:
    role: str
    content: str = ""
    prefix: bool = False
    calls: list[_Call] = field(default_factory=list)
    call_id: str | None = None


def new_call_id() -> str:
    """A fresh call id: 9 letters and digits, which v3 takes as it is."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(9))


def mistral_call_id(call_id: str) -> str:
    """A tool call id as v3 takes it: kept when it is 9 letters or digits, else a stable 9-character
    digest of it (so an OpenAI "call_..." id and the tool reply that names it still match)."""
    if _CALL_ID.match(call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    out = []
    for _ in range(9):
        digest, index = divmod(digest, len(_ALPHABET))
        out.append(_ALPHABET[index])
    return "".join(out)


class MistralFormat:
    """mistral-common's instruct encoding of one version (1 or 3) for a sentencepiece vocabulary."""

    def __init__(self, version: int, encode: Callable[[str], list[int]], bos_id: int, eos_id: int,
                 control: dict[str, int] | None = None) -> None:
        """`encode(text)`: plain sentencepiece ids without BOS/EOS; `control`: the ids of
        CONTROL_PIECES (v3 only)."""
        if version not in _KEYS:
            raise ValueError(f"unknown Mistral instruct version {version}")
        self.version = version
        self._encode = encode
        self.bos_id, self.eos_id = bos_id, eos_id
        self.control = control or {}
        self.tool_calls_id: int | None = self.control.get("[TOOL_CALLS]")
        self.supports_tools = version >= 3

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation (see the module docstring). Raises `MixtralError` for every
        conversation mistral-common rejects, so a bad one fails before generation. With
        `add_generation_prompt=False` a conversation may end with a complete assistant turn."""
        tools_json = self._check_tools(tools)
        self._validate(messages, ending_free=not add_generation_prompt)
        system = _JOIN.join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        turns = _merge(messages)
        if not turns or turns[0].role != "user":
            turns.insert(0, _Turn("user"))
        users = [i for i, t in enumerate(turns) if t.role == "user"]
        return ([self.bos_id] + self._encode_v1(turns, system, users[0]) if self.version == 1
                else [self.bos_id] + self._encode_v3(turns, system, users[-1], tools_json))

    # --- the two encodings ---------------------------------------------------------------------

    def _encode_v1(self, turns: list[_Turn], system: str, first_user: int) -> list[int]:
        tokens: list[int] = []
        for index, turn in enumerate(turns):
            if turn.role == "user":
                text = system + _JOIN + turn.content if index == first_user and system else turn.content
                tokens += self._encode(f"[INST] {text} [/INST]")
            else:
                tokens += self._encode(turn.content) + ([] if turn.prefix else [self.eos_id])
        return tokens

    def _encode_v3(self, turns: list[_Turn], system: str, last_user: int, tools_json: str | None) -> list[int]:
        c = self.control
        tokens: list[int] = []
        for index, turn in enumerate(turns):
            if turn.role == "user":
                text = turn.content
                if index == last_user:
                    if tools_json is not None:
                        tokens += [c["[AVAILABLE_TOOLS]"], *self._encode(tools_json), c["[/AVAILABLE_TOOLS]"]]
                    if system:
                        text = system + _JOIN + text
                tokens += [c["[INST]"], *self._encode(text), c["[/INST]"]]
            elif turn.role == "tool":
                result = {"content": _parse_json(turn.content), "call_id": turn.call_id}
                tokens += [c["[TOOL_RESULTS]"], *self._encode(_dumps(result)), c["[/TOOL_RESULTS]"]]
            else:
                if turn.calls:
                    calls = [{"name": k.name, "arguments": k.arguments, **({"id": k.id} if k.id else {})}
                             for k in turn.calls]
                    tokens += [c["[TOOL_CALLS]"], *self._encode(_dumps(calls))]
                else:
                    tokens += self._encode(turn.content.rstrip(" "))
                if not turn.prefix:
                    tokens.append(self.eos_id)
        return tokens

    # --- validation (mistral-common's, one line each) --------------------------------------------

    def _check_tools(self, tools: Sequence[dict] | None) -> str | None:
        """The `[AVAILABLE_TOOLS]` JSON of OpenAI-style tools (None without any)."""
        if not tools:
            return None
        if not self.supports_tools:
            raise MixtralError("this model's chat format (Mistral v1) has no tool calls; send the request without tools")
        if not isinstance(tools, (list, tuple)):
            raise MixtralError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
        dumped = []
        for index, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or tool.get("type", "function") != "function":
                raise MixtralError(f"tool {index} must be {{\"type\": \"function\", \"function\": {{...}}}}")
            name = function.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise MixtralError(f"tool {index}: function name {name!r} must be 1-64 letters, digits, _ or -")
            description = function.get("description", "")
            parameters = function.get("parameters")
            if not isinstance(description, str):
                raise MixtralError(f"tool {index} ({name}): description must be a string")
            if not isinstance(parameters, dict):
                raise MixtralError(f"tool {index} ({name}): parameters must be a JSON schema object")
            dumped.append({"type": "function",
                           "function": {"name": name, "description": description, "parameters": parameters}})
        return _dumps(dumped)

    def _validate(self, messages: Sequence[dict], ending_free: bool) -> None:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise MixtralError("The conversation is empty: give at least one user or system message.")
        last = len(messages) - 1
        for index, message in enumerate(messages):
            self._validate_message(index, message, is_last=index == last)
            if index > 0:
                before = messages[index - 1]["role"]
                if message["role"] not in _FOLLOWS[before]:
                    raise MixtralError(f"Message {index}: a {message['role']} message cannot follow a {before} message.")
        final = messages[-1]
        if len(messages) == 1 and final["role"] not in ("user", "system"):
            raise MixtralError(f"The conversation must start with a user or system message, not a {final['role']} one.")
        if (len(messages) > 1 and not ending_free and final["role"] == "assistant"
                and not final.get("prefix", False)):
            raise MixtralError(
                "The conversation must end with a user message, or an assistant message with prefix=True to continue.")
        self._validate_calls_answered(messages)

    def _validate_message(self, index: int, message: object, is_last: bool) -> None:
        if not isinstance(message, dict):
            raise MixtralError(f"Message {index} must be a dict with 'role' and 'content', got {type(message).__name__}.")
        keys = _KEYS[self.version]
        role = message.get("role")
        if not isinstance(role, str) or role not in keys:
            raise MixtralError(f"Message {index} has role {role!r}; this chat format has {', '.join(keys)}.")
        extra = sorted(set(message) - keys[role])
        if extra:
            raise MixtralError(f"Message {index} ({role}) has unsupported keys {extra}.")
        content = message.get("content")
        calls = message.get("tool_calls")
        if role == "assistant" and calls is not None:
            if content is not None and not isinstance(content, str):
                raise MixtralError(f"Message {index} (assistant) must have string content, got {type(content).__name__}.")
        elif not isinstance(content, str):
            raise MixtralError(f"Message {index} ({role}) must have string content, got {type(content).__name__}.")
        if role == "tool":
            _validate_tool_reply(index, message)
        if role != "assistant":
            return
        prefix = message.get("prefix", False)
        if not isinstance(prefix, bool):
            raise MixtralError(f"Message {index}: 'prefix' must be true or false, got {prefix!r}.")
        if calls is not None:
            _validate_calls(index, calls)
        if bool(content) == bool(calls):
            raise MixtralError(f"Message {index}: an assistant message must have either content or tool_calls "
                               "(not both, not neither).")
        if prefix and not is_last:
            raise MixtralError(f"Message {index}: only the last message may be an assistant prefix (prefix=True).")

    @staticmethod
    def _validate_calls_answered(messages: Sequence[dict]) -> None:
        expected = 0
        for index, message in enumerate(messages[1:], start=1):
            if message["role"] == "tool":
                expected -= 1
            elif message["role"] == "assistant":
                if expected != 0:
                    raise MixtralError(f"Message {index}: the tool calls before it do not each have one tool reply.")
                expected = len(message.get("tool_calls") or [])


def _validate_calls(index: int, calls: object) -> None:
    if not isinstance(calls, list):
        raise MixtralError(f"Message {index}: tool_calls must be a list")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise MixtralError(f"Message {index}: each tool call needs a 'function' with 'name' and 'arguments'")
        name, arguments = function.get("name"), function.get("arguments", "")
        if not isinstance(name, str) or not _NAME.match(name):
            raise MixtralError(f"Message {index}: tool call name {name!r} must be 1-64 letters, digits, _ or -")
        if not isinstance(arguments, (str, dict)):
            raise MixtralError(f"Message {index}: tool call arguments must be a JSON string")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not _CALL_ID.match(call_id):
            raise MixtralError(f"Message {index}: tool call id {call_id!r} must be 9 letters or digits "
                               "(mistral_call_id maps other ids)")


def _validate_tool_reply(index: int, message: dict) -> None:
    name = message.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
        raise MixtralError(f"Message {index}: tool name {name!r} must be 1-64 letters, digits, _ or -")
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not _CALL_ID.match(call_id):
        raise MixtralError(f"Message {index}: tool_call_id {call_id!r} must be 9 letters or digits "
                           "(mistral_call_id maps other ids)")


def _merge(messages: Sequence[dict]) -> list[_Turn]:
    """Merge runs of same-role messages; system messages only break runs; tool replies stay apart."""
    turns: list[_Turn] = []
    previous = None
    for message in messages:
        role = message["role"]
        content = message.get("content") or ""
        if role == "tool":
            turns.append(_Turn("tool", _normalize_json(content), call_id=message.get("tool_call_id")))
        elif role != "system":
            calls = [_call(c) for c in message.get("tool_calls") or []]
            if role == previous:
                turn = turns[-1]
                turn.content = _JOIN.join(part for part in (turn.content, content) if part)
                turn.prefix = turn.prefix or message.get("prefix", False)
                turn.calls += calls
            else:
                turns.append(_Turn(role, content, message.get("prefix", False), calls))
        previous = role
    return turns


def _call(call: dict) -> _Call:
    function = call["function"]
    arguments = function.get("arguments", "")
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    call_id = call.get("id")
    return _Call(function["name"], _parse_json(_normalize_json(text)), call_id if call_id != "null" else None)


def _normalize_json(text: str) -> str:
    """mistral-common's normalization: "" is "{}", JSON is re-dumped, anything else stays."""
    if not text:
        return "{}"
    try:
        return _dumps(json.loads(text))
    except json.JSONDecodeError:
        return text


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
