"""How much each quantization choice moves a Mixtral's output, to pick the converter's defaults.

A random Mixtral (hidden 256, 4 layers, 8 experts top-2, the real 32000 vocabulary) is saved in
float32 and converted with `convert.convert` under one policy at a time, changing one kind of
weight at a time (router gate, embeddings, lm_head) on top of 4- and 8-bit experts and attention.
Each result is compared with the float32 model over random token sequences:

- KL(float || quantized) of the next-token distributions, mean over positions (nats);
- top-1 agreement: how often the most likely next token is the same;
- expert choices changed: how often a (token, layer)'s top-k expert set differs from float's.

Weights are drawn with raised std for the router and lm_head (see GAIN): with the usual
1 / sqrt(fan_in) a random model routes by coin toss and every measurement is noise. A random model
still overstates what a changed expert choice costs (its experts are unrelated functions), so the
figures rank the choices rather than predict Mixtral's own KL. Sizes are those of the real
Mixtral-8x7B under each policy (computed from shapes).

    python benchmarks/quant_quality.py [--seeds 3] [--sequences 4] [--length 64]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import mistral_common
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import SHAPES  # noqa: E402

from convert.convert import convert, nbytes, output_model, parameter_count  # noqa: E402
from convert.quant_policy import QuantPolicy, module_kind, quantizable_modules  # noqa: E402
from mlx_mixtral.config import ModelConfig  # noqa: E402
from mlx_mixtral.loading import load_model  # noqa: E402
from mlx_mixtral.model import Mixtral  # noqa: E402

CONFIG = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                     num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5)
# Weight std is GAIN[kind] / sqrt(fan_in). With 1 everywhere routing is a coin toss and the model
# is chaotic (bfloat16 rounding alone gives KL ~0.03); these give decisive routing (router logits
# std ~4), a peaked next-token distribution (entropy ~3.8 nats) and small residual updates, like a
# trained model: bfloat16 rounding then costs KL ~0.002.
GAIN = {"router": 4.0, "lm_head": 4.0, "embed": 1.0, "body": 0.5}
GROUP_SIZE = 64
F = None  # float


def variants(bits: int) -> list[tuple[str, dict]]:
    """(label, policy) pairs: one kind changed at a time on top of a float-everything-else base."""
    base = dict(bits=bits, router_bits=F, embed_bits=F, lm_head_bits=F)
    rows = [(f"{bits}-bit body; router, embed, lm_head float", base)]
    for kind in ("router_bits", "embed_bits", "lm_head_bits"):
        for b in (4, 8):
            rows.append((f"{bits}-bit body, {kind.removesuffix('_bits')} {b}-bit", {**base, kind: b}))
    rows.append((f"all {bits}-bit (what mlx-lm does)", dict(bits=bits, router_bits=bits, embed_bits=bits,
                                                             lm_head_bits=bits)))
    rows.append((f"{bits}-bit, our defaults", dict(bits=bits)))
    return rows


def random_model(folder: Path, seed: int) -> Path:
    """A float32 MLX folder holding a random `CONFIG` model with decisive routing."""
    mx.random.seed(seed)
    model = Mixtral(CONFIG)
    weights = {p: mx.random.uniform(0.5, 1.5, a.shape) if a.ndim == 1  # norms: not all-ones
               else mx.random.normal(a.shape) * GAIN[module_kind(p.removesuffix(".weight"))] / math.sqrt(a.shape[-1])
               for p, a in tree_flatten(model.parameters())}
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return folder


def run_model(model: nn.Module, tokens: mx.array) -> tuple[np.ndarray, list[np.ndarray]]:
    """Log-probabilities [B, L, V] and each layer's chosen expert sets [B, L, k] (sorted)."""
    chosen: list[mx.array] = []
    for layer in model.layers:
        moe = layer.block_sparse_moe
        gate = moe.gate

        def recording(x, gate=gate, k=moe.top_k):
            logits = gate(x)
            chosen.append(mx.sort(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k], axis=-1))
            return logits

        moe.gate = recording
    logits = model(tokens).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return np.array(logp), [np.array(c) for c in chosen]


def compare(ref: tuple, out: tuple) -> tuple[float, float, float]:
    """KL(ref || out) in nats, top-1 agreement, fraction of changed expert sets."""
    (lp_ref, experts_ref), (lp, experts) = ref, out
    kl = float((np.exp(lp_ref) * (lp_ref - lp)).sum(-1).mean())
    top1 = float((lp_ref.argmax(-1) == lp.argmax(-1)).mean())
    changed = float(np.mean([np.any(a != b, axis=-1).mean() for a, b in zip(experts_ref, experts)]))
    return kl, top1, changed


def real_size(policy: dict | None) -> tuple[float, float]:
    """GB and bits per weight of Mixtral-8x7B (bfloat16 scales/floats) under `policy`."""
    config = SHAPES["mixtral-8x7b"]
    plan = None
    if policy is not None:
        plan = QuantPolicy(group_size=GROUP_SIZE, **policy).plan(quantizable_modules(output_model(config)))
    size = nbytes(output_model(config, plan), mx.bfloat16)
    return size / 1e9, size * 8 / parameter_count(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()

    rows = [("bfloat16, no quantization", None)] + variants(4) + variants(8)
    results: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _ in rows}
    work = Path(tempfile.mkdtemp(prefix="quant_quality-"))
    try:
        for seed in range(args.seeds):
            src = random_model(work / f"src-{seed}", seed)
            tokens = mx.array(np.random.default_rng(seed).integers(3, CONFIG.vocab_size, (args.sequences, args.length)))
            model = load_model(src, progress=False)
            router = model.layers[0].block_sparse_moe.gate(mx.random.normal((256, CONFIG.hidden_size)))
            print(f"seed {seed}: router logit std on unit inputs {np.std(np.array(router)):.2f}", file=sys.stderr)
            ref = run_model(model, tokens)
            entropy = float(-(np.exp(ref[0]) * ref[0]).sum(-1).mean())
            print(f"seed {seed}: next-token entropy {entropy:.2f} nats", file=sys.stderr)
            for i, (label, policy) in enumerate(rows):
                dst = work / f"out-{seed}-{i}"
                convert(src, dst, quantize=policy is not None, dtype="bfloat16", group_size=GROUP_SIZE,
                        progress=False, **(policy or {}))
                results[label].append(compare(ref, run_model(load_model(dst, progress=False), tokens)))
                shutil.rmtree(dst)
                print(f"seed {seed} {label.strip()}: KL {results[label][-1][0]:.4f}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"| policy (group size {GROUP_SIZE}, bf16 scales) | KL (nats) | top-1 agree | expert sets changed "
          "| Mixtral-8x7B size | bits/weight |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, policy in rows:
        kl, top1, changed = np.mean(results[label], axis=0)
        gb, bpw = real_size(policy)
        print(f"| {label} | {kl:.4f} | {top1:.1%} | {changed:.1%} | {gb:.2f} GB | {bpw:.2f} |")


if __name__ == "__main__":
    main()
