"""Structured output, tool calls and logprobs: enforced by a grammar token by token, read back
as OpenAI's clients read them (the openai SDK, LangChain), checked with jsonschema, and logprobs
against an independent log-softmax of the model's logits.

The weights are random, so a reply is whatever the grammar lets chance pick: exactly the case
where an unenforced format would break. Schemas bound their strings and numbers, so replies end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from mlx_mixtral.constrain import check, json_grammar, tool_grammar
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.sampling import SamplingParams
from mlx_mixtral.tokenizer import GENERIC, generic_messages, tool_syntax

import tokenizer_folders as folders
from served import Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8},
                                                                      "n": {"type": "integer", "minimum": 1, "maximum": 5}},
                                     "required": ["q"], "additionalProperties": False}}}
TOOLS = [WEATHER, SEARCH]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# Nested objects, arrays, enums, required and optional, bounded numbers, patterns, $defs.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1, "maximum": 1}, "y": {"type": "number", "minimum": -1, "maximum": 1}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                      "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 5}},
     "required": ["code", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}},
                        "required": ["id"], "additionalProperties": False}},
     "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "exclusiveMinimum": 0,
                                                                         "maximum": 10}},
     "required": ["kind", "r"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3}},
                "required": ["a"], "additionalProperties": False},
               {"type": "string", "maxLength": 4}]},
]


@pytest.fixture(scope="module")
def members(hf_checkpoint_factory, tmp_path_factory) -> dict[str, Path]:
    """The tiny gqa weights under Mixtral-8x22B-Instruct's (v3), 8x7B-Instruct's (v1) and a ChatML
    fine-tune's tokenizer files."""
    source = hf_checkpoint_factory("gqa")
    root = tmp_path_factory.mktemp("constrained")
    return {"v3": folders.with_weights(source, root / "v3", folders.instruct_v3),
            "v1": folders.with_weights(source, root / "v1", folders.instruct_v1),
            "chatml": folders.with_weights(source, root / "chatml", folders.chatml, "model"),
            "hermes": folders.with_weights(source, root / "hermes", folders.hermes)}


@pytest.fixture(scope="module")
def loaded(members):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = mlx_mixtral.load(members[name], progress=False)
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------
# The grammar, at the Python API
# --------------------------------------------------------------------------------------------


def _outside_strings(text: str) -> str:
    """`text` (JSON) without its string literals."""
    out, in_string, escaped = [], False, False
    for c in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        else:
            out.append(c)
    return "".join(out)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_finished_reply_validates_against_its_schema(loaded, index):
    model, tokenizer = loaded("v1")
    schema = SCHEMAS[index]
    grammar = json_grammar(schema)
    check(grammar, tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Answer in JSON."}])
    finished = 0
    for seed in range(6):
        *_, last = replies = list(mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=60, grammar=grammar,
                                                              sampling=SamplingParams(temp=1.0), seed=seed))
        text = "".join(r.text for r in replies)
        if last.finish_reason == "stop":
            finished += 1
            value = json.loads(text)
            jsonschema.validate(value, schema)
            assert not any(c.isspace() for c in _outside_strings(text.strip()))  # compact
    assert finished >= 4


def test_without_a_grammar_random_weights_write_no_json(loaded):
    """The test above can fail: unconstrained, these weights do not write JSON."""
    model, tokenizer = loaded("v1")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Answer in JSON."}])
    text = mlx_mixtral.generate(model, tokenizer, prompt, max_tokens=30, sampling=SamplingParams(temp=1.0), seed=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("schema, needle", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"type": "string", "format": "telepathy"}, "telepathy"),
    ({"$ref": "https://example.com/schema.json"}, "example.com"),
    ({"not": {"type": "string"}}, "not"),
])
def test_a_schema_llguidance_cannot_compile_is_named_in_one_line(loaded, schema, needle):
    _, tokenizer = loaded("v1")
    with pytest.raises(MixtralError) as error:
        check(json_grammar(schema), tokenizer)
    assert needle in str(error.value) and "\n" not in str(error.value)


def accepts(grammar, tokenizer, ids: list[int]) -> bool:
    """Whether `grammar` takes exactly these ids as a whole reply."""
    import llguidance

    from mlx_mixtral.constrain.vocabulary import llg_tokenizer

    matcher = llguidance.LLMatcher(llg_tokenizer(tokenizer), llguidance.LLMatcher.grammar_from_lark(grammar.lark),
                                   log_level=0)
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


OPEN = {"type": "object", "properties": {"a": {"type": "integer"}, "inner": {"type": "array", "items": {
    "type": "object", "properties": {"x": {"type": "integer"}}}}}, "required": ["a"]}


@pytest.mark.parametrize("schema, text, ok", [
    (OPEN, '{"a":1}', True),
    (OPEN, '{"a":1,"inner":[{"x":2}]}', True),
    (OPEN, '{"a":1,"b":2}', False),  # no additionalProperties: only the declared keys
    (OPEN, '{"a":1,"inner":[{"x":2,"y":3}]}', False),  # nested objects too
    ({**OPEN, "additionalProperties": True}, '{"a":1,"b":2}', True),  # said: honoured
    ({**OPEN, "additionalProperties": {"type": "integer"}}, '{"a":1,"b":2}', True),
    ({**OPEN, "additionalProperties": {"type": "integer"}}, '{"a":1,"b":"x"}', False),
    ({"type": "object"}, '{"z":1}', True),  # no properties listed: any object
    ({"allOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"b": {"type": "integer"}}}]},
     '{"a":1,"b":2}', True),  # each branch sees only part of the keys
])
def test_objects_that_do_not_say_additional_properties_get_only_their_own(loaded, schema, text, ok):
    _, tokenizer = loaded("v1")
    assert accepts(json_grammar(schema), tokenizer, tokenizer.encode_text(text)) == ok
    if ok:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("member", ["v3", "v1"])
def test_a_named_tool_or_no_parallel_calls_means_exactly_one_call(loaded, member):
    """OpenAI's forced function is "call exactly one specific function"; parallel_tool_calls false
    is at most one call. The grammar takes one call and refuses a second."""
    _, tokenizer = loaded(member)
    syntax = tool_syntax(tokenizer.chat_format)
    one = '{"name": "search", "arguments": {"q": "a"}}'
    calls = {n: [syntax.marker_id] * (syntax.marker_id is not None) + tokenizer.encode_text(
        ("" if syntax.marker_id is not None else syntax.marker) + syntax.opening.lstrip()  # (encode_text adds "▁")
        + syntax.between.join([one] * n)
        + syntax.closing) for n in (1, 2)}
    from mlx_mixtral.serve.request import function_tools

    forced = function_tools(TOOLS, "required", "search", True)
    assert forced.parallel is False and forced.choice == "required"
    for grammar in (tool_grammar(syntax, TOOLS, True, "search", forced.parallel),
                    tool_grammar(syntax, TOOLS, False, None, parallel=False)):
        assert accepts(grammar, tokenizer, calls[1]) and not accepts(grammar, tokenizer, calls[2])
    assert accepts(tool_grammar(syntax, TOOLS, True, None, parallel=True), tokenizer, calls[2])


@pytest.mark.parametrize("member", ["v3", "v1", "chatml", "hermes"])
def test_a_required_call_is_written_in_the_models_syntax(loaded, member):
    model, tokenizer = loaded(member)
    syntax = tool_syntax(tokenizer.chat_format)
    assert syntax.native == (member in ("v3", "hermes"))
    if syntax.native:
        prompt = tokenizer.apply_chat_template(ASK, tools=TOOLS)
    else:
        prompt = tokenizer.apply_chat_template(generic_messages(ASK, TOOLS, required=True))
    grammar = tool_grammar(syntax, TOOLS, required=True, parallel=False)
    check(grammar, tokenizer)
    shown = [syntax.marker_id] if syntax.marker_id is not None else []
    *_, last = replies = list(mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=80, grammar=grammar,
                                                          sampling=SamplingParams(temp=1.0), seed=3, shown=shown))
    text = "".join(r.text for r in replies).lstrip()
    assert last.finish_reason == "stop" and text.startswith(syntax.marker)
    if syntax.marker_id is not None:
        assert last.tokens[0] == syntax.marker_id  # the control token, not the words
    body = text.removeprefix(syntax.marker)
    if member == "hermes":  # <tool_call>\n{...}\n</tool_call>, as its template writes a call
        assert body.startswith("\n{") and body.endswith("}\n</tool_call>")
        call = json.loads(body.removesuffix("</tool_call>"))
    else:
        (call,) = json.loads(body)
    tool = {"get_weather": WEATHER, "search": SEARCH}[call["name"]]
    jsonschema.validate(call["arguments"], tool["function"]["parameters"])


def test_a_templates_own_tool_syntax_is_read_off_its_rendering(loaded):
    """Hermes-style: tools rendered by the template (the ids transformers gives), calls in
    <tool_call> tags; a template that renders tools but no calls gets the generic syntax."""
    from transformers import AutoTokenizer

    _, tokenizer = loaded("hermes")
    syntax = tool_syntax(tokenizer.chat_format)
    assert (syntax.marker, syntax.opening, syntax.between, syntax.closing) == \
        ("<tool_call>", "\n", "\n</tool_call>\n<tool_call>\n", "\n</tool_call>")
    hf = AutoTokenizer.from_pretrained(tokenizer.files.folder)
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    reference = hf.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert tokenizer.apply_chat_template(messages, tools=TOOLS) == list(reference)
    _, abridged = loaded("chatml")
    assert tool_syntax(abridged.chat_format) is GENERIC


def test_generic_prompt_describes_the_tools_and_rewrites_earlier_calls():
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "22C"}]
    out = generic_messages(messages, TOOLS, only="search")
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert "Call the function search" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'}
    assert out[3]["role"] == "user" and out[3]["content"].count("[TOOL_RESULTS]") == 2 and len(out) == 4
    assert GENERIC.marker_id is None


def test_logprobs_are_the_log_softmax_of_the_logits(loaded):
    """Greedy, no penalties: the sampler sees the model's logits as they are; checked against a
    float64 log-softmax of a fresh forward pass over the prompt and the reply (teacher forced)."""
    model, tokenizer = loaded("v1")
    prompt = tokenizer.apply_chat_template(ASK)
    replies = list(mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=8, logprobs=5))
    tokens = [r.token for r in replies]
    logits = model(mx.array([prompt + tokens[:-1]]))[0, len(prompt) - 1:].astype(mx.float32)
    reference = np.array(logits, dtype=np.float64)
    reference -= np.log(np.exp(reference - reference.max(-1, keepdims=True)).sum(-1, keepdims=True)) + \
        reference.max(-1, keepdims=True)
    for step, r in enumerate(replies):
        assert r.logprob == pytest.approx(reference[step, r.token], abs=1e-4)
        best = np.argsort(-reference[step])[:5]
        assert [t for t, _ in r.top_logprobs] == best.tolist()
        assert [v for _, v in r.top_logprobs] == pytest.approx(reference[step, best].tolist(), abs=1e-4)


# --------------------------------------------------------------------------------------------
# The server, with real clients
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["v3", "v1", "hermes"])
def server(request, members):
    s = Server(members[request.param])
    s.member = request.param
    yield s
    s.stop()


def _validate_calls(calls) -> None:
    for call in calls:
        tool = {"get_weather": WEATHER, "search": SEARCH}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_tool_calls_round_trip_with_the_openai_sdk(server):
    client = server.client()
    first = client.chat.completions.create(model="gpt-4o", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=80, temperature=1.0, seed=3)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1 and choice.message.tool_calls[0].type == "function"
    _validate_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    second = client.chat.completions.create(model="gpt-4o", messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=12)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content
    plain = client.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=1)
    assert second.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the call and its result are in it


def test_v3_prompts_carry_the_tools_as_mistral_common_encodes_them(server, loaded):
    if server.member != "v3":
        pytest.skip("the native format is v3's")
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Tool
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    reference = MistralTokenizer.from_file(str(folders.V3_MODEL))
    ids = reference.encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content=ASK[0]["content"])], tools=[Tool(**t) for t in TOOLS])).tokens
    r = server.client().chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=1)
    assert r.usage.prompt_tokens == len(ids)
    _, tokenizer = loaded("v3")
    assert tokenizer.apply_chat_template(ASK, tools=TOOLS) == ids


def test_streamed_tool_calls_arrive_as_openai_streams_them(server):
    client = server.client()
    kwargs = dict(model="m", messages=ASK, tools=TOOLS, max_tokens=80, temperature=1.0, seed=5,
                  tool_choice={"type": "function", "function": {"name": "search"}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    deltas = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.delta.tool_calls or []:
            if tc.index not in calls:  # the first delta of a call: index, id, type, name, empty arguments
                assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                calls[tc.index] = {"name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments
    assert deltas[-1].finish_reason == "tool_calls" == whole.finish_reason
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert {c["name"] for c in calls.values()} == {"search"}


def test_tool_choice_none_and_auto(server):
    client = server.client()
    none = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=10,
                                          temperature=1.0, seed=1)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "length"
    for seed in range(3):  # auto: text, or calls that parse and match
        auto = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=60, temperature=1.0,
                                              seed=seed)
        message = auto.choices[0].message
        if auto.choices[0].finish_reason == "tool_calls":
            _validate_calls(message.tool_calls)
        else:
            assert message.tool_calls is None and "[TOOL_CALLS]" not in (message.content or "")


def test_json_schema_and_json_object_responses(server):
    client = server.client()
    for schema in SCHEMAS[:4]:
        r = client.chat.completions.create(model="m", messages=ASK, max_tokens=60, temperature=1.0, seed=2,
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "answer", "schema": schema,
                                                                            "strict": True}})
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model="m", messages=ASK, max_tokens=40, seed=2,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_tools_and_a_response_format_together(server):
    """auto with json_schema: the reply is calls, or JSON that matches the schema, never loose text."""
    client = server.client()
    schema = SCHEMAS[0]
    finished = 0
    for seed in range(4):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=60, temperature=1.0,
                                           seed=seed, response_format={"type": "json_schema", "json_schema": {
                                               "name": "person", "schema": schema}})
        choice = r.choices[0]
        if choice.finish_reason == "tool_calls":
            _validate_calls(choice.message.tool_calls)
        elif choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), schema)
        finished += choice.finish_reason != "length"
    assert finished >= 2


def test_logprobs_chat_streamed_and_completions(server, loaded):
    model, tokenizer = loaded(server.member)
    client = server.client()
    whole = client.chat.completions.create(model="m", messages=ASK, max_tokens=6, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    prompt = tokenizer.apply_chat_template(ASK)
    direct = list(mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=6, logprobs=3))
    for entry, r in zip(content, direct):
        assert entry.logprob == pytest.approx(r.logprob, abs=1e-5)
        assert bytes(entry.bytes) == tokenizer.token_bytes(r.token)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in r.top_logprobs], abs=1e-5)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model="m", messages=ASK, max_tokens=6, logprobs=True, top_logprobs=3, stream=True) if c.choices]
    flat = [e for lp in streamed if lp is not None for e in lp.content]
    assert [e.logprob for e in flat] == pytest.approx([e.logprob for e in content], abs=1e-5)
    completion = client.completions.create(model="m", prompt="Hello", max_tokens=4, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_langchain_bind_tools_and_structured_output(server):
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model="gpt-4o", temperature=1.0,
                     max_tokens=120, seed=3, max_retries=0)

    class GetWeather(BaseModel):
        """Current weather in a city."""

        city: str = Field(max_length=12)
        unit: Literal["celsius", "fahrenheit"]

    message = llm.bind_tools([GetWeather], tool_choice="required", parallel_tool_calls=False, strict=True).invoke(
        "What is the weather in Paris?")
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] == "GetWeather"
    GetWeather(**message.tool_calls[0]["args"])

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=120)

    for method in ("json_schema", "function_calling"):  # strict: no extra keys (random weights would add some)
        person = llm.with_structured_output(Person, method=method, strict=True).invoke("Describe someone.")
        assert isinstance(person, Person) and 0 <= person.age <= 120


BAD = [
    ({"tools": [{"type": "function"}]}, "tools[0]", "must be"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "naming"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "none, auto, required"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}]},
     "tools[0].function.parameters", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", "not"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"functions": [{"name": "f"}]}, "functions", "send tools"),
]


@pytest.mark.parametrize("extra, param, needle", BAD, ids=[b[1] + "-" + b[2] for b in BAD])
def test_bad_tool_and_format_requests_are_400s(server, extra, param, needle):
    r = server.post("/v1/chat/completions", {"messages": ASK, **extra})
    assert r.status == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"] and "\n" not in error["message"], error


# --------------------------------------------------------------------------------------------
# generate --json / --json-schema
# --------------------------------------------------------------------------------------------


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "generate", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_generate_json_schema_and_its_errors(members, tmp_path):
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(SCHEMAS[0]))
    r = _generate("--model", str(members["v1"]), "--prompt", "Someone?", "--json-schema", str(schema_file),
                  "--temp", "1", "--seed", "1", "--max-tokens", "60")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), SCHEMAS[0])
    r = _generate("--model", str(members["v1"]), "--prompt", "Anything?", "--json", "--max-tokens", "40", "--seed", "0",
                  "--temp", "1")
    assert r.returncode == 0 and r.stdout.lstrip().startswith("{"), r.stderr
    schema_file.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    for bad, needle in [(schema_file, "uniqueItems"), (tmp_path / "missing.json", "cannot read"),
                        (members["v1"] / "tokenizer.model", "not JSON")]:
        r = _generate("--model", str(members["v1"]), "--prompt", "x", "--json-schema", str(bad), "--max-tokens", "4")
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert needle is None or needle in lines[0]
