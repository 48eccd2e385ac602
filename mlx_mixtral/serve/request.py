"""The one request core that Chat Completions, Responses and Messages share.

Each protocol module (`openai_api`, `responses_api`, `anthropic_api`) reads its own body shape
and hands this module the same few things: the conversation as OpenAI chat messages (roles
system, user, assistant, tool; text contents; assistant `tool_calls`; tool replies by
`tool_call_id`), the function tools and what the tool choice asks for, the response format,
sampling, stop strings and limits. `build` turns them into one `Request`: prompt ids in the
model's own chat format, the grammar the reply is held to (tools, JSON, a schema), the tool
syntax the reply is read with, and max_tokens cut to the context. The scheduler, the prompt
cache and the queue only ever see a `Request`, so every protocol gets the same tool calls,
constraints, caching and queueing.

Errors are `APIError`s (status, message, type, the field at fault); each protocol writes them in
its own error shape.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..constrain import Grammar, check, json_grammar, text_grammar, tool_grammar
from ..errors import MixtralError
from ..sampling import SamplingParams
from ..tokenizer import ToolSyntax, generic_messages, mistral_call_id, tool_syntax

MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; llama-server does not limit)


class APIError(Exception):
    """A request the server refuses: HTTP `status`, a one-line message, an OpenAI error type and
    the field at fault (`param`). `body()` is OpenAI's error shape; Messages writes its own."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TooLong(APIError):
    """A prompt that leaves no room to answer: each protocol says so in its own words (Claude
    Code compacts on Anthropic's, Codex on OpenAI's code)."""

    def __init__(self, tokens: int, context: int, param: str):
        super().__init__(400, f"the {param} takes {tokens} tokens, which leaves no room to answer in the model's "
                              f"context of {context} tokens; shorten it", param=param, code="context_length_exceeded")
        self.tokens, self.context = tokens, context


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
    """One checked generation request, ready for the scheduler, whichever protocol it came in."""

    chat: bool  # a conversation (else a raw completion prompt)
    model: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool = False
    grammar: Grammar | None = None  # what the reply is held to (response format, tools)
    tools: ToolSyntax | None = None  # the reply is read for tool calls written in this syntax
    logprobs: int | None = None  # alternatives per token (0: only the chosen token's); None: off
    shown: tuple[int, ...] = ()  # control ids shown in the reply's text (the tool-call marker)


# --------------------------------------------------------------------------------------------
# Reading fields
# --------------------------------------------------------------------------------------------

MISSING = object()


def number(body: dict, name: str, default: Any, integer: bool = False) -> Any:
    """`body[name]` as a finite number (an int if `integer`); JSON true/false are not numbers."""
    value = body.get(name, MISSING)
    if value is MISSING or value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise bad(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}", name)
    return value


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def in_range(name: str, value: float, ok: bool, what: str) -> None:
    if not ok:
        raise bad(f"{name} must be {what}, got {value}", name)


def sampling(body: dict, defaults: Defaults, vocab: int, max_temperature: float = 2) -> tuple[SamplingParams, int | None]:
    """The sampling fields every protocol names alike (temperature, top_p, top_k, min_p, the
    penalties, seed), each checked; what a body leaves out comes from `defaults`."""
    d = defaults.sampling
    temp = number(body, "temperature", d.temp)
    top_p = number(body, "top_p", d.top_p)
    top_k = number(body, "top_k", d.top_k, integer=True)
    min_p = number(body, "min_p", d.min_p)
    penalty = number(body, "repetition_penalty", d.repetition_penalty)
    repeat = number(body, "repeat_penalty", None)  # llama.cpp's and Ollama's name for it
    if repeat is not None:
        if body.get("repetition_penalty") is not None and repeat != penalty:
            raise bad("repeat_penalty and repetition_penalty are the same setting: send one", "repeat_penalty")
        penalty = repeat
    frequency = number(body, "frequency_penalty", d.frequency_penalty)
    presence = number(body, "presence_penalty", d.presence_penalty)
    seed = number(body, "seed", defaults.seed, integer=True)
    in_range("temperature", temp, 0 <= temp <= max_temperature, f"from 0 to {max_temperature}")
    in_range("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")
    in_range("top_k", top_k, 0 <= top_k <= vocab, f"from 0 (off) to the vocabulary size {vocab}")
    in_range("min_p", min_p, 0 <= min_p < 1, "in [0, 1)")
    in_range("repetition_penalty", penalty, 0 < penalty <= 10, "in (0, 10]")
    in_range("frequency_penalty", frequency, -2 <= frequency <= 2, "from -2 to 2")
    in_range("presence_penalty", presence, -2 <= presence <= 2, "from -2 to 2")
    if seed is not None:
        in_range("seed", seed, 0 <= seed < 2**64, "from 0 to 2**64 - 1")
    return SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=penalty,
                          frequency_penalty=frequency, presence_penalty=presence), seed


def stop_strings(value: Any, param: str = "stop") -> list[str]:
    """Stop strings: a string or a list of them (None: none)."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"{param} must be a string or a list of strings", param)
    if len(stops) > MAX_STOPS:
        raise bad(f"{param} has {len(stops)} strings; at most {MAX_STOPS} are allowed", param)
    if any(not s for s in stops):
        raise bad(f"{param} strings must not be empty", param)
    return stops


def max_tokens_asked(body: dict, names: Sequence[str], context: int) -> int | None:
    """The reply's token limit under the first of `names` the body sends, checked; None if none."""
    name = next((n for n in names if body.get(n) is not None), names[0])
    asked = number(body, name, None, integer=True)
    if asked is not None:
        in_range(name, asked, 1 <= asked <= context, f"from 1 to the model's context of {context} tokens")
    return asked


# --------------------------------------------------------------------------------------------
# Tools and formats
# --------------------------------------------------------------------------------------------


@dataclass
class Tools:
    """A request's function tools (OpenAI chat tool objects) and what the tool choice asks for."""

    tools: list[dict]
    choice: str  # "none", "auto" or "required"
    only: str | None = None  # the one function a named tool choice forces: exactly one call
    parallel: bool = True  # more than one call in a reply (never with `only`)
    params: list[str] = field(default_factory=list)  # each tool's schema field, as the client named it


def function_tools(tools: Sequence[dict], choice: str, only: str | None, parallel: bool, param: str = "tools",
                   fields: tuple[str, str] = ("function.name", "function.parameters"),
                   indexes: Sequence[int] | None = None, max_name: int = 64) -> Tools:
    """Check `tools` (`{"type": "function", "function": {"name", "description", "parameters"}}`,
    whatever shape the protocol sent them in) and the choice. Errors name the field as the client
    sent it: `param[index].field` (`indexes`: the tools' places in the request, where others were
    skipped)."""
    checked, params, names = [], [], set()
    for i, tool in zip(indexes if indexes is not None else range(len(tools)), tools):
        name_param, schema_param = (f"{param}[{i}].{f}" for f in fields)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= max_name or not all(c.isalnum() or c in "_-" for c in name):
            raise bad(f"{name_param} must be 1-{max_name} letters, digits, _ or -, got {json.dumps(name)}", name_param)
        if name in names:
            raise bad(f"{param}[{i}]: two tools are named {name}", name_param)
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad(f"{schema_param} must be a JSON schema object", schema_param)
        description = function.get("description")
        checked.append({"type": "function", "function": {
            "name": name, **({"description": description} if isinstance(description, str) else {}),
            # no schema (or an empty one) still means an object of arguments, as OpenAI defines them
            "parameters": parameters if parameters else {"type": "object", "properties": {}}}})
        params.append(schema_param)
    if only is not None and only not in names:
        raise bad(f"tool_choice must be a function naming one of the tools ({', '.join(sorted(names))}), "
                  f"got {json.dumps(only)}", "tool_choice")
    return Tools(checked, "required" if only is not None else choice, only, parallel and only is None, params)


def function_tools_of(tools: Any, as_function: Callable[[dict], dict | None], route: str,
                      shape: str) -> tuple[list[dict], list[int]]:
    """The function tools among a request's `tools` (in the chat shape, as `as_function` makes
    each one; None: a tool of another kind, such as a hosted web search, which cannot run here)
    and their places in the list. Tools of other kinds are left out of the prompt, not refused
    (agents send them every turn), and the server log names them once (`route`: the endpoint)."""
    tools = tools or []
    if not isinstance(tools, list):
        raise bad(f"tools must be a list of {shape} objects", "tools")
    functions, indexes, skipped = [], [], []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad(f"tools[{i}] must be a tool object", f"tools[{i}]")
        function = as_function(tool)
        if function is None:
            skipped.append(str(tool.get("type") or tool.get("name")))
        else:
            functions.append({"type": "function", "function": function})
            indexes.append(i)
    if skipped:
        _note_skipped(route, tuple(sorted(set(skipped))))
    return functions, indexes


@functools.lru_cache(maxsize=64)
def _note_skipped(route: str, kinds: tuple[str, ...]) -> None:
    """Said once per server, route and set of kinds."""
    print(f"note: {route}: left out tools this server cannot run: {', '.join(kinds)} (the model is told only of "
          "function tools)", file=sys.stderr, flush=True)


def json_format(schema: dict | None, what: str) -> Grammar:
    """The grammar of a JSON response format: any object (`schema` None) or one matching `schema`."""
    return json_grammar(schema, what=what)


def checked(grammar: Grammar | None, tokenizer, param: str) -> Grammar | None:
    """`grammar`, once llguidance has compiled it; a schema it cannot enforce is a 400 naming it."""
    if grammar is not None:
        try:
            check(grammar, tokenizer)
        except MixtralError as e:
            raise bad(str(e), param, "unsupported_schema") from None
    return grammar


# --------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------


def fold_system(messages: list[dict]) -> list[dict]:
    """Every system message's text, in order, as one system message first: what Mistral's own
    encoding does with system text anywhere, and what a Jinja template that wants the system prompt
    first can render (agents send instructions between turns; none may be dropped)."""
    system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    rest = [m for m in messages if m["role"] != "system"]
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + rest


def check_tool_results(messages: Sequence[dict], param: str, what: str = "tool result") -> None:
    """Every tool reply answers a call made earlier in the conversation."""
    made: set[str] = set()
    for message in messages:
        made.update(call["id"] for call in message.get("tool_calls", []))
        if message["role"] == "tool" and message["tool_call_id"] not in made:
            raise bad(f"{param}: the {what} for call id {json.dumps(message['tool_call_id'])} answers no call "
                      "made earlier in the conversation", param)


def _prompt(messages: list[dict], tools: Tools | None, tokenizer, param: str) -> tuple[list[int], ToolSyntax]:
    """The prompt ids of a conversation in the model's chat format, with its tools where the
    format renders them and described in a system message where it does not."""
    syntax = tool_syntax(tokenizer.chat_format)
    messages = [{**m, "tool_calls": [{**c, "function": dict(c["function"])} for c in m["tool_calls"]]}
                if m.get("tool_calls") else dict(m) for m in messages]  # the caller's stay as they were
    if syntax.native and tokenizer.chat_format.kind == "mistral-v3":
        for message in messages:  # v3 takes 9-character call ids: others are mapped, stably
            for call in message.get("tool_calls", []):
                call["id"] = mistral_call_id(call["id"])
            if message.get("tool_calls"):
                message.pop("content", None)
            if "tool_call_id" in message:
                message["tool_call_id"] = mistral_call_id(message["tool_call_id"])
    elif syntax.native:  # a template renders arguments as objects (transformers' convention)
        for message in messages:
            for call in message.get("tool_calls", []):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"] or "{}")
    elif tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        described = tools is not None and tools.choice != "none"
        messages = generic_messages(messages, tools.tools if described else [], tools is not None and
                                    tools.choice == "required", tools.only if tools else None)
    try:
        return tokenizer.apply_chat_template(messages, tools=tools.tools if tools and syntax.native else None), syntax
    except MixtralError as e:
        raise bad(f"{param}: {e}", param) from None


def build(messages: list[dict], tools: Tools | None, text: Grammar | None, *, tokenizer, served: str, context: int,
          sampling: SamplingParams, seed: int | None, stop: list[str], stream: bool, asked: int | None,
          defaults: Defaults, logprobs: int | None = None, include_usage: bool = False,
          param: str = "messages", format_param: str = "response_format", prompt: list[int] | None = None) -> Request:
    """The `Request` for a conversation (`messages`), or for raw `prompt` ids: its tools and
    response format (`text`) compiled into the grammar the reply is held to, max_tokens cut to
    what the context leaves (`asked` None: up to the context, or the server's default)."""
    syntax = None
    if prompt is None:
        prompt, syntax = _prompt(messages, tools, tokenizer, param)
        if tools is not None:
            for tool, where in zip(tools.tools, tools.params):
                function = tool["function"]
                checked(json_grammar(function["parameters"], what=f"{where} ({function['name']})"), tokenizer, where)
            if tools.choice == "none":
                text, syntax = text or text_grammar(syntax), None
            else:
                text = tool_grammar(syntax, tools.tools, tools.choice == "required", tools.only, tools.parallel, text)
        else:
            syntax = None
    grammar = checked(text, tokenizer, "tools" if syntax is not None else format_param)
    if len(prompt) >= context:
        raise TooLong(len(prompt), context, param)
    room = context - len(prompt)
    max_tokens = min(room, asked if asked is not None else defaults.max_tokens or room)
    return Request(chat=messages is not None, model=served, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                   seed=seed, stop=stop, stream=stream, include_usage=include_usage, grammar=grammar, tools=syntax,
                   logprobs=logprobs, shown=(syntax.marker_id,) if syntax and syntax.marker_id is not None else ())
