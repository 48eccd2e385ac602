"""Expert parallelism against the tensor split, from the routing of real text.

    python benchmarks/parallelism.py            # the model benchmarks/train_small.py trained
    python benchmarks/parallelism.py --tokens 4096 --processes 2 4 8

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
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_small  # noqa: E402
from quant_quality import run_model  # noqa: E402

from mlx_mixtral.loading import load_model  # noqa: E402


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
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    folder = args.trained / "float32"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: {folder} has no trained model; run python benchmarks/train_small.py first")
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
