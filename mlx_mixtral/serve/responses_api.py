"""OpenAI's Responses API (POST /v1/responses): what Codex CLI, the OpenAI Agents SDK and
`client.responses` speak, on the one request core (`request.build`).

`input` (a string, or message, function_call, function_call_output and reasoning items) becomes
the chat messages every protocol turns into; `instructions`, `system` and `developer` text
becomes the system prompt, in order (`request.fold_system`). Function tools are held to their
schemas by the grammar as in Chat Completions; the other tool types agents send alongside
(web_search, local_shell, custom, namespace...) cannot run here: they are left out of the prompt
and the server log says so once. Reasoning items are dropped (Mixtral does not reason).

The reply is a response object with `message` and `function_call` output items, or, streamed,
OpenAI's event sequence (each event with `type`, a rising `sequence_number` and its `event:`
line), always closed by `response.completed`, `response.incomplete` or `response.failed`.
Responses are kept (unless `store: false`, as Codex sends) in a `response_store.ResponseStore`
bounded by count and bytes, so a client may continue one by `previous_response_id`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..constrain import Grammar
from ..generate import MAX_TOP_LOGPROBS
from .openai_reply import token_logprobs
from .output import Output, TokenLogprob, sse
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
    in_range,
    json_format,
    max_tokens_asked,
    number,
    sampling,
)
from .response_store import ResponseStore
from .scheduler import Done, Failed, Piece, Started

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text", "summary_text")
MEDIA_PARTS = ("input_image", "input_file", "input_audio", "image", "file")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Fields that would ask for something this server does not do, refused rather than ignored.
REFUSED = {"background": "background responses are not supported; leave background out",
           "conversation": "conversations are not stored here: send the history in input, or use previous_response_id",
           "prompt": "stored prompt templates are not supported; send instructions and input"}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass
class Asked:
    """A checked Responses request: the core `Request`, and what the response echoes and stores."""

    request: Request
    echo: dict[str, Any]  # the request's settings, as the response object repeats them
    added: list[dict]  # this request's input as chat messages (stored with the reply)
    previous: str | None
    store: bool
    logprobs: bool
    failure: APIError | None = None  # streamed and refused before generating: sent as response.failed


def _text(content: Any, param: str) -> str:
    """A message's text: a string, or text parts (input_text, output_text)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad(f"{param} must be a string or a list of content parts", param)
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            raise bad(f"{param}[{k}] is {kind}: this model reads text only; send input_text", f"{param}[{k}]")
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise bad(f"{param}[{k}] must be an input_text or output_text part, got {json.dumps(kind)}", f"{param}[{k}]")
    return "".join(texts)


def _call_id(item: dict, param: str) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise bad(f"{param}.call_id is required: the id of the call", f"{param}.call_id")
    return call_id


def _arguments(item: dict, kind: str, param: str) -> str:
    if kind == "custom_tool_call":  # a freeform tool's input, as one string argument
        return json.dumps({"input": item.get("input", "")}, ensure_ascii=False)
    arguments = item.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise bad(f"{param}.arguments must be a JSON string", f"{param}.arguments")
    try:
        json.loads(arguments or "{}")
    except json.JSONDecodeError:
        raise bad(f"{param}.arguments is not JSON: {arguments[:60]!r}", f"{param}.arguments") from None
    return arguments or "{}"


def _items(value: Any) -> list[dict]:
    """`input` as chat messages: system text stays where it was (folded later), calls join the
    assistant turn before them, outputs become tool messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise bad("input must be a string or a list of items", "input")
    out: list[dict] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{param} must be an object", param)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise bad(f"{param}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}", f"{param}.role")
            text = _text(item.get("content"), f"{param}.content")
            if ROLES[role] != "assistant" or text:  # an empty assistant turn: as if never asked
                out.append({"role": ROLES[role], "content": text})
        elif kind in ("function_call", "custom_tool_call"):
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise bad(f"{param}.name is required: the function called", f"{param}.name")
            call = {"id": _call_id(item, param), "type": "function",
                    "function": {"name": name, "arguments": _arguments(item, kind, param)}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out.append({"role": "tool", "tool_call_id": _call_id(item, param),
                        "content": _text(item.get("output"), f"{param}.output")})
        elif kind == "reasoning":
            continue  # Mixtral does not reason: nothing to give back to it
        elif kind in MEDIA_PARTS:
            raise bad(f"{param} is {kind}: this model reads text only", param)
        else:
            raise bad(f"{param}.type {json.dumps(kind)} is not supported: send message, function_call, "
                      "function_call_output or reasoning items", f"{param}.type")
    return out


def _tools(body: dict) -> Tools | None:
    functions, indexes = function_tools_of(
        body.get("tools"), lambda tool: {k: tool[k] for k in ("name", "description", "parameters")
                                         if tool.get(k) is not None} if tool.get("type") == "function" else None,
        "/v1/responses", "tool")
    choice, only = body.get("tool_choice") or "auto", None
    if isinstance(choice, dict):
        only = choice.get("name")
        if choice.get("type") != "function" or not isinstance(only, str):
            raise bad("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise bad(f"tool_choice must be none, auto, required or a named function, got {json.dumps(choice)}",
                  "tool_choice")
    if not functions:
        if choice not in ("none", "auto"):
            raise bad("tool_choice needs function tools", "tool_choice")
        return None
    return function_tools(functions, choice, only, boolean(body, "parallel_tool_calls", True),
                          fields=("name", "parameters"), indexes=indexes)


def _format(body: dict) -> tuple[Grammar | None, dict]:
    """The grammar `text.format` asks for, and the format as the response echoes it."""
    text = body.get("text")
    if text is None:
        return None, {"type": "text"}
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return None, {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, fmt
    if kind == "json_object":
        return json_format(None, "text.format json_object"), fmt
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad("text.format json_schema needs {\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}",
                      "text.format")
        return json_format(fmt["schema"], "text.format json_schema"), fmt
    raise bad(f"text.format type must be text, json_object or json_schema, got {json.dumps(kind)}", "text.format")


def parse(body: Any, store: ResponseStore, tokenizer, served: str, context: int, vocab: int,
          defaults: Defaults) -> Asked:
    """Check a /v1/responses body; the conversation it continues comes from `store`."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for name, message in REFUSED.items():
        if body.get(name) not in (None, False):
            raise bad(message, name, "unsupported_parameter")
    if body.get("truncation") not in (None, "disabled", "auto"):
        raise bad("truncation must be disabled or auto", "truncation")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions must be a string", "instructions")
    if "input" not in body and body.get("previous_response_id") is None:
        raise bad("input is required: a string or a list of items", "input")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise bad("previous_response_id must be a string", "previous_response_id")
    added = _items(body.get("input", []))
    history = store.conversation(previous) if previous else []
    conversation = fold_system(([{"role": "system", "content": instructions}] if instructions else []) + history + added)
    if not conversation:
        raise bad("input is empty: send at least one message", "input")
    check_tool_results(conversation, "input", "function_call_output")
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
        raise bad("include must be a list of strings", "include")
    top = number(body, "top_logprobs", None, integer=True)
    if top is not None:
        in_range("top_logprobs", top, 0 <= top <= MAX_TOP_LOGPROBS, f"from 0 to {MAX_TOP_LOGPROBS}")
    logprobs = (top or 0) if LOGPROBS_INCLUDE in include else None
    params, seed = sampling(body, defaults, vocab)
    tools = _tools(body)
    grammar, fmt = _format(body)
    stored = boolean(body, "store", True)
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad("metadata must be an object of strings", "metadata")
    stream = boolean(body, "stream", False)
    try:
        request = build(conversation, tools, grammar, tokenizer=tokenizer, served=served, context=context,
                        sampling=params, seed=seed, stop=[], stream=stream,
                        asked=max_tokens_asked(body, ("max_output_tokens",), context), defaults=defaults,
                        logprobs=logprobs, param="input", format_param="text.format")
    except TooLong as e:
        if not stream:
            raise
        request, failure = Request(chat=True, model=served, prompt=[], max_tokens=0, sampling=params, seed=seed,
                                   stop=[], stream=True), e  # streamed: OpenAI's response.failed, as Codex reads it
    else:
        failure = None
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "metadata": metadata or {}, "parallel_tool_calls": boolean(body, "parallel_tool_calls", True),
            "previous_response_id": previous, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": stored, "temperature": params.temp,
            "text": {"format": fmt, "verbosity": "medium"}, "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [], "top_logprobs": top or 0, "top_p": params.top_p,
            "truncation": body.get("truncation") or "disabled", "user": body.get("user")}
    return Asked(request, echo, added, previous, stored, logprobs is not None, failure)


# --------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------


@dataclass
class ResponseReply:
    """One response, built as generation goes (see `output.ProtocolReply`): output items open as
    text or calls begin and close when the next begins or the reply ends."""

    asked: Asked
    token_bytes: Callable[[int], bytes]
    store: ResponseStore
    id: str = field(default_factory=lambda: _new_id("resp"))
    created: float = field(default_factory=lambda: int(time.time()))
    output: Output = field(init=False)
    items: list[dict] = field(default_factory=list)  # output items, in order
    _sequence: int = 0
    _message: int | None = None  # the output index of the message item being written
    _calls: dict[int, int] = field(default_factory=dict)  # a call's index in the reply -> its output index
    _open_call: int | None = None
    _unsent: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.output = Output(self.asked.request)

    # -- as generation goes ----------------------------------------------------------------

    def opening(self) -> list[bytes]:
        snapshot = self._object("in_progress", [])
        return [self._event("response.created", response=snapshot), self._event("response.in_progress", response=snapshot)]

    def started(self, event: Started) -> list[bytes]:
        return []

    def piece(self, event: Piece) -> list[bytes]:
        self._unsent += event.logprobs
        return [data for e in self.output.feed(event.text, event.logprobs) for data in self._take(e)]

    def done(self, event: Done) -> list[bytes]:
        out = [data for e in self.output.end(event) for data in self._take(e)]
        out += self._close_message() + self._close_call()
        response = self.whole()
        if self.asked.store:
            self.store.put(response, [*self.asked.added, *self._as_messages()], self.asked.previous)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return [*out, self._event(kind, response=response)]

    def failed(self, event: Failed, code: str = "server_error") -> list[bytes]:
        error = {"code": code, "message": event.message}
        return [self._event("response.failed", response={**self._object("failed", self._finished_items()),
                                                         "error": error})]

    def refused(self) -> bytes:
        """The whole stream of a request refused before generating (`Asked.failure`)."""
        e = self.asked.failure
        return b"".join([*self.opening(), *self.failed(Failed(e.message, e.status), e.code or "invalid_request")])

    def whole(self) -> dict[str, Any]:
        out = self.output
        usage = {"input_tokens": out.prompt_tokens, "input_tokens_details": {"cached_tokens": out.cached_tokens},
                 "output_tokens": out.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": out.prompt_tokens + out.completion_tokens}
        if out.finish_reason == "length":
            return {**self._object("incomplete", self._finished_items()), "usage": usage,
                    "incomplete_details": {"reason": "max_output_tokens"}}
        return {**self._object("completed", self._finished_items()), "usage": usage}

    # -- items -------------------------------------------------------------------------------

    def _take(self, event: tuple) -> list[bytes]:
        kind = event[0]
        if kind == "content":
            out = [] if self._message is not None else self._open_message()
            logprobs = self._logprobs(self._unsent)
            self._unsent = []
            item = self.items[self._message]
            item["content"][0]["text"] += event[1]
            item["content"][0]["logprobs"] += logprobs
            return [*out, self._event("response.output_text.delta", item_id=item["id"], output_index=self._message,
                                      content_index=0, delta=event[1], logprobs=logprobs)]
        call = event[1]
        if kind == "call":
            out = self._close_message() + self._close_call()
            self._calls[call.index] = self._open_call = len(self.items)
            self.items.append({"id": _new_id("fc"), "type": "function_call", "status": "in_progress",
                               "call_id": call.id, "name": call.name, "arguments": ""})
            return [*out, self._event("response.output_item.added", output_index=self._open_call,
                                      item=dict(self.items[-1]))]
        index = self._calls[call.index]
        self.items[index]["arguments"] += event[2]
        return [self._event("response.function_call_arguments.delta", item_id=self.items[index]["id"],
                            output_index=index, delta=event[2])]

    def _open_message(self) -> list[bytes]:
        self._message = len(self.items)
        item = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        self.items.append(item)
        added = self._event("response.output_item.added", output_index=self._message, item={**item, "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["content"].append(part)
        return [added, self._event("response.content_part.added", item_id=item["id"], output_index=self._message,
                                   content_index=0, part=dict(part))]

    def _close_message(self) -> list[bytes]:
        if self._message is None:
            return []
        index, self._message = self._message, None
        item = self.items[index]
        item["status"] = "completed"
        part = item["content"][0]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [self._event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"]),
                self._event("response.content_part.done", **where, part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _close_call(self) -> list[bytes]:
        if self._open_call is None:
            return []
        index, self._open_call = self._open_call, None
        item = self.items[index]
        whole = any(c.id == item["call_id"] for c in self.output.complete_calls)
        item["status"] = "completed" if whole else "incomplete"  # cut short by max_output_tokens
        out = [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                           name=item["name"], arguments=item["arguments"])] if whole else []
        return [*out, self._event("response.output_item.done", output_index=index, item=item)]

    def _finished_items(self) -> list[dict]:
        """The output: whole items (a call whose arguments were cut short is left out)."""
        return [item for item in self.items if item["status"] != "incomplete"]

    def _as_messages(self) -> list[dict]:
        """This response's output as the chat messages a continuation starts from."""
        calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                         "arguments": item["arguments"]}}
                 for item in self._finished_items() if item["type"] == "function_call"]
        message: dict[str, Any] = {"role": "assistant", "content": self.output.text}
        if calls:
            message["tool_calls"] = calls
        return [message] if calls or self.output.text else []

    # -- shapes ------------------------------------------------------------------------------

    def _logprobs(self, entries: list[TokenLogprob]) -> list[dict]:
        return token_logprobs(entries, self.token_bytes) if self.asked.logprobs else []

    def _object(self, status: str, output: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": None, "incomplete_details": None, "max_tool_calls": None,
                "model": self.asked.request.model, "output": json.loads(json.dumps(output)), "usage": None,
                **self.asked.echo}

    def _event(self, kind: str, **fields: Any) -> bytes:
        self._sequence += 1
        return sse({"type": kind, "sequence_number": self._sequence - 1, **fields}, event=kind)
