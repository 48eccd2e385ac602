"""Experts streamed from disk under a memory budget (`max_memory`): exactly the resident model.

The central property: whatever the budget (from the least that holds one token's experts to
every expert), policy and prefetch setting, the logits and greedy tokens are bitwise those of the
fully resident model, in prefill and decode, through `generate`, the chat session and the CLI.
Around it: the budget is never exceeded, expert reads leave nothing in the page cache, a prompt
chunk reads each expert once, and bad budgets fail in one line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from argparse import Namespace

import mlx.core as mx
import numpy as np
import pytest

import mlx_mixtral
from mlx_mixtral import arguments
from mlx_mixtral.chat.conversation import ChatSession, Settings
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.experts import budget
from mlx_mixtral.experts.expert_view import heatmap
from mlx_mixtral.experts.routing import log_of
from mlx_mixtral.experts.uncached_io import drop_file_from_page_cache, page_cache_bytes
from mlx_mixtral.generate import prefill
from mlx_mixtral.sampling import SamplingParams

GREEDY = SamplingParams(temp=0.0)


def budgets(path, counts=None):
    """Budgets (bytes) holding `counts` experts besides what stays resident: by default k (the
    least allowed), one per layer, half of them, and all."""
    model, _ = mlx_mixtral.load(path, progress=False, max_memory="1000GB")
    plan = model.runtime.expert_cache.plan
    c = model.config
    if counts is None:
        k = c.num_experts_per_tok
        counts = sorted({k, max(k, c.num_hidden_layers), max(k, plan.total_experts // 2), plan.total_experts})
    return {n: plan.resident + plan.staging + n * plan.expert_bytes for n in counts}


def streamed(path, max_memory, **kwargs):
    return mlx_mixtral.load(path, progress=False, max_memory=max_memory, **kwargs)


def decode_logits(model, tokens, prefill: int) -> mx.array:
    """Logits of a cached run: `prefill` tokens at once, then one token per step."""
    cache = mlx_mixtral.make_cache(model)
    out = [model(mx.array([tokens[:prefill]]), cache=cache)]
    for t in tokens[prefill:]:
        out.append(model(mx.array([[t]]), cache=cache))
    return mx.concatenate(out, axis=1)


@pytest.mark.parametrize("name", ["gqa", "experts4_top1", "experts6_top3", "tied"])
def test_any_budget_gives_bitwise_the_resident_logits_and_tokens(hf_checkpoint_factory, probe_tokens, name):
    path = hf_checkpoint_factory(name)
    resident, tokenizer = mlx_mixtral.load(path, progress=False)
    full = resident(mx.array([probe_tokens]))
    stepped = decode_logits(resident, probe_tokens, 5)
    greedy = mlx_mixtral.generate(resident, tokenizer, probe_tokens, max_tokens=12, stop_on_eos=False)
    for n, size in budgets(path).items():
        for policy in ("lru", "lfu"):
            model, _ = streamed(path, size, policy=policy)
            cache = model.runtime.expert_cache
            assert cache.slots == n, (n, cache.slots)
            assert mx.array_equal(model(mx.array([probe_tokens])), full), (name, n, policy)
            assert mx.array_equal(decode_logits(model, probe_tokens, 5), stepped), (name, n, policy)
            assert mlx_mixtral.generate(model, tokenizer, probe_tokens, max_tokens=12, stop_on_eos=False) == greedy
            assert cache.peak_used <= cache.capacity
            assert cache.snapshot().misses > 0


def test_without_prefetch_and_in_several_prefill_chunks_too(hf_checkpoint_factory, probe_tokens):
    path = hf_checkpoint_factory("gqa")
    resident, tokenizer = mlx_mixtral.load(path, progress=False)
    want = [r.token for r in mlx_mixtral.stream_generate(resident, tokenizer, probe_tokens, max_tokens=8,
                                                         prefill_step=4, stop_on_eos=False)]
    size = budgets(path, [3])[3]
    for prefetch in (True, False):
        model, _ = streamed(path, size, prefetch=prefetch)
        got = [r.token for r in mlx_mixtral.stream_generate(model, tokenizer, probe_tokens, max_tokens=8,
                                                            prefill_step=4, stop_on_eos=False)]
        assert got == want
        assert (model.runtime.expert_cache.snapshot().prefetch_issued > 0) == prefetch


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_lm_quantized_folders_stream_without_reconversion(hf_checkpoint_factory, mlx_lm_converted,
                                                              probe_tokens, bits):
    """mlx-lm's stacked layout, with its own bf16 scales (dtype=None: its default)."""
    path = mlx_lm_converted(hf_checkpoint_factory("gqa"), quantize=True, bits=bits, dtype=None)
    resident, _ = mlx_mixtral.load(path, progress=False)
    want = resident(mx.array([probe_tokens]))
    for size in budgets(path).values():
        model, _ = streamed(path, size)
        assert mx.array_equal(model(mx.array([probe_tokens])), want)


def test_bfloat16_and_sharded_checkpoints_stream_exactly(hf_checkpoint_factory, probe_tokens):
    for path in (hf_checkpoint_factory("gqa", dtype="bfloat16"), hf_checkpoint_factory("gqa", shards=3)):
        resident, _ = mlx_mixtral.load(path, progress=False)
        model, _ = streamed(path, min(budgets(path).values()))
        assert mx.array_equal(model(mx.array([probe_tokens])), resident(mx.array([probe_tokens])))


def test_chat_session_with_a_budget_replies_exactly_as_resident(hf_checkpoint_factory):
    path = hf_checkpoint_factory("gqa")
    replies = []
    for max_memory in (None, min(budgets(path).values())):
        model, tokenizer = mlx_mixtral.load(path, progress=False, max_memory=max_memory)
        session = ChatSession(model, tokenizer, Settings(GREEDY, max_tokens=6))
        texts = []
        for user in ("Hello there", "What is a mixture of experts?", "And why?"):
            turn = session.start(user)
            texts.append("".join(session.stream(turn)))
            assert turn.fed < len(turn.prompt) or user == "Hello there"  # the cache is reused
        replies.append(texts)
    assert replies[0] == replies[1]


def test_a_prompt_chunk_reads_each_expert_once(hf_checkpoint_factory, probe_tokens):
    path = hf_checkpoint_factory("gqa")
    model, _ = streamed(path, max(budgets(path).values()))
    model.model(mx.array([probe_tokens]), mlx_mixtral.make_cache(model))  # one chunk, no lm_head
    stats, usage = model.runtime.expert_cache.snapshot(), model.runtime.routing_log.usage
    assert usage.sum() == len(probe_tokens) * model.config.num_experts_per_tok * model.config.num_hidden_layers
    assert stats.requests == stats.misses + stats.hits + stats.prefetched == (usage > 0).sum()
    assert stats.bytes_read == sum(model.runtime.expert_cache.store.disk_bytes(layer, e) for layer, e in zip(*np.nonzero(usage)))


def test_prefill_skips_the_last_layers_experts(hf_checkpoint_factory, probe_tokens):
    """Only the prompt's last token needs the last layer's output: a prefill (every token but that
    one) reads no expert of the last layer, and the reply is still the resident model's."""
    path = hf_checkpoint_factory("gqa")
    model, tokenizer = streamed(path, max(budgets(path).values()))
    prefill(model, probe_tokens, mlx_mixtral.make_cache(model))
    usage = model.runtime.routing_log.usage
    last = model.config.num_hidden_layers - 1
    assert usage[:last].sum() == len(probe_tokens) * model.config.num_experts_per_tok * last
    assert usage[last].sum() == 0
    resident, _ = mlx_mixtral.load(path, progress=False)
    assert mlx_mixtral.generate(model, tokenizer, probe_tokens, max_tokens=4) == \
        mlx_mixtral.generate(resident, tokenizer, probe_tokens, max_tokens=4)


def test_expert_reads_leave_nothing_in_the_page_cache(hf_checkpoint_factory, probe_tokens, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), folder)
    weights = folder / "model.safetensors"
    try:  # asked of the file system itself, not of the code under test
        os.close(os.open(weights, os.O_RDONLY | os.O_DIRECT))
    except (AttributeError, OSError):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT (tmpfs?): only the fallback applies")
    fd = os.open(weights, os.O_RDONLY)
    os.fsync(fd)  # the copy's pages are dirty, and dirty pages cannot be dropped
    os.close(fd)
    drop_file_from_page_cache(weights)
    if page_cache_bytes(weights) != 0:
        pytest.skip("this kernel keeps pages it was asked to drop (cannot measure here)")
    model, tokenizer = streamed(folder, min(budgets(folder).values()))
    mlx_mixtral.generate(model, tokenizer, probe_tokens, max_tokens=6)
    assert model.runtime.expert_cache.snapshot().bytes_read > 0
    assert page_cache_bytes(weights) == 0


def test_budget_too_small_names_the_minimum(hf_checkpoint_factory):
    path = hf_checkpoint_factory("gqa")
    least = min(budgets(path).values())
    streamed(path, least)  # the minimum itself is accepted
    with pytest.raises(MixtralError) as e:
        streamed(path, least - 1)
    message = str(e.value)
    assert "\n" not in message and "below the minimum for this model" in message
    assert budget.gb(least) in message and "for 2 experts" in message


@pytest.mark.parametrize("text, expected", [("12GB", 12 * 10**9), ("12G", 12 * 10**9), ("1.5GiB", 3 * 2**29),
                                            ("800MB", 8 * 10**8), ("100000", 100000), (" 2 gb ", 2 * 10**9)])
def test_sizes(text, expected):
    assert budget.parse_size(text) == expected


@pytest.mark.parametrize("text", ["12XB", "GB", "-1GB", "0", "twelve", ""])
def test_bad_sizes_fail_in_one_line(text):
    with pytest.raises(MixtralError, match="--max-memory") as e:
        budget.parse_size(text)
    assert "\n" not in str(e.value)


def test_unknown_policy_is_refused(hf_checkpoint_factory):
    with pytest.raises(MixtralError, match="unknown expert cache policy 'mru'"):
        streamed(hf_checkpoint_factory("gqa"), "1000GB", policy="mru")


def test_auto_budget_is_the_machine_minus_kv_cache_and_margin(monkeypatch, hf_checkpoint_factory):
    path = hf_checkpoint_factory("gqa")
    config = mlx_mixtral.load(path, progress=False)[0].config
    monkeypatch.setattr(budget, "machine_memory", lambda: (10 * 10**9, "test RAM"))
    got, how = budget.auto_budget(config, context=100)
    kv = budget.kv_cache_bytes(config, 100)
    assert got == 10 * 10**9 - kv - (10**9 // 2 + budget.MARGIN_BYTES)
    assert "test RAM" in how and "100 tokens" in how
    assert budget.auto_budget(config, context=10**9)[1].endswith(f"for {config.max_position_embeddings} tokens - "
                                                                 f"{budget.gb(10**9 // 2 + budget.MARGIN_BYTES)} margin")


def test_zero_config_streaming_uses_what_suits_the_device_and_flags_override(monkeypatch, hf_checkpoint_factory):
    """With no flags: on a GPU (a Mac) cyclic without prefetch, which reads the fewest bytes where
    reads set the pace; on the CPU backend LFU with prefetch. Either is overridden by the flags."""
    from mlx_mixtral import device, loading

    assert device.streaming_defaults() == ("lfu", True)  # this machine: the CPU backend
    monkeypatch.setattr(device.mx, "default_device", lambda: device.mx.Device(device.mx.gpu))
    assert device.streaming_defaults() == ("cyclic", False)
    monkeypatch.undo()
    path = hf_checkpoint_factory("gqa")

    def streamed(*flags: str, gpu: bool):
        parser = argparse.ArgumentParser()
        arguments.add_model_args(parser)
        args = parser.parse_args(["--model", str(path), "--max-memory", "1000GB", *flags])
        monkeypatch.setattr(loading, "streaming_defaults", lambda: ("cyclic", False) if gpu else ("lfu", True))
        cache = arguments.load_from_args(args, lambda line: None)[0].runtime.expert_cache
        return cache.policy, cache.prefetch_enabled

    assert streamed(gpu=True) == ("cyclic", False)
    assert streamed(gpu=False) == ("lfu", True)
    assert streamed("--cache-policy", "lru", "--prefetch", gpu=True) == ("lru", True)
    assert streamed("--no-prefetch", gpu=False) == ("lfu", False)
    assert mlx_mixtral.load(path, progress=False, max_memory="1000GB")[0].runtime.expert_cache.policy == "lfu"


def test_front_doors_stream_automatically_when_the_model_does_not_fit(monkeypatch, hf_checkpoint_factory):
    """Resident when it fits; `auto`, said in one line, when it does not."""
    path = hf_checkpoint_factory("gqa")
    args = Namespace(model=str(path), max_memory=None, cache_policy="lfu", prefetch=None, miss_bits=None, expert_skip=0.0,
                     kv_bits=None, kv_group_size=None)
    notes: list[str] = []
    model, _ = arguments.load_from_args(args, notes.append)
    assert not hasattr(model, "expert_cache") and notes == []
    need = budget.weight_bytes(mlx_mixtral.checkpoint.Checkpoint(path), model.config)
    kv = budget.kv_cache_bytes(model.config, model.config.max_position_embeddings)
    monkeypatch.setattr(budget, "MARGIN_BYTES", 0)
    monkeypatch.setattr(budget, "MARGIN_FRACTION", 0.0)
    # room for the resident part and some experts, not for all of them
    monkeypatch.setattr(budget, "machine_memory", lambda: (need + kv - 1, "test RAM"))
    model, _ = arguments.load_from_args(args, notes.append)
    assert model.runtime.expert_cache.policy == "lfu"
    assert notes[0].startswith(f"the model takes {budget.gb(need)} and this machine offers ")
    assert notes[0].endswith("streaming experts from disk with --max-memory auto")
    assert notes[1].startswith("streaming experts within ")
    args.max_memory = "1KB"
    with pytest.raises(MixtralError, match="below the minimum"):
        arguments.load_from_args(args, notes.append)


def test_routing_heatmap_counts_every_routed_token(hf_checkpoint_factory, probe_tokens):
    path = hf_checkpoint_factory("gqa")
    for max_memory in (None, min(budgets(path).values())):
        model, tokenizer = mlx_mixtral.load(path, progress=False, max_memory=max_memory)
        log = log_of(model)
        assert heatmap(log) is None  # nothing routed yet
        mlx_mixtral.generate(model, tokenizer, probe_tokens, max_tokens=4, stop_on_eos=False)
        log = log_of(model)
        # the prompt (but its last token) in one prefill chunk, then 4 single tokens; the prefill
        # stops the last layer after attention (only the prompt's last token needs its output)
        k = model.config.num_experts_per_tok
        assert (log.usage[:-1].sum(axis=1) == (len(probe_tokens) + 3) * k).all()
        assert log.usage[-1].sum() == 4 * k
        assert log.streamed == (max_memory is not None)
        from rich.console import Console

        console = Console(record=True, width=120)
        console.print(heatmap(log))
        text = console.export_text()
        assert "layer" in text and "e7" in text and ("misses" in text) == (max_memory is not None)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_mixtral.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_generate_with_a_budget_prints_the_resident_text_and_the_streaming_stats(hf_checkpoint_factory):
    path = hf_checkpoint_factory("gqa")
    size = str(min(budgets(path).values()))
    common = ["generate", "--model", str(path), "--prompt", "Hello", "--max-tokens", "8"]
    resident = run_cli(*common)
    out = run_cli(*common, "--max-memory", size, "--verbose", "--show-experts")
    assert out.returncode == 0, out.stderr
    assert out.stdout == resident.stdout
    assert "streaming experts within" in out.stderr
    assert "experts: budget" in out.stderr and "hit rate" in out.stderr and "from disk" in out.stderr
    assert "experts used over this reply" in out.stderr and "misses" in out.stderr
    bad = run_cli(*common, "--max-memory", "1MB")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "below the minimum" in bad.stderr


def test_chat_experts_and_stats_commands(hf_checkpoint_factory, tmp_path):
    from test_repl import STAT, Chat

    path = hf_checkpoint_factory("gqa")
    c = Chat(path, "--temp", "0", "--max-tokens", "6", "--max-memory", str(min(budgets(path).values())),
             env={"MLX_MIXTRAL_HISTORY": str(tmp_path / "history")})
    c.expect(r"streaming experts within [\d.]+ MB: 2 of 16 experts fit in memory \(lfu\)")
    c.command("/experts", r"no reply yet")
    c.line("Hello there")
    c.expect(STAT)
    c.command("/experts", r"experts used over the last reply")
    c.expect(r"layer.*e0.*e7.*hits.*misses")
    c.expect(r"cache: \d+ hits, \d+ misses")
    c.command("/stats", r"streaming +budget [\d.]+ MB, \d+/16 cached \(lfu\) \| hit rate [\d.]+%")
    c.line("/exit")
    assert c.exits() == 0


def test_our_converters_mixed_precision_output_streams_exactly(hf_checkpoint_factory, probe_tokens, tmp_path):
    """Experts 4-bit, attention 4-bit, embeddings and lm_head 8-bit, router float; bf16 scales."""
    from convert.convert import convert

    out = convert(hf_checkpoint_factory("gqa", dtype="bfloat16"), tmp_path / "q4", quantize=True, bits=4,
                  group_size=32, progress=False).path
    resident, _ = mlx_mixtral.load(out, progress=False)
    want = resident(mx.array([probe_tokens]))
    for size in budgets(out).values():
        model, _ = streamed(out, size)
        assert mx.array_equal(model(mx.array([probe_tokens])), want)


def test_ctrl_c_or_a_failed_read_mid_layer_leaves_nothing_pinned(hf_checkpoint_factory, probe_tokens, monkeypatch):
    path = hf_checkpoint_factory("gqa")
    resident, _ = mlx_mixtral.load(path, progress=False)
    want = resident(mx.array([probe_tokens]))
    model, _ = streamed(path, min(budgets(path).values()))  # 2 slots: any leaked pin would block
    cache = model.runtime.expert_cache
    real_read = cache.store.read
    failures = iter([KeyboardInterrupt(), MixtralError("model.safetensors: cannot read expert 3 of layer 1")])

    def flaky(layer, expert):
        error = next(failures, None)
        if error is not None:
            raise error
        return real_read(layer, expert)

    monkeypatch.setattr(cache.store, "read", flaky)
    with pytest.raises(KeyboardInterrupt):
        model(mx.array([probe_tokens]))
    with pytest.raises(MixtralError, match="cannot read expert"):
        model(mx.array([probe_tokens]))
    assert all(entry.pins == 0 for entry in cache._entries.values())
    assert mx.array_equal(model(mx.array([probe_tokens])), want)  # and the next call just works


def copy_of_gqa(hf_checkpoint_factory, tmp_path):
    """A copy of the gqa checkpoint to damage, and its weights file."""
    folder = tmp_path / "model"
    shutil.copytree(hf_checkpoint_factory("gqa"), folder)
    return folder, folder / "model.safetensors"


def test_a_shard_truncated_while_streaming_is_one_line_and_the_chat_keeps_its_conversation(
        hf_checkpoint_factory, tmp_path):
    folder, weights = copy_of_gqa(hf_checkpoint_factory, tmp_path)
    model, tokenizer = streamed(folder, min(budgets(folder).values()))
    session = ChatSession(model, tokenizer, Settings(GREEDY, max_tokens=6))
    first = session.start("Hello there")
    "".join(session.stream(first))
    os.truncate(weights, weights.stat().st_size // 3)  # the experts of layer 1 are gone
    with pytest.raises(MixtralError) as e:
        turn = session.start("What is a mixture of experts?")
        "".join(session.stream(turn))
    message = str(e.value)
    assert "\n" not in message and str(weights) in message and "cannot read expert" in message
    assert "truncated" in message
    assert session.conversation.exchanges[0].user == "Hello there"  # the conversation is kept
    assert all(entry.pins == 0 for entry in model.runtime.expert_cache._entries.values())


def test_the_repl_reports_a_truncated_shard_and_goes_on(hf_checkpoint_factory, tmp_path):
    from test_repl import STAT, Chat

    folder, weights = copy_of_gqa(hf_checkpoint_factory, tmp_path)
    c = Chat(folder, "--temp", "0", "--max-tokens", "6", "--max-memory", str(min(budgets(folder).values())),
             env={"MLX_MIXTRAL_HISTORY": str(tmp_path / "history")})
    c.line("Hello there")
    c.expect(STAT)
    os.truncate(weights, weights.stat().st_size // 3)
    c.line("What is a mixture of experts?")
    c.expect(r"model\.safetensors: cannot read expert \d+ of layer \d+ \((?s:.*?)the file is truncated\)")
    c.command("/stats", r"conversation +\d+ exchanges?")
    c.line("/exit")
    assert c.exits() == 0


class _FakeStore:
    """Two layers of four 100-byte experts; reads return at once and are counted."""

    num_layers, num_experts = 2, 4
    max_expert_bytes = 100

    def __init__(self):
        self.reads: list[tuple[int, int]] = []
        self.bytes_read, self.read_seconds = 0, 0.0

    def nbytes(self, layer, expert):
        return 100

    def read(self, layer, expert):
        self.reads.append((layer, expert))
        return {}

    def close(self):
        pass


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_miss_never_evicts_an_expert_the_same_request_uses(policy):
    from mlx_mixtral.experts.expert_cache import ExpertCache

    store = _FakeStore()
    cache = ExpertCache(store, capacity=300, policy=policy)
    for e in (0, 1):  # layer 0 uses experts 0 and 1
        cache.fetch(0, [e])[e].result()
        cache.release(0, [e])
    cache.prefetch(1, [2])  # the guess for layer 1: expert 2 (the cache is now full)
    futures = cache.fetch(1, [3, 2])  # a miss listed before the prefetched expert
    [f.result() for f in futures.values()]
    cache.release(1, [3, 2])
    assert store.reads.count((1, 2)) == 1  # the prefetched expert was used, not evicted and re-read
    stats = cache.snapshot()
    assert (stats.prefetched, stats.misses, stats.evictions) == (1, 3, 1)
    assert cache.peak_used <= 300 and set(cache._entries) == {(0, 1), (1, 2), (1, 3)}
    cache.close()


@pytest.mark.parametrize("per_token, hits_per_token", [(0, 0), (4, 2)])
def test_a_cache_smaller_than_a_token_keeps_a_stable_set_instead_of_thrashing(per_token, hits_per_token):
    """2 layers x 2 experts a token (one at a time), room for 3, each used as often as the others: in LRU
    order each request evicts the one needed next (0 hits, the old tie-break); under pressure LFU
    keeps a stable set (2 of 4 hits a token: the capacity less the slot the misses pass through)."""
    from mlx_mixtral.experts.expert_cache import ExpertCache

    cache = ExpertCache(_FakeStore(), capacity=300, policy="lfu", prefetch=False, per_token=per_token)
    assert cache.pressed == (per_token > 3)
    for token in range(12):
        if token == 2:
            cache.reset_stats()
        for layer, expert in ((0, 0), (0, 1), (1, 0), (1, 1)):
            cache.fetch(layer, [expert])[expert].result()
            cache.release(layer, [expert])
    stats = cache.snapshot()
    assert stats.requests == 40 and stats.hits == 10 * hits_per_token
    cache.close()


def _cache_limit() -> int:
    """MLX's buffer-cache limit now (set_cache_limit returns the previous one)."""
    current = mx.set_cache_limit(1 << 40)
    mx.set_cache_limit(current)
    return current


def test_closing_a_streamed_model_puts_the_process_settings_back(hf_checkpoint_factory, monkeypatch):
    """Streaming caps MLX's buffer cache and fixes glibc's mmap threshold for the process; a
    closed model gives both back (and closing twice is harmless)."""
    from mlx_mixtral.experts import expert_cache

    calls = []
    monkeypatch.setattr(expert_cache, "_glibc_mallopt", lambda: lambda option, value: calls.append((option, value)) or 1)
    before = 1 << 40  # a known limit (other tests' streamed models lowered it and were never closed)
    outer = mx.set_cache_limit(before)
    try:
        model, _ = mlx_mixtral.load(hf_checkpoint_factory("gqa"), progress=False, max_memory="1000GB")
        assert _cache_limit() < before and calls == [(expert_cache.M_MMAP_THRESHOLD, expert_cache.MMAP_THRESHOLD)]
        model.runtime.close()
        model.runtime.close()
        assert _cache_limit() == before
        assert calls[1:] == [(expert_cache.M_MMAP_THRESHOLD, expert_cache.GLIBC_MMAP_THRESHOLD)]
    finally:
        mx.set_cache_limit(outer)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", None])
@pytest.mark.parametrize("max_memory", [None, "1000GB"])
def test_a_dtype_override_works_resident_and_streamed_alike(hf_checkpoint_factory, mlx_lm_converted, dtype,
                                                            max_memory):
    """`load(dtype=...)` with and without `max_memory` (the expert readers once built MLX
    conversions on their own threads, which the model's thread could not evaluate)."""
    folder = mlx_lm_converted(hf_checkpoint_factory("gqa"), quantize=True)
    dt = getattr(mx, dtype) if dtype else None
    reference, tokenizer = mlx_mixtral.load(folder, progress=False, dtype=dt)
    model, _ = mlx_mixtral.load(folder, progress=False, dtype=dt, max_memory=max_memory)
    x = mx.array([[1, 415, 2936, 9060, 285]])
    out = model(x)
    assert out.dtype == (dt or mx.float32)
    assert mx.array_equal(out, reference(x)).item()
    assert (mlx_mixtral.generate(model, tokenizer, [1, 415], max_tokens=5)
            == mlx_mixtral.generate(reference, tokenizer, [1, 415], max_tokens=5))


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_default_policy_keeps_its_invariants_under_pressure(hf_checkpoint_factory, probe_tokens, prefetch):
    """LFU (the default) at the tightest budgets, prompt and decode: nothing stays pinned, the
    cache never holds more than its capacity, every request is a hit, a miss or a prefetch used,
    and the tokens are the resident model's."""
    path = hf_checkpoint_factory("experts6_top3")
    resident, tokenizer = mlx_mixtral.load(path, progress=False)
    want = mlx_mixtral.generate(resident, tokenizer, probe_tokens, max_tokens=10, stop_on_eos=False)
    sizes = budgets(path)
    for n in sorted(sizes)[:2]:
        model, _ = streamed(path, sizes[n], prefetch=prefetch)
        cache = model.runtime.expert_cache
        assert cache.policy == "lfu"
        got = mlx_mixtral.generate(model, tokenizer, probe_tokens, max_tokens=10, stop_on_eos=False)
        stats = cache.snapshot()
        assert got == want
        assert all(entry.pins == 0 for entry in cache._entries.values())
        assert cache.peak_used <= cache.capacity and sum(e.nbytes for e in cache._entries.values()) <= cache.capacity
        assert stats.requests == stats.hits + stats.misses + stats.prefetched
        assert stats.misses > 0 and (prefetch or stats.prefetch_issued == 0)
        model.runtime.close()


def test_max_memory_auto_counts_the_kv_format_asked_for(hf_checkpoint_factory, monkeypatch):
    """`--max-memory auto --kv-bits 4` leaves room for a 4-bit KV cache, not a float one: the
    front door passes the format through to the budget."""
    import argparse

    from mlx_mixtral import arguments

    seen = []
    real = arguments.would_fit

    def spy(folder, tokens=None, kv=None):
        seen.append(kv)
        return real(folder, tokens, kv)

    monkeypatch.setattr(arguments, "would_fit", spy)
    for bits in (None, 8, 4):
        args = argparse.Namespace(model=str(hf_checkpoint_factory("gqa")), max_memory=None, kv_bits=bits,
                                  kv_group_size=None, cache_policy="lfu", prefetch=None, miss_bits=None,
                                  expert_skip=0.0)
        arguments.load_from_args(args, lambda line: None, context=lambda t: 4096)
    assert [fmt.bits for fmt in seen] == [None, 8, 4]
    config = mlx_mixtral.load(hf_checkpoint_factory("gqa"), progress=False)[0].config
    budgets_by_bits = [budget.auto_budget(config, 512, fmt)[0] for fmt in seen]
    assert budgets_by_bits[0] < budgets_by_bits[1] < budgets_by_bits[2]
