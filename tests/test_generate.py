"""Sampling filters, stop conditions and the streaming contract of `stream_generate`."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from mlx_mixtral import MixtralError, SamplingParams
from mlx_mixtral.chat import conversation
from mlx_mixtral.chat.conversation import ChatSession, Settings
from mlx_mixtral.generate import _stop_split
from mlx_mixtral.sampling import REPETITION_WINDOW, apply_repetition_penalty, make_sampler

from checkpoints import PROBE_TOKENS


@pytest.fixture(scope="module")
def tiny(hf_checkpoint_factory):
    return mlx_mixtral.load(hf_checkpoint_factory("gqa"), progress=False)


def _support(params: SamplingParams, logits: list[float], draws: int = 400) -> set[int]:
    """The set of tokens a sampler ever picks for these logits."""
    sampler = make_sampler(params)
    mx.random.seed(0)
    x = mx.broadcast_to(mx.array([logits]), (draws, len(logits)))
    return set(np.array(sampler(x)).tolist())


LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]  # probabilities ~ .53 .20 .12 .07 .03 .004


def test_greedy_is_argmax():
    assert _support(SamplingParams(temp=0), LOGITS) == {0}


def test_filters_restrict_the_support():
    assert _support(SamplingParams(temp=1.0), LOGITS) >= {0, 1, 2, 3}
    assert _support(SamplingParams(temp=1.0, top_k=2), LOGITS) == {0, 1}
    assert _support(SamplingParams(temp=1.0, top_p=0.6), LOGITS) == {0, 1}  # .53 < .6 <= .73
    assert _support(SamplingParams(temp=1.0, min_p=0.2), LOGITS) == {0, 1, 2}  # >= .2 * .53
    assert _support(SamplingParams(temp=1.0, top_k=1), LOGITS) == {0}


def _probs(logits: list[float], temp: float) -> np.ndarray:
    z = np.array(logits) / temp
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_temperature_divides_the_logits(temp):
    """Sampled frequencies match softmax(logits / T); at T=0.5 token 0 has 83%, at T=2 36%."""
    draws = 20000
    mx.random.seed(1)
    x = mx.broadcast_to(mx.array([LOGITS]), (draws, len(LOGITS)))
    counts = np.bincount(np.array(make_sampler(SamplingParams(temp=temp))(x)), minlength=len(LOGITS))
    expected = _probs(LOGITS, temp)
    # binomial standard deviation at 20000 draws is at most 0.0035: 0.015 is > 4 of them
    np.testing.assert_allclose(counts / draws, expected, atol=0.015)


@pytest.mark.parametrize("temp,params,support", [
    # T=0.5: probabilities .83 .11 .04 .015; T=1: .53 .20 .12 .07 .03; T=2: .36 .22 .17 .13 .08 .03
    (0.5, dict(top_p=0.9), {0, 1}), (1.0, dict(top_p=0.9), {0, 1, 2, 3}), (2.0, dict(top_p=0.6), {0, 1, 2}),
    (0.5, dict(min_p=0.1), {0, 1}), (1.0, dict(min_p=0.1), {0, 1, 2, 3}), (2.0, dict(min_p=0.1), {0, 1, 2, 3, 4}),
])
def test_top_p_and_min_p_apply_after_the_temperature(temp, params, support):
    assert _support(SamplingParams(temp=temp, **params), LOGITS, draws=2000) == support


def _penalised_greedy(model, context: list[int], n: int, penalty: float, eos: int) -> list[int]:
    """An independent reference: recompute every step from scratch; penalise each distinct token
    among the last REPETITION_WINDOW ids (prompt, earlier context and reply alike) as Hugging Face does."""
    ids, out = list(context), []
    for _ in range(n):
        logits = np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))
        for t in set(ids[-REPETITION_WINDOW:]):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        token = int(np.argmax(logits))
        if token == eos:
            break
        ids.append(token)
        out.append(token)
    return out


def test_repetition_penalty_over_a_long_reply_matches_a_full_recompute(tiny):
    """The window slides past the prompt (80 ids) and the reply's own tokens join it."""
    model, tokenizer = tiny
    prompt = [1] + np.random.default_rng(3).integers(3, 500, 79).tolist()
    penalty = 3.0
    reply = [r.token for r in mlx_mixtral.stream_generate(
        model, tokenizer, prompt, max_tokens=40, sampling=SamplingParams(repetition_penalty=penalty))]
    plain = [r.token for r in mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=40)]
    assert reply != plain  # the penalty changes this reply, so the comparison below means something
    assert reply == _penalised_greedy(model, prompt, 40, penalty, tokenizer.eos_id)


def test_repetition_penalty_in_a_chat_sees_the_earlier_turns(tiny, monkeypatch):
    model, tokenizer = tiny
    penalty = 3.0
    session = ChatSession(model, tokenizer, Settings(SamplingParams(repetition_penalty=penalty), max_tokens=16))
    seen = []

    def spy(*args, **kwargs):
        seen.append(list(kwargs["history"]) + list(args[2]))
        return real(*args, **kwargs)

    real = conversation.stream_generate
    monkeypatch.setattr(conversation, "stream_generate", spy)
    for message in ("Tell me about the sea and the ships", "More"):
        turn = session.start(message)
        "".join(session.stream(turn))
    assert seen[-1] == turn.prompt  # the penalty is told of everything the cache holds
    # the cache held most of the prompt, so only the history brings it into the penalty's window
    assert turn.fed + 10 < min(len(turn.prompt), REPETITION_WINDOW)
    assert turn.last.tokens == _penalised_greedy(model, turn.prompt, 16, penalty, tokenizer.eos_id)


def test_repetition_penalty_follows_hugging_face():
    logits = mx.array([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, mx.array([0, 1, 1]), 2.0)
    assert np.array(out).tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("bad", [dict(temp=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_values(bad):
    with pytest.raises(MixtralError):
        make_sampler(SamplingParams(**bad))


def test_repetition_penalty_window_covers_the_history_before_the_prompt(tiny):
    """A chat turn feeds only its new tokens; what the cache held before still counts as recent."""
    model, tokenizer = tiny
    prompt = PROBE_TOKENS[-3:]

    def first(**kwargs) -> int:
        return next(mlx_mixtral.stream_generate(model, tokenizer, prompt, max_tokens=1, **kwargs)).token

    greedy = first()
    assert greedy not in prompt
    penalised = SamplingParams(repetition_penalty=50.0)
    assert first(sampling=penalised) == greedy  # not recent: untouched
    assert first(sampling=penalised, history=[greedy]) != greedy
    assert first(sampling=penalised, history=[greedy] + [7] * 64) == greedy  # out of the window


def test_stop_strings_are_held_back_until_decided():
    assert _stop_split("hello wor", ["world"]) == ("hello ", "wor", None)
    assert _stop_split("hello world and", ["world"]) == ("hello ", "", "world")
    assert _stop_split("abc", []) == ("abc", "", None)


def test_streamed_text_is_the_decoded_tokens(tiny):
    model, tokenizer = tiny
    responses = list(mlx_mixtral.stream_generate(model, tokenizer, PROBE_TOKENS, max_tokens=20, stop_on_eos=False))
    tokens = [r.token for r in responses]
    assert len(tokens) == 20 and responses[-1].finish_reason == "length"
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
    assert responses[-1].generation_tokens == 20 and responses[-1].prompt_tokens == len(PROBE_TOKENS)
    assert responses[-1].peak_memory_gb > 0


def test_stop_string_ends_generation(tiny):
    model, tokenizer = tiny
    full = mlx_mixtral.generate(model, tokenizer, PROBE_TOKENS, max_tokens=20, stop_on_eos=False)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    first = full.index(stop)
    out = list(mlx_mixtral.stream_generate(model, tokenizer, PROBE_TOKENS, max_tokens=20,
                                           stop=[stop], stop_on_eos=False))
    assert "".join(r.text for r in out) == full[:first]
    assert out[-1].finish_reason == "stop"


def test_eos_stops_generation(tiny):
    model, tokenizer = tiny
    free = [r.token for r in mlx_mixtral.stream_generate(model, tokenizer, PROBE_TOKENS, max_tokens=12, stop_on_eos=False)]
    tokenizer.eos_token_ids = {free[5]}  # pretend the 6th token is EOS
    try:
        out = list(mlx_mixtral.stream_generate(model, tokenizer, PROBE_TOKENS, max_tokens=12))
    finally:
        tokenizer.eos_token_ids = {tokenizer.eos_id}
    assert [r.token for r in out] == free[: free.index(free[5]) + 1]
    assert out[-1].finish_reason == "stop" and out[-1].text == ""


def test_cache_holds_prompt_and_reply_and_continues(tiny):
    """Passing the cache back appends to it: a second turn equals one long prefill."""
    model, tokenizer = tiny
    cache = mlx_mixtral.make_cache(model)
    out = list(mlx_mixtral.stream_generate(model, tokenizer, PROBE_TOKENS, max_tokens=6, cache=cache, stop_on_eos=False))
    seen = PROBE_TOKENS + [r.token for r in out]
    assert cache[0].offset == len(seen) - 1  # the last token is returned, not yet fed back
    more = seen[cache[0].offset :] + [28705, 415]
    logits = model(mx.array([more]), cache=cache)
    full = model(mx.array([seen + [28705, 415]]))
    np.testing.assert_allclose(np.array(logits[0, -1]), np.array(full[0, -1]), atol=1e-4)


def test_prompt_longer_than_context(tiny):
    model, tokenizer = tiny
    too_long = [1] + [415] * model.config.max_position_embeddings
    with pytest.raises(MixtralError, match="does not fit the context"):
        next(mlx_mixtral.stream_generate(model, tokenizer, too_long))
    with pytest.raises(MixtralError, match="context of 8 tokens"):
        next(mlx_mixtral.stream_generate(model, tokenizer, PROBE_TOKENS, max_context=8))


def test_generation_stops_at_the_context_limit(tiny):
    model, tokenizer = tiny
    out = list(mlx_mixtral.stream_generate(model, tokenizer, PROBE_TOKENS, max_tokens=100,
                                           max_context=len(PROBE_TOKENS) + 5, stop_on_eos=False))
    assert len(out) == 5 and out[-1].finish_reason == "length"
