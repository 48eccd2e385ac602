"""Chat Completions' and Completions' responses: one request's reply, whole or as stream chunks.

`openai_api` turns a request body into a `Request`; this shapes what goes back for it, as the
scheduler's events come in (`output.Output` reads the text and the tool calls): the text, tool
calls, logprobs, the finish reason and usage, in the shapes OpenAI's clients parse.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .output import Output, TokenLogprob, sse
from .request import APIError, Request
from .scheduler import Done, Failed, Piece, Started


@dataclass
class Reply:
    """One request's response, built as generation goes (see `output.ProtocolReply`)."""

    request: Request
    token_bytes: Callable[[int], bytes]
    id: str = ""
    created: int = 0
    output: Output = field(init=False)
    _unsent: list[TokenLogprob] = field(default_factory=list)  # logprobs not in a chunk yet

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())
        self.output = Output(self.request)

    @property
    def usage(self) -> dict[str, Any]:
        out = self.output
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}

    # -- as generation goes ----------------------------------------------------------------

    def opening(self) -> list[bytes]:
        return [sse(self.chunk(first=True))] if self.request.chat else []

    def started(self, event: Started) -> list[bytes]:
        return []

    def piece(self, event: Piece) -> list[bytes]:
        self._unsent += event.logprobs
        return [sse(self._event_chunk(e)) for e in self.output.feed(event.text, event.logprobs)]

    def done(self, event: Done) -> list[bytes]:
        """The end: text held back as a possible tool-call marker, the finish chunk, usage, [DONE]."""
        chunks = [self._event_chunk(e) for e in self.output.end(event)]
        chunks.append(self.chunk(finish_reason=self.output.finish_reason))
        if self.request.include_usage:
            chunks.append({**self._envelope(True), "choices": [], "usage": self.usage})
        return [*map(sse, chunks), sse("[DONE]")]

    def failed(self, event: Failed) -> list[bytes]:
        """An error event instead of [DONE]: a partial reply never looks finished."""
        return [sse(APIError(event.status, event.message, "server_error").body())]

    def _event_chunk(self, event: tuple) -> dict[str, Any]:
        kind = event[0]
        if kind == "content":
            return self.chunk(event[1])
        call = event[1]
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
        if self.request.chat:
            return {"content": token_logprobs(entries, self.token_bytes), "refusal": None}
        token = lambda i: self.token_bytes(i).decode("utf-8", "replace")  # noqa: E731
        offsets, at = [], len(self.output.text) - sum(len(token(t)) for t, _, _ in entries)
        for t, _, _ in entries:
            offsets.append(max(at, 0))
            at += len(token(t))
        return {"tokens": [token(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{token(a): alp for a, alp in top} for _, _, top in entries], "text_offset": offsets}

    def _message(self) -> dict[str, Any]:
        """The whole assistant message; a call cut short by max_tokens is left out (its arguments
        would not parse), and finish_reason "length" says the reply was cut."""
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in self.output.complete_calls]
        text = self.output.text
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            message["tool_calls"] = calls
        return message

    def whole(self) -> dict[str, Any]:
        """The whole response (stream: false)."""
        logprobs = self._logprobs(self.output.logprobs)
        finish = self.output.finish_reason
        if self.request.chat:
            choice = {"index": 0, "message": self._message(), "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": self.output.text, "logprobs": logprobs, "finish_reason": finish}
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


def token_logprobs(entries: Sequence[TokenLogprob], token_bytes: Callable[[int], bytes]) -> list[dict[str, Any]]:
    """OpenAI's per-token logprob objects (chat's `logprobs.content`, the Responses API's
    `output_text.logprobs`): token text, log-probability, bytes, the best alternatives."""
    def one(t: int, lp: float) -> dict[str, Any]:
        raw = token_bytes(t)
        return {"token": raw.decode("utf-8", "replace"), "logprob": lp, "bytes": list(raw)}

    return [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]} for t, lp, top in entries]
