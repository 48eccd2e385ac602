"""Expert parallelism against the tensor split, from the routing of real text.

    python -m benchmarks.parallelism            # the model benchmarks/train_small.py trained
    python -m benchmarks.parallelism --tokens 4096 --processes 2 4 8
    mlx.launch --backend ring -n 2 -- python -m benchmarks.parallelism --timed FOLDER   # both, timed

Splitting the experts across N processes can go two ways. The tensor split (ours, `sharding`)
cuts every expert along its intermediate dimension: each process does 1/N of every routed
expert, so each does exactly k/N experts' work per token and layer, whatever the router picks.
Expert parallelism gives each process E/N whole experts: a token's k experts land where they
land, and the layer takes as long as the busiest process. Both hold the same bytes per process
and send the same all_sum (each process's partial MoE output); what differs is the work on the
critical path. This measures that work from the trained model's own routing of held-out text:
per decoded token (each token alone), and per prefill chunk (all its tokens at once), in units
of one whole expert applied to one token, for experts assigned to processes in contiguous
blocks (as a converter would shard them).

`--timed FOLDER`, under mlx.launch, also builds an expert-parallel model beside the tensor-split
one (attention split alike; each process holding whole experts, E/N of them) and times both,
interleaved, on the same prompts: prompt processing and greedy decoding. Expert parallelism
here dispatches on the host: each layer reads the router's choices back and runs only the
(token, expert) pairs its process owns (a dispatch a fused kernel could avoid, but that is the
cost of not computing every pair everywhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from benchmarks import synthetic, train_small
from benchmarks.quant_quality import run_model
from mlx_mixtral.loading import build_model, load_model


class ExpertParallelMoE:
    """Router replicated; this process's whole experts [e0, e1) only; partial sums all_summed."""

    def __init__(self, gate, switch_mlp, e0: int, e1: int, top_k: int, group):
        self.gate, self.switch_mlp, self.e0, self.e1, self.top_k, self.group = gate, switch_mlp, e0, e1, top_k, group

    def __call__(self, x: mx.array) -> mx.array:
        B, L, H = x.shape
        logits = self.gate(x)
        k = self.top_k
        indices = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
        weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
        chosen = np.array(indices).reshape(-1, k)  # host dispatch: which pairs are this process's
        token, slot = np.nonzero((chosen >= self.e0) & (chosen < self.e1))
        out = mx.zeros((B * L, H), x.dtype)
        if token.size:
            rows = mx.array(token.astype(np.int32))
            local = mx.array((chosen[token, slot] - self.e0).astype(np.int32))[:, None]
            y = self.switch_mlp(x.reshape(-1, H)[rows], local)[:, 0, :]  # [pairs, H]
            w = weights.reshape(-1, k)[rows, mx.array(slot.astype(np.int32))][:, None].astype(y.dtype)
            out = out.at[rows].add(y * w)
        return mx.distributed.all_sum(out, group=self.group).reshape(B, L, H)


def expert_parallel_model(folder: Path, group):
    """The tensor-split model with each layer's experts replaced by this process's whole ones."""
    from mlx.utils import tree_flatten

    from mlx_mixtral.checkpoint import Checkpoint
    from mlx_mixtral.config import ModelConfig
    from mlx_mixtral.distributed.sharding import read_tensor

    model = load_model(folder, progress=False)
    config = ModelConfig.from_file(folder / "config.json")
    E, n = config.num_local_experts, group.size()
    e0, e1 = group.rank() * E // n, (group.rank() + 1) * E // n
    ckpt = Checkpoint(folder)
    full = ckpt.mlx_shapes(config)
    shapes = {name: ((e1 - e0, *shape[1:]) if ".switch_mlp." in name else shape) for name, shape in full.items()}
    local = build_model(dataclasses.replace(config, num_local_experts=e1 - e0), shapes)
    for i, layer in enumerate(model.layers):
        mlp = local.layers[i].block_sparse_moe.switch_mlp
        prefix = f"model.layers.{i}.block_sparse_moe.switch_mlp."
        weights = []
        for name, _ in tree_flatten(mlp.parameters()):  # experts e0..e1 of the stacked [experts, ...]
            weights.append((name, read_tensor(ckpt, prefix + name, config, 0, e0, e1, None, unpacked=E)))
        mlp.load_weights(weights)
        mx.eval(mlp.parameters())
        moe = layer.block_sparse_moe.block  # the tensor split's, inside its AllSum
        layer.block_sparse_moe = ExpertParallelMoE(moe.gate, mlp, e0, e1, moe.top_k, group)
    return model


def timed(folder: Path, prompt_tokens: int, new_tokens: int, trials: int) -> dict:
    """Both splits, interleaved per trial: prefill tok/s and decode tok/s, and whether they agree."""
    from mlx_mixtral import make_cache
    from mlx_mixtral.distributed.group import world
    from mlx_mixtral.generate import stream_generate
    from mlx_mixtral.sampling import SamplingParams

    group = world()
    models = {"tensor split": load_model(folder, progress=False), "expert parallel": expert_parallel_model(folder, group)}
    tokenizer = synthetic.NullTokenizer()  # token ids in and out: nothing is detokenized
    rng = np.random.default_rng(0)
    samples = {name: {"pp": [], "tg": []} for name in models}
    tokens = {}
    for trial in range(trials + 1):
        prompt = rng.integers(3, models["tensor split"].config.vocab_size, prompt_tokens).tolist()
        for name, model in models.items():
            start = time.perf_counter()
            stamps, ids = [], []
            for r in stream_generate(model, tokenizer, prompt, max_tokens=new_tokens + 1, sampling=SamplingParams(),
                                     stop_on_eos=False, cache=make_cache(model)):
                stamps.append(time.perf_counter() - start)
                ids.append(r.token)
            tokens[name] = ids
            if trial:  # trial 0 warms up
                samples[name]["pp"].append(prompt_tokens / stamps[0])
                samples[name]["tg"].append(new_tokens / (stamps[-1] - stamps[0]))
    agree = float(np.mean(np.array(tokens["tensor split"]) == np.array(tokens["expert parallel"])))
    return {"processes": group.size(), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "trials": trials,
            "greedy_agreement_last_trial": agree,
            **{f"{name} {kind}_tok_s": statistics.median(v) for name, d in samples.items() for kind, v in d.items()},
            "samples": samples}


def routing(folder: Path, windows: np.ndarray) -> np.ndarray:
    """[tokens, layers, k] expert ids the model chose for every held-out token."""
    model = load_model(folder, progress=False)
    rows = []
    for row in windows:
        _, chosen = run_model(model, mx.array(row[None]))
        rows.append(np.stack([np.array(c[0]) for c in chosen], axis=1))  # [T, layers, k]
    return np.concatenate(rows)


def critical_work(choices: np.ndarray, experts: int, n: int, chunk: int) -> dict:
    """Expert-token units on the busiest process, per token, for both splits."""
    tokens, layers, k = choices.shape
    owner = choices * n // experts  # process that owns each chosen expert under expert parallelism
    loads = np.stack([(owner == r).sum(-1) for r in range(n)], -1)  # [T, layers, n]
    decode_ep = loads.max(-1).mean()
    usable = tokens // chunk * chunk
    chunk_loads = loads[:usable].reshape(-1, chunk, layers, n).sum(1)  # [chunks, layers, n]
    prefill_ep = chunk_loads.max(-1).mean() / chunk
    tp = k / n
    return {"processes": n, "tensor_split": tp, "expert_parallel_decode": float(decode_ep),
            "expert_parallel_prefill": float(prefill_ep), "decode_ratio": float(decode_ep / tp),
            "prefill_ratio": float(prefill_ep / tp),
            "decode_idle": float(1 - loads.mean(-1).mean() / decode_ep)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trained", type=Path, default=train_small.DEFAULT_OUT, metavar="DIR")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens routed")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--timed", type=Path, metavar="FOLDER",
                   help="under mlx.launch: time both splits on this model folder (MLX layout)")
    p.add_argument("--pp", type=int, default=128, help="--timed: prompt tokens")
    p.add_argument("--tg", type=int, default=32, help="--timed: generated tokens")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.timed is not None:
        from mlx_mixtral.distributed.group import world

        result = timed(args.timed, args.pp, args.tg, args.trials)
        if world().rank() == 0:
            print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    folder = args.trained / "float32"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: {folder} has no trained model; run python -m benchmarks.train_small first")
    heldout = np.load(args.trained / "corpus" / "heldout.npy")
    windows = train_small.eval_windows(heldout, args.chunk, max(1, args.tokens // args.chunk))
    choices = routing(folder, windows)
    experts = int(json.loads((folder / "config.json").read_text())["num_local_experts"])
    rows = [critical_work(choices, experts, n, args.chunk) for n in args.processes if experts % n == 0]

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"work on the busiest of N processes per token and layer (whole-expert units; TP: tensor "
                    f"split, EP: expert parallel), {choices.shape[0]} "
                    f"held-out tokens, {experts} experts top-{choices.shape[2]}, {choices.shape[1]} layers")
    for col in ("N", "TP", "EP decode", "EP prefill", "EP/TP decode", "EP/TP prefill", "EP idle"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["processes"]), f"{r['tensor_split']:.3f}", f"{r['expert_parallel_decode']:.3f}",
                  f"{r['expert_parallel_prefill']:.3f}", f"{r['decode_ratio']:.2f}x", f"{r['prefill_ratio']:.2f}x",
                  f"{100 * r['decode_idle']:.0f}%")
    Console().print(t)
    if args.json:
        args.json.write_text(json.dumps({"tokens": int(choices.shape[0]), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
