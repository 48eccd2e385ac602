"""Speed of mlx-mixtral in llama-bench's vocabulary, optionally side by side with mlx-lm.

    python -m benchmarks.bench --model PATH                      # a converted or Hugging Face folder
    python -m benchmarks.bench --synthetic small --bits 4        # random weights, nothing downloaded
    python -m benchmarks.bench --synthetic small --bits 4 --compare mlx-lm --dense-baseline

Figures: ppN (prompt processing, tok/s, from an empty cache), ttft (time to first token at the
first pp size), tgN@dD (N generated tokens after a context of D tokens, tok/s), load time, peak
memory, and for generation the bytes read per token and the bandwidth that achieves (see
roofline.py). Each figure gets one warm-up then `--trials` timed runs; median and min-max.

Fairness rules: prompts are random token ids, the same for every engine; EOS is disabled, so every
run generates exactly the requested number of tokens; decoding is greedy; every engine prefills in
chunks of `--prefill-step` tokens and computes logits only for the last prompt position; neither
side detokenizes. Engines run interleaved, A/B/A/B, in one process, so drift (thermal, other
load) hits both alike; ratios are medians of the per-trial ratios. Timing is done here, around
each engine's own token generator, never taken from an engine's self-reported statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from benchmarks import disk, roofline, synthetic
from mlx_mixtral import SamplingParams, make_cache, stream_generate
from mlx_mixtral.config import ModelConfig
from mlx_mixtral.distributed.group import end_with_peers, world
from mlx_mixtral.errors import MixtralError
from mlx_mixtral.experts.expert_cache import DEFAULT_POLICY, POLICIES
from mlx_mixtral.kv_format import FLOAT, KV_BITS, KV_GROUP_SIZES, kv_format
from mlx_mixtral.loading import load_model, would_fit
from mlx_mixtral.model import Mixtral

OURS = "mlx-mixtral"
MLX_LM = "mlx-lm"
DENSE = "dense"
SCALE_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
DEFAULT_DEPTHS = (0, 4096)  # tg with an empty context, and with a filled one (llama-bench -d)


class Engine:
    """One implementation under test: its model, and how it generates and trims caches."""

    kv = FLOAT  # how the KV cache is stored (--kv-bits): the same for every engine

    def __init__(self, name: str, model: Any, config: ModelConfig, load_s: float, prefill_step: int):
        self.name, self.model, self.config = name, model, config
        self.load_s, self.prefill_step = load_s, prefill_step
        self.peak_working = 0  # bytes above the resident state, the most any run needed
        self.kv_position_bytes = 0  # KV cache bytes per position (all layers), seen after a tg run
        self.streaming: dict[str, dict[str, Any]] = {}  # test -> expert cache figures, if streamed

    @property
    def expert_cache(self):
        """Our model's expert cache when it streams (None for a resident model and for mlx-lm's)."""
        runtime = self.model.runtime if isinstance(self.model, Mixtral) else None
        return runtime.expert_cache if runtime is not None else None

    def stream_start(self) -> None:
        if self.expert_cache is not None:
            self.expert_cache.reset_stats()

    def stream_done(self, test: str, tokens: int) -> None:
        """Record what the expert cache did over the timed trials of `test` (`tokens` computed)."""
        cache = self.expert_cache
        if cache is None:
            return
        s = cache.snapshot()
        self.streaming[test] = {
            "hit_rate": s.hit_rate, "hits": s.hits, "prefetched": s.prefetched, "misses": s.misses,
            "requests": s.requests, "prefetch_recall": s.prefetch_recall, "prefetch_issued": s.prefetch_issued,
            "bytes_read": s.bytes_read, "bytes_read_per_token": s.bytes_read / tokens,
            "read_gbs": s.bytes_read / s.elapsed_s / 1e9, "wait_s": s.wait_s, "elapsed_s": s.elapsed_s,
            "tokens": tokens}

    def new_cache(self) -> list:
        raise NotImplementedError

    def tokens(self, prompt: list[int], n: int, cache: list) -> Iterator[Any]:
        """A generator of exactly `n` tokens after `prompt`, appending to `cache`."""
        raise NotImplementedError

    def trim(self, cache: list, depth: int) -> None:
        raise NotImplementedError

    def fill(self, cache: list, context: list[int], random_kv: bool) -> None:
        """Put `context` in `cache`: prefilled, or (`random_kv`) random keys and values of its
        length written straight in (generation costs the same whatever the cache holds)."""
        if random_kv:
            raise MixtralError(f"--fill random is not available for {self.name}")
        _run(self, context, 1, cache)

    def position_bytes(self, cache: list) -> int:
        """Bytes one position takes in `cache`, over all layers."""
        raise NotImplementedError

    @property
    def weight_bytes(self) -> int:
        return synthetic.nbytes(self.model)


class Ours(Engine):
    """mlx-mixtral through its public API (also runs the dense baseline: same loop, same code)."""

    def new_cache(self) -> list:
        return make_cache(self.model, self.kv)

    def position_bytes(self, cache: list) -> int:
        return sum(c.nbytes // c.capacity for c in cache)

    def tokens(self, prompt: list[int], n: int, cache: list) -> Iterator[Any]:
        return stream_generate(self.model, synthetic.NullTokenizer(), prompt, max_tokens=n,
                               sampling=SamplingParams(), stop_on_eos=False, cache=cache,
                               prefill_step=self.prefill_step)

    def trim(self, cache: list, depth: int) -> None:
        for c in cache:
            c.trim(c.offset - depth)

    def fill(self, cache: list, context: list[int], random_kv: bool) -> None:
        if not random_kv:
            return super().fill(cache, context, random_kv)
        config, rng = self.config, mx.random.key(len(context))
        shape = (1, self.model.layers[0].self_attn.n_kv_heads, 0, config.head_dim)
        dtype = self.model.layers[0].input_layernorm.weight.dtype
        for start in range(0, len(context), 1024):  # in chunks: no spike of a whole context's floats
            n = min(1024, len(context) - start)
            for c in cache:
                rng, a, b = mx.random.split(rng, 3)
                kv = [mx.random.normal((*shape[:2], n, shape[3]), key=k).astype(dtype) for k in (a, b)]
                c.update_and_fetch(*kv)
            mx.eval([c.state for c in cache])


class MlxLm(Engine):
    """mlx-lm's `generate_step` (its generation loop minus detokenization and the EOS check)."""

    def new_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def tokens(self, prompt: list[int], n: int, cache: list) -> Iterator[Any]:
        from mlx_lm.generate import generate_step

        quantized = {} if self.kv.bits is None else {"kv_bits": self.kv.bits, "kv_group_size": self.kv.group_size,
                                                       "quantized_kv_start": 0}
        return generate_step(mx.array(prompt), self.model, max_tokens=n,
                             sampler=lambda logprobs: mx.argmax(logprobs, axis=-1),
                             prompt_cache=cache, prefill_step_size=self.prefill_step, **quantized)

    def position_bytes(self, cache: list) -> int:
        from mlx.utils import tree_flatten

        total = 0
        for c in cache:  # keys/values are arrays, or (packed, scales, biases) tuples when quantized
            parts = [a for _, a in tree_flatten([c.keys, c.values])]
            total += sum(a.nbytes for a in parts) // parts[0].shape[2]
        return total

    def trim(self, cache: list, depth: int) -> None:
        from mlx_lm.models.cache import trim_prompt_cache

        trim_prompt_cache(cache, cache[0].offset - depth)


@contextmanager
def _timed_load() -> Iterator[list[float]]:
    out: list[float] = []
    t = time.perf_counter()
    yield out
    out.append(time.perf_counter() - t)


def load_ours(path: Path, prefill_step: int, streaming: dict[str, Any] | None = None) -> Engine:
    """`streaming`: load_model's max_memory/policy/prefetch, to stream experts from disk."""
    with _timed_load() as t:
        model = load_model(path, progress=False, **(streaming or {}))
    return Ours(OURS, model, model.config, t[0], prefill_step)


def load_mlx_lm(path: Path, prefill_step: int) -> Engine:
    try:
        from mlx_lm.utils import load_model as mlx_lm_load_model
    except ImportError:
        raise MixtralError("--compare mlx-lm: mlx-lm is not installed (pip install mlx-lm)") from None
    with _timed_load() as t:
        model, _ = mlx_lm_load_model(path)
        mx.eval(model.parameters())
    return MlxLm(MLX_LM, model, ModelConfig.from_file(path / "config.json"), t[0], prefill_step)


def build_synthetic(config: ModelConfig, name: str, prefill_step: int, dense: bool = False,
                    seed: int = 0) -> Engine:
    with _timed_load() as t:
        model = synthetic.fill_random(synthetic.skeleton(config, synthetic.float_dtype(), dense=dense), seed)
    return Ours(name, model, config, t[0], prefill_step)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured quantity for one engine: its samples, in `unit`."""

    engine: str
    test: str
    unit: str
    samples: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"engine": self.engine, "test": self.test, "unit": self.unit,
                "median": statistics.median(self.samples), "min": min(self.samples),
                "max": max(self.samples), "samples": self.samples}


def _run(engine: Engine, prompt: list[int], n: int, cache: list) -> list[float]:
    """Seconds from the start to each of the `n` tokens; records the engine's working memory."""
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    start = time.perf_counter()
    stamps = [time.perf_counter() - start for _ in engine.tokens(prompt, n, cache)]
    engine.peak_working = max(engine.peak_working, mx.get_peak_memory() - base)
    if len(stamps) != n:
        raise RuntimeError(f"{engine.name} generated {len(stamps)} tokens instead of {n}")
    return stamps


def random_prompt(rng: np.random.Generator, vocab: int, length: int) -> list[int]:
    return rng.integers(0, vocab, size=length).tolist()


def measure(engines: list[Engine], pp: list[int], tg: int, depths: list[int], trials: int,
            seed: int = 0, log: Callable[[str], None] = lambda _: None, random_kv: bool = False) -> list[Figure]:
    """Every figure for every engine, interleaved per trial; trial 0 is the discarded warm-up.
    At each depth after 0 the first pp size is also timed after the context (ppN@dD)."""
    rng = np.random.default_rng(seed)
    vocab = engines[0].config.vocab_size
    figures: list[Figure] = []

    def new(test: str, unit: str) -> dict[str, Figure]:
        made = {e.name: Figure(e.name, test, unit) for e in engines}
        figures.extend(made.values())
        return made

    ttft = new(f"ttft@pp{pp[0]}", "ms") if pp else {}
    for size in pp:
        log(f"pp{size}")
        fig = new(f"pp{size}", "tok/s")
        for trial in range(trials + 1):
            prompt = random_prompt(rng, vocab, size)
            for e in engines:
                if trial == 1:
                    e.stream_start()
                first = _run(e, prompt, 1, e.new_cache())[0]
                if trial:
                    fig[e.name].samples.append(size / first)
                    if size == pp[0]:
                        ttft[e.name].samples.append(first * 1000)
        for e in engines:
            e.stream_done(f"pp{size}", size * trials)
    for depth in depths:
        log(f"tg{tg}@d{depth}")
        fig = new(f"tg{tg}@d{depth}", "tok/s")
        caches = {e.name: e.new_cache() for e in engines}
        context = random_prompt(rng, vocab, depth)
        for e in engines:
            if depth:
                e.fill(caches[e.name], context, random_kv)  # once; trials trim back to it
        if depth and pp:
            deep = new(f"pp{pp[0]}@d{depth}", "tok/s")
            for trial in range(trials + 1):
                prompt = random_prompt(rng, vocab, pp[0])
                for e in engines:
                    e.trim(caches[e.name], depth)
                    first = _run(e, prompt, 1, caches[e.name])[0]
                    if trial:
                        deep[e.name].samples.append(pp[0] / first)
        for trial in range(trials + 1):
            prompt = random_prompt(rng, vocab, 1)
            for e in engines:
                e.trim(caches[e.name], depth)
                if trial == 1:
                    e.stream_start()
                stamps = _run(e, prompt, tg + 1, caches[e.name])
                if trial:
                    fig[e.name].samples.append(tg / (stamps[-1] - stamps[0]))
        for e in engines:
            e.kv_position_bytes = e.position_bytes(caches[e.name])
            e.stream_done(f"tg{tg}@d{depth}", (tg + 1) * trials)
    return figures


def ratios(figures: list[Figure], numerator: str, denominator: str, label: str,
           invert: bool = False) -> list[dict[str, Any]]:
    """Per-figure median of per-trial ratios `numerator / denominator` (or its inverse).

    Throughputs compare as speed (higher is better); `ms` figures are turned around so a ratio
    above 1 always means `numerator` is faster, unless `invert`.
    """
    by_test: dict[str, dict[str, Figure]] = {}
    for f in figures:
        by_test.setdefault(f.test, {})[f.engine] = f
    out = []
    for test, fs in by_test.items():
        if numerator not in fs or denominator not in fs:
            continue
        a, b = fs[numerator], fs[denominator]
        per_trial = [x / y for x, y in zip(a.samples, b.samples)]
        if (a.unit == "ms") != invert:
            per_trial = [1 / r for r in per_trial]
        out.append({"ratio": label, "test": test, "median": statistics.median(per_trial),
                    "min": min(per_trial), "max": max(per_trial)})
    return out


def roofline_rows(engines: list[Engine], figures: list[Figure], tg: int,
                  bandwidth: tuple[float, str]) -> list[dict[str, Any]]:
    """Bytes per generated token and achieved bandwidth for each tg figure and engine."""
    gbs, source = bandwidth
    rows = []
    by_key = {(f.engine, f.test): f for f in figures}
    for e in engines:
        weights = roofline.weight_bytes_per_token(e.model, e.config)
        for (name, test), f in by_key.items():
            if name != e.name or not test.startswith("tg"):
                continue
            depth = int(test.split("@d")[1])
            kv = e.kv_position_bytes * (depth + tg // 2)  # mean context
            per_token = weights + kv
            achieved = per_token * statistics.median(f.samples) / 1e9
            rows.append({"engine": e.name, "test": test, "bytes_per_token": per_token,
                         "weight_bytes_per_token": weights, "kv_bytes_per_token": kv,
                         "achieved_gbs": achieved, "reference_gbs": gbs, "reference": source,
                         "fraction_of_reference": achieved / gbs})
    return rows


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a converted or Hugging Face Mixtral folder")
    src.add_argument("--synthetic", choices=list(synthetic.SHAPES), help="random weights of a real shape")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8, 16), help="synthetic: 16 = unquantized")
    p.add_argument("--scales-dtype", choices=list(SCALE_DTYPES), default="bfloat16",
                   help="synthetic with --compare: dtype of the scales written for both tools to load "
                        "(bfloat16 is mlx_lm convert's default)")
    p.add_argument("--pp", type=int, nargs="*", default=[128, 512, 2048], help="prompt sizes")
    p.add_argument("--tg", type=int, default=128, help="tokens generated per tg run")
    p.add_argument("--depth", type=int, nargs="+", default=None,
                   help="context depths for tg: tokens already in the KV cache (default: 0 and 4096, "
                        "those the model's context holds)")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--kv-bits", type=int, choices=KV_BITS, default=None, help="quantized KV cache (all engines)")
    p.add_argument("--kv-group-size", type=int, choices=KV_GROUP_SIZES, default=None)
    p.add_argument("--kv-sweep", action="store_true",
                   help="also run mlx-mixtral with 8- and 4-bit KV caches on the same weights, interleaved "
                        "with the float cache, and report their speed ratios")
    p.add_argument("--prefill-step", type=int, default=512, help="prefill chunk, the same for all engines")
    p.add_argument("--fill", choices=("prefill", "random"), default="prefill",
                   help="how tg/pp at a depth get their context: prefilled (default), or random keys and "
                        "values written into the cache (mlx-mixtral only; the same cost per token, minutes "
                        "sooner at 16k on a CPU)")
    p.add_argument("--compare", choices=[MLX_LM], help="also run this peer on the same model")
    p.add_argument("--dense-baseline", action="store_true",
                   help="also run a dense model with the same active parameters per token")
    p.add_argument("--json", type=Path, help="write every sample and summary here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-memory", default=None, metavar="SIZE|auto",
                   help="stream experts from disk within this budget (e.g. 10GB); with --synthetic the "
                        "random model is first written to --synthetic-dir (once; reused after)")
    p.add_argument("--cache-policy", choices=POLICIES, default=DEFAULT_POLICY,
                   help="streaming: eviction policy (default: %(default)s)")
    p.add_argument("--no-prefetch", action="store_true", help="streaming: no speculative reads")
    p.add_argument("--synthetic-dir", type=Path, default=Path("~/.cache/mlx-mixtral/synthetic").expanduser(),
                   help="where --synthetic --max-memory keeps its model folders (default: %(default)s)")
    args = p.parse_args(argv)
    args.depth_given = args.depth is not None
    args.depth = args.depth if args.depth_given else list(DEFAULT_DEPTHS)
    if args.trials < 1 or args.tg < 1 or any(n < 1 for n in args.pp) or any(d < 0 for d in args.depth):
        p.error("--trials, --tg and --pp must be positive, --depth non-negative")
    if args.kv_sweep and args.kv_bits is not None:
        p.error("--kv-sweep runs every KV format; leave out --kv-bits")
    return args


def _synthetic_config(args: argparse.Namespace) -> ModelConfig:
    """The synthetic shape's config, after checking that every model of this run fits in memory."""
    config = synthetic.shape_config(args.synthetic, args.bits)
    dtype = synthetic.float_dtype()
    needed = synthetic.nbytes(synthetic.skeleton(config, dtype))
    engines = 1
    if args.compare:
        scales = SCALE_DTYPES[args.scales_dtype]
        needed += synthetic.nbytes(synthetic.skeleton(config, dtype, scales))
        engines += 1
    if args.dense_baseline:
        needed += synthetic.nbytes(synthetic.skeleton(config, dtype, dense=True))
        engines += 1
    context = max(args.pp, default=0) + max(args.depth) + args.tg + 1
    caches = engines + (len(KV_BITS) if args.kv_sweep else 0)  # quantized ones are smaller: an upper bound
    needed += caches * roofline.kv_cache_bytes(config, context, dtype.size)
    what = f"--synthetic {args.synthetic} --bits {args.bits}"
    if engines > 1:
        what += f" ({engines} models side by side)"
    synthetic.check_fits(int(needed * 1.1), what)  # 10% for activations and the allocator
    return config


def synthetic_path(args: argparse.Namespace) -> Path:
    return args.synthetic_dir / f"{args.synthetic}-{args.bits}bit-seed{args.seed}"


def synthetic_folder(args: argparse.Namespace, log: Callable[[str], None]) -> Path:
    """The synthetic shape as files on disk (written once, layer by layer, then reused)."""
    config = synthetic.shape_config(args.synthetic, args.bits)
    folder = synthetic_path(args)
    if (folder / "config.json").exists():
        return folder
    log(f"writing synthetic {args.synthetic} ({args.bits} bits) to {folder} (once)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    return synthetic.write_folder(config, folder, seed=args.seed,
                                  progress=lambda n, total: log(f"  shard {n}/{total}"))


def load_streamed(args: argparse.Namespace, log: Callable[[str], None]) -> list[Engine]:
    path = synthetic_folder(args, log) if args.synthetic else args.model
    if args.compare:
        fits, why = would_fit(path)
        if not fits:
            raise MixtralError(f"--compare {args.compare}: {why}, so the peer cannot hold it; "
                               "benchmarks/streaming.py runs it apart and reports how it fails")
    log(f"loading {path}, experts streamed within --max-memory {args.max_memory} ({args.cache_policy})")
    ours = load_ours(path, args.prefill_step, {"max_memory": args.max_memory, "policy": args.cache_policy,
                                               "prefetch": not args.no_prefetch})
    engines = [ours]
    if args.compare:
        engines.append(load_mlx_lm(path, args.prefill_step))
    return engines


def load_distributed(args: argparse.Namespace, group: Any, log: Callable[[str], None]) -> list[Engine]:
    """Under mlx.launch: mlx-mixtral alone, each process loading its 1/N from a folder (a
    --synthetic one is written by rank 0, once, into --synthetic-dir: on one machine, or a
    folder every host shares; else pass --model)."""
    if args.compare or args.dense_baseline or args.max_memory is not None:
        raise MixtralError("under mlx.launch, bench.py runs mlx-mixtral alone: leave out --compare, "
                           "--dense-baseline and --max-memory")
    path = args.model
    if args.synthetic:
        if group.rank() == 0:
            synthetic_folder(args, log)
        mx.eval(mx.distributed.all_sum(mx.array([1.0]), group=group))  # the others wait for it
        path = synthetic_path(args)
        if not (path / "config.json").exists():
            raise MixtralError(f"{path}: not on this host; write it here too, or pass --model")
    log(f"loading {path}, 1/{group.size()} per process")
    return [load_ours(path, args.prefill_step)]


def communication(engine: Engine, group: Any, chunk: int, trials: int = 200) -> dict[str, Any]:
    """What the tensor split sends: 2 all_sums of a hidden-wide activation per layer and token
    (a ring all-reduce moves 2(N-1)/N of it per process), and what one costs here, timed alone
    (decode-sized, and prefill-chunk-sized), so its share of a token's time can be read off."""
    config, n = engine.config, group.size()
    itemsize = engine.model.layers[0].input_layernorm.weight.dtype.size
    per_token = 2 * config.num_hidden_layers * config.hidden_size * itemsize * 2 * (n - 1) / n
    timed = {}
    for label, rows in (("decode", 1), (f"chunk{chunk}", chunk)):
        x = mx.ones((1, rows, config.hidden_size), engine.model.layers[0].input_layernorm.weight.dtype)
        mx.eval(mx.distributed.all_sum(x, group=group))
        start = time.perf_counter()
        for _ in range(trials):
            mx.eval(mx.distributed.all_sum(x, group=group))
        timed[label] = (time.perf_counter() - start) / trials
    return {"processes": n, "bytes_sent_per_token_per_process": per_token,
            "all_sums_per_token": 2 * config.num_hidden_layers, "all_sum_s_decode": timed["decode"],
            f"all_sum_s_chunk{chunk}": timed[f"chunk{chunk}"],
            "all_sum_s_per_token": 2 * config.num_hidden_layers * timed["decode"]}


def gathered(value: float, group: Any) -> list[float]:
    """Every process's `value`, in rank order."""
    mine = np.zeros(group.size(), np.float32)
    mine[group.rank()] = value
    return np.array(mx.distributed.all_sum(mx.array(mine), group=group)).tolist()


def load_engines(args: argparse.Namespace, log: Callable[[str], None]) -> list[Engine]:
    step = args.prefill_step
    group = world()
    if group.size() > 1:
        return load_distributed(args, group, log)
    if args.max_memory is not None:
        return load_streamed(args, log)
    with tempfile.TemporaryDirectory(prefix="mlx-mixtral-bench-") as tmp:
        if args.synthetic:
            config = _synthetic_config(args)
            log(f"building synthetic {args.synthetic} ({args.bits} bits)")
            ours = build_synthetic(config, OURS, step, seed=args.seed)
            path = None
            if args.compare:  # both tools load the same files, written like mlx_lm convert would
                path = synthetic.save_mlx_lm(ours.model, Path(tmp), SCALE_DTYPES[args.scales_dtype])
                del ours
                ours = load_ours(path, step)
        else:
            path = args.model
            log(f"loading {path}")
            ours = load_ours(path, step)
        engines = [ours]
        if args.compare:
            log("loading it with mlx-lm")
            engines.append(load_mlx_lm(path, step))
    if args.dense_baseline:
        log("building the dense baseline")
        engines.append(build_synthetic(ours.config, DENSE, step, dense=True, seed=args.seed))
    return engines


def kv_name(bits: int) -> str:
    return f"{OURS} kv{bits}"


def kv_variants(ours: Engine, group_size: int | None) -> list[Engine]:
    """mlx-mixtral again with each quantized KV format, on the very same weights (no more memory
    for them), so --kv-sweep compares cache formats in one interleaved run."""
    variants = []
    for bits in KV_BITS:
        e = Ours(kv_name(bits), ours.model, ours.config, ours.load_s, ours.prefill_step)
        e.kv = kv_format(bits, group_size, ours.config.head_dim)
        variants.append(e)
    return variants


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "chip": roofline.chip_name(), "cpus": os.cpu_count(), "mlx": mx.__version__,
            "device": str(mx.default_device()), "ld_preload": os.environ.get("LD_PRELOAD", "")}


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{result['model']}  ({result['machine']['device']}, mlx {result['machine']['mlx']})")
    for col in ("test", "engine", "median", "min-max", "unit"):
        table.add_column(col, justify="left" if col in ("test", "engine") else "right")
    for f in result["figures"]:
        table.add_row(f["test"], f["engine"], f"{f['median']:.2f}", f"{f['min']:.2f}-{f['max']:.2f}", f["unit"])
    for e in result["engines"]:
        table.add_row("load", e["engine"], f"{e['load_s']:.2f}", "", "s")
        table.add_row("peak memory", e["engine"], f"{e['peak_memory_gb']:.2f}", "", "GB")
    console.print(table)
    if result["ratios"]:
        rt = Table(title="ratios (median of per-trial ratios; > 1: the first is faster)")
        for col in ("ratio", "test", "median", "min-max"):
            rt.add_column(col)
        for r in result["ratios"]:
            rt.add_row(r["ratio"], r["test"], f"{r['median']:.3f}", f"{r['min']:.3f}-{r['max']:.3f}")
        console.print(rt)
    rf = Table(title="roofline (generation)")
    for col in ("engine", "test", "GB/token", "achieved GB/s", "reference"):
        rf.add_column(col)
    for r in result["roofline"]:
        rf.add_row(r["engine"], r["test"], f"{r['bytes_per_token'] / 1e9:.4g}", f"{r['achieved_gbs']:.2f}",
                   f"{100 * r['fraction_of_reference']:.1f}% of {r['reference_gbs']:.1f} GB/s ({r['reference']})")
    console.print(rf)
    dist = result.get("distributed")
    if dist:
        dt = Table(title=f"tensor parallel over {dist['processes']} processes")
        dt.add_column("")
        dt.add_column("", justify="right")
        for key, value in (
            ("weights per process", " / ".join(f"{g:.2f}" for g in dist["weights_gb_per_process"]) + " GB"),
            ("peak memory per process", " / ".join(f"{g:.2f}" for g in dist["peak_memory_gb_per_process"]) + " GB"),
            ("peak RSS per process", " / ".join(f"{g:.2f}" for g in dist["peak_rss_gb_per_process"]) + " GB"),
            ("sent per token per process", f"{dist['bytes_sent_per_token_per_process'] / 1e3:.1f} KB "
                                           f"in {dist['all_sums_per_token']} all_sums"),
            ("one decode all_sum", f"{1e6 * dist['all_sum_s_decode']:.0f} us"),
            ("all_sums per decoded token", f"{1e3 * dist['all_sum_s_per_token']:.2f} ms"),
        ):
            dt.add_row(key, value)
        console.print(dt)
    st = result.get("streaming")
    if st:
        held = "n/a" if st["page_cache_gb"] is None else f"{st['page_cache_gb']:.2f} GB"
        title = (f"expert streaming: budget {st['budget_gb']:.2f} GB, {st['cached_experts']}/{st['total_experts']} "
                 f"experts cached ({st['policy']}, prefetch {'on' if st['prefetch'] else 'off'}); disk "
                 f"{st['disk_gbs']:.2f} GB/s measured; peak RSS {result['peak_rss_gb']:.2f} GB; page cache {held}")
        stt = Table(title=title)
        for col in ("test", "hit rate", "prefetch recall", "GB read/token", "read GB/s", "% of disk"):
            stt.add_column(col)
        for test, t in st["tests"].items():
            stt.add_row(test, f"{100 * t['hit_rate']:.1f}%", f"{100 * t['prefetch_recall']:.1f}%",
                        f"{t['bytes_read_per_token'] / 1e9:.3f}", f"{t['read_gbs']:.2f}",
                        f"{100 * t['read_gbs'] / st['disk_gbs']:.0f}%")
        console.print(stt)


def check_context(args: argparse.Namespace, limit: int, log: Callable[[str], None]) -> None:
    """Refuse sizes the model's context cannot hold, before any trial runs (default depths that
    do not fit are only dropped: a small model's context may be shorter than 4096)."""
    if not args.depth_given:
        fits = [d for d in args.depth if d + args.tg + 1 <= limit]
        for d in sorted(set(args.depth) - set(fits)):
            log(f"skipping tg{args.tg}@d{d}: beyond the model's context of {limit} tokens")
        args.depth = fits
    too_long = [f"--pp {n}" for n in args.pp if n + 1 > limit]
    too_long += [f"--depth {d} with --tg {args.tg}" for d in args.depth if d + args.tg + 1 > limit]
    if too_long:
        raise MixtralError(f"{', '.join(too_long)} does not fit the model's context of {limit} tokens; "
                           "choose smaller sizes")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    end_with_peers()
    group = world()
    lead = group.rank() == 0  # under mlx.launch, rank 0 alone reports
    log = (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)) if lead else (lambda msg: None)  # noqa: E731
    try:
        engines = load_engines(args, log)
        for e in engines:
            e.kv = kv_format(args.kv_bits, args.kv_group_size, e.config.head_dim)
        if args.kv_sweep:
            engines += kv_variants(engines[0], args.kv_group_size)
        check_context(args, engines[0].config.max_position_embeddings, log)
        figures = measure(engines, args.pp, args.tg, args.depth, args.trials, args.seed, log,
                          random_kv=args.fill == "random")
        rss = disk.peak_rss()  # of the runs, before the bandwidth probes below allocate their own
    except MixtralError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    all_ratios = []
    if args.compare:
        all_ratios += ratios(figures, OURS, MLX_LM, f"{OURS} / {MLX_LM} speed")
    if args.kv_sweep:
        for bits in KV_BITS:
            all_ratios += ratios(figures, kv_name(bits), OURS, f"kv{bits} / float KV speed")
    if args.dense_baseline:
        all_ratios += ratios(figures, OURS, DENSE, "MoE / dense time per token", invert=True)
    result = {
        "model": str(args.model) if args.model else f"synthetic {args.synthetic} {args.bits}-bit",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "engines": [{"engine": e.name, "load_s": e.load_s, "weights_gb": e.weight_bytes / 1e9,
                     "peak_memory_gb": (e.weight_bytes + e.peak_working) / 1e9} for e in engines],
        "figures": [f.summary() for f in figures],
        "ratios": all_ratios,
        "roofline": roofline_rows(engines, figures, args.tg, roofline.reference_bandwidth()),
        "peak_rss_gb": rss / 1e9,
    }
    if group.size() > 1:
        result["distributed"] = {
            **communication(engines[0], group, args.prefill_step),
            "peak_memory_gb_per_process": gathered(result["engines"][0]["peak_memory_gb"], group),
            "weights_gb_per_process": gathered(engines[0].weight_bytes / 1e9, group),
            "peak_rss_gb_per_process": gathered(rss / 1e9, group)}
    if not lead:
        return 0
    streamed = engines[0].expert_cache
    if streamed is not None:
        files = streamed.store.files
        held = disk.page_cache(files)
        result["streaming"] = {
            "budget_gb": streamed.plan.budget / 1e9, "resident_gb": streamed.plan.resident / 1e9,
            "expert_mb": streamed.plan.expert_bytes / 1e6, "cached_experts": streamed.plan.cached_experts,
            "total_experts": streamed.plan.total_experts, "policy": streamed.policy,
            "prefetch": streamed.prefetch_enabled, "page_cache_gb": None if held is None else held / 1e9,
            "model_files_gb": sum(f.stat().st_size for f in files) / 1e9,
            "disk_gbs": disk.read_bandwidth(files) / 1e9, "tests": engines[0].streaming}
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
