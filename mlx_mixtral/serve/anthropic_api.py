"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens): what Claude Code and
the `anthropic` SDK speak, on the one request core (`request.build`).

`system` (a string or text blocks) and any system text inside `messages` become the system
prompt, in order. Claude Code puts a block `x-anthropic-billing-header: ...; cch=<nonce>;` first
in `system`, with a new nonce every request: it is removed before encoding, or the prompt cache
would miss from the first token every turn. `tool_use` and `tool_result` blocks become the calls
and tool replies of the chat messages every protocol turns into; tools with `input_schema` are
held to it by the grammar; Anthropic's server tools (web search, bash, text editor...) cannot run
here and are left out, said once in the server log. Thinking blocks are dropped and `thinking`
is accepted: Mixtral writes none.

The reply is a message with `text` and `tool_use` blocks, or, streamed, Anthropic's events:
message_start (once the request leaves the queue, with its cache figures), ping,
content_block_start / _delta / _stop, message_delta, message_stop; a failure mid-way is an
`error` event. Errors carry Anthropic's shape and status codes (`error`).
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

from .output import Output, sse
from .request import (
    APIError,
    Defaults,
    Request,
    TooLong,
    Tools,
    bad,
    boolean,
    build,
    check_tool_results,
    fold_system,
    function_tools,
    function_tools_of,
    max_tokens_asked,
    number,
    sampling,
    stop_strings,
)
from .scheduler import Done, Failed, Piece, Started

BILLING_HEADER = "x-anthropic-billing-header:"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
MEDIA_BLOCKS = ("image", "document", "search_result")
DROPPED_BLOCKS = ("thinking", "redacted_thinking")


def speaks(path: str) -> bool:
    """Whether a request path is the Messages API's (its errors then take Anthropic's shape)."""
    return path.startswith(("/v1/messages", "/messages"))


def error(e: APIError) -> tuple[int, dict[str, Any]]:
    """Anthropic's status and error body for `e`. A full queue is Anthropic's 529 overloaded_error,
    which its clients retry."""
    status = 529 if e.status == 429 else e.status
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": e.message}}


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def _texts(blocks: Any, param: str, skip_billing: bool = False) -> list[str]:
    """The texts of a string or of text blocks (`skip_billing`: without Claude Code's per-request
    billing block)."""
    if isinstance(blocks, str):
        return [blocks]
    if not isinstance(blocks, list):
        raise bad(f"{param} must be a string or a list of text blocks", param)
    texts = []
    for k, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in MEDIA_BLOCKS:
            raise bad(f"{param}[{k}] is {kind}: this model reads text only; send text blocks", f"{param}[{k}]")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise bad(f"{param}[{k}] must be a text block, got {json.dumps(kind)}", f"{param}[{k}]")
        if not (skip_billing and block["text"].lstrip().startswith(BILLING_HEADER)):
            texts.append(block["text"])
    return texts


def _message(m: Any, i: int) -> list[dict]:
    """One Anthropic message as chat messages: a user turn's tool results become tool messages
    (then its text, if any), an assistant turn's tool_use blocks its calls."""
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"{param} must be an object with role and content", param)
    role = m.get("role")
    if role not in ("user", "assistant", "system"):
        raise bad(f"{param}.role must be user or assistant, got {json.dumps(role)}", f"{param}.role")
    content = m.get("content")
    if isinstance(content, str) or role == "system":
        return [{"role": role, "content": "\n\n".join(_texts(content, f"{param}.content", skip_billing=True))}]
    if not isinstance(content, list):
        raise bad(f"{param}.content must be a string or a list of content blocks", f"{param}.content")
    texts, calls, results = [], [], []
    for k, block in enumerate(content):
        where = f"{param}.content[{k}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad(f"{where}: a tool_use block needs id and name", where)
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise bad(f"{where}.input must be an object", f"{where}.input")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad(f"{where}.tool_use_id is required: the id of the tool_use this answers", f"{where}.tool_use_id")
            text = "\n\n".join(_texts(block.get("content", ""), f"{where}.content"))
            if boolean(block, "is_error", False):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind in DROPPED_BLOCKS and role == "assistant":
            continue  # Mixtral does not think: nothing to give back to it
        elif kind in MEDIA_BLOCKS:
            raise bad(f"{where} is {kind}: this model reads text only; send text blocks", where)
        else:
            raise bad(f"{where}: a {role} message cannot hold a {json.dumps(kind)} block", where)
    text = "\n\n".join(texts)
    if role == "assistant":
        return [{"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}] \
            if text or calls else []
    return [*results, *([{"role": "user", "content": text}] if text or not results else [])]


def _tools(body: dict) -> Tools | None:
    functions, indexes = function_tools_of(
        body.get("tools"), lambda tool: {"name": tool.get("name"), "description": tool.get("description"),
                                         "parameters": tool["input_schema"]}
        if tool.get("type") in (None, "custom") and "input_schema" in tool else None,
        "/v1/messages", "{name, description, input_schema}")
    choice = body.get("tool_choice") or {"type": "auto"}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none") or (kind == "tool" and not isinstance(choice.get("name"), str)):
        raise bad("tool_choice must be {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", \"name\": ...}",
                  "tool_choice")
    if not functions:
        if kind in ("any", "tool"):
            raise bad("tool_choice needs tools", "tool_choice")
        return None
    single = boolean(choice, "disable_parallel_tool_use", False)
    return function_tools(functions, {"any": "required", "tool": "required"}.get(kind, kind),
                          choice.get("name") if kind == "tool" else None, not single,
                          fields=("name", "input_schema"), indexes=indexes, max_name=128)


def _conversation(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages is required: a non-empty list of {role, content} objects", "messages")
    system = body.get("system")
    system = _texts(system, "system", skip_billing=True) if system is not None else []
    conversation = [{"role": "system", "content": text} for text in system]
    for i, m in enumerate(messages):
        conversation += _message(m, i)
    conversation = fold_system(conversation)
    check_tool_results(conversation, "messages", "tool_result")
    return conversation


def _request(body: Any, tokenizer, served: str, context: int, vocab: int, defaults: Defaults,
             asked: int | None) -> Request:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if not isinstance(body.get("model", served), str):
        raise bad("model must be a string", "model")
    temperature = number(body, "temperature", None)
    if temperature is not None and not 0 <= temperature <= 1:
        raise bad(f"temperature must be from 0 to 1, got {temperature}", "temperature")
    params, seed = sampling(body, defaults, vocab)
    try:
        return build(_conversation(body), _tools(body), None, tokenizer=tokenizer, served=served, context=context,
                     sampling=params, seed=seed, stop=stop_strings(body.get("stop_sequences"), "stop_sequences"),
                     stream=boolean(body, "stream", False), asked=asked, defaults=defaults)
    except TooLong as e:  # Anthropic's words, which Claude Code watches for to compact the conversation
        raise bad(f"prompt is too long: {e.tokens} tokens > {e.context - 1} maximum", "messages") from None


def parse(body: Any, tokenizer, served: str, context: int, vocab: int, defaults: Defaults) -> Request:
    """Check a /v1/messages body; `max_tokens` is required, as the API requires it."""
    if isinstance(body, dict) and body.get("max_tokens") is None:
        raise bad("max_tokens is required: the most tokens the reply may have", "max_tokens")
    asked = max_tokens_asked(body, ("max_tokens",), context) if isinstance(body, dict) else None
    return _request(body, tokenizer, served, context, vocab, defaults, asked)


def parse_count(body: Any, tokenizer, served: str, context: int, vocab: int, defaults: Defaults) -> Request:
    """A /v1/messages/count_tokens body: the same request, counted even past the context."""
    return _request(body, tokenizer, served, sys.maxsize, vocab, defaults, None)


# --------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------


@dataclass
class MessageReply:
    """One message, built as generation goes (see `output.ProtocolReply`)."""

    request: Request
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")
    output: Output = field(init=False)
    _blocks: list[dict] = field(default_factory=list)
    _open: int | None = None  # the index of the block being written
    _calls: dict[int, int] = field(default_factory=dict)  # a call's index in the reply -> its block

    def __post_init__(self) -> None:
        self.output = Output(self.request)

    def opening(self) -> list[bytes]:
        return []  # message_start waits for the cache figures (`started`)

    def started(self, event: Started) -> list[bytes]:
        usage = self._usage(len(self.request.prompt), event.cached_tokens, 0)
        start = {**self._message([]), "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [_event("message_start", message=start), _event("ping")]

    def piece(self, event: Piece) -> list[bytes]:
        return [data for e in self.output.feed(event.text) for data in self._take(e)]

    def done(self, event: Done) -> list[bytes]:
        out = [data for e in self.output.end(event) for data in self._take(e)] + self._close()
        whole = self.whole()
        return [*out, _event("message_delta", delta={"stop_reason": whole["stop_reason"],
                                                     "stop_sequence": whole["stop_sequence"]}, usage=whole["usage"]),
                _event("message_stop")]

    def failed(self, event: Failed) -> list[bytes]:
        _, body = error(APIError(event.status, event.message, "server_error"))
        return [_event("error", error=body["error"])]

    def whole(self) -> dict[str, Any]:
        out = self.output
        complete = {c.index for c in out.complete_calls}
        blocks = [b for b in self._blocks if b["type"] == "text" or b["index"] in complete]
        content = [{"type": "text", "text": b["text"]} if b["type"] == "text" else
                   {"type": "tool_use", "id": b["id"], "name": b["name"], "input": json.loads(b["arguments"])}
                   for b in blocks]
        reason = "stop_sequence" if out.stop_sequence is not None else STOP_REASONS[out.finish_reason]
        return {**self._message(content), "stop_reason": reason, "stop_sequence": out.stop_sequence,
                "usage": self._usage(out.prompt_tokens, out.cached_tokens, out.completion_tokens)}

    def _take(self, event: tuple) -> list[bytes]:
        kind = event[0]
        if kind == "content":
            out = []
            if self._open is None:
                self._open = len(self._blocks)
                self._blocks.append({"type": "text", "text": ""})
                out.append(_event("content_block_start", index=self._open, content_block={"type": "text", "text": ""}))
            self._blocks[self._open]["text"] += event[1]
            return [*out, _event("content_block_delta", index=self._open, delta={"type": "text_delta", "text": event[1]})]
        call = event[1]
        if kind == "call":
            out = self._close()
            self._open = self._calls[call.index] = len(self._blocks)
            block = {"type": "tool_use", "id": f"toolu_{call.id}", "name": call.name, "index": call.index,
                     "arguments": ""}
            self._blocks.append(block)
            return [*out, _event("content_block_start", index=self._open, content_block={
                "type": "tool_use", "id": block["id"], "name": call.name, "input": {}})]
        index = self._calls[call.index]
        self._blocks[index]["arguments"] += event[2]
        return [_event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": event[2]})]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [_event("content_block_stop", index=index)]

    def _message(self, content: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.request.model, "content": content}

    @staticmethod
    def _usage(prompt: int, cached: int, output: int) -> dict[str, int]:
        """Anthropic counts the prompt tokens read from the cache apart from the others."""
        return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
                "output_tokens": output}


def _event(kind: str, **fields: Any) -> bytes:
    return sse({"type": kind, **fields}, event=kind)
