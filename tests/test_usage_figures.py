"""The cached-token figures every protocol reports equal the prefix the server really reused.

`usage.prompt_tokens_details.cached_tokens` (Chat Completions), `usage.input_tokens_details.
cached_tokens` (Responses) and `usage.cache_read_input_tokens` (Messages) are checked against an
exact account kept here of what the prompt cache holds: each reply's prompt plus the ids fed back
while generating it (computed with the model in this process). A fresh server: 0 on the first
request; a continued conversation: the shared prefix; a fork sharing only the system prompt: that
part; a conversation whose cache was evicted: only what the surviving one shares with it. Never
more than the prompt's length minus one (its last id is always fed, for its logits).
"""

from __future__ import annotations

import json
import shutil

import pytest

import mlx_mixtral

from served import Server

CONTEXT = 2048
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def folder(hf_checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("usage") / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return out


@pytest.fixture(scope="module")
def local(folder):
    return mlx_mixtral.load(folder, progress=False)


def ask(server: Server, protocol: str, system: str, turns: list[dict]) -> tuple[int, int, str]:
    """(prompt tokens, cached tokens, reply text) of one greedy request in `protocol`."""
    if protocol == "chat":
        r = server.post("/v1/chat/completions", {"messages": [{"role": "system", "content": system}, *turns],
                                                 "max_tokens": MAX_TOKENS})
        body = r.json()
        usage = body["usage"]
        return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], \
            body["choices"][0]["message"]["content"]
    if protocol == "responses":
        r = server.post("/v1/responses", {"instructions": system, "input": turns, "max_output_tokens": MAX_TOKENS})
        body = r.json()
        usage = body["usage"]
        text = "".join(part["text"] for item in body["output"] for part in item.get("content", []))
        return usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"], text
    r = server.post("/v1/messages", {"system": system, "messages": turns, "max_tokens": MAX_TOKENS})
    body = r.json()
    usage = body["usage"]
    text = "".join(block["text"] for block in body["content"] if block["type"] == "text")
    return usage["input_tokens"] + usage["cache_read_input_tokens"], usage["cache_read_input_tokens"], text


class Account:
    """What the server's prompt cache holds, kept the way it keeps it (`PromptPool`): each reply's
    prompt plus the ids fed back while generating; a continued conversation replaces the entry it
    extends; the least recently used go first when `capacity` (entries) is exceeded."""

    def __init__(self, local, capacity: int = 1000) -> None:
        self.model, self.tokenizer = local
        self.entries: list[list[int]] = []
        self.capacity = capacity

    def expect(self, system: str, turns: list[dict]) -> tuple[list[int], int, str]:
        prompt = self.tokenizer.apply_chat_template([{"role": "system", "content": system}, *turns])
        shares = [(_shared(e, prompt), i) for i, e in enumerate(self.entries)]
        cached, best = max(shares, default=(0, None))
        *_, last = mlx_mixtral.stream_generate(self.model, self.tokenizer, prompt, max_tokens=MAX_TOKENS)
        fed = last.tokens[:-1] if last.finish_reason == "length" else last.tokens
        text = "".join(r.text for r in mlx_mixtral.stream_generate(self.model, self.tokenizer, prompt,
                                                                    max_tokens=MAX_TOKENS))
        held = prompt + list(fed)
        if best is not None and cached == len(self.entries[best]):
            self.entries.pop(best)  # taken over
        self.entries = [e for e in self.entries if held[:len(e)] != e]
        self.entries.append(held)
        del self.entries[:-self.capacity]
        return prompt, cached if best is not None else 0, text


def _shared(held: list[int], prompt: list[int]) -> int:
    n = 0
    while n < min(len(held), len(prompt) - 1) and held[n] == prompt[n]:
        n += 1
    return n


@pytest.mark.parametrize("protocol", ["chat", "responses", "messages"])
def test_cached_tokens_are_the_prefix_reused(folder, local, protocol):
    server = Server(folder)
    account = Account(local)
    try:
        steps = []
        a1 = [{"role": "user", "content": "Name a colour."}]
        steps.append(("first", "You are terse.", a1))
        steps.append(("fork: the system prompt only", "You are terse.", [{"role": "user", "content": "Count to three."}]))
        for what, system, turns in steps:
            prompt, cached, text = account.expect(system, turns)
            got = ask(server, protocol, system, turns)
            assert got == (len(prompt), cached, text), what
        assert steps and account.entries
        # continue the first conversation with its own reply
        reply = ask(server, "chat", "You are terse.", a1)[2]  # (the same reply again: greedy)
        account.expect("You are terse.", a1)
        a2 = [*a1, {"role": "assistant", "content": reply}, {"role": "user", "content": "Another?"}]
        prompt, cached, text = account.expect("You are terse.", a2)
        got = ask(server, protocol, "You are terse.", a2)
        assert got == (len(prompt), cached, text)
        assert 0 < cached <= len(prompt) - 1
    finally:
        server.stop()


def test_an_evicted_conversation_reports_only_what_survives(folder, local):
    probe = Server(folder)
    try:
        ask(probe, "chat", "You are terse.", [{"role": "user", "content": "Name a colour."}])
        one = probe.health()["prompt_cache"]["bytes"]
    finally:
        probe.stop()
    server = Server(folder, "--prompt-cache-size", str(one * 3 // 2))  # room for one conversation, not two
    account = Account(local, capacity=1)
    try:
        a1 = [{"role": "user", "content": "Name a colour."}]
        for system, turns in (("You are terse.", a1), ("Reply in French, always.", [{"role": "user", "content": "Hi"}])):
            prompt, cached, text = account.expect(system, turns)
            assert ask(server, "chat", system, turns) == (len(prompt), cached, text)
        assert server.health()["prompt_cache"]["conversations"] == 1
        reply = account.tokenizer.decode(account.tokenizer.encode_text("x"))  # any earlier reply will do
        a2 = [*a1, {"role": "assistant", "content": reply}, {"role": "user", "content": "Another?"}]
        prompt, cached, text = account.expect("You are terse.", a2)
        assert ask(server, "chat", "You are terse.", a2) == (len(prompt), cached, text)
        assert cached < 8  # BOS and the first marker at most: the first conversation is gone
    finally:
        server.stop()
    off = Server(folder, "--prompt-cache-size", "0")
    try:
        for _ in range(2):
            assert ask(off, "messages", "You are terse.", a1)[1] == 0
    finally:
        off.stop()
