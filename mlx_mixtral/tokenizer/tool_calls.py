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

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .mistral_format import new_call_id

MARKER = "[TOOL_CALLS]"
RESULTS = "[TOOL_RESULTS]"


@dataclass(frozen=True)
class ToolSyntax:
    """How one model writes tool calls: `marker`, `opening`, the calls (JSON objects `{"name": ...,
    "arguments": ...}` written with `separators`) joined by `between`, then `closing`. A single
    space that starts `opening` is optional (a sentencepiece reply's "▁" habit)."""

    name: str
    marker: str = MARKER
    marker_id: int | None = None  # the special id that writes the marker; None: written as text
    native: bool = False  # the chat format renders tools itself; else `generic_messages` describes them
    opening: str = " ["
    between: str = ", "
    closing: str = "]"
    separators: tuple[str, str] = (", ", ": ")

    @property
    def listed(self) -> bool:
        """Whether the calls are one JSON list (else each object stands in its own wrapper)."""
        return self.opening.endswith("[")


GENERIC = ToolSyntax("generic: tools described in a system message, calls written as [TOOL_CALLS] [...]")


@functools.lru_cache(maxsize=8)
def tool_syntax(chat_format) -> ToolSyntax:
    """The syntax a model with this chat format gets: Mistral v3's control token; a template's own
    syntax when it renders tools and calls in a form we can read back (`probe_syntax`); else the
    generic one."""
    if chat_format.tool_calls_id is not None:
        return ToolSyntax("Mistral v3: [AVAILABLE_TOOLS] and the [TOOL_CALLS] control token",
                          marker_id=chat_format.tool_calls_id, native=True)
    if chat_format.kind == "template" and chat_format.supports_tools:
        return probe_syntax(chat_format) or GENERIC
    return GENERIC


_PROBE_TOOL = {"type": "function", "function": {"name": "probe_function", "description": "A probe.", "parameters": {
    "type": "object", "properties": {"probe_argument": {"type": "integer"}}, "required": ["probe_argument"]}}}


def _probe_calls(n: int) -> list[dict]:
    return [{"id": f"probe{i}abc", "type": "function",
             "function": {"name": "probe_function", "arguments": {"probe_argument": i + 1}}} for i in range(n)]


def probe_syntax(template) -> ToolSyntax | None:
    """The call syntax a chat template writes, read off its own rendering of one and of two calls
    (after the generation prompt): the text before, between and after the call objects. None when
    the template renders no calls, or calls we could not hold to a grammar (another key order,
    arguments as a string, a marker that is not at the start)."""
    ask = [{"role": "user", "content": "Probe?"}]
    try:
        head = template.render(ask, [_PROBE_TOOL], True)
        one, two = (template.render([*ask, {"role": "assistant", "content": "", "tool_calls": _probe_calls(n)}],
                                    [_PROBE_TOOL], False) for n in (1, 2))
    except Exception:  # noqa: BLE001 - a template that cannot render calls: the generic syntax
        return None
    if not one.startswith(head) or not two.startswith(head):  # the reply must follow the generation prompt
        return None
    one, two = one[len(head):], two[len(head):]
    found1, found2 = _objects(one), _objects(two)
    if len(found1) != 1 or len(found2) != 2:
        return None
    (start, end, raw), (_, end_a, _), (start_b, _, _) = found1[0], *found2
    separators = next((seps for seps in ((", ", ": "), (",", ":"))
                       if raw == json.dumps({"name": "probe_function", "arguments": {"probe_argument": 1}},
                                            separators=seps)), None)
    prefix, between, after = one[:start], two[end_a:start_b], one[end:]
    marker = prefix.strip().rstrip("[").strip()
    if separators is None or not marker or not prefix.startswith(marker) or not two.startswith(prefix):
        return None
    closing = os.path.commonprefix([after, between]) if not prefix.rstrip().endswith("[") else "]"
    if not after.startswith(closing):
        return None
    return ToolSyntax(f"the template's own: {prefix.strip()} ... {closing.strip()}", marker=marker,
                      marker_id=template.special_id(marker), native=True, opening=prefix[len(marker):],
                      between=between, closing=closing, separators=separators)


def _objects(text: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of each JSON object in `text` that is a probe call."""
    decoder = json.JSONDecoder()
    found, at = [], 0
    while (at := text.find("{", at)) >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at += 1
            continue
        if isinstance(value, dict) and list(value) == ["name", "arguments"] and value["name"] == "probe_function":
            found.append((at, end, text[at:end]))
        at = end
    return found


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


def scan_calls(text: str, listed: bool = True) -> tuple[list[tuple[str, str]], bool]:
    """The calls in `text`, a JSON list of `{"name": ..., "arguments": {...}}` (or, not `listed`,
    such objects each in its wrapper text) that may be cut anywhere: (name, the arguments' JSON
    text so far) for each call whose name is complete, and whether the list is closed. Arguments
    are the exact text the model wrote."""
    base = 1 if listed else 0  # the depth at which call objects open
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
                if depth == base + 1 and arguments_start is None:
                    if not expect_value:
                        key = value
                    elif key == "name":
                        calls.append((value, ""))
            continue
        if char == '"':
            if depth > 0:  # (wrapper text between objects is not JSON)
                string_start = i
        elif char in "[{":
            if depth == base + 1 and expect_value and key == "arguments" and calls:
                arguments_start = i
            elif depth == base:  # a call object opens
                key, expect_value = None, False
            depth += 1
        elif char in "]}":
            depth -= 1
            if arguments_start is not None and depth == base + 1:
                calls[-1] = (calls[-1][0], text[arguments_start:i + 1])
                arguments_start = None
            if depth == 0 and listed:
                return calls, True
        elif depth == base + 1 and arguments_start is None:
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
        scanned, self.complete = scan_calls(self._text, self.syntax.listed)
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
