"""Peak memory while loading a model: `python benchmarks/load_memory.py MODEL_FOLDER ours|mlxlm`.

Prints the loaded parameters' size against the process's peak RSS and MLX's peak, so a loader
that holds a second copy of the weights (or of a layer's experts) shows up. Run one load per
process: peak RSS only ever grows.
"""

import sys, resource, time
import mlx.core as mx
from mlx.utils import tree_flatten
if len(sys.argv) != 3 or sys.argv[2] not in ("ours", "mlxlm"):
    sys.exit(__doc__.splitlines()[0])
path, tool = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if tool == "ours":
    import mlx_mixtral
    model, _ = mlx_mixtral.load(path, progress=False)
else:
    from mlx_lm import load
    model, _ = load(path)
mx.eval(model.parameters())
size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"{tool} {path}: model in memory {size/1e9:.2f} GB, peak RSS {rss/1e9:.2f} GB, MLX peak {mx.get_peak_memory()/1e9:.2f} GB, {time.perf_counter()-t:.1f} s")
