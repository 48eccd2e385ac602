"""Peak memory while loading a model: `python -m benchmarks.load_memory MODEL_FOLDER ours|mlxlm`.

Prints the loaded parameters' size against the process's peak RSS and MLX's peak, so a loader
that holds a second copy of the weights (or of a layer's experts) shows up. Run one load per
process: peak RSS only ever grows. Figures: benchmarks/RESULTS.md, "Load memory".
"""

from __future__ import annotations

import resource
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten

LOADERS = ("ours", "mlxlm")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in LOADERS:
        print(f"usage: {__doc__.splitlines()[0].split('`')[1]}", file=sys.stderr)
        return 2
    path, loader = argv
    start = time.perf_counter()
    if loader == "ours":
        import mlx_mixtral

        model, _ = mlx_mixtral.load(path, progress=False)
    else:
        from mlx_lm import load

        model, _ = load(path)
    mx.eval(model.parameters())
    seconds = time.perf_counter() - start
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"{loader} {path}: weights in memory {weights / 1e9:.2f} GB, peak RSS {rss / 1e9:.2f} GB "
          f"({rss / weights:.2f}x), MLX peak {mx.get_peak_memory() / 1e9:.2f} GB, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
