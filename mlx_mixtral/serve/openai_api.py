"""Chat Completions and Completions requests, parsed and checked (responses: `openai_reply`).

No HTTP here (that is `server`) and no model (that is `scheduler`): a request body goes in, the
one `request.Request` that every protocol becomes (token ids, grammar, sampling) comes out, or an `APIError` that says in one line
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
from typing import Any

from ..constrain import Grammar
from ..errors import MixtralError
from ..generate import MAX_TOP_LOGPROBS  # chat's top_logprobs: what the sampler keeps
from ..sampling import REPETITION_WINDOW
from .request import (
    MISSING,
    Defaults,
    Request,
    Tools,
    bad,
    boolean,
    build,
    function_tools,
    in_range,
    json_format,
    max_tokens_asked,
    number,
    sampling,
    stop_strings,
)

MAX_TOKENS_NAMES = ("max_completion_tokens", "max_tokens", "n_predict", "num_predict")
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


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _refuse_unsupported(body: dict) -> None:
    for name, (neutrals, message) in UNSUPPORTED.items():
        value = body.get(name)
        if not any(type(value) is type(v) and value == v for v in neutrals):  # 1 but not true, 0 but not 0.5
            raise bad(message, name, "unsupported_parameter")


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


def _tools(body: dict) -> Tools | None:
    tools = body.get("tools")
    if tools is None or tools == []:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise bad("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise bad("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"parameters\"}}}}",
                      f"tools[{i}]")
    choice, only = body.get("tool_choice", "auto"), None
    if choice is None:
        choice = "auto"
    if isinstance(choice, dict):
        function = choice.get("function")
        only = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(only, str):
            raise bad("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                      "{\"name\": ...}} naming one of the tools", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise bad(f"tool_choice must be none, auto, required or a named function, got {json.dumps(choice)}",
                  "tool_choice")
    return function_tools(tools, choice, only, boolean(body, "parallel_tool_calls", True))


def _response_format(body: dict) -> Grammar | None:
    """The grammar `response_format` asks for (compact JSON), or None for text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_format(None, "response_format json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                      "response_format")
        return json_format(schema, "response_format json_schema")
    raise bad(f"response_format type must be text, json_object or json_schema, got {json.dumps(kind)}",
              "response_format")


def _logprobs(body: dict, chat: bool) -> int | None:
    """Alternatives per token to report (0: the chosen token's only), or None: no logprobs."""
    if not chat:  # /v1/completions: an integer, the alternatives
        n = number(body, "logprobs", None, integer=True)
        if n is not None:
            in_range("logprobs", n, 0 <= n <= MAX_COMPLETION_LOGPROBS, f"from 0 to {MAX_COMPLETION_LOGPROBS}")
        return n
    wanted = boolean(body, "logprobs", False)
    top = number(body, "top_logprobs", None, integer=True)
    if top is not None:
        in_range("top_logprobs", top, 0 <= top <= MAX_TOP_LOGPROBS, f"from 0 to {MAX_TOP_LOGPROBS}")
        if top and not wanted:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None


def _completion_prompt(body: dict, tokenizer, vocab: int) -> list[int]:
    """`prompt`: text (encoded with BOS, as `generate --raw`), or token ids; one prompt only."""
    prompt = body.get("prompt", MISSING)
    if prompt is MISSING or prompt is None:
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
    if not isinstance(body.get("model", served), str):
        raise bad("model must be a string", "model")
    # Any name is this server's one model (clients default to "gpt-3.5-turbo" and the like);
    # responses name the model that answered.
    _refuse_unsupported(body)
    params, seed = sampling(body, defaults, vocab)
    stop = stop_strings(body.get("stop"))
    stream = boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    if options and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    include_usage = boolean(options or {}, "include_usage", False)
    # OpenAI's two names, llama.cpp's and Ollama's: the first one sent counts
    asked = max_tokens_asked(body, MAX_TOKENS_NAMES, context)
    logprobs = _logprobs(body, chat)
    common = dict(tokenizer=tokenizer, served=served, context=context, sampling=params, seed=seed, stop=stop,
                  stream=stream, asked=asked, defaults=defaults, logprobs=logprobs, include_usage=include_usage)
    if chat:
        return build(_messages(body), _tools(body), _response_format(body), **common)
    if body.get("tools"):
        raise bad("tools are for /v1/chat/completions", "tools")
    return build(None, None, _response_format(body), **common, param="prompt",
                 prompt=_completion_prompt(body, tokenizer, vocab))
