"""Expert bytes read per prompt token by a streamed prefill, with and without the last layer's
experts (only the prompt's last token needs that layer's output; `MixtralModel(cache_only=True)`
skips it for the others). Both ways in the same process, alternating, on a synthetic model
written to disk and streamed under a budget that holds few of its experts.

    python -m benchmarks.prefill_reads --synthetic small --bits 4 --prompt 128 --trials 3
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

from . import synthetic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--synthetic", default="small", choices=sorted(synthetic.SHAPES))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--slots", type=int, default=8, help="experts the budget holds besides the resident part")
    args = p.parse_args()
    config = synthetic.shape_config(args.synthetic, args.bits)
    with tempfile.TemporaryDirectory() as tmp:
        folder = synthetic.write_folder(config, Path(tmp) / "model")
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
        print(f"synthetic {args.synthetic} {args.bits}-bit, {config.num_hidden_layers} layers, prompt {args.prompt}, "
              f"{cache.slots} expert slots: {before / 1e6:.1f} MB read per prompt token with the last layer's "
              f"experts, {after / 1e6:.1f} MB without ({after / before - 1:+.1%})")
        model.runtime.close()


if __name__ == "__main__":
    main()
