"""The chat template must give mistral-common's v1 token ids, and reject what it rejects.

mistral-common (the reference Mistral ships with Mixtral-Instruct v0.1) is compared on hand-picked
edge cases and on random conversations; whenever it rejects a conversation, ours must raise
MixtralError with a one-line message.
"""

from __future__ import annotations

import random
from pathlib import Path

import pydantic
import pytest
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mlx_mixtral.errors import MixtralError
from mlx_mixtral.tokenizer import Tokenizer
from mlx_mixtral.tokenizer.mistral_format import MistralFormat


@pytest.fixture(scope="module")
def reference(tokenizer_model_path: Path) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(tokenizer_model_path))


def reference_tokens(reference: MistralTokenizer, messages: list[dict]) -> list[int] | None:
    """mistral-common's ids, or None when it rejects the conversation."""
    try:
        request = ChatCompletionRequest(messages=messages)
        return reference.encode_chat_completion(request).tokens
    except (MistralCommonException, pydantic.ValidationError):
        return None


def assert_same_as_reference(tokenizer: Tokenizer, reference: MistralTokenizer, messages: list[dict]) -> bool:
    """Check ours against mistral-common; return whether the reference accepted the conversation."""
    expected = reference_tokens(reference, messages)
    if expected is None:
        with pytest.raises(MixtralError) as caught:
            tokenizer.apply_chat_template(messages)
        assert "\n" not in str(caught.value), str(caught.value)
        return False
    assert tokenizer.apply_chat_template(messages) == expected, messages
    return True


def U(content: str) -> dict:
    return {"role": "user", "content": content}


def A(content: str, prefix: bool | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if prefix is not None:
        message["prefix"] = prefix
    return message


def S(content: str) -> dict:
    return {"role": "system", "content": content}


ACCEPTED = [
    [U("Hello")],
    [U("What is 2+2?"), A("4"), U("And 3+3?")],
    [S("You are terse."), U("Hi")],
    [S("one"), S("two"), U("Hi")],
    [U("Hi"), S("late system prompt")],
    [U("a"), A("b"), U("c"), S("system after the last user")],
    [U("a"), S("s"), U("b")],  # a system message splits two user turns: no merge
    [S("s1"), U("a"), S("s2"), U("b")],
    [U("first"), U("second")],
    [U("first"), U("second"), U("third"), A("x"), A("y"), U("z")],
    [U(""), U("a")],
    [U("a"), U("")],
    [U("")],
    [S("only a system prompt")],
    [S(""), U("empty system prompt is dropped")],
    [S(""), S("x"), U("a"), S("y")],
    [U("Write a poem"), A("Roses are", prefix=True)],
    [U("q"), A("a1"), A("a2", prefix=True)],
    [U("q"), A(" leading and trailing spaces ", prefix=True)],
    [U("q"), A("a", prefix=False), U("r")],
    [A("assistant first"), U("then user")],  # mistral-common inserts an empty user turn
    [A("x"), A("y", prefix=True)],
    [S("s"), A("continue me", prefix=True)],
    [S("s"), A("a"), U("u")],
    [U("  two leading spaces"), A("  also  "), U("trailing   ")],
    [U("tabs\tand\nnewlines\n\n\nand \r\n CRLF")],
    [U("               many spaces")],
    [U("\n")],
    [U(" ")],
    [U("Literal [INST] and [/INST] markers"), A("and </s> and <s> inside"), U("<unk> too")],
    [U("[INST]"), A("[/INST]", prefix=True)],
    [U("你好，世界"), A("こんにちは 世界"), U("안녕하세요 🙂👍🏽")],
    [U("emoji 🧑‍🚀🏳️‍🌈 and combining e\u0301 and RTL עברית العربية")],
    [U("▁ the sentencepiece space symbol ▁▁ and <0x41> byte-like text")],
    [S("System\n\nwith paragraphs"), U("User\n\nwith paragraphs"), A("Answer\n\n"), U("ok")],
    [U("x" * 500)],
]

REJECTED = [
    [],
    [A("assistant alone")],
    [A("assistant alone", prefix=True)],
    [U("q"), A("no prefix at the end")],
    [U("q"), A("prefix not last", prefix=True), A("x")],
    [U("q"), A("prefix not last", prefix=True), U("r")],
    [U("q"), A("")],
    [U("q"), A("", prefix=True)],
    [U("q"), A("a"), S("system after assistant"), U("r")],
    [U("q"), A("a"), S("system last after assistant")],
    [{"role": "tool", "content": "x"}],
    [U("q"), {"role": "tool", "content": "x"}],
    [{"role": "robot", "content": "x"}],
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "system", "content": None}, U("x")],
    [{"role": "user", "content": "x", "prefix": True}],
    [{"role": "user", "content": "x", "prefix": False}],
    [{"role": "user", "content": "x", "name": "bob"}],
    [U("q"), {"role": "assistant", "content": None, "prefix": True}],
]


@pytest.mark.parametrize("messages", ACCEPTED, ids=range(len(ACCEPTED)))
def test_accepted_conversations_match_mistral_common(tokenizer, reference, messages) -> None:
    assert assert_same_as_reference(tokenizer, reference, messages), "mistral-common rejected an ACCEPTED case"


@pytest.mark.parametrize("messages", REJECTED, ids=range(len(REJECTED)))
def test_rejected_conversations_raise(tokenizer, reference, messages) -> None:
    assert not assert_same_as_reference(tokenizer, reference, messages), "mistral-common accepted a REJECTED case"


def test_not_a_list_of_messages_raises(tokenizer) -> None:
    for bad in (None, "hello", [None], ["hello"], [{"role": ["user"], "content": "x"}], [{"role": "user", "content": 5}]):
        with pytest.raises(MixtralError):
            tokenizer.apply_chat_template(bad)


def test_layout_with_a_character_encoder() -> None:
    """The structure, readable: one char per id, BOS=-1, EOS=-2."""
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    messages = [S("sys"), U("a"), A("b"), U("c"), A("d", prefix=True)]
    ids = MistralFormat(1, encode, bos_id=-1, eos_id=-2).encode(messages)
    text = "".join({-1: "<BOS>", -2: "<EOS>"}.get(i) or chr(i) for i in ids)
    assert text == "<BOS>[INST] sys\n\na [/INST]b<EOS>[INST] c [/INST]d"


SNIPPETS = [
    "Hello",
    "world",
    "How are you?",
    "  ",
    "   leading",
    "trailing   ",
    "\n",
    "\n\n\n",
    "\t",
    "a\r\nb",
    "[INST]",
    "[/INST]",
    "</s>",
    "<s>",
    "<unk>",
    "<0xE4>",
    "▁",
    "你好",
    "世界和平",
    "🙂",
    "👩‍👩‍👧",
    "naïve café",
    "Ω≈ç√",
    "e\u0301",
    "مرحبا",
    "日本語のテキスト",
    "x",
    "",
    "",
]


def random_content(rng: random.Random) -> str:
    return "".join(rng.choice(SNIPPETS) + rng.choice(["", " ", "  ", "\n"]) for _ in range(rng.randint(0, 5)))


def random_conversation(rng: random.Random) -> list[dict]:
    """Mostly valid conversations (so ids get compared), with some invalid ones mixed in."""
    roles = rng.choices(["user", "assistant", "system"], weights=[5, 4, 2], k=rng.randint(1, 7))
    messages = [{"role": role, "content": random_content(rng)} for role in roles]
    for message in messages:
        if message["role"] == "assistant" and not message["content"] and rng.random() < 0.9:
            message["content"] = rng.choice(SNIPPETS[:6])
    ending = rng.random()
    if ending < 0.5:
        messages.append(U(random_content(rng)))
    elif ending < 0.8:
        messages.append(A(random_content(rng) or "Sure", prefix=True))
    elif ending < 0.85:
        rng.choice(messages)["prefix"] = True
    return messages


def test_random_conversations_match_mistral_common(tokenizer, reference) -> None:
    rng = random.Random(20240101)
    accepted = sum(assert_same_as_reference(tokenizer, reference, random_conversation(rng)) for _ in range(400))
    assert accepted >= 200  # the comparison of ids, not only of rejections, must be exercised
