"""The OpenAI HTTP API's responses as plain data: one request's reply, whole or as stream chunks.

`openai_api` turns a request body into a `Request`; this shapes what goes back for it, as the
scheduler's events come in: text, tool calls read from the text as it streams
(`ToolCallReader`), logprobs, the finish reason and usage, in the shapes OpenAI's clients parse.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..tokenizer import ToolCall, ToolCallReader

if TYPE_CHECKING:
    from .openai_api import Request

TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # id, log-probability, best alternatives


@dataclass
class Reply:
    """One request's response, built as generation goes: `add` each piece of text (returns the
    stream chunks it makes), `finish` at the end, `complete` for the whole (stream: false).
    A request with tools has its text read for calls (`ToolCallReader`) as it comes."""

    request: Request
    token_bytes: Callable[[int], bytes]
    id: str = ""
    created: int = 0
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    _unsent: list[TokenLogprob] = field(default_factory=list)  # logprobs not in a chunk yet
    _reader: ToolCallReader | None = None

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())
        if self.request.tools is not None:
            self._reader = ToolCallReader(self.request.tools)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._reader.calls if self._reader is not None else []

    @property
    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    # -- as generation goes ----------------------------------------------------------------

    def add(self, text: str, logprobs: Sequence[TokenLogprob] = ()) -> list[dict[str, Any]]:
        """Take a piece of the reply; return the stream chunks it makes."""
        self.logprobs += logprobs
        self._unsent += logprobs
        events = self._reader.feed(text) if self._reader is not None else [("content", text)] if text else []
        return [self._event_chunk(event) for event in events]

    def finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               cached_tokens: int) -> list[dict[str, Any]]:
        """The end: text held back as a possible tool-call marker, then the finish chunk."""
        chunks = [self._event_chunk(e) for e in self._reader.finish()] if self._reader is not None else []
        self.finish_reason = "tool_calls" if self.tool_calls and finish_reason == "stop" else finish_reason
        self.prompt_tokens, self.completion_tokens, self.cached_tokens = prompt_tokens, completion_tokens, cached_tokens
        return [*chunks, self.chunk(finish_reason=self.finish_reason)]

    def _event_chunk(self, event: tuple) -> dict[str, Any]:
        kind = event[0]
        if kind == "content":
            self.text += event[1]
            return self.chunk(event[1])
        call: ToolCall = event[1]
        if kind == "call":
            delta = {"index": call.index, "id": call.id, "type": "function",
                     "function": {"name": call.name, "arguments": ""}}
        else:
            delta = {"index": call.index, "function": {"arguments": event[2]}}
        return self.chunk(tool_call=delta)

    # -- shapes ------------------------------------------------------------------------------

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.request.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model}

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """OpenAI's logprobs object for `entries`: chat's `content` list, or completions' legacy lists."""
        if self.request.logprobs is None:
            return None
        token = lambda i: self.token_bytes(i).decode("utf-8", "replace")  # noqa: E731
        if self.request.chat:
            return {"content": [{"token": token(t), "logprob": lp, "bytes": list(self.token_bytes(t)),
                                 "top_logprobs": [{"token": token(a), "logprob": alp, "bytes": list(self.token_bytes(a))}
                                                  for a, alp in top]} for t, lp, top in entries], "refusal": None}
        offsets, at = [], len(self.text) - sum(len(token(t)) for t, _, _ in entries)
        for t, _, _ in entries:
            offsets.append(max(at, 0))
            at += len(token(t))
        return {"tokens": [token(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{token(a): alp for a, alp in top} for _, _, top in entries], "text_offset": offsets}

    def _message(self) -> dict[str, Any]:
        """The whole assistant message; a call cut short by max_tokens is left out (its arguments
        would not parse), and finish_reason "length" says the reply was cut."""
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in self.tool_calls if _parses(c.arguments)]
        message: dict[str, Any] = {"role": "assistant", "content": self.text if self.text or not calls else None}
        if calls:
            message["tool_calls"] = calls
        return message

    def complete(self) -> dict[str, Any]:
        """The whole response (stream: false)."""
        logprobs = self._logprobs(self.logprobs)
        if self.request.chat:
            choice = {"index": 0, "message": self._message(), "logprobs": logprobs, "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": logprobs, "finish_reason": self.finish_reason}
        return {**self._envelope(False), "choices": [choice], "usage": self.usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False,
              tool_call: dict | None = None) -> dict[str, Any]:
        """One streamed event: a piece of text or of a tool call, the opening role (chat), or the
        finish reason; with the logprobs of the tokens not sent yet."""
        logprobs = None
        if not first and self._unsent:
            logprobs, self._unsent = self._logprobs(self._unsent), []
        if self.request.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            if tool_call is not None:
                delta["tool_calls"] = [tool_call]
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        out = {**self._envelope(True), "choices": [choice]}
        if self.request.include_usage:
            out["usage"] = None  # OpenAI: every chunk has it, null until the last
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """The last event of a stream with include_usage: no choices, the usage."""
        return {**self._envelope(True), "choices": [], "usage": self.usage}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
