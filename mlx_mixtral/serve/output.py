"""One reply as generation goes, whichever protocol carries it back: the text, the tool calls read
from it as it streams (`ToolCallReader`), the logprobs, the finish and the usage.

Each protocol's reply (`openai_reply`, `responses_api`, `anthropic_api`) holds an `Output` and
only shapes what it says into its own objects and stream events; `ProtocolReply` is what the
server asks of each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..tokenizer import ToolCall, ToolCallReader
from .request import Request
from .scheduler import Done, Failed, Piece, Started

TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # id, log-probability, best alternatives


@dataclass
class Output:
    """`feed` each piece of text (returns what it made certain: ("content", text), ("call",
    ToolCall) when a call's name is complete, ("arguments", ToolCall, text) as its arguments
    grow); `end` at the end. A request with tools has its text read for calls."""

    request: Request
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", or "tool_calls" (a reply of calls that ended)
    stop_sequence: str | None = None  # the stop string that ended the reply
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _reader: ToolCallReader | None = None

    def __post_init__(self) -> None:
        if self.request.tools is not None:
            self._reader = ToolCallReader(self.request.tools)

    @property
    def calls(self) -> list[ToolCall]:
        """Every call read so far, whole or not."""
        return self._reader.calls if self._reader is not None else []

    @property
    def complete_calls(self) -> list[ToolCall]:
        """The calls whose arguments parse: a call cut short by max_tokens is left out."""
        return [c for c in self.calls if parses(c.arguments)]

    def feed(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> list[tuple]:
        self.logprobs += logprobs
        events = self._reader.feed(text) if self._reader is not None else [("content", text)] if text else []
        return self._taken(events)

    def end(self, done: Done) -> list[tuple]:
        """The end: text held back as a possible tool-call marker comes out as text."""
        events = self._taken(self._reader.finish()) if self._reader is not None else []
        self.finish_reason = "tool_calls" if self.calls and done.finish_reason == "stop" else done.finish_reason
        self.stop_sequence = done.stop_sequence
        self.prompt_tokens, self.completion_tokens = done.prompt_tokens, done.completion_tokens
        self.cached_tokens = done.cached_tokens
        return events

    def _taken(self, events: list[tuple]) -> list[tuple]:
        for event in events:
            if event[0] == "content":
                self.text += event[1]
        return events


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event (with an `event:` line where the protocol names its events)."""
    named = f"event: {event}\n" if event else ""
    return f"{named}data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class ProtocolReply(Protocol):
    """What the server asks of a protocol's reply: server-sent events as the job's events come
    (`opening` before any), and the whole reply once it is `done` (stream: false)."""

    def opening(self) -> list[bytes]: ...

    def started(self, event: Started) -> list[bytes]: ...

    def piece(self, event: Piece) -> list[bytes]: ...

    def done(self, event: Done) -> list[bytes]: ...

    def failed(self, event: Failed) -> list[bytes]: ...

    def whole(self) -> dict[str, Any]: ...
