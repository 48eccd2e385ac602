"""Expert bytes read per prompt token by a streamed prefill, with and without the last layer's
experts (only the prompt's last token needs that layer's output; `MixtralModel(cache_only=True)`
skips it for the others). Both ways in the same process, alternating, on a synthetic model
written to disk and streamed under a budget that holds few of its experts.

    python -m benchmarks.prefill_reads --synthetic small --bits 4 --prompt 128 --trials 3
    python -m benchmarks.prefill_reads --folder ~/.cache/mlx-mixtral/synthetic/mixtral-8x7b-4bit-seed0 \
        --prompt 16 --trials 1      # the full-shape folder benchmarks.streaming writes
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import mistral_common
import mlx.core as mx
import numpy as np

import mlx_mixtral
from mlx_mixtral.config import ModelConfig

from . import synthetic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", default="small", choices=sorted(synthetic.SHAPES))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--slots", type=int, default=8, help="experts the budget holds besides the resident part")
    p.add_argument("--folder", type=Path, default=None, help="an existing model folder instead of a synthetic one")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.folder is None:
            config = synthetic.shape_config(args.synthetic, args.bits)
            folder = synthetic.write_folder(config, Path(tmp) / "model")
        else:
            folder = Path(tmp) / "model"  # the weights linked, a tokenizer beside them
            folder.mkdir()
            for f in args.folder.expanduser().iterdir():
                (folder / f.name).symlink_to(f)
            config = ModelConfig.from_file(folder / "config.json")
        if not (folder / "tokenizer.model").exists():
            shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
        resident = sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # an upper bound on what loads
        model, _ = mlx_mixtral.load(folder, progress=False, max_memory=resident)  # every expert fits: size it
        expert = model.runtime.expert_cache.expert_bytes
        spent = model.runtime.expert_cache.plan
        model.runtime.close()
        budget = spent.resident + spent.staging + args.slots * expert
        model, _ = mlx_mixtral.load(folder, progress=False, max_memory=budget)
        cache = model.runtime.expert_cache
        rng = np.random.default_rng(0)
        figures: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.trials):
            for cache_only in (False, True):
                tokens = mx.array(rng.integers(0, config.vocab_size, (1, args.prompt)))
                kv = mlx_mixtral.make_cache(model)
                cache.reset_stats()
                h = model.model(tokens, kv, cache_only=cache_only)
                mx.eval([c.state for c in kv] + ([] if h is None else [h]))
                figures[cache_only].append(cache.snapshot().bytes_read / args.prompt)
        before, after = statistics.median(figures[False]), statistics.median(figures[True])
        name = args.folder.name if args.folder is not None else f"synthetic {args.synthetic} {args.bits}-bit"
        print(f"{name}, {config.num_hidden_layers} layers, prompt {args.prompt}, "
              f"{cache.slots} expert slots: {before / 1e6:.1f} MB read per prompt token with the last layer's "
              f"experts, {after / 1e6:.1f} MB without ({after / before - 1:+.1%})")
        model.runtime.close()


if __name__ == "__main__":
    main()
