"""Reading the model's tool calls back: Mistral v3's `[TOOL_CALLS]` followed by a JSON list.

Mixtral-8x22B-Instruct answers a request with tools either with text, or with the control id
`[TOOL_CALLS]` followed by `[{"name": ..., "arguments": {...}}, ...]` (sometimes with an "id",
sometimes a single object instead of a list). The parser works on ids: the control id marks where
calls start (its text is empty when decoded, and typed text can never produce it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name, its arguments as compact JSON text, the model's id."""

    name: str
    arguments: str
    id: str | None = None


def split_tool_calls(ids: Sequence[int], tool_calls_id: int | None,
                     decode: Callable[[Sequence[int]], str]) -> tuple[str, str | None]:
    """(the text before `[TOOL_CALLS]`, the text after it or None when the model wrote no call)."""
    ids = list(ids)
    if tool_calls_id is None or tool_calls_id not in ids:
        return decode(ids), None
    at = ids.index(tool_calls_id)
    return decode(ids[:at]), decode(ids[at + 1:])


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls in the JSON written after `[TOOL_CALLS]`, or None when it is not a list of calls
    (cut short, or not JSON): a caller then treats the reply as text."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                return None
        call_id = item.get("id")
        calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":")),
                              call_id if isinstance(call_id, str) and call_id else None))
    return calls or None
