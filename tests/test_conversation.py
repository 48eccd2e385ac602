"""The chat's conversation and cache logic, without a terminal.

The central property: whatever happened in earlier turns (replies that re-encode to other ids,
interrupted replies, regenerated ones, dropped exchanges, a sliding window that cannot trim),
the cache plus the ids fed for the next turn give the same next-token logits as a fresh prefill
of `apply_chat_template(conversation)`, while feeding only the ids not already cached.
"""

from __future__ import annotations

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from mlx_mixtral.chat import conversation as conversation_module
from mlx_mixtral.chat.conversation import SETTING_KEYS, ChatSession, Conversation, Exchange, Settings
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.prompt_cache import PromptCache, common_prefix_length
from mlx_mixtral.sampling import SamplingParams

GREEDY = SamplingParams(temp=0.0)


@pytest.fixture(scope="module")
def gqa(hf_checkpoint_factory):
    return mlx_mixtral.load(hf_checkpoint_factory("gqa"), progress=False)


@pytest.fixture(scope="module")
def sliding(hf_checkpoint_factory, tmp_path_factory):
    """The gqa checkpoint with a 16-token sliding window and room for a conversation long enough
    that the cache compacts (cheaper than building another model)."""
    folder = tmp_path_factory.mktemp("sliding") / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sliding_window": 16, "max_position_embeddings": 4096}))
    return mlx_mixtral.load(folder, progress=False)


def session_for(loaded, max_tokens: int = 6, **kwargs) -> ChatSession:
    model, tokenizer = loaded
    return ChatSession(model, tokenizer, Settings(GREEDY, max_tokens=max_tokens), **kwargs)


def run_turn(session: ChatSession, user: str, stop_after: int | None = None):
    """Answer `user`; with `stop_after`, close the stream after that many pieces (like Ctrl-C)."""
    turn = session.start(user)
    stream = session.stream(turn)
    for n, _ in enumerate(stream, 1):
        if n == stop_after:
            stream.close()
            break
    return turn


def assert_next_turn_matches_fresh_prefill(session: ChatSession, user: str) -> int:
    """Prepare the next turn like `stream` does; compare logits with a from-scratch prefill.

    Returns how many ids had to be fed.
    """
    model, tokenizer = session.model, session.tokenizer
    turn = session.start(user)  # may drop the oldest exchanges
    full = tokenizer.apply_chat_template(session.conversation.messages(user))
    assert turn.prompt == full
    rest = session.cache.prepare(full)
    assert session.cache.ids + rest == full
    assert session.cache.cache[0].offset == len(session.cache.ids)
    cached = model(mx.array([rest]), cache=session.cache.cache, last_only=True)[0, -1]
    session.cache.record(rest, [])
    fresh = model(mx.array([full]), cache=mlx_mixtral.make_cache(model), last_only=True)[0, -1]
    np.testing.assert_allclose(np.array(cached), np.array(fresh), atol=1e-4, rtol=1e-4)
    assert int(mx.argmax(cached)) == int(mx.argmax(fresh))
    return len(rest)


# -- pure helpers -------------------------------------------------------------------------------

def test_common_prefix_length():
    assert common_prefix_length([], [1, 2]) == 0
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5], [1]) == 0


def test_settings_update_parses_validates_and_leaves_bad_values_out():
    s = Settings(SamplingParams(temp=0.7), max_tokens=100)
    assert s.update("temp", "0.2") == "temp" and s.sampling.temp == 0.2
    assert s.update("top-p", "0.9") == "top_p" and s.sampling.top_p == 0.9
    s.update("top_k", "40")
    s.update("min_p", "0.05")
    s.update("repetition_penalty", "1.1")
    s.update("max_tokens", "7")
    s.update("seed", "42")
    assert dict(s.items()) == {"temp": 0.2, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                               "repetition_penalty": 1.1, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                               "max_tokens": 7, "seed": 42}
    assert [k for k, _ in s.items()] == list(SETTING_KEYS)
    s.update("seed", "none")
    assert s.seed is None
    for key, value, message in [
        ("temp", "abc", "temp takes a number, not 'abc'"),
        ("top_k", "1.5", "top_k takes a whole number, not '1.5'"),
        ("temp", "-1", "temperature must be >= 0, got -1.0"),
        ("top_p", "0", "top-p must be in (0, 1], got 0.0"),
        ("max_tokens", "0", "max_tokens must be at least 1, got 0"),
        ("seed", "-1", "seed must be from 0 to 2**64 - 1, got -1"),
        ("colour", "red", "unknown setting 'colour'"),
    ]:
        with pytest.raises(MixtralError, match=re.escape(message)):
            s.update(key, value)
    assert dict(s.items())["temp"] == 0.2 and s.max_tokens == 7


def test_conversation_messages_and_json_round_trip(tmp_path):
    c = Conversation("Be brief.", [Exchange("Hi", "Hello!"), Exchange("Tell me more", "Once upon", True)])
    assert c.messages("Next") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me more"}, {"role": "assistant", "content": "Once upon"},
        {"role": "user", "content": "Next"},
    ]
    saved = json.loads(c.to_json())
    assert saved["messages"][4] == {"role": "assistant", "content": "Once upon", "interrupted": True}
    assert "interrupted" not in saved["messages"][2]
    path = c.save(tmp_path / "chat.json")
    assert Conversation.load(path) == c
    assert Conversation.load(Conversation().save(tmp_path / "empty.json")) == Conversation()


@pytest.mark.parametrize("text, message", [
    ("{", "is not valid JSON"),
    ("[]", "expected an object with a 'messages' list"),
    ('{"messages": [{"role": "user"}]}', "message 0 needs a 'role' and a string 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "must end with an assistant reply"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}',
     "must alternate user, assistant"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
     "the assistant reply in message 1 is empty"),
])
def test_conversation_from_bad_json_is_one_line_error(text, message):
    with pytest.raises(MixtralError, match=message) as info:
        Conversation.from_json(text, source="x.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("x.json")


def test_conversation_file_errors(tmp_path):
    with pytest.raises(MixtralError, match="no saved conversation at .*missing.json: no such file"):
        Conversation.load(tmp_path / "missing.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MixtralError, match="is not a text file"):
        Conversation.load(tmp_path / "binary.json")
    with pytest.raises(MixtralError, match="cannot save the conversation to .*: no such file or directory"):
        Conversation().save(tmp_path / "no" / "dir.json")


def test_a_save_that_fails_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    """A full disk mid-write: the previous save stays whole, nothing else is left behind."""
    from mlx_mixtral import files

    path = tmp_path / "chat.json"
    old = Conversation("Be kind.", [Exchange("hi", "hello")])
    old.save(path)
    before = path.read_bytes()
    real_write = files.os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data[:10]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "write", full_disk)
    with pytest.raises(MixtralError) as caught:
        Conversation("Other", [Exchange("a" * 5000, "b")]).save(path)
    message = str(caught.value)
    assert message == (f"cannot save the conversation to {path}: no space left on device; the disk is full: free "
                       "some space (nothing was changed there)")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["chat.json"]
    assert Conversation.load(path) == old


@pytest.mark.parametrize("kind", ["fifo", "folder", "unreadable"])
def test_only_regular_readable_files_are_opened(tmp_path, kind):
    """A FIFO would block `open` forever: refused in one line before anything waits on it."""
    import os

    path = tmp_path / "thing.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        Conversation().save(path)
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: nothing to test here
            pytest.skip("running as root: permissions do not stop reads")
    with pytest.raises(MixtralError) as caught:
        Conversation.load(path)
    expected = {"fifo": "is not a regular file (a pipe, socket or device)", "folder": "is a folder",
                "unreadable": "permission denied; check the file's permissions"}[kind]
    assert expected in str(caught.value) and "\n" not in str(caught.value)


# -- the cache follows the conversation ---------------------------------------------------------

def test_cache_after_several_turns_equals_fresh_prefill_and_work_is_incremental(gqa):
    session = session_for(gqa, system="You are terse.")
    encode = session.tokenizer.apply_chat_template
    turns = []
    for user in ["Hello there", "What is a mixture of experts?", "Thanks!"]:
        turn = run_turn(session, user)
        assert turn.kept and not turn.interrupted and turn.last.finish_reason == "length"
        assert turn.text == session.conversation.exchanges[-1].reply
        assert len(session.cache.ids) == session.cache.cache[0].offset
        turns.append(turn)
    first_prompt = encode(session.conversation.messages()[:2])  # system text + first message
    assert turns[0].fed == len(first_prompt) == len(turns[0].prompt)
    for turn in turns[1:]:  # later turns reuse at least that from the cache
        assert turn.prompt[: len(first_prompt)] == first_prompt
        assert turn.fed <= len(turn.prompt) - len(first_prompt)
    fed = assert_next_turn_matches_fresh_prefill(session, "One more question")
    assert fed <= len(encode(session.conversation.messages("One more question"))) - len(first_prompt)


def test_regenerate_feeds_one_token_and_replaces_the_reply(gqa):
    session = session_for(gqa)
    run_turn(session, "Hello")
    run_turn(session, "Tell me a story")
    before = list(session.conversation.exchanges)
    session.set("temp", "1.0")
    turn = session.regenerate()
    assert turn.user == "Tell me a story" and len(session.conversation.exchanges) == 1
    list(session.stream(turn))
    assert turn.fed == 1  # the whole prompt was still in the cache
    assert session.conversation.exchanges[0] == before[0]
    assert session.conversation.exchanges[1].user == "Tell me a story"
    assert len(session.conversation.exchanges) == 2
    assert_next_turn_matches_fresh_prefill(session, "Go on")


def test_interrupted_reply_is_kept_and_cache_stays_consistent(gqa):
    session = session_for(gqa, max_tokens=50)
    turn = run_turn(session, "Write a long poem", stop_after=4)
    assert turn.interrupted and turn.kept and turn.last.generation_tokens == 4
    kept = session.conversation.exchanges[-1]
    assert kept == Exchange("Write a long poem", turn.text, interrupted=True) and kept.reply
    # The partial reply is in the cache without the EOS its stored form gets.
    assert session.cache.ids[-1] != session.tokenizer.eos_id
    assert_next_turn_matches_fresh_prefill(session, "Go on")


def test_error_inside_generation_resets_the_cache(gqa, monkeypatch):
    """An exception raised from inside stream_generate (Ctrl-C during prefill) leaves the cache
    in an unknown state: it is thrown away and the next turn prefills from scratch."""
    real = conversation_module.stream_generate

    def breaks_after_one_token(*args, **kwargs):
        responses = real(*args, **kwargs)
        yield next(responses)
        raise KeyboardInterrupt

    session = session_for(gqa, max_tokens=20)
    run_turn(session, "Hello")
    monkeypatch.setattr(conversation_module, "stream_generate", breaks_after_one_token)
    turn = session.start("Tell me more")
    with pytest.raises(KeyboardInterrupt):
        list(session.stream(turn))
    monkeypatch.undo()
    assert turn.interrupted and session.cache.ids == [] and session.cache.cache[0].offset == 0
    assert len(session.conversation.exchanges) == 2 - (not turn.kept)
    fed = assert_next_turn_matches_fresh_prefill(session, "Again")
    assert fed == len(session.tokenizer.apply_chat_template(session.conversation.messages("Again")))


def test_empty_reply_is_not_kept(gqa, monkeypatch):
    """When the very first token is EOS, there is no reply to store: the exchange is dropped."""
    session = session_for(gqa)
    run_turn(session, "Hello")
    turn = session.start("Hi again")
    probe = session.model(mx.array([turn.prompt]), last_only=True)
    monkeypatch.setattr(session.tokenizer, "eos_token_ids", {session.tokenizer.eos_id, int(mx.argmax(probe[0, -1]))})
    list(session.stream(turn))
    monkeypatch.undo()
    assert not turn.kept and not turn.interrupted and turn.text == ""
    assert len(session.conversation.exchanges) == 1
    assert_next_turn_matches_fresh_prefill(session, "Hi again")


def test_undo_and_errors(gqa):
    session = session_for(gqa)
    with pytest.raises(MixtralError, match="nothing to undo"):
        session.undo()
    with pytest.raises(MixtralError, match="no reply to regenerate"):
        session.regenerate()
    run_turn(session, "Hello")
    run_turn(session, "Bye")
    assert session.undo().user == "Bye"
    assert [e.user for e in session.conversation.exchanges] == ["Hello"]
    assert_next_turn_matches_fresh_prefill(session, "Bye again")


def test_sliding_window_cache_rebuilds_when_it_cannot_trim(sliding):
    """Window 16: once the cache has dropped old keys, a trim far back is refused: start afresh."""
    session = session_for(sliding, max_tokens=5)
    for user in ["Hi", "Tell me about " + "the sea and the sky, " * 40, "And " + "the land, " * 90]:
        run_turn(session, user)
        assert session.cache.cache[0].offset == len(session.cache.ids)
    assert session.cache.cache[0].start > 0  # keys outside the window are gone
    assert_next_turn_matches_fresh_prefill(session, "Bye")
    session.conversation.system = "Changed"  # the prompt now differs right after the first tokens
    fed = assert_next_turn_matches_fresh_prefill(session, "Bye")
    assert fed == len(session.tokenizer.apply_chat_template(session.conversation.messages("Bye")))
    turn = session.regenerate()  # the prompt is all cached: trimming back over the reply works
    list(session.stream(turn))
    assert turn.fed == 1
    assert_next_turn_matches_fresh_prefill(session, "And?")


def test_context_overflow_drops_oldest_exchanges_and_keeps_system(gqa):
    session = session_for(gqa, max_tokens=8, max_context=96, system="Be kind.")
    assert session.limit == 96 and session.reply_room() == 8
    dropped = []
    for user in ["first message", "second message", "third message", "fourth message", "fifth message"]:
        turn = run_turn(session, user)
        dropped.append(turn.dropped)
        assert len(turn.prompt) + session.reply_room() <= 96
    assert sum(dropped) > 0
    assert session.conversation.system == "Be kind."
    assert session.conversation.exchanges[-1].user == "fifth message"
    assert "first message" not in [e.user for e in session.conversation.exchanges]
    assert_next_turn_matches_fresh_prefill(session, "sixth")


def test_message_too_long_for_the_context_keeps_the_conversation(gqa):
    session = session_for(gqa, max_tokens=8, max_context=64, system="Be kind.")
    run_turn(session, "Hello")
    before = list(session.conversation.exchanges)
    with pytest.raises(MixtralError, match=r"this message with the system text takes \d+ tokens, which does "
                                           r"not fit the context of 64 tokens with 8 left for the reply"):
        session.start("word " * 100)
    assert session.conversation.exchanges == before


def test_prompt_cache_prepare_always_leaves_one_token(gqa):
    model, _ = gqa
    cache = PromptCache(model)
    ids = [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]
    assert cache.prepare(ids) == ids
    model(mx.array([ids]), cache=cache.cache)
    cache.record(ids, [])
    assert cache.prepare(ids) == ids[-1:] and cache.cache[0].offset == len(ids) - 1
    assert cache.prepare(ids[:3] + [5]) == [5] and cache.ids == ids[:3]


@pytest.mark.parametrize("make", [mlx_mixtral.cache.KVCache, lambda: mlx_mixtral.cache.SlidingWindowCache(16)])
def test_cache_grows_enough_after_a_trim(make):
    """The chat's pattern: trim far back, then prefill more than the buffer's spare room."""
    cache = make()
    kv = lambda n: mx.ones((1, 2, n, 8))  # noqa: E731
    cache.update_and_fetch(kv(300), kv(300))
    cache.trim(290)
    keys, _ = cache.update_and_fetch(kv(450), kv(450))
    assert cache.offset == 460 and keys[0].shape[2] == 460 - getattr(cache, "start", 0)


def test_trimming_a_long_loaded_history_is_linear(gqa, tmp_path):
    """2000 saved exchanges against a 96-token context: the text that is encoded is a small
    multiple of what fits, not of the whole history (which re-encoding per dropped exchange was).
    Counted in characters handed to the tokenizer, so the check does not depend on speed."""
    session = session_for(gqa, max_tokens=8, max_context=96, system="Be kind.")
    history = Conversation("Be kind.", [Exchange(f"question {i} " * 20, f"answer {i} " * 20) for i in range(2000)])
    history.save(tmp_path / "long.json")
    session.load(tmp_path / "long.json")
    encoded = []
    real = session.tokenizer.apply_chat_template

    def counting(messages, *args, **kwargs):
        encoded.append(sum(len(m["content"]) for m in messages))
        return real(messages, *args, **kwargs)

    session.tokenizer.apply_chat_template = counting
    try:
        turn = session.start("and now?")
    finally:
        del session.tokenizer.apply_chat_template
    whole = sum(len(e.user) + len(e.reply) for e in history.exchanges)
    assert turn.dropped >= 1990 and len(turn.prompt) + session.reply_room() <= 96
    assert sum(encoded) < whole / 50, (sum(encoded), whole)
    assert turn.prompt == session.tokenizer.apply_chat_template(session.conversation.messages("and now?"))
