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

`--trained` measures on the model `benchmarks/train_small.py` trained instead (real text, real
routing): the same figures plus held-out perplexity, over its held-out windows, for more bit
widths and for mixed recipes (attention at more bits than the experts). It first checks the
yardstick: the float32 checkpoint converted and loaded by us must give transformers' perplexity.

    python -m benchmarks.quant_quality [--seeds 3] [--sequences 4] [--length 64]
    python -m benchmarks.quant_quality --trained [--windows 16]    # ~20 min on 2 cores
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

from benchmarks import train_small
from benchmarks.synthetic import SHAPES
from convert.convert import convert, nbytes, output_model, parameter_count
from convert.quant_policy import QuantPolicy, module_kind, quantizable_modules
from mlx_mixtral.config import ModelConfig
from mlx_mixtral.loading import load_model
from mlx_mixtral.model import Mixtral

CONFIG = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=896, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8,
                     num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5)
# Weight std is GAIN[kind] / sqrt(fan_in). With 1 everywhere routing is a coin toss and the model
# is chaotic (bfloat16 rounding alone gives KL ~0.03); these give decisive routing (router logits
# std ~4), a peaked next-token distribution (entropy ~3.8 nats) and small residual updates, like a
# trained model: bfloat16 rounding then costs KL ~0.002.
GAIN = {"router": 4.0, "lm_head": 4.0, "embed": 1.0, "attention": 0.5, "body": 0.5}
GROUP_SIZE = 64
F = None  # float
CHUNK = 8  # held-out windows per forward pass with --trained


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


def random_model(folder: Path, seed: int, config: ModelConfig = CONFIG) -> Path:
    """A float32 MLX folder holding a random `config` model with decisive routing."""
    mx.random.seed(seed)
    model = Mixtral(config)
    weights = {p: mx.random.uniform(0.5, 1.5, a.shape) if a.ndim == 1  # norms: not all-ones
               else mx.random.normal(a.shape) * GAIN[module_kind(p.removesuffix(".weight"))] / math.sqrt(a.shape[-1])
               for p, a in tree_flatten(model.parameters())}
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return folder


def run_model(model: nn.Module, tokens: mx.array) -> tuple[np.ndarray, list[np.ndarray]]:
    """Log-probabilities [B, L, V] and each layer's chosen expert sets [B, L, k] (sorted)."""
    chosen: list[mx.array] = []
    gates = [layer.block_sparse_moe.gate for layer in model.layers]
    for layer, gate in zip(model.layers, gates):
        moe = layer.block_sparse_moe

        def recording(x, gate=gate, k=moe.top_k):
            logits = gate(x)
            chosen.append(mx.sort(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k], axis=-1))
            return logits

        moe.gate = recording
    try:
        logits = model(tokens).astype(mx.float32)
    finally:
        for layer, gate in zip(model.layers, gates):
            layer.block_sparse_moe.gate = gate
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


def trained_rows() -> list[tuple[str, dict | None]]:
    """The random model's rows, the other bit widths, and mixed recipes (attention finer than experts)."""
    rows = [("bfloat16, no quantization", None)] + variants(8) + variants(4)
    for bits in (6, 5, 3, 2):
        rows += [(f"all {bits}-bit (what mlx-lm does)", dict(bits=bits, router_bits=bits, embed_bits=bits,
                                                              lm_head_bits=bits)),
                 (f"{bits}-bit, our defaults", dict(bits=bits))]
    for bits, attention in ((4, 6), (4, 8), (3, 4), (3, 6), (2, 4)):
        rows.append((f"experts {bits}-bit, attention {attention}-bit, our defaults",
                     dict(bits=bits, attention_bits=attention)))
    return rows


def perplexity(logps: list[np.ndarray], windows: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of each window's next tokens, from per-chunk log-probabilities."""
    targets = [windows[i:i + CHUNK, 1:, None] for i in range(0, len(windows), CHUNK)]
    nll = np.concatenate([-np.take_along_axis(lp, t, -1).ravel() for lp, t in zip(logps, targets)])
    return float(np.exp(nll.astype(np.float64).mean()))


def evaluate(model: nn.Module, windows: np.ndarray, ref: list | None = None) -> tuple[dict, list]:
    """Held-out perplexity of `model` on `windows` [N, L + 1] and, against `ref` (the float model's
    chunks from an earlier call), KL, top-1 agreement and expert sets changed. Run in chunks of
    CHUNK windows so the graph of one forward pass stays small."""
    chunks, logps, stats = [], [], []
    for n, i in enumerate(range(0, len(windows), CHUNK)):
        out = run_model(model, mx.array(windows[i:i + CHUNK, :-1]))
        logps.append(out[0])
        if ref is None:
            chunks.append(out)
        else:
            stats.append(compare(ref[n], out))
    result = {"perplexity": perplexity(logps, windows)}
    if stats:
        result.update(zip(("kl", "top1", "changed"), np.mean(stats, axis=0)))
    return result, chunks


def transformers_logp(folder: Path, windows: np.ndarray) -> list[np.ndarray]:
    """transformers' float32 log-probabilities of the checkpoint, in `evaluate`'s chunks."""
    import torch
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.from_numpy(windows[i:i + CHUNK, :-1])).logits, -1).numpy()
                for i in range(0, len(windows), CHUNK)]


def main_trained(out: Path, count: int, length: int) -> None:
    """Every policy on the model `train_small.py` trained, scored on its held-out text."""
    src = out / "float32"
    if not (src / "model.safetensors").is_file():
        raise SystemExit(f"error: {src} has no trained model; run python -m benchmarks.train_small first")
    windows = train_small.eval_windows(np.load(out / "corpus" / "heldout.npy"), length, count)
    work = Path(tempfile.mkdtemp(prefix="quant_quality-"))
    rows = trained_rows()
    results = {}
    try:
        convert(src, work / "float32", dtype="float32", progress=False)
        ours, ref = evaluate(load_model(work / "float32", progress=False), windows)
        theirs = transformers_logp(src, windows)
        hf_ppl = perplexity(theirs, windows)
        gap = max(float(np.abs(lp - r[0]).max()) for lp, r in zip(theirs, ref))
        del theirs
        print(f"cross-check on {windows.size - len(windows)} held-out tokens of {src}: perplexity "
              f"transformers {hf_ppl:.4f}, mlx_mixtral (converted float32) {ours['perplexity']:.4f}; "
              f"largest log-probability difference {gap:.2e}", file=sys.stderr)
        for i, (label, policy) in enumerate(rows):
            dst = work / f"out-{i}"
            convert(src, dst, quantize=policy is not None, dtype="bfloat16", group_size=GROUP_SIZE,
                    progress=False, **(policy or {}))
            results[label], _ = evaluate(load_model(dst, progress=False), windows, ref)
            shutil.rmtree(dst)
            print(f"{label}: {results[label]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"Trained model {src}, {windows.size - len(windows)} held-out tokens ({count} windows of {length}); "
          f"float32 perplexity {ours['perplexity']:.3f} (transformers {hf_ppl:.3f}, largest log-prob "
          f"difference {gap:.1e})\n")
    print(f"| policy (group size {GROUP_SIZE}, bf16 scales) | held-out ppl | KL (nats) | top-1 agree "
          "| expert sets changed | Mixtral-8x7B size | bits/weight |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, policy in rows:
        r = results[label]
        gb, bpw = real_size(policy)
        print(f"| {label} | {r['perplexity']:.3f} | {r['kl']:.4f} | {r['top1']:.1%} | {r['changed']:.1%} "
              f"| {gb:.2f} GB | {bpw:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", nargs="?", type=Path, const=train_small.DEFAULT_OUT, default=None, metavar="DIR",
                        help=f"measure on the model train_small.py trained (default folder {train_small.DEFAULT_OUT})")
    parser.add_argument("--windows", type=int, default=16, help="with --trained: held-out windows scored")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=None,
                        help="tokens per sequence (default: 64 random, 256 with --trained)")
    args = parser.parse_args()
    if args.trained is not None:
        return main_trained(args.trained, args.windows, args.length or 256)
    args.length = args.length or 64

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
