"""The agents' protocols end to end: OpenAI's Responses API (Codex CLI, the Agents SDK) and
Anthropic's Messages API (Claude Code), on a real server, spoken to by the official `openai`,
`openai-agents` and `anthropic` SDKs (their parsers and stream accumulators are the test of a
reply) and by raw HTTP (each stream's event order and fields).

Every protocol is one request core: a conversation sent through Responses or Messages gets the
reply Chat Completions gives for the same conversation, token for token (greedy), and the same
cache figures. Two family members: Mixtral-8x22B-Instruct's v3 tokenizer (native tool tokens)
and 8x7B-Instruct's v1 (the generic tool format).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Annotated

import anthropic
import jsonschema
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

import mlx_mixtral

import tokenizer_folders as folders
from served import NAME, Reply, Server

CONTEXT = 2048
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
SEARCH = {"name": "search", "description": "Search the web",
          "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8}},
                         "required": ["q"], "additionalProperties": False}}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "score"], "additionalProperties": False}


def _responses_tool(f: dict) -> dict:
    return {"type": "function", **f}


def _anthropic_tool(f: dict) -> dict:
    return {"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}


def _chat_tool(f: dict) -> dict:
    return {"type": "function", "function": f}


@pytest.fixture(scope="module", params=["v3", "v1"])
def member(request, hf_checkpoint_factory, tmp_path_factory) -> tuple[str, Path]:
    source = tmp_path_factory.mktemp("agents-src") / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    builder = folders.instruct_v3 if request.param == "v3" else folders.instruct_v1
    return request.param, folders.with_weights(source, tmp_path_factory.mktemp("agents") / request.param, builder)


@pytest.fixture(scope="module")
def server(member):
    s = Server(member[1], "--max-tokens", "24", "--api-key", "sekret")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(member):
    return mlx_mixtral.load(member[1], progress=False)


def openai_client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0, timeout=60)


def anthropic_client(server: Server, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="sekret", max_retries=0, timeout=60, **kw)


def chat(server: Server, messages: list[dict], **kw) -> dict:
    return openai_client(server).chat.completions.create(model=NAME, messages=messages, temperature=0,
                                                         **kw).model_dump()


def post(server: Server, path: str, body, headers: dict | None = None) -> Reply:
    """A raw POST with the key in the headers given (Bearer by default)."""
    conn = server.connect()
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                    **(headers or {"Authorization": "Bearer sekret"})})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def events(server: Server, path: str, body: dict, headers: dict | None = None) -> list[tuple[str, dict]]:
    """A raw stream: (the event: line, the data) of each server-sent event."""
    conn = server.connect()
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                "Authorization": "Bearer sekret", **(headers or {})})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    raw = r.read().decode()
    conn.close()
    out = []
    for block in raw.strip().split("\n\n"):
        name = re.search(r"^event: (.*)$", block, re.M)
        data = re.search(r"^data: (.*)$", block, re.M).group(1)
        out.append((name.group(1) if name else None, json.loads(data)))
    return out


CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


def test_responses_create_is_the_chat_completion_of_the_same_conversation(server):
    expected = chat(server, CONVERSATION, max_tokens=12)
    r = openai_client(server).responses.create(model="gpt-5-codex", instructions="You are terse.",
                                               input="Name a colour.", max_output_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == NAME
    assert r.output_text == expected["choices"][0]["message"]["content"]
    assert r.status == ("incomplete" if expected["choices"][0]["finish_reason"] == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert r.usage.input_tokens == expected["usage"]["prompt_tokens"]
    assert r.usage.output_tokens == expected["usage"]["completion_tokens"]
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.instructions == "You are terse." and r.max_output_tokens == 12 and r.temperature == 0


def test_instructions_system_and_developer_text_all_reach_the_prompt(server):
    """Codex sends instructions plus developer messages between user turns: none is dropped, and
    the order is kept (the same prompt as one system message with all of it)."""
    items = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
             {"role": "system", "content": [{"type": "input_text", "text": "Use French."}]},
             {"type": "reasoning", "id": "rs_1", "summary": []},
             {"role": "user", "content": [{"type": "input_text", "text": "Again"}]}]
    r = openai_client(server).responses.create(model=NAME, instructions="You code.", input=items,
                                               max_output_tokens=8, temperature=0)
    expected = chat(server, [{"role": "system", "content": "You code.\n\nBe brief.\n\nUse French."},
                             {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Again"}], max_tokens=8)
    assert r.usage.input_tokens == expected["usage"]["prompt_tokens"]
    assert r.output_text == expected["choices"][0]["message"]["content"]


def test_responses_stream_accumulates_to_the_created_response(server):
    """The SDK's accumulator gives the final response only on response.completed: a reply held to
    a bounded schema ends by itself."""
    client = openai_client(server)
    ask = dict(model=NAME, input="Rate this.", max_output_tokens=80, temperature=0,
               text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}})
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text == "".join(deltas)
    assert final.status == whole.status == "completed" and final.usage.output_tokens == whole.usage.output_tokens
    jsonschema.validate(json.loads(final.output_text), ANSWER)


def test_responses_stream_events_in_openais_order(server):
    got = events(server, "/v1/responses", {"model": NAME, "input": "Name a colour.", "stream": True,
                                           "max_output_tokens": 6, "temperature": 0})
    kinds = [data["type"] for _, data in got]
    assert all(name == data["type"] for name, data in got)  # every event: line names its data's type
    assert [data["sequence_number"] for _, data in got] == list(range(len(got)))
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    body = kinds[2:-1]
    if body:  # one message: added, part added, deltas, text done, part done, item done
        assert body[:2] == ["response.output_item.added", "response.content_part.added"]
        assert body[-3:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
        assert set(body[2:-3]) == {"response.output_text.delta"}
    final = got[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == "".join(d["delta"] for _, d in got if "delta" in d)
    assert got[0][1]["response"]["status"] == "in_progress" and got[0][1]["response"]["output"] == []


def test_a_function_call_round_trip(server):
    client = openai_client(server)
    tools = [_responses_tool(WEATHER), _responses_tool(SEARCH)]
    first = client.responses.create(model=NAME, input="Weather in Paris?", tools=tools, tool_choice="required",
                                    max_output_tokens=60, temperature=0)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and first.status == "completed"
    for call in calls:
        schema = {t["name"]: t["parameters"] for t in tools}[call.name]
        jsonschema.validate(json.loads(call.arguments), schema)
        assert call.call_id and call.id.startswith("fc_")
    history = [{"role": "user", "content": "Weather in Paris?"},
               *[{"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls],
               *[{"type": "function_call_output", "call_id": c.call_id, "output": "22 C, sunny"} for c in calls]]
    second = client.responses.create(model=NAME, input=history, tools=tools, max_output_tokens=12, temperature=0)
    assert second.status in ("completed", "incomplete")
    expected = chat(server, [{"role": "user", "content": "Weather in Paris?"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"id": c.call_id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in calls]},
                             *[{"role": "tool", "tool_call_id": c.call_id, "content": "22 C, sunny"} for c in calls]],
                    tools=[_chat_tool(WEATHER), _chat_tool(SEARCH)], max_tokens=12)
    assert second.usage.input_tokens == expected["usage"]["prompt_tokens"]


def test_streamed_function_calls_reach_codex_as_whole_items(server):
    tools = [_responses_tool(WEATHER)]
    got = events(server, "/v1/responses", {"model": NAME, "input": "Weather?", "tools": tools, "stream": True,
                                           "tool_choice": "required", "parallel_tool_calls": False, "max_output_tokens": 60,
                                           "temperature": 0})
    kinds = [d["type"] for _, d in got]
    assert kinds[-1] == "response.completed"
    done = [d["item"] for _, d in got if d["type"] == "response.output_item.done"]
    assert done and all(item["type"] == "function_call" and item["status"] == "completed" for item in done)
    for item in done:
        jsonschema.validate(json.loads(item["arguments"]), WEATHER["parameters"])
        deltas = "".join(d["delta"] for _, d in got if d["type"] == "response.function_call_arguments.delta"
                         and d["item_id"] == item["id"])
        assert deltas == item["arguments"]
        finished = [d for _, d in got if d["type"] == "response.function_call_arguments.done" and d["item_id"] == item["id"]]
        assert finished[0]["arguments"] == item["arguments"]
    assert got[-1][1]["response"]["output"] == done


def test_text_format_json_schema_validates(server):
    client = openai_client(server)
    r = client.responses.create(model=NAME, input="Rate this.", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), ANSWER)
    assert r.text.format.type == "json_schema"


def test_previous_response_id_continues_the_stored_conversation(server):
    client = openai_client(server)
    first = client.responses.create(model=NAME, input="Name a colour.", max_output_tokens=6, temperature=0)
    second = client.responses.create(model=NAME, previous_response_id=first.id, input="Another?",
                                     max_output_tokens=6, temperature=0)
    expected = chat(server, [{"role": "user", "content": "Name a colour."},
                             {"role": "assistant", "content": first.output_text},
                             {"role": "user", "content": "Another?"}], max_tokens=6)
    assert second.output_text == expected["choices"][0]["message"]["content"]
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == second.output_text
    # store: false (as Codex sends) keeps nothing; an id never held is a 404 naming it
    unstored = client.responses.create(model=NAME, input="Hi", store=False, max_output_tokens=2)
    for missing in (unstored.id, "resp_nope"):
        r = server.post("/v1/responses", {"previous_response_id": missing, "input": "x"})
        assert r.status == 401  # the key is checked first
        with pytest.raises(Exception) as caught:
            client.responses.create(model=NAME, previous_response_id=missing, input="x")
        assert caught.value.status_code == 404 and missing in str(caught.value)


def test_output_text_logprobs_are_chat_completions_logprobs(server):
    expected = chat(server, [{"role": "user", "content": "Hi"}], max_tokens=5, logprobs=True, top_logprobs=2)
    r = openai_client(server).responses.create(model=NAME, input="Hi", max_output_tokens=5, temperature=0,
                                               include=["message.output_text.logprobs"], top_logprobs=2)
    got = [lp.model_dump() for lp in r.output[0].content[0].logprobs]
    assert got == expected["choices"][0]["logprobs"]["content"] and len(got) == 5 and r.top_logprobs == 2
    plain = openai_client(server).responses.create(model=NAME, input="Hi", max_output_tokens=5, temperature=0)
    assert plain.output[0].content[0].logprobs == []


def test_tools_codex_sends_that_cannot_run_here_are_left_out_and_logged(server):
    tools = [{"type": "web_search"}, {"type": "local_shell"}, {"type": "custom", "name": "apply_patch",
                                                                 "format": {"type": "grammar"}},
             _responses_tool(WEATHER)]
    r = openai_client(server).responses.create(model=NAME, input="Hi", tools=tools, max_output_tokens=4)
    assert r.status in ("completed", "incomplete")
    log = "".join(server.log)
    assert "left out tools" in log and "local_shell" in log and "web_search" in log


@pytest.mark.parametrize("body, param, needle", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]",
     "text only"),
    ({"input": [{"type": "mystery"}]}, "input[0].type", "mystery"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "input", "call_x"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a",
                                       "schema": {"type": "string", "pattern": "(?=a)"}}}}, "text.format", ""),
    ({"input": "x", "background": True}, "background", "background"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}, "tools": [_responses_tool(WEATHER)]},
     "tool_choice", "get_weather"),
    ({}, "input", "input"),
])
def test_bad_responses_requests_are_400s_naming_the_field(server, body, param, needle):
    with pytest.raises(Exception) as caught:
        openai_client(server).responses.create(model=NAME, **body)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and needle in error["message"], error


class Verdict(BaseModel):
    answer: str = Field(max_length=10)
    score: int = Field(ge=0, le=9)


def test_the_agents_sdk_runs_a_function_tool_and_an_output_type(server):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_default_openai_client, set_tracing_disabled
    from agents.models.multi_provider import MultiProvider

    set_tracing_disabled(True)  # (it would send traces to OpenAI)
    set_default_openai_client(AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0),
                              use_for_tracing=False)
    model = NAME  # a plain name: the SDK's default provider and model class
    assert isinstance(MultiProvider().get_model(NAME), OpenAIResponsesModel)  # ... which is the Responses API
    ran = []

    @function_tool
    def lookup(city: Annotated[str, Field(max_length=8)]) -> str:
        """Look a city up."""
        ran.append(city)
        return "sunny"

    async def go():
        tools = Agent(name="t", instructions="Use the tool.", model=model, tools=[lookup],
                      tool_use_behavior="stop_on_first_tool",
                      model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=60,
                                                   temperature=0))
        typed = Agent(name="o", instructions="Answer.", model=model, output_type=Verdict,
                      model_settings=ModelSettings(max_tokens=80, temperature=0))
        return (await Runner.run(tools, "Weather in Rome?", max_turns=2),
                await Runner.run(typed, "Rate Rome.", max_turns=2))

    with_tool, with_type = asyncio.run(go())
    assert len(ran) == 1 and with_tool.final_output == "sunny"
    assert isinstance(with_type.final_output, Verdict)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


def test_messages_create_is_the_chat_completion_of_the_same_conversation(server):
    expected = chat(server, CONVERSATION, max_tokens=12)
    m = anthropic_client(server).messages.create(model="claude-sonnet-4-5", max_tokens=12, system="You are terse.",
                                                 messages=[{"role": "user", "content": "Name a colour."}])
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == NAME
    text = "".join(b.text for b in m.content if b.type == "text")
    assert text == expected["choices"][0]["message"]["content"]
    finish = expected["choices"][0]["finish_reason"]
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[finish] and m.stop_sequence is None
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == expected["usage"]["prompt_tokens"]
    assert m.usage.output_tokens == expected["usage"]["completion_tokens"]


def test_messages_stream_final_message_is_the_created_one(server):
    client = anthropic_client(server)
    ask = dict(model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "Hello"}])
    whole = client.messages.create(**ask)
    with client.messages.stream(**ask) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert text == "".join(b.text for b in whole.content if b.type == "text")
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_messages_stream_events_in_anthropics_order(server):
    got = events(server, "/v1/messages?beta=true", {"model": "claude-x", "max_tokens": 6, "stream": True,
                                                    "messages": [{"role": "user", "content": "Hello"}]})
    kinds = [d["type"] for _, d in got]
    assert all(name == d["type"] for name, d in got)
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    start = got[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    body = kinds[2:-2]
    if body:
        assert body[0] == "content_block_start" and body[-1] == "content_block_stop"
        assert set(body[1:-1]) == {"content_block_delta"}
    delta = got[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens") and delta["usage"]["output_tokens"] > 0


def test_a_tool_use_round_trip_with_tool_choice_any(server):
    client = anthropic_client(server)
    tools = [_anthropic_tool(WEATHER), _anthropic_tool(SEARCH)]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.messages.create(model="claude-x", max_tokens=60, tools=tools, tool_choice={"type": "any"},
                                   messages=ask)
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and first.stop_reason == "tool_use"
    for use in uses:
        assert use.id.startswith("toolu_")
        jsonschema.validate(use.input, {t["name"]: t["input_schema"] for t in tools}[use.name])
    results = [{"type": "tool_result", "tool_use_id": u.id, "content": [{"type": "text", "text": "22 C"}]} for u in uses]
    second = client.messages.create(model="claude-x", max_tokens=8, tools=tools, messages=[
        *ask, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": results}])
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    with client.messages.stream(model="claude-x", max_tokens=60, tools=tools, tool_choice={"type": "any"},
                                messages=ask) as stream:
        streamed = stream.get_final_message()
    assert [(b.name, b.input) for b in streamed.content] == [(u.name, u.input) for u in uses]


def test_count_tokens_is_the_prompt_the_model_reads(server):
    client = anthropic_client(server)
    ask = dict(system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0; cch=abc;"},
                       {"type": "text", "text": "You are Claude Code."}],
               messages=[{"role": "user", "content": "Hello"}], tools=[_anthropic_tool(WEATHER)])
    counted = client.messages.count_tokens(model="claude-x", **ask)
    made = client.messages.create(model="claude-x", max_tokens=1, **ask)
    assert counted.input_tokens == made.usage.input_tokens + made.usage.cache_read_input_tokens > 0


def test_claude_code_turns_reuse_the_cache_despite_the_billing_nonce(member, local):
    """A second turn with a new billing nonce reads the whole first turn from the cache: exactly
    the prefix its prompt shares with the first prompt and reply (a fresh server: nothing cached)."""
    model, tokenizer = local
    server = Server(member[1], "--max-tokens", "24", "--api-key", "sekret")
    client = anthropic_client(server)
    system = lambda nonce: [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.0.1; cch={nonce};"},  # noqa: E731
                            {"type": "text", "text": "You are Claude Code, a coding agent. Be careful."}]
    turn1 = [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                                          {"type": "text", "text": "List the files."}]}]
    first = client.messages.create(model="claude-sonnet-4-5", max_tokens=8, system=system("a1b2c"),
                                   messages=turn1)
    assert first.usage.cache_read_input_tokens == 0
    reply = "".join(b.text for b in first.content if b.type == "text")
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "Now read one."}]
    second = client.messages.create(model="claude-sonnet-4-5", max_tokens=4, system=system("zz9y8"),
                                    messages=turn2)
    convert = [{"role": "system", "content": "You are Claude Code, a coding agent. Be careful."},
               {"role": "user", "content": "<system-reminder>ctx</system-reminder>\n\nList the files."}]
    prompt1 = tokenizer.apply_chat_template(convert)
    prompt2 = tokenizer.apply_chat_template([*convert, {"role": "assistant", "content": reply},
                                             {"role": "user", "content": "Now read one."}])
    server.stop()
    assert first.usage.input_tokens == len(prompt1)
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == len(prompt2)
    assert second.usage.cache_read_input_tokens == shared_prefix(prompt1 + generated(local, prompt1, 8), prompt2) > 0


def generated(local, prompt: list[int], max_tokens: int) -> list[int]:
    """The ids of a greedy reply to `prompt` that the server's prompt cache holds after it: those fed
    back to the model (a reply cut by max_tokens never feeds its last id; the end-of-sequence id
    is not kept)."""
    model, tokenizer = local
    *_, last = mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
    return list(last.tokens[:-1] if last.finish_reason == "length" else last.tokens)


def shared_prefix(held: list[int], prompt: list[int]) -> int:
    """What the cache can give a prompt: the common prefix, short of the prompt's last id (which is
    always fed, for its logits)."""
    n = 0
    while n < min(len(held), len(prompt) - 1) and held[n] == prompt[n]:
        n += 1
    return n


@pytest.mark.parametrize("body, status, kind, needle", [
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error", "max_tokens"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, 400,
     "invalid_request_error", "text only"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_zz", "content": "1"}]}]}, 400, "invalid_request_error", "toolu_zz"),
    ({"max_tokens": 4, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request_error", "role"),
    ({"max_tokens": 4, "messages": []}, 400, "invalid_request_error", "messages"),
    ({"max_tokens": 4, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error", "temperature"),
])
def test_bad_messages_requests_get_anthropics_error_shape(server, body, status, kind, needle):
    r = post(server, "/v1/messages", {"model": "claude-x", **body}, {"x-api-key": "sekret"})
    assert r.status == status, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and needle in error["error"]["message"], error
    assert "\n" not in error["error"]["message"]


def test_anthropic_keys_and_routes(server):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="claude-x", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    # Claude Code's ANTHROPIC_AUTH_TOKEN sends a bearer token instead of x-api-key
    m = anthropic.Anthropic(base_url=server.url, auth_token="sekret", max_retries=0).messages.create(
        model="claude-x", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    assert m.usage.output_tokens == 1
    r = server.post("/messages?beta=true", {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    assert r.status == 401 and r.json()["error"]["type"] == "authentication_error"


# --------------------------------------------------------------------------------------------
# Every protocol
# --------------------------------------------------------------------------------------------


def test_a_forced_tool_is_exactly_one_call_in_every_protocol_and_stream(server):
    """A named tool choice (and Anthropic's `tool`) is one call, streamed or not, whatever the
    model would write next; so is a reply with parallel calls turned off."""
    oa, an = openai_client(server), anthropic_client(server)
    budget = 120  # room for several calls, were they allowed
    for seed in range(2):
        chat_calls = oa.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Search."}], max_tokens=budget, seed=seed, temperature=1,
            tools=[_chat_tool(WEATHER), _chat_tool(SEARCH)],
            tool_choice={"type": "function", "function": {"name": "search"}}).choices[0].message.tool_calls
        streamed = oa.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Search."}], max_tokens=budget, seed=seed, temperature=1,
            tools=[_chat_tool(SEARCH)], parallel_tool_calls=False, tool_choice="required", stream=True)
        streamed_ids = {tc.index for chunk in streamed for tc in (chunk.choices[0].delta.tool_calls or [])}
        response = oa.responses.create(model=NAME, input="Search.", tools=[_responses_tool(WEATHER), _responses_tool(SEARCH)],
                                       tool_choice={"type": "function", "name": "search"}, max_output_tokens=budget,
                                       temperature=1, extra_body={"seed": seed})
        got = events(server, "/v1/responses", {"input": "Search.", "tools": [_responses_tool(SEARCH)], "stream": True,
                                               "tool_choice": {"type": "function", "name": "search"}, "seed": seed,
                                               "max_output_tokens": budget, "temperature": 1})
        message = an.messages.create(model="claude-x", max_tokens=budget, messages=[{"role": "user", "content": "Search."}],
                                     tools=[_anthropic_tool(WEATHER), _anthropic_tool(SEARCH)],
                                     tool_choice={"type": "tool", "name": "search"}, extra_body={"seed": seed})
        with an.messages.stream(model="claude-x", max_tokens=budget, messages=[{"role": "user", "content": "Search."}],
                                tools=[_anthropic_tool(SEARCH)], extra_body={"seed": seed},
                                tool_choice={"type": "any", "disable_parallel_tool_use": True}) as stream:
            final = stream.get_final_message()
        assert [c.function.name for c in chat_calls] == ["search"] and streamed_ids == {0}
        assert [item.name for item in response.output if item.type == "function_call"] == ["search"]
        assert [d["item"]["name"] for _, d in got if d["type"] == "response.output_item.done"] == ["search"]
        assert [b.name for b in message.content if b.type == "tool_use"] == ["search"]
        assert [b.name for b in final.content if b.type == "tool_use"] == ["search"]


def test_a_prompt_over_the_context_is_said_in_each_protocols_words(server):
    """Codex reads a streamed response.failed with context_length_exceeded; Claude Code compacts
    the conversation when Anthropic's "prompt is too long" comes back."""
    long = "word " * (CONTEXT + 200)
    got = events(server, "/v1/responses", {"input": long, "stream": True})
    assert [d["type"] for _, d in got] == ["response.created", "response.in_progress", "response.failed"]
    failed = got[-1][1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/responses", {"input": long})
    assert r.status == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(server, "/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": long}]},
             {"x-api-key": "sekret"})
    assert r.status == 400 and re.fullmatch(r"prompt is too long: \d+ tokens > 2047 maximum",
                                            r.json()["error"]["message"]), r.text
