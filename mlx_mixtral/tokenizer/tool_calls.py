"""Tool calls: how a model is told about tools, how it writes a call, and reading calls back.

Every model writes calls the same way here: a marker, then a JSON list of
`{"name": ..., "arguments": {...}}` objects, which is Mistral v3's trained syntax:

* Mistral v3 (Mixtral-8x22B-Instruct): the marker is the control id `[TOOL_CALLS]`, and the
  tools go in `[AVAILABLE_TOOLS]`, as the model was trained (`mistral_format`).
* Every other model (Mistral v1, fine-tunes with their own template, base models): the generic
  syntax. The tools and the syntax are described in a system message (`generic_messages`), the
  marker is the text `[TOOL_CALLS]`, and earlier calls and tool results in the conversation are
  written back in the same syntax as ordinary turns.

Either way the reply is held to the syntax by a grammar (`constrain.grammars.tool_grammar`), so
arguments always parse and match their tool's schema. A reply is read with the marker shown as
text (`Tokenizer.detokenizer(shown=...)`), by `ToolCallReader`, as it streams.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

MARKER = "[TOOL_CALLS]"
RESULTS = "[TOOL_RESULTS]"
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolSyntax:
    """How one model writes tool calls (see the module docstring)."""

    name: str
    marker: str = MARKER
    marker_id: int | None = None  # the control id that writes the marker; None: written as text
    native: bool = False  # the chat format renders tools itself; else `generic_messages` describes them


GENERIC = ToolSyntax("generic: tools described in a system message, calls written as [TOOL_CALLS] [...]")


def tool_syntax(chat_format) -> ToolSyntax:
    """The syntax a model with this chat format gets."""
    if chat_format.tool_calls_id is not None:
        return ToolSyntax("Mistral v3: [AVAILABLE_TOOLS] and the [TOOL_CALLS] control token",
                          marker_id=chat_format.tool_calls_id, native=True)
    return GENERIC


def new_call_id() -> str:
    """A fresh call id: 9 letters and digits, which Mistral v3's format takes as it is."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def generic_messages(messages: Sequence[dict], tools: Sequence[dict], required: bool = False,
                     only: str | None = None) -> list[dict]:
    """`messages` for a model without a trained tool format: a system message that describes the
    tools and the call syntax first (when there are `tools`), and earlier calls and results as
    plain turns in that syntax."""
    out = [{"role": "system", "content": _description(tools, required, only)}] if tools else []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))}
                     for c in message["tool_calls"]]
            text = f"{MARKER} {_dumps(calls)}"
            content = message.get("content") or ""
            out.append({"role": "assistant", "content": f"{content}\n\n{text}" if content else text})
        elif role == "tool":
            result = {"call_id": message.get("tool_call_id"), "content": message.get("content")}
            if message.get("name"):
                result["name"] = message["name"]
            text = f"{RESULTS} {_dumps(result)}"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith(RESULTS):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}  # one turn of results
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append({k: v for k, v in message.items() if k != "tool_calls"})
    return out


def _description(tools: Sequence[dict], required: bool, only: str | None) -> str:
    """The system message that tells a model without a trained tool format about the tools."""
    functions = [tool["function"] for tool in tools]
    lines = ["You can call these functions (JSON schemas):", _dumps(functions),
             f"To call functions, reply with {MARKER} followed by a JSON list of calls, and nothing else: "
             f'{MARKER} [{{"name": "function_name", "arguments": {{...}}}}]',
             f"The results come back in {RESULTS} messages."]
    if only is not None:
        lines.append(f"Call the function {only} now.")
    elif required:
        lines.append("Call at least one function now.")
    else:
        lines.append("When no function is needed, answer in text.")
    return "\n".join(lines)


def _arguments(arguments) -> object:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


@dataclass
class ToolCall:
    """One call as read so far: its index in the reply, id, function name and arguments text."""

    index: int
    id: str
    name: str
    arguments: str = ""


def scan_calls(text: str) -> tuple[list[tuple[str, str]], bool]:
    """The calls in `text`, a JSON list of `{"name": ..., "arguments": {...}}` that may be cut
    anywhere: (name, the arguments' JSON text so far) for each call whose name is complete, and
    whether the list is closed. Arguments are the exact text the model wrote."""
    calls: list[tuple[str, str]] = []
    depth, string_start, escaped = 0, None, False
    key = None
    expect_value = False
    arguments_start = None
    for i, char in enumerate(text):
        if string_start is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                value, string_start = text[string_start + 1:i], None
                if depth == 2 and arguments_start is None:
                    if not expect_value:
                        key = value
                    elif key == "name":
                        calls.append((value, ""))
            continue
        if char == '"':
            string_start = i
        elif char in "[{":
            if depth == 2 and expect_value and key == "arguments" and calls:
                arguments_start = i
            elif depth == 1:  # a call object opens
                key, expect_value = None, False
            depth += 1
        elif char in "]}":
            depth -= 1
            if arguments_start is not None and depth == 2:
                calls[-1] = (calls[-1][0], text[arguments_start:i + 1])
                arguments_start = None
            if depth == 0:
                return calls, True
        elif depth == 2 and arguments_start is None:
            if char == ":":
                expect_value = True
            elif char == ",":
                key, expect_value = None, False
    if arguments_start is not None:
        calls[-1] = (calls[-1][0], text[arguments_start:])
    return calls, False


@dataclass
class ToolCallReader:
    """Reads a reply as it streams: text, or the marker and a list of calls (see module doc).

    `feed(text)` returns what the text made certain: ("content", text) for reply text,
    ("call", ToolCall) when a call's name is complete, ("arguments", ToolCall, text) as its
    arguments' JSON grows. Text is held back only while it could still be the marker.
    """

    syntax: ToolSyntax
    calls: list[ToolCall] = field(default_factory=list)
    mode: str = "undecided"  # then "text" or "calls"
    complete: bool = False  # the list of calls was closed
    _text: str = ""  # held text (undecided), or the calls' JSON so far

    def feed(self, text: str) -> list[tuple]:
        if self.mode == "text":
            return [("content", text)] if text else []
        self._text += text
        if self.mode == "calls":
            return self._calls()
        stripped = self._text.lstrip()
        if stripped.startswith(self.syntax.marker):
            self.mode, self._text = "calls", stripped[len(self.syntax.marker):]
            return self._calls()
        if self.syntax.marker.startswith(stripped):
            return []  # may still become the marker
        self.mode, held, self._text = "text", self._text, ""
        return [("content", held)]

    def finish(self) -> list[tuple]:
        """The end of the reply: held text is text after all."""
        if self.mode == "undecided" and self._text:
            self.mode, held, self._text = "text", self._text, ""
            return [("content", held)]
        return []

    def _calls(self) -> list[tuple]:
        scanned, self.complete = scan_calls(self._text)
        events: list[tuple] = []
        for index, (name, arguments) in enumerate(scanned):
            if index == len(self.calls):
                self.calls.append(ToolCall(index, new_call_id(), name))
                events.append(("call", self.calls[index]))
            call = self.calls[index]
            if len(arguments) > len(call.arguments):
                events.append(("arguments", call, arguments[len(call.arguments):]))
                call.arguments = arguments
        return events
