"""The OpenAI HTTP API's requests as plain data, parsed and checked (responses: `openai_reply`).

No HTTP here (that is `server`) and no model (that is `scheduler`): a request body goes in, a
`Request` with token ids and sampling parameters comes out, or an `APIError` that says in one line
what is wrong and which field, with the status and error body OpenAI's clients expect. Chat
requests are encoded in the model's own chat format (`Tokenizer.apply_chat_template`).

Fields OpenAI defines that we cannot honour (n > 1, logit_bias, ...) are refused when they ask
for something, never silently ignored; fields that only describe the caller (`user`, `metadata`,
`store`, `service_tier`) are accepted and ignored. Any `model` name is served by the one model
this server holds. Sampling: OpenAI's `frequency_penalty` and `presence_penalty`, and
`repetition_penalty` (`repeat_penalty`, llama.cpp's and Ollama's name, means the same); without
`max_tokens` a reply runs until the model stops or the context is full. An empty assistant
message (a reply stopped before its first token) is left out, so the user messages around it
join as the chat format joins consecutive messages.

Enforced, never ignored: `response_format` (json_object, json_schema) and `tools` (the model's
tool syntax, `tokenizer.tool_calls`) hold the reply to a grammar (`constrain`); `logprobs` and
`top_logprobs` report the log-softmax of the logits the sampler saw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..constrain import Grammar, check, json_grammar, text_grammar, tool_grammar
from ..errors import MixtralError
from ..generate import MAX_TOP_LOGPROBS  # chat's top_logprobs: what the sampler keeps
from ..sampling import REPETITION_WINDOW, SamplingParams
from ..tokenizer import ToolSyntax, generic_messages, mistral_call_id, tool_syntax

MAX_TOKENS_NAMES = ("max_completion_tokens", "max_tokens", "n_predict", "num_predict")
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; llama-server does not limit)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' legacy integer logprobs
# Fields that change nothing at their neutral value, and that we refuse at any other.
UNSUPPORTED = {
    "n": ((None, 1), "n: only one choice per request is supported; send n=1 (or leave it out)"),
    "best_of": ((None, 1), "best_of: only one candidate per request is supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None,), "suffix (insertion) is not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "mirostat": ((None, 0), "mirostat sampling is not supported"),
    "typical_p": ((None, 1, 1.0), "typical_p is not supported"),
    # llama.cpp's other samplers, which Open WebUI and others pass through
    "tfs_z": ((None, 1, 1.0), "tfs_z (tail-free sampling) is not supported"),
    "dynatemp_range": ((None, 0, 0.0), "dynatemp_range (dynamic temperature) is not supported"),
    "xtc_probability": ((None, 0, 0.0), "xtc_probability (XTC sampling) is not supported"),
    "dry_multiplier": ((None, 0, 0.0), "dry_multiplier (DRY sampling) is not supported"),
    "repeat_last_n": ((None, REPETITION_WINDOW), f"repeat_last_n: the repetition penalty looks at the last "
                      f"{REPETITION_WINDOW} tokens; leave it out or send {REPETITION_WINDOW}"),
    "functions": ((None, []), "functions (the deprecated form of tools) are not supported; send tools"),
    "function_call": ((None, "none", "auto"), "function_call (the deprecated form of tool_choice) is not supported; "
                      "send tool_choice"),
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
    grammar: Grammar | None = None  # what the reply is held to (response_format, tools)
    tools: ToolSyntax | None = None  # the reply is read for tool calls written in this syntax
    logprobs: int | None = None  # alternatives per token (0: only the chosen token's); None: off
    shown: tuple[int, ...] = ()  # control ids shown in the reply's text (the tool-call marker)


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


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of text parts (what newer clients send); null is ""
    (an assistant message that only calls tools)."""
    content = message.get("content")
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if content is None and (message.get("tool_calls") or message.get("role") == "assistant"):
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{param}: only text parts are supported, got {json.dumps(kind)}", param)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{param} must be a string or a list of text parts, got {json.dumps(content)}", param)


def _calls(m: dict, i: int) -> list[dict]:
    """An assistant message's tool_calls, checked, arguments as JSON text."""
    calls = m.get("tool_calls")
    param = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise bad(f"{param} must be a list of tool calls", param)
    out = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(f"{param}[{k}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                      f"\"arguments\"}}}}", param)
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise bad(f"{param}[{k}].function.arguments is not JSON: {arguments[:60]!r}", param) from None
        elif isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        else:
            raise bad(f"{param}[{k}].function.arguments must be a JSON string", param)
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise bad(f"{param}[{k}].id must be a non-empty string", param)
        out.append({"id": call_id, "type": "function",
                    "function": {"name": function["name"], "arguments": arguments or "{}"}})
    return out


def _messages(body: dict) -> list[dict]:
    """The conversation as the chat formats take it: roles mapped, contents as text, tool calls
    and tool replies in OpenAI's shape."""
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
        if role == "function" or m.get("function_call"):
            raise bad(f"messages[{i}]: function messages (the deprecated form of tools) are not supported; "
                      "send tool_calls and role \"tool\"", f"messages[{i}]")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)}",
                      f"messages[{i}].role")
        message = {"role": ROLES[role], "content": _content(m, i)}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _calls(m, i)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad(f"messages[{i}].tool_call_id is required: the id of the call this answers",
                          f"messages[{i}].tool_call_id")
            message["tool_call_id"] = call_id
            if isinstance(m.get("name"), str):
                message["name"] = m["name"]
        elif message["role"] == "assistant" and not message["content"] and not m.get("prefix"):
            continue  # a reply stopped before its first token: as if never asked (its neighbours merge)
        if m.get("prefix") is not None:
            if not isinstance(m["prefix"], bool):
                raise bad(f"messages[{i}].prefix must be true or false", f"messages[{i}].prefix")
            if m["prefix"]:
                message["prefix"] = True
        out.append(message)
    return out


@dataclass
class _Tools:
    """A request's tools, checked: OpenAI tool objects, and what tool_choice asks for."""

    tools: list[dict]
    choice: str  # "none", "auto" or "required"
    only: str | None  # the one function a named tool_choice forces
    parallel: bool


def _tools(body: dict) -> _Tools | None:
    tools = body.get("tools")
    if tools is None or tools == []:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise bad("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    checked, names = [], set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}",
                      f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
            raise bad(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {json.dumps(name)}",
                      f"tools[{i}].function.name")
        if name in names:
            raise bad(f"tools[{i}]: two tools are named {name}", f"tools[{i}].function.name")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}].function.parameters")
        description = function.get("description")
        checked.append({"type": "function", "function": {
            "name": name, **({"description": description} if isinstance(description, str) else {}),
            # no schema (or an empty one) still means an object of arguments, as OpenAI defines them
            "parameters": parameters if parameters else {"type": "object", "properties": {}}}})
    choice, only = body.get("tool_choice", "auto"), None
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        function = choice.get("function")
        only = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or only not in names:
            raise bad(f"tool_choice must be none, auto, required or {{\"type\": \"function\", \"function\": "
                      f"{{\"name\": ...}}}} naming one of the tools ({', '.join(sorted(names))})", "tool_choice")
        choice = "required"
    elif choice not in ("none", "auto", "required"):
        raise bad(f"tool_choice must be none, auto, required or a named function, got {json.dumps(choice)}",
                  "tool_choice")
    return _Tools(checked, choice, only, _bool(body, "parallel_tool_calls", True))


def _response_format(body: dict) -> Grammar | None:
    """The grammar `response_format` asks for (compact JSON), or None for text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None, what="response_format json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                      "response_format")
        return json_grammar(schema, what="response_format json_schema")
    raise bad(f"response_format type must be text, json_object or json_schema, got {json.dumps(kind)}",
              "response_format")


def _logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives per token to report (0: the chosen token's only), or None: no logprobs."""
    if not chat:  # /v1/completions: an integer, the alternatives
        n = _number(body, "logprobs", None, integer=True)
        if n is not None:
            _in_range("logprobs", n, 0 <= n <= MAX_COMPLETION_LOGPROBS, f"from 0 to {MAX_COMPLETION_LOGPROBS}")
        return n
    wanted = _bool(body, "logprobs", False)
    top = _number(body, "top_logprobs", None, integer=True)
    if top is not None:
        _in_range("top_logprobs", top, 0 <= top <= MAX_TOP_LOGPROBS, f"from 0 to {MAX_TOP_LOGPROBS}")
        if top and not wanted:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def _chat_prompt(body: dict, tokenizer) -> tuple[list[int], Grammar | None, ToolSyntax | None]:
    """The prompt ids of a chat request, the grammar its tools ask for, and the tool syntax its
    reply is read with (None: no tools, or tool_choice none)."""
    messages = _messages(body)
    tools = _tools(body)
    syntax = tool_syntax(tokenizer.chat_format)
    native = syntax.native
    if native and tokenizer.chat_format.kind == "mistral-v3":
        for message in messages:  # v3 takes 9-character call ids: OpenAI's are mapped, stably
            for call in message.get("tool_calls", []):
                call["id"] = mistral_call_id(call["id"])
            if message.get("tool_calls"):
                message.pop("content", None)
            if "tool_call_id" in message:
                message["tool_call_id"] = mistral_call_id(message["tool_call_id"])
    elif native:  # a template renders arguments as objects (transformers' convention)
        for message in messages:
            for call in message.get("tool_calls", []):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"] or "{}")
    elif tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        described = tools is not None and tools.choice != "none"
        messages = generic_messages(messages, tools.tools if described else [], tools is not None and
                                    tools.choice == "required", tools.only if tools else None)
    try:
        prompt = tokenizer.apply_chat_template(messages, tools=tools.tools if tools and native else None)
    except MixtralError as e:
        raise bad(f"messages: {e}", "messages") from None
    text = _response_format(body)
    if tools is None:
        return prompt, text, None
    for i, tool in enumerate(tools.tools):
        function = tool["function"]
        _checked(json_grammar(function["parameters"], what=f"tools[{i}].function.parameters ({function['name']})"),
                 tokenizer, f"tools[{i}].function.parameters")
    if tools.choice == "none":
        return prompt, text or text_grammar(syntax), None
    grammar = tool_grammar(syntax, tools.tools, tools.choice == "required", tools.only, tools.parallel, text)
    return prompt, grammar, syntax


def _checked(grammar: Grammar | None, tokenizer, param: str) -> Grammar | None:
    if grammar is not None:
        try:
            check(grammar, tokenizer)
        except MixtralError as e:
            raise bad(str(e), param, "unsupported_schema") from None
    return grammar


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
    # OpenAI's two names, llama.cpp's and Ollama's: the first one sent counts
    name = next((n for n in MAX_TOKENS_NAMES if body.get(n) is not None), "max_tokens")
    asked = _number(body, name, None, integer=True)
    if asked is not None:
        _in_range(name, asked, 1 <= asked <= context, f"from 1 to the model's context of {context} tokens")

    param = "messages" if chat else "prompt"
    logprobs = _logprobs(body, chat)
    syntax = None
    if chat:
        prompt, grammar, syntax = _chat_prompt(body, tokenizer)
    else:
        if body.get("tools"):
            raise bad("tools are for /v1/chat/completions", "tools")
        prompt, grammar = _completion_prompt(body, tokenizer, vocab), _response_format(body)
    _checked(grammar, tokenizer, "tools" if syntax is not None else "response_format")
    if len(prompt) >= context:
        raise bad(f"the {param} takes {len(prompt)} tokens, which leaves no room to answer in the model's "
                  f"context of {context} tokens; shorten it", param, "context_length_exceeded")
    room = context - len(prompt)  # left out: until the model stops or the context is full
    max_tokens = min(room, asked if asked is not None else defaults.max_tokens or room)
    return Request(chat=chat, model=served, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                   seed=seed, stop=stop, stream=stream, include_usage=include_usage, grammar=grammar, tools=syntax,
                   logprobs=logprobs, shown=(syntax.marker_id,) if syntax and syntax.marker_id is not None else ())
