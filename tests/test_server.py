"""`mlx-mixtral serve` end to end: a real server in a subprocess on a free loopback port, spoken to
by the official `openai` client, `curl` and raw HTTP.

Answers are checked against mistral-common's ids for the conversation and against this process's
own greedy generation from those ids; errors by status and OpenAI error body; queueing,
cancellation and the prompt cache through /health's counters.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from openai import OpenAI

import mlx_mixtral
from mlx_mixtral.prompt_cache import PromptCache
from mlx_mixtral.sampling import SamplingParams
from mlx_mixtral.serve.prompt_pool import PromptPool

from served import NAME, Server

CONTEXT = 8192  # the fixture's 512 positions, raised so a long generation takes seconds


@pytest.fixture(scope="module")
def folder(hf_checkpoint_factory, tmp_path_factory) -> Path:
    """The head_dim-32 fixture (so --kv-bits works) with a longer context."""
    copy = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(hf_checkpoint_factory("head_dim"), copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return copy


@pytest.fixture(scope="module")
def local(folder):
    return mlx_mixtral.load(folder, progress=False)


@pytest.fixture(scope="module")
def reference(tokenizer_model_path) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tokenizer_model_path))


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, "--max-queue", "1", "--max-tokens", "16")
    yield s
    s.stop()


def mistral_ids(reference: MistralTokenizer, messages: list[dict]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return reference.encode_chat_completion(request).tokens


def expected(local, ids: list[int], max_tokens: int, stop=()) -> str:
    model, tokenizer = local
    return mlx_mixtral.generate(model, tokenizer, ids, max_tokens=max_tokens, sampling=SamplingParams(), stop=stop)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one, please."},
]


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def test_chat_completion_is_mistral_commons_encoding_generated_greedily(server, local, reference):
    r = server.client().chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=12, temperature=0)
    ids = mistral_ids(reference, CONVERSATION)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected(local, ids, 12)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(ids) + 12


def test_streamed_chat_is_the_same_answer_with_usage_last(server, reference):
    client = server.client()
    whole = client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(mistral_ids(reference, CONVERSATION))
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_text_completion_from_text_or_ids_and_stop_strings(server, local):
    model, tokenizer = local
    prompt = "The quick brown fox jumps over the lazy dog. Once upon a time"
    client = server.client()
    full = expected(local, tokenizer.encode(prompt), 16)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == full
    ids = client.completions.create(model=NAME, prompt=tokenizer.encode(prompt), max_tokens=16, temperature=0)
    assert ids.choices[0].text == full
    stop = full.strip()[3:6]
    stopped = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert stopped.choices[0].text == full[:full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # usage counts exactly: the prompt's ids, and every token generated up to the stop string
    model, tokenizer = local
    ids = tokenizer.encode(prompt)
    steps = list(mlx_mixtral.stream_generate(model, tokenizer, ids, max_tokens=16, stop=[stop, "zzz"]))
    assert (stopped.usage.prompt_tokens, stopped.usage.completion_tokens) == (len(ids), steps[-1].generation_tokens)
    assert stopped.usage.total_tokens == len(ids) + steps[-1].generation_tokens < len(ids) + 16
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_server_defaults_apply_to_fields_left_out(server, local, reference):
    """--max-tokens 16 and --temp 0 (greedy) for a request that gives neither."""
    messages = [{"role": "user", "content": "Hello there"}]
    r = server.post("/v1/chat/completions", {"messages": messages}).json()
    assert r["usage"]["completion_tokens"] == 16
    assert r["choices"][0]["message"]["content"] == expected(local, mistral_ids(reference, messages), 16)


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "n_predict", "num_predict"])
def test_every_clients_name_for_max_tokens(server, name):
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], name: 3}).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"


def test_curl_streams_server_sent_events(server, local, reference):
    messages = [{"role": "user", "content": "Say something."}]
    body = json.dumps({"model": NAME, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sSN", "-H", "Content-Type: application/json", "-d", body,
                          f"{server.url}/v1/chat/completions"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    events = [line.removeprefix("data: ") for line in out.stdout.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == expected(local, mistral_ids(reference, messages), 8)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_conversation_reuses_its_cached_prefix_each_turn(server, local, reference):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me about rivers."}]
    first = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And lakes?"}]
    second = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    ids = mistral_ids(reference, messages)
    turn1 = mistral_ids(reference, messages[:1])
    # Turn 1's prompt and its reply's ids are reused: only the new user message is fed.
    assert second.usage.prompt_tokens_details.cached_tokens >= len(turn1)
    assert second.usage.prompt_tokens == len(ids)
    assert second.choices[0].message.content == expected(local, ids, 8)
    assert server.health()["prompt_cache"]["conversations"] >= 1


# --------------------------------------------------------------------------------------------
# Bad input: a 4xx with an OpenAI error body, and the server goes on
# --------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "hi"}]
BAD = [
    ("/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/chat/completions", b"\xff\xfe", 400, None, "not UTF-8"),
    ("/v1/chat/completions", [1, 2], 400, None, "must be a JSON object"),
    ("/v1/chat/completions", {"messages": USER, "model": 4}, 400, "model", "string"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "empty"),
    ("/v1/chat/completions", {}, 400, "messages", "required"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "must be a list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "only text"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id",
     "required"),
    ("/v1/chat/completions", {"messages": [{"role": "function", "name": "f", "content": "x"}]}, 400, "messages[0]",
     "deprecated"),
    ("/v1/chat/completions", {"messages": [*USER, {"role": "assistant", "content": "a"}]}, 400, "messages",
     "assistant"),
    ("/v1/chat/completions", {"messages": [*USER, {"role": "assistant", "content": "a"},
                                           {"role": "system", "content": "s"}]}, 400, "messages", "system"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "from 1"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 10**9}, 400, "max_tokens", "context"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/chat/completions", {"messages": USER, "temperature": 50}, 400, "temperature", "from 0 to 2"),
    ("/v1/chat/completions", {"messages": USER, "temperature": True}, 400, "temperature", "number"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/chat/completions", {"messages": USER, "top_k": -1}, 400, "top_k", "from 0"),
    ("/v1/chat/completions", {"messages": USER, "min_p": 1.5}, 400, "min_p", "[0, 1)"),
    ("/v1/chat/completions", {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty", "(0, 10]"),
    ("/v1/chat/completions", {"messages": USER, "seed": -1}, 400, "seed", "from 0"),
    ("/v1/chat/completions", {"messages": USER, "stop": 7}, 400, "stop", "string"),
    ("/v1/chat/completions", {"messages": USER, "stop": [""]}, 400, "stop", "empty"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a"] * 17}, 400, "stop", "at most"),
    ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, 400, "stream", "true or false"),
    ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream: true"),
    ("/v1/chat/completions", {"messages": USER, "n": 2}, 400, "n", "one choice"),
    ("/v1/chat/completions", {"messages": USER, "logprobs": "yes"}, 400, "logprobs", "true or false"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools[0]", "must be"),
    ("/v1/chat/completions", {"messages": USER, "frequency_penalty": 2.5}, 400, "frequency_penalty",
     "from -2 to 2"),
    ("/v1/chat/completions", {"messages": USER, "presence_penalty": -3}, 400, "presence_penalty", "from -2 to 2"),
    ("/v1/chat/completions", {"messages": USER, "repeat_penalty": 1.1, "repetition_penalty": 1.2}, 400,
     "repeat_penalty", "same setting"),
    ("/v1/chat/completions", {"messages": USER, "mirostat": 2}, 400, "mirostat", "not supported"),
    ("/v1/chat/completions", {"messages": USER, "tfs_z": 0.9}, 400, "tfs_z", "not supported"),
    ("/v1/chat/completions", {"messages": USER, "repeat_last_n": 128}, 400, "repeat_last_n", "last 64"),
    ("/v1/chat/completions", {"messages": USER, "n_predict": 0}, 400, "n_predict", "from 1"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "yaml"}}, 400,
     "response_format", "json_object"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs", "from 0 to 5"),
    ("/v1/completions", {"prompt": "x", "tools": [{"type": "function"}]}, 400, "tools", "chat"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * (CONTEXT + 10)}]}, 400,
     "messages", "context"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "not a batch"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "non-empty"),
    ("/v1/completions", {"prompt": None}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"prompt": list(range(5, CONTEXT + 5))}, 400, "prompt", "context"),
]


@pytest.mark.parametrize("path,body,status,param,needle", BAD, ids=[f"{i}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, path, body, status, param, needle):
    r = server.post(path, body)
    assert r.status == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"] and error["param"] == param, error
    assert "\n" not in error["message"]
    assert server.health()["status"] == "ok"


def test_oversized_bodies_unknown_routes_and_methods(server):
    big = server.post("/v1/completions", b'{"prompt": "' + b"a" * (9 * 2**20) + b'"}')
    assert big.status == 413 and "limit" in big.json()["error"]["message"]
    missing = server.send("GET", "/v1/nothing")
    assert missing.status == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = server.send("GET", "/v1/chat/completions")
    assert wrong.status == 405 and "error" in wrong.json()
    assert server.health()["status"] == "ok"


def test_openai_client_raises_its_own_errors(server):
    with pytest.raises(openai.BadRequestError, match="one choice"):
        server.client().chat.completions.create(model=NAME, messages=USER, n=3)


def test_any_model_name_is_the_one_model(server, local, reference):
    """LangChain and LlamaIndex default to gpt-3.5-turbo: that is this server's model too, and
    the response names the model that answered."""
    r = server.client().chat.completions.create(model="gpt-3.5-turbo", messages=CONVERSATION, max_tokens=6,
                                                temperature=0)
    assert r.model == NAME and r.choices[0].message.content == expected(local, mistral_ids(reference, CONVERSATION), 6)
    assert server.client().models.retrieve("gpt-4o").id == NAME


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert server.client().models.retrieve(NAME).id == NAME
    h = server.health()
    assert h["model"] == NAME and h["status"] == "ok" and h["prompt_cache"]["budget"] == 2 * 10**9


# --------------------------------------------------------------------------------------------
# Many clients
# --------------------------------------------------------------------------------------------


def test_concurrent_clients_each_get_their_own_answer(folder, local, reference):
    server = Server(folder, "--max-queue", "8")
    try:
        prompts = [f"Write about the number {i}." for i in range(6)]
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            messages = [{"role": "user", "content": prompts[i]}]
            client = server.client()
            if i % 2:
                chunks = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                                        temperature=0, stream=True)
                answers[i] = "".join(c.choices[0].delta.content or "" for c in chunks)
            else:
                r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
                answers[i] = r.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, p in enumerate(prompts):
            assert answers[i] == expected(local, mistral_ids(reference, [{"role": "user", "content": p}]), 12)
        assert server.health()["completed"] == len(prompts)
    finally:
        server.stop()


def test_full_queue_is_429_and_a_client_that_leaves_frees_its_slot(server):
    long = {"model": NAME, "prompt": "Once upon a time", "max_tokens": CONTEXT - 100, "temperature": 0}
    before = server.health()
    streaming = server.connect()
    streaming.request("POST", "/v1/completions", body=json.dumps({**long, "stream": True}))
    events = streaming.getresponse()
    assert events.status == 200 and events.readline().startswith(b"data: ")  # it holds the model
    waiting = threading.Thread(target=server.post, args=("/v1/completions", {**long, "max_tokens": 4}))
    waiting.start()
    server.wait_for(lambda h: h["queued"] == 1)
    refused = server.post("/v1/completions", long)
    assert refused.status == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert server.health()["active"]
    # The streaming client hangs up long before its thousands of tokens: its slot frees at once,
    # and the waiting request is served.
    events.close()
    streaming.close()
    server.wait_for(lambda h: h["cancelled"] == before["cancelled"] + 1, timeout=10)
    waiting.join(30)
    assert not waiting.is_alive()
    h = server.wait_for(lambda h: h["completed"] == before["completed"] + 1 and not h["active"])
    assert h["queued"] == 0


def test_a_non_streaming_client_that_leaves_is_cancelled_too(server):
    before = server.health()
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": CONTEXT - 100, "temperature": 0}
    with pytest.raises(socket.timeout):
        server.send("POST", "/v1/completions", body, timeout=1.0)  # the connection closes after 1 s
    server.wait_for(lambda h: h["cancelled"] == before["cancelled"] + 1 and not h["active"], timeout=10)


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def test_serve_with_a_quantized_kv_cache(folder, local, reference):
    server = Server(folder, "--kv-bits", "8", "--kv-group-size", "32")
    try:
        assert any("8-bit" in line for line in server.log), server.log
        r = server.client().chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=8, temperature=0)
        model, tokenizer = local
        cache = mlx_mixtral.make_cache(model, mlx_mixtral.kv_format(8, 32))
        ids = mistral_ids(reference, CONVERSATION)
        want = mlx_mixtral.generate(model, tokenizer, ids, max_tokens=8, sampling=SamplingParams(), cache=cache)
        assert r.choices[0].message.content == want
    finally:
        server.stop()


def test_a_taken_port_or_a_bad_flag_is_one_line(server, folder):
    port = server.url.rsplit(":", 1)[1]
    for args, needle in ((["--port", port], "pick another with --port"),
                         (["--max-queue", "0"], "--max-queue must be at least 1"),
                         (["--prompt-cache-size", "lots"], "--prompt-cache-size 'lots' is not a size")):
        out = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model", str(folder), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and needle in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_ctrl_c_ends_replies_in_flight_with_an_error_and_exits_cleanly(folder):
    import signal

    server = Server(folder)
    streaming = server.connect()
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": CONTEXT - 100, "stream": True}
    streaming.request("POST", "/v1/completions", body=json.dumps(body))
    events = streaming.getresponse()
    assert events.readline().startswith(b"data: ")
    server.proc.send_signal(signal.SIGINT)
    rest = events.read().decode()
    assert server.proc.wait(15) == 0
    # The reply cut short ends with an error event, never with [DONE] as if it were complete.
    last = [line for line in rest.split("\n") if line.startswith("data: ")][-1]
    assert "shutting down" in json.loads(last[6:])["error"]["message"] and "[DONE]" not in rest
    time.sleep(0.2)
    log = "".join(server.log)
    assert "server stopped" in log and "Traceback" not in log and "terminate" not in log, log


def test_an_api_key_is_required_when_set(folder):
    server = Server(folder, "--api-key", "sesame")
    try:
        r = server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"
        for wrong in ("Bearer sesam", "Bearer sesame2", "sesame", "Bearer  sesame", "Basic sesame", "Bearer \u00e9"):
            conn = server.connect()
            conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 2}),
                         headers={"Content-Type": "application/json", "Authorization": wrong.encode().decode("latin-1")})
            assert conn.getresponse().status == 401, wrong
            conn.close()
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{server.url}/v1", api_key="open-sesame", max_retries=0).completions.create(
                model=NAME, prompt="hi", max_tokens=2)
        ok = OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0).completions.create(
            model=NAME, prompt="hi", max_tokens=2)
        assert ok.usage.completion_tokens == 2
    finally:
        server.stop()


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_is_refused_at_start(folder, key):
    r = subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", "serve", "--model", str(folder), "--port", "0",
                        "--api-key", key], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --api-key is empty: no client could ever authenticate; give a key, or leave the flag out"]


def test_sigterm_stops_the_server_like_ctrl_c(folder):
    server = Server(folder)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    time.sleep(0.2)
    assert "server stopped" in "".join(server.log)


def test_hostile_bodies_are_400s_and_the_server_stays_up(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    r = server.post("/v1/chat/completions", deep)
    assert r.status == 400 and "nested too deeply" in r.json()["error"]["message"]
    for body in ({"model": NAME, "messages": [{"role": "user", "content": "a\ud800b"}]},
                 {"model": NAME, "prompt": "x\udfffy"}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        raw = json.dumps(body).encode()  # json escapes the lone surrogate as \ud800: valid JSON, invalid text
        r = server.post(path, raw)
        assert r.status == 400 and "surrogate" in r.json()["error"]["message"], r.text
    for text in ("nul\u0000 and \u0007 bell", "\u202e right-to-left \ufeff"):
        r = server.post("/v1/completions", {"model": NAME, "prompt": text, "max_tokens": 2})
        assert r.status == 200, r.text
    assert server.health()["status"] == "ok"
    log = "".join(server.log)
    assert "Traceback" not in log and "error req_" not in log


def test_a_big_prompt_is_tokenized_off_the_event_loop(folder):
    """While a multi-megabyte prompt is tokenized (seconds), /health keeps answering: counted, not
    timed, so the check holds on a loaded machine (tokenizing on the event loop answered none)."""
    server = Server(folder)
    try:
        big = json.dumps({"model": NAME, "prompt": "all work and no play makes jack a dull boy " * 150_000,
                          "max_tokens": 1}).encode()
        done = threading.Event()
        threading.Thread(target=lambda: (server.post("/v1/completions", big), done.set()), daemon=True).start()
        time.sleep(0.3)  # the body is in; tokenizing it takes seconds
        answered, slowest = 0, 0.0
        while not done.is_set():
            start = time.perf_counter()
            assert server.health()["status"] == "ok"
            if not done.is_set():
                answered += 1
                slowest = max(slowest, time.perf_counter() - start)
        print(f"/health answered {answered} times while the prompt was tokenized, slowest {slowest * 1000:.0f} ms")
        assert answered >= 3
    finally:
        server.stop()


def test_a_body_that_trickles_in_is_cut_off(folder):
    server = Server(folder, env={"MLX_MIXTRAL_BODY_TIMEOUT": "1"})
    try:
        conn = server.connect(timeout=20)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "100")
        conn.endheaders()
        conn.send(b'{"prompt": ')
        r = conn.getresponse()
        assert r.status == 408 and b"did not arrive within 1 s" in r.read()
        assert server.health()["status"] == "ok"
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# The prompt pool, in process
# --------------------------------------------------------------------------------------------


def test_pool_takes_a_continued_conversation_and_forks_a_shared_prefix(local):
    import mlx.core as mx

    model, tokenizer = local
    pool = PromptPool(model, budget=10**9)
    a = list(range(100, 160))
    first = pool.take(a)
    fed = first.prepare(a)
    assert fed == a
    model.model(mx.array([fed]), first.cache)
    first.ids = list(a)
    pool.put(first)
    # A prompt that continues it takes the very cache over.
    assert pool.take(a + [7, 8]) is first and pool.entries == []
    pool.put(first)
    # One that shares 30 ids gets a copy of those 30; the original stays whole, bit for bit.
    fork = pool.take(a[:30] + [5, 6, 7])
    assert fork is not first and fork.ids == a[:30] and len(first.ids) == 60
    for mine, theirs in zip(first.cache, fork.cache):
        for m, t in zip(mine.held()[0], theirs.held()[0]):
            assert mx.array_equal(m[:, :, :30], t).item()
    assert fork.prepare(a[:30] + [5, 6, 7]) == [5, 6, 7]
    # Putting back an extension of an entry replaces it; the budget evicts the oldest.
    longer = PromptCache(model)
    longer.ids = a + [1]
    model.model(mx.array([longer.ids]), longer.cache)
    pool.put(longer)
    assert pool.entries == [longer]
    other = PromptCache(model)
    other.ids = [3, 4, 5]
    model.model(mx.array([other.ids]), other.cache)
    pool.budget = other.allocated
    pool.put(other)
    assert pool.entries == [other]


def test_the_default_model_name_is_the_folders_name_or_the_repo_id(folder):
    from mlx_mixtral.serve.server import _default_name

    assert _default_name(str(folder)) == "model"
    assert _default_name("mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit") == "mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit"


def test_an_internal_error_shows_the_client_an_id_and_the_log_the_traceback(capsys):
    """A bug's text (paths, internals) never reaches the client: a generic message and a request
    id do; the server's log has the traceback under that id."""
    import asyncio
    from types import SimpleNamespace

    from mlx_mixtral.serve.request import Defaults
    from mlx_mixtral.serve.server import create_app

    class Broken:
        model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64, vocab_size=10, quantization=None),
                                parameters=dict)
        tokenizer = SimpleNamespace(chat_format=SimpleNamespace(name="none (base model)"))

        @property
        def pool(self):
            raise RuntimeError("cannot open /home/someone/secret.kv")

    app = create_app(Broken(), "m", Defaults(16, SamplingParams(), None))
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/health", "raw_path": b"/health", "query_string": b"",
             "headers": [], "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 1),
             "client": ("127.0.0.1", 2), "root_path": "", "app": app}
    with pytest.raises(RuntimeError):  # Starlette re-raises after answering, for the server's log
        asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    message = body["error"]["message"]
    assert status == 500 and "secret" not in message and "RuntimeError" not in message
    request_id = re.search(r"request id (req_[0-9a-f]+)", message).group(1)
    log = capsys.readouterr().err
    assert f"error {request_id}: unexpected RuntimeError" in log and "/home/someone/secret.kv" in log


def test_routes_without_v1_and_ollama_discovery(server, local, reference):
    """Base URLs set to http://host:port (no /v1) and Ollama-style model discovery."""
    plain = OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    r = plain.chat.completions.create(model=NAME, messages=CONVERSATION, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == expected(local, mistral_ids(reference, CONVERSATION), 5)
    assert [m.id for m in plain.models.list().data] == [NAME]
    assert server.post("/completions", {"prompt": "hi", "max_tokens": 2}).status == 200
    tags = server.send("GET", "/api/tags").json()
    assert [m["name"] for m in tags["models"]] == [NAME] and tags["models"][0]["details"]["family"] == "mixtral"
    assert tags["models"][0]["size"] > 0
    show = server.post("/api/show", {"model": NAME}).json()
    assert show["model_info"]["mixtral.context_length"] == CONTEXT and "completion" in show["capabilities"]


def test_without_max_tokens_a_reply_runs_to_the_end(folder, local):
    """Most clients leave max_tokens out: the reply runs until the model stops or the context is
    full (here: the context, with EOS never chosen by this random model in time... so cap it by a
    small context), unless serve --max-tokens caps it."""
    copy = folder.parent / "short-context"
    if not copy.exists():
        shutil.copytree(folder, copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    server = Server(copy)
    try:
        r = server.post("/v1/completions", {"prompt": [1, 415, 2936], "temperature": 0})
        body = r.json()
        usage = body["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 64 or body["choices"][0]["finish_reason"] == "stop"
        assert usage["completion_tokens"] > 16
    finally:
        server.stop()
    capped = Server(copy, "--max-tokens", "7")
    try:
        r = capped.post("/v1/completions", {"prompt": [1, 415, 2936], "temperature": 0}).json()
        assert r["usage"]["completion_tokens"] == 7 and r["choices"][0]["finish_reason"] == "length"
    finally:
        capped.stop()


def test_openai_penalties_and_repeat_penalty(server, local):
    """frequency/presence penalties as OpenAI defines them (against a local run with the same
    settings and seed), and llama.cpp's repeat_penalty as the repetition penalty."""
    model, tokenizer = local
    ids = [1, 415, 2936, 9060]
    for fields, params in (({"frequency_penalty": -2.0}, SamplingParams(temp=1.0, frequency_penalty=-2.0)),
                           ({"presence_penalty": 2.0}, SamplingParams(temp=1.0, presence_penalty=2.0)),
                           ({"frequency_penalty": 1.5, "presence_penalty": 0.5},
                            SamplingParams(temp=1.0, frequency_penalty=1.5, presence_penalty=0.5)),
                           ({"repeat_penalty": 1.3}, SamplingParams(temp=1.0, repetition_penalty=1.3))):
        r = server.post("/v1/completions", {"prompt": ids, "max_tokens": 24, "temperature": 1.0, "seed": 7,
                                            **fields}).json()
        want = mlx_mixtral.generate(model, tokenizer, ids, max_tokens=24, sampling=params, seed=7)
        assert r["choices"][0]["text"] == want, fields
    plain = mlx_mixtral.generate(model, tokenizer, ids, max_tokens=24, sampling=SamplingParams(temp=1.0), seed=7)
    rewarded = mlx_mixtral.generate(model, tokenizer, ids, max_tokens=24, seed=7,
                                    sampling=SamplingParams(temp=1.0, frequency_penalty=-2.0))
    assert plain != rewarded  # the penalty really changes the draw


def test_an_empty_assistant_turn_is_left_out(server, local, reference):
    """A reply the user stopped before its first token: the conversation reads as if it were
    never asked, so the user messages around it join (mistral-common's rule for consecutive ones)."""
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": ""},
                {"role": "user", "content": "second"}]
    r = server.client().chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0)
    joined = [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]
    assert r.usage.prompt_tokens == len(mistral_ids(reference, joined))
    assert r.choices[0].message.content == expected(local, mistral_ids(reference, joined), 4)


@pytest.mark.parametrize("origin, allowed", [("http://localhost:3000", True), ("http://127.0.0.1:8080", True),
                                             ("http://[::1]:5173", True), ("https://evil.example", False),
                                             ("http://localhost.evil.example", False)])
def test_browsers_from_this_machine_may_call_others_may_not(server, origin, allowed):
    conn = server.connect()
    conn.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    r = conn.getresponse()
    r.read()
    conn.close()
    assert (r.status == 200 and r.getheader("access-control-allow-origin") == origin) == allowed
    assert r.getheader("access-control-allow-origin") != "*"


def test_allow_origin_names_more_origins(folder):
    server = Server(folder, "--allow-origin", "https://my.app")
    try:
        for origin, allowed in (("https://my.app", True), ("https://other.app", False), ("http://localhost:1", True)):
            conn = server.connect()
            conn.request("GET", "/v1/models", headers={"Origin": origin})
            r = conn.getresponse()
            r.read()
            conn.close()
            assert (r.getheader("access-control-allow-origin") == origin) == allowed, origin
    finally:
        server.stop()

