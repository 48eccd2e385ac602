"""Each sampling field does what it says on its own, and in any pair: the distribution a token is
drawn from equals an independent numpy rendering of the documented rules, for every field set
alone (every other at its default) and for every pair; and each protocol's and front door's
field reaches the sampler alone, without needing another one set.

The documented rules, in order: the repetition penalty (CTRL-style, over the last 64 ids of
prompt and reply: positive logits divided, negative multiplied), OpenAI's penalties (count x
frequency + presence, for ids generated in this reply), then temperature, top-k, min-p (against
the most likely token left), top-p (the smallest most-likely set reaching the mass). Greedy
(temperature 0) takes the most likely token after the penalties.
"""

from __future__ import annotations

import argparse
import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_mixtral.arguments import add_sampling_args, sampling_from_args
from mlx_mixtral.generate import PenalizedSampler
from mlx_mixtral.sampling import SamplingParams
from mlx_mixtral.serve.request import Defaults, sampling

V = 40
SET = {"temp": 0.6, "top_k": 7, "top_p": 0.7, "min_p": 0.15, "repetition_penalty": 1.8,
       "frequency_penalty": 0.9, "presence_penalty": 1.3}
PROMPT = [3, 5, 5, 11]  # the repetition penalty's window starts with the prompt
GENERATED = [5, 9, 5, 17]  # then the reply so far: OpenAI's penalties count these


def _logits(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 2.0, V)
    x[[3, 5, 9, 11, 17]] = [2.5, 3.0, -1.0, 1.5, 2.8]  # penalised ids near the top, one below zero
    return x.astype(np.float32)


def reference(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution the documented rules give (one-hot for greedy)."""
    x = logits.astype(np.float64).copy()
    if p.repetition_penalty != 1:
        for t in set(PROMPT + GENERATED):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    counts = np.bincount(GENERATED, minlength=V)
    x -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
    if p.temp == 0:
        return np.eye(V)[np.argmax(x)]
    x /= p.temp
    if p.top_k:
        x[x < np.sort(x)[-p.top_k]] = -np.inf
    if p.min_p:
        lp = x - np.logaddexp.reduce(x)
        x[lp < lp.max() + np.log(p.min_p)] = -np.inf
    if p.top_p < 1:
        probs = np.exp(x - np.logaddexp.reduce(x))
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        drop = order[before >= p.top_p]
        x[drop] = -np.inf
    return np.exp(x - np.logaddexp.reduce(x))


def drawn_from(p: SamplingParams, logits: np.ndarray, monkeypatch) -> np.ndarray:
    """The distribution our sampler draws the next token from, after it generated GENERATED."""
    seen: list[mx.array] = []
    real = mx.random.categorical

    def capture(x, axis=-1, **kw):
        seen.append(x)
        return real(x, axis=axis, **kw)

    monkeypatch.setattr(mx.random, "categorical", capture)
    sampler = PenalizedSampler(p, PROMPT)
    for token in GENERATED:  # a peaked step samples `token` whatever the filters
        peaked = np.full(V, -30.0, np.float32)
        peaked[token] = 30.0
        assert sampler(mx.array(peaked)[None, None]).item() == token
    seen.clear()
    y = sampler(mx.array(logits)[None, None])
    monkeypatch.undo()
    if p.temp == 0:
        return np.eye(V)[y.item()]
    (final,) = seen
    x = np.array(final.astype(mx.float32)).reshape(-1).astype(np.float64)
    return np.exp(x - np.logaddexp.reduce(x))


CASES = [(name,) for name in SET] + list(itertools.combinations(SET, 2))


@pytest.mark.parametrize("fields", CASES, ids=["+".join(c) for c in CASES])
def test_each_field_alone_and_in_pairs_shapes_the_distribution_as_documented(fields, monkeypatch):
    base = SamplingParams(temp=1.0)  # filters act on a sampled distribution; temp is tested too
    params = SamplingParams(**{**vars(base), **{f: SET[f] for f in fields}})
    logits = _logits(len(fields))
    got, want = drawn_from(params, logits, monkeypatch), reference(logits, params)
    np.testing.assert_allclose(got, want, atol=2e-5)
    if len(fields) == 1:  # it changed something on its own
        assert np.abs(want - reference(logits, base)).max() > 1e-3


@pytest.mark.parametrize("field", ["repetition_penalty", "frequency_penalty", "presence_penalty"])
def test_each_penalty_alone_changes_the_greedy_choice(field, monkeypatch):
    logits = _logits()
    logits[5] = 9.0  # generated twice and in the prompt: greedy's choice until penalised
    logits[20] = 8.0
    params = SamplingParams(**{field: {"repetition_penalty": 2.0, "frequency_penalty": 0.6,
                                       "presence_penalty": 1.5}[field]})
    assert np.argmax(drawn_from(SamplingParams(), logits, monkeypatch)) == 5
    assert np.argmax(drawn_from(params, logits, monkeypatch)) == np.argmax(reference(logits, params)) == 20


BODY_NAMES = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
              "repetition_penalty": "repetition_penalty", "frequency_penalty": "frequency_penalty",
              "presence_penalty": "presence_penalty"}
FLAG_NAMES = {"temp": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
              "repetition_penalty": "--repetition-penalty", "frequency_penalty": "--frequency-penalty",
              "presence_penalty": "--presence-penalty"}


@pytest.mark.parametrize("fields", CASES, ids=["+".join(c) for c in CASES])
def test_every_front_door_passes_each_field_alone(fields):
    """A request body (every protocol reads the same names) and the command-line flags set
    exactly the fields given, whatever else is left out."""
    defaults = Defaults(sampling=SamplingParams())
    expected = SamplingParams(**{f: SET[f] for f in fields})
    parsed, _ = sampling({BODY_NAMES[f]: SET[f] for f in fields}, defaults, vocab=32000)
    assert parsed == expected
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    args = parser.parse_args([a for f in fields for a in (FLAG_NAMES[f], str(SET[f]))])
    assert sampling_from_args(args) == expected
