"""The OpenAI HTTP API as plain data: requests parsed and checked, responses shaped.

No HTTP here (that is `server`) and no model (that is `scheduler`): a request body goes in, a
`Request` with token ids and sampling parameters comes out, or an `APIError` that says in one line
what is wrong and which field, with the status and error body OpenAI's clients expect. Chat
requests are encoded with our Mixtral-Instruct v1 encoding (`tokenizer.mistral_format`: exactly
mistral-common's ids), never with a re-rendered template string.

Fields OpenAI defines that we cannot honour (n > 1, logprobs, tools, ...) are refused when they
ask for something, never silently ignored; fields that only describe the caller (`user`,
`metadata`, `store`, `service_tier`) are accepted and ignored. Any `model` name is served by the
one model this server holds. Sampling: OpenAI's `frequency_penalty` and `presence_penalty`,
and `repetition_penalty` (`repeat_penalty`, llama.cpp's and Ollama's name, means the same);
without `max_tokens` a reply runs until the model stops or the context is full. An empty
assistant message (a reply stopped before its first token) is left out, so the user messages
around it join as the chat format joins consecutive messages.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import MixtralError
from ..sampling import SamplingParams

MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; llama-server does not limit)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields that change nothing at their neutral value, and that we refuse at any other.
UNSUPPORTED = {
    "n": ((None, 1), "n: only one choice per request is supported; send n=1 (or leave it out)"),
    "best_of": ((None, 1), "best_of: only one candidate per request is supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None,), "suffix (insertion) is not supported"),
    "logprobs": ((None, False), "logprobs are not supported"),
    "top_logprobs": ((None, 0), "top_logprobs are not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "mirostat": ((None, 0), "mirostat sampling is not supported"),
    "typical_p": ((None, 1, 1.0), "typical_p is not supported"),
    "tools": ((None, []), "tools (function calling) are not supported"),
    "functions": ((None, []), "functions (function calling) are not supported"),
    "tool_choice": ((None, "none", "auto"), "tool_choice is not supported"),
}


class APIError(Exception):
    """A request the server refuses: HTTP `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Defaults:
    """What a request gets for the fields it leaves out (the `serve` flags). `max_tokens` None:
    a reply runs until the model stops or the context is full, as llama-server and Ollama do."""

    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temp=0.7))
    seed: int | None = None


@dataclass
class Request:
    """One checked completion request, ready for the scheduler."""

    chat: bool  # /v1/chat/completions (else /v1/completions)
    model: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


# --------------------------------------------------------------------------------------------
# Reading fields
# --------------------------------------------------------------------------------------------

_MISSING = object()


def _number(body: dict, name: str, default: Any, integer: bool = False) -> Any:
    """`body[name]` as a finite number (an int if `integer`); JSON true/false are not numbers."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise bad(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    return value


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _in_range(name: str, value: float, ok: bool, what: str) -> None:
    if not ok:
        raise bad(f"{name} must be {what}, got {value}", name)


def _sampling(body: dict, defaults: Defaults, vocab: int) -> tuple[SamplingParams, int | None]:
    d = defaults.sampling
    temp = _number(body, "temperature", d.temp)
    top_p = _number(body, "top_p", d.top_p)
    top_k = _number(body, "top_k", d.top_k, integer=True)
    min_p = _number(body, "min_p", d.min_p)
    penalty = _number(body, "repetition_penalty", d.repetition_penalty)
    repeat = _number(body, "repeat_penalty", None)  # llama.cpp's and Ollama's name for it
    if repeat is not None:
        if body.get("repetition_penalty") is not None and repeat != penalty:
            raise bad("repeat_penalty and repetition_penalty are the same setting: send one", "repeat_penalty")
        penalty = repeat
    frequency = _number(body, "frequency_penalty", d.frequency_penalty)
    presence = _number(body, "presence_penalty", d.presence_penalty)
    seed = _number(body, "seed", defaults.seed, integer=True)
    _in_range("temperature", temp, 0 <= temp <= 2, "from 0 to 2")
    _in_range("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")
    _in_range("top_k", top_k, 0 <= top_k <= vocab, f"from 0 (off) to the vocabulary size {vocab}")
    _in_range("min_p", min_p, 0 <= min_p < 1, "in [0, 1)")
    _in_range("repetition_penalty", penalty, 0 < penalty <= 10, "in (0, 10]")
    _in_range("frequency_penalty", frequency, -2 <= frequency <= 2, "from -2 to 2")
    _in_range("presence_penalty", presence, -2 <= presence <= 2, "from -2 to 2")
    if seed is not None:
        _in_range("seed", seed, 0 <= seed < 2**64, "from 0 to 2**64 - 1")
    return SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=penalty,
                          frequency_penalty=frequency, presence_penalty=presence), seed


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed", "stop")
    if any(not s for s in stops):
        raise bad("stop strings must not be empty", "stop")
    return stops


def _refuse_unsupported(body: dict) -> None:
    for name, (neutrals, message) in UNSUPPORTED.items():
        value = body.get(name)
        if not any(type(value) is type(v) and value == v for v in neutrals):  # 1 but not true, 0 but not 0.5
            raise bad(message, name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format: only {\"type\": \"text\"} is supported", "response_format",
                  "unsupported_parameter")


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of text parts (what newer clients send)."""
    content = message.get("content")
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{param}: only text parts are supported, got {json.dumps(kind)}", param)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{param} must be a string or a list of text parts, got {json.dumps(content)}", param)


def _messages(body: dict) -> list[dict]:
    """The conversation as the chat format takes it: roles mapped, contents as text."""
    messages = body.get("messages")
    if messages is None:
        raise bad("messages is required: a list of {role, content} objects", "messages")
    if not isinstance(messages, list):
        raise bad("messages must be a list of {role, content} objects", "messages")
    if not messages:
        raise bad("messages is empty: send at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise bad(f"messages[{i}]: tool and function calls are not supported", f"messages[{i}]")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)}",
                      f"messages[{i}].role")
        message = {"role": ROLES[role], "content": _content(m, i)}
        if message["role"] == "assistant" and not message["content"] and not m.get("prefix"):
            continue  # a reply stopped before its first token: as if never asked (its neighbours merge)
        if m.get("prefix") is not None:
            if not isinstance(m["prefix"], bool):
                raise bad(f"messages[{i}].prefix must be true or false", f"messages[{i}].prefix")
            if m["prefix"]:
                message["prefix"] = True
        out.append(message)
    return out


def _completion_prompt(body: dict, tokenizer, vocab: int) -> list[int]:
    """`prompt`: text (encoded with BOS, as `generate --raw`), or token ids; one prompt only."""
    prompt = body.get("prompt", _MISSING)
    if prompt is _MISSING or prompt is None:
        raise bad("prompt is required: a string or a list of token ids", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        try:
            return tokenizer.encode(prompt)
        except MixtralError as e:
            raise bad(f"prompt: {e}", "prompt") from None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < vocab for t in prompt):
            raise bad(f"prompt has token ids outside the vocabulary (0 to {vocab - 1})", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt: one prompt per request is supported, not a batch", "prompt", "unsupported_parameter")
    raise bad("prompt must be a string or a non-empty list of token ids", "prompt")


# --------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------


def parse(body: Any, chat: bool, tokenizer, served: str, context: int, vocab: int,
          defaults: Defaults | None = None) -> Request:
    """Check a decoded JSON body for /v1/chat/completions (`chat`) or /v1/completions.

    `served`: the model name this server answers to; `context`: its context length in tokens.
    """
    defaults = defaults or Defaults()
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model", served)
    if not isinstance(model, str):
        raise bad("model must be a string", "model")
    # Any name is this server's one model (clients default to "gpt-3.5-turbo" and the like);
    # responses name the model that answered.
    _refuse_unsupported(body)
    sampling, seed = _sampling(body, defaults, vocab)
    stop = _stop(body)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    if options and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    include_usage = _bool(options or {}, "include_usage", False)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = _number(body, name, None, integer=True)
    if asked is not None:
        _in_range(name, asked, 1 <= asked <= context, f"from 1 to the model's context of {context} tokens")

    param = "messages" if chat else "prompt"
    if chat:
        messages = _messages(body)
        try:
            prompt = tokenizer.apply_chat_template(messages)
        except MixtralError as e:
            raise bad(f"messages: {e}", "messages") from None
    else:
        prompt = _completion_prompt(body, tokenizer, vocab)
    if len(prompt) >= context:
        raise bad(f"the {param} takes {len(prompt)} tokens, which leaves no room to answer in the model's "
                  f"context of {context} tokens; shorten it", param, "context_length_exceeded")
    room = context - len(prompt)  # left out: until the model stops or the context is full
    max_tokens = min(room, asked if asked is not None else defaults.max_tokens or room)
    return Request(chat=chat, model=served, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                   seed=seed, stop=stop, stream=stream, include_usage=include_usage)


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """What the response to one request is built from, filled in as generation goes."""

    request: Request
    id: str = ""
    created: int = 0
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    @property
    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.request.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model}

    def complete(self) -> dict[str, Any]:
        """The whole response (stream: false)."""
        if self.request.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text},
                      "logprobs": None, "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish_reason}
        return {**self._envelope(False), "choices": [choice], "usage": self.usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed event: a piece of text, the opening role (chat), or the finish reason."""
        if self.request.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        out = {**self._envelope(True), "choices": [choice]}
        if self.request.include_usage:
            out["usage"] = None  # OpenAI: every chunk has it, null until the last
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """The last event of a stream with include_usage: no choices, the usage."""
        return {**self._envelope(True), "choices": [], "usage": self.usage}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
